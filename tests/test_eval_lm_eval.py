"""The lm-eval adapter on a local custom task (YAML + jsonl written here; nothing downloaded)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval not installed (optional extra: pip install '.[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

from fair_calib_ext.eval.likelihood import mc_elbo_nll  # noqa: E402
from fair_calib_ext.eval.lm_eval_adapter import FairDLLM, _request_seed, register  # noqa: E402
from fair_calib_ext.models.testing import tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    ids = dict(vocab_size=768, mask_token_id=2, eos_token_id=1, pad_token_id=0, bos_token_id=3)
    path = tiny_checkpoint(root / "fp", "llada", seed=0, init_std=0.2, **ids)
    spec = importlib.util.spec_from_file_location("tiny_tokenizer", REPO / "python" / "tiny_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.save_tokenizer(path)
    return path


def _lm(ckpt, **kw):
    return FairDLLM(pretrained=str(ckpt), device="cpu", mc_num="8", batch_size="8", gen_length="8", steps="8", **kw)


def _inst(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i, metadata=("t", i, 1))


def test_loglikelihood_is_the_mc_elbo_with_request_seeded_masks(ckpt):
    lm = _lm(ckpt)
    reqs = [_inst("loglikelihood", ("Q: 2+3=? A:", " 5")), _inst("loglikelihood", ("Q: sort 3 1 A:", " 1 3"), 1)]
    out = lm.loglikelihood(reqs, disable_tqdm=True)
    assert all(g is False for _, g in out)
    ctx = lm._encode("Q: 2+3=? A:")
    tgt = lm._encode("Q: 2+3=? A: 5")[len(ctx):]
    ref = mc_elbo_nll(lm.model, ctx, tgt, mc_num=8, batch_size=8, generator=_request_seed(0, "Q: 2+3=? A:", " 5"))
    assert out[0][0] == pytest.approx(-ref, rel=1e-6)
    # order-independent: the same request alone gives the same value (common random numbers)
    assert lm.loglikelihood(reqs[1:], disable_tqdm=True)[0][0] == pytest.approx(out[1][0], rel=1e-6)
    # trailing context spaces move into the continuation
    assert lm._encode_pair("Q: 2+3=? A: ", "5") == lm._encode_pair("Q: 2+3=? A:", " 5")


def test_rolling_and_generate_until(ckpt):
    lm = _lm(ckpt)
    roll = lm.loglikelihood_rolling([_inst("loglikelihood_rolling", ("Q: 2+3=? A: 5",))], disable_tqdm=True)
    assert roll[0] < 0
    gen = lm.generate_until([_inst("generate_until", ("Q: 2+3=? A:", {"until": ["A"], "max_gen_toks": 8}))],
                            disable_tqdm=True)
    assert isinstance(gen[0], str) and "A" not in gen[0]


def test_fast_decoding_model_args(ckpt):
    lm = _lm(ckpt, cache="dual", threshold="0.5", block_length="4")
    assert lm.gen_kwargs["cache"] == "dual" and lm.gen_kwargs["threshold"] == 0.5
    gen = lm.generate_until([_inst("generate_until", ("Q: 2+3=? A:", {"until": ["A"], "max_gen_toks": 8}))],
                            disable_tqdm=True)
    assert isinstance(gen[0], str)
    assert "cache" not in _lm(ckpt, cache="none").gen_kwargs
    with pytest.raises(ValueError, match="--threshold must be in"):
        _lm(ckpt, threshold="2")
    with pytest.raises(ValueError, match="--cache must be one of"):
        _lm(ckpt, cache="triple")


def test_unknown_model_args_are_rejected(ckpt):
    with pytest.raises(ValueError, match="unknown model_args"):
        _lm(ckpt, typo_arg="1")


@pytest.mark.parametrize("kw,match", [
    ({"mc_num": "0"}, r"mc_num must be an integer in \[1, 4096\], got 0"),
    ({"mc_num": "abc"}, "mc_num must be an integer, got 'abc'"),
    ({"seed": "-5"}, "seed must be an integer in"),
    ({"batch_size": "0"}, "batch_size must be an integer in"),
    ({"max_length": "100000000"}, r"max_length must be an integer in \[1, 256\]"),
    ({"steps": "1000000"}, "steps must be an integer in"),
])
def test_bad_model_args_name_the_argument(ckpt, kw, match):
    args = {"pretrained": str(ckpt), "device": "cpu", "mc_num": "8", "batch_size": "8", "gen_length": "8", **kw}
    with pytest.raises(ValueError, match=match):
        FairDLLM(**args)


def test_simple_evaluate_on_a_local_task(ckpt, tmp_path):
    data = tmp_path / "mc.jsonl"
    rows = [{"q": f"Q: {a}+{b}=? A:", "choices": [f" {a + b}", f" {a + b + 1}"], "label": 0}
            for a, b in [(1, 2), (3, 4), (2, 2)]]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    register()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    res = simple_evaluate(
        model="fair_dllm",
        model_args=f"pretrained={ckpt},mc_num=4,batch_size=4,device=cpu",
        tasks=["tiny_mc"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=False,
        bootstrap_iters=0,
    )
    acc = res["results"]["tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
