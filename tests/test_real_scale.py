"""Real scale: full-width LLaDA-8B- and Dream-7B-shaped checkpoints (2 blocks, random bf16
weights, official layout) through calibrate, save, load and sample, in bounded memory.

Each CLI runs in a fresh process whose peak RSS is read from ``getrusage``. Full width is what
matters: a 2-block model of these shapes is 2.9 / 3.1 GB in bf16 and 5.9 / 6.2 GB in fp32, so a
run that materializes the whole model in fp32 (what ``calibrate`` did before the blocks were
streamed, and what killed it on a real 8B checkpoint) exceeds the bounds below, while the
streamed engine (embeddings and head as stored, one fp32 block at a time) stays well inside.
Memory bounds, never timings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

import fair_calib_ext
from fair_calib_ext.calib import budget
from fair_calib_ext.models.shaped import shaped_config, write_shaped_checkpoint

PKG_PARENT = str(Path(fair_calib_ext.__file__).resolve().parents[1])
SHAPES = {"llada": "llada-8b", "dream": "dream-7b"}
GB = 1e9

# run a module's __main__ and report this process's peak RSS on the last stderr line
_PEAK = """
import resource, runpy, sys
mod = sys.argv[1]; sys.argv = [mod] + sys.argv[2:]
rc = 0
try:
    if mod.startswith("runpy_path:"):
        runpy.run_path(mod.split(":", 1)[1], run_name="__main__")
    else:
        runpy.run_module(mod, run_name="__main__", alter_sys=True)
except SystemExit as e:
    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
sys.stderr.write("\\nPEAK_RSS_BYTES %d\\n" % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
sys.exit(rc)
"""


def _run(tmp: Path, module: str, *args: str) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=PKG_PARENT, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    p = subprocess.run([sys.executable, "-c", _PEAK, module, *args], cwd=tmp, env=env, capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode == 0, f"{module} {' '.join(args)} failed:\n{p.stderr[-4000:]}"
    peak = int(re.findall(r"PEAK_RSS_BYTES (\d+)", p.stderr)[-1])
    return peak, p.stdout


def _param_bytes(family: str, itemsize: int) -> int:
    c = shaped_config(SHAPES[family], 2)
    s = budget._shapes(c)
    return (s["layers"] * s["block"] + s["heads"]) * itemsize


@pytest.fixture(scope="module")
def shaped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("shaped")
    yield {fam: write_shaped_checkpoint(root / fam, shape, layers=2, shard_bytes=1 << 30)
           for fam, shape in SHAPES.items()}
    shutil.rmtree(root, ignore_errors=True)  # 6 GB: pytest keeps its last three base temps


@pytest.fixture
def out(tmp_path: Path) -> Iterator[Path]:
    """A quantized output dir (~2.5 GB), removed after the test."""
    yield tmp_path / "q"
    shutil.rmtree(tmp_path / "q", ignore_errors=True)


def test_shaped_checkpoint_has_the_official_layout(shaped: dict[str, Path]) -> None:
    from fair_calib_ext.models import load_tokenizer, read_config
    from fair_calib_ext.models.weights import CheckpointTensors

    for fam, path in shaped.items():
        raw = read_config(path)
        assert raw["model_type"] == {"llada": "llada", "dream": "Dream"}[fam]
        idx = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(idx["weight_map"].values())) >= 2  # really sharded
        t = CheckpointTensors(path)
        if fam == "llada":
            assert t.shape("model.transformer.wte.weight") == (126464, 4096)
            assert t.shape("model.transformer.blocks.1.ff_out.weight") == (4096, 12288)
        else:
            assert t.shape("model.embed_tokens.weight") == (152064, 3584)
            assert t.shape("model.layers.1.self_attn.k_proj.bias") == (512,)
        assert {t.dtype(n) for n in t.names()} == {torch.bfloat16}
        tok = load_tokenizer(path)
        c = shaped_config(SHAPES[fam], 2)
        mask = tok.convert_ids_to_tokens(c.mask_token_id)
        assert mask == {"llada": "<|mdm_mask|>", "dream": "<|mask|>"}[fam]
        assert tok.convert_tokens_to_ids(tok.eos_token) == c.eos_token_id
        assert len(tok("Q: 12 + 7 = ? A:")["input_ids"]) > 3


# quarot+gptq on LLaDA only: at full width GPTQ's column loop costs ~70 s a block, and what is
# family-specific in QuaRot (Dream's q/k/v bias, GQA) is covered exactly on the tiny models
@pytest.mark.parametrize("family,method", [("llada", "rtn"), ("dream", "rtn"), ("llada", "quarot+gptq")])
def test_calibrate_streams_blocks_and_never_holds_the_fp32_model(
        shaped: dict[str, Path], tmp_path: Path, out: Path, family: str, method: str) -> None:
    extra = ["--w-clip-search", "off"] if "gptq" in method else []  # the 81-point search is minutes per block
    peak, _ = _run(tmp_path, "fair_calib_ext.calibrate", "--model", str(shaped[family]), "--method", method,
                   "--nsamples", "4", "--seqlen", "64", "--out", str(out), "--no-progress", *extra)
    if method == "rtn":
        bound, what = _param_bytes(family, 4), "the whole model in fp32"
    else:  # QuaRot rewrites embeddings and head (2 GB here) and GPTQ holds a 12288² fp64 Hessian,
        # so at two blocks the honest bound is the run's own estimate (fp32 materialization adds 3 GB)
        c = shaped_config(SHAPES[family], 2)
        _, s2 = budget.calibration_budget(c, stored_itemsize=2, method="quarot", weight_quant="gptq", nsamples=4,
                                          seqlen=64, act_itemsize=4, batch_size=4, probe_itemsize=None,
                                          probe_noise=False, probe_batch=8, probe_len=80)
        bound, what = s2.total, f"the Stage II estimate ({s2.describe()})"
    assert peak < bound, f"peak RSS {peak / GB:.2f} GB >= {bound / GB:.2f} GB, {what}"
    _check_quantized_and_sample(out, tmp_path, family, method)
    if method == "rtn" and family == "llada":  # the larger vocabulary; the code paths are shared
        _check_evaluate_and_lm_eval(shaped[family], out, tmp_path, family)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_calibrate_fair_fits_its_budget(shaped: dict[str, Path], tmp_path: Path, out: Path, family: str) -> None:
    """FAIR-Calib end to end (Stage I probe with the noise-aware RTN student, Stage II training),
    tiny budgets: the peak stays under the run's own Stage II estimate, which is what the
    refusal compares with the machine's memory."""
    from fair_calib_ext.calib.methods import MethodConfig

    args = ["--model", str(shaped[family]), "--method", "fair", "--nsamples", "2", "--seqlen", "32",
            "--epochs", "1", "--n-probe", "2", "--probe-gen-length", "4", "--probe-batch-size", "2",
            "--probe-dtype", "bf16", "--out", str(out), "--no-progress"]
    peak, _ = _run(tmp_path, "fair_calib_ext.calibrate", *args)
    c = shaped_config(SHAPES[family], 2)
    s1, s2 = budget.calibration_budget(
        c, stored_itemsize=2, method="fair", weight_quant=MethodConfig(method="fair").weight_quant, nsamples=2,
        seqlen=32, act_itemsize=4, batch_size=4, probe_itemsize=2, probe_noise=True, probe_batch=2,
        probe_len=4 + 64)
    bound = max(s1.total + sum(s1.mapped.values()), s2.total)
    assert peak < bound, f"peak RSS {peak / GB:.2f} GB above the estimate {bound / GB:.2f} GB ({s2.describe()})"
    _check_quantized_and_sample(out, tmp_path, family, "fair")


def _check_quantized_and_sample(out: Path, tmp: Path, family: str, method: str) -> None:
    from fair_calib_ext.models.weights import CheckpointTensors

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["method"] == method
    t = CheckpointTensors(out)
    packed = [n for n in t.names() if n.endswith("weight_packed")]
    assert len(packed) == 2 * 7  # 7 linears per block, all int4
    assert all(t.dtype(n) == torch.uint8 for n in packed)
    assert t.dtype("embed_tokens.weight") == torch.bfloat16  # kept as stored, never widened
    peak, stdout = _run(tmp, "fair_calib_ext.sample", "--quantized", str(out), "--dtype", "bfloat16",
                        "--prompt", "Q: 12 + 7 = ? A:", "--gen-length", "4", "--steps", "2", "--block-length", "4")
    assert stdout.strip(), "sample printed nothing"
    # one int4 copy of the blocks: the quantized model holds its embeddings and head as stored
    # plus int4 blocks, far below the bf16 model it came from plus one fp32 block
    bf16 = _param_bytes(family, 2)
    assert peak < bf16, f"sample --quantized peak RSS {peak / GB:.2f} GB >= the bf16 model {bf16 / GB:.2f} GB"


_LM_EVAL = """
import sys
from lm_eval.api.instance import Instance
from fair_calib_ext.eval.lm_eval_adapter import FairDLLM
lm = FairDLLM(pretrained=sys.argv[1], dtype="bfloat16", device="cpu", mc_num="2", batch_size="2", gen_length="4",
              steps="2", block_length="4")
ll = lm.loglikelihood([Instance("loglikelihood", {}, ("Q: 2 + 3 = ? A:", " 5"), 0)], disable_tqdm=True)
gen = lm.generate_until([Instance("generate_until", {}, ("Q: 2 + 3 = ? A:", {"until": ["Q:"]}), 0)],
                        disable_tqdm=True)
print("LL", ll[0][0], "GEN", repr(gen[0]))
"""


def _check_evaluate_and_lm_eval(model: Path, out: Path, tmp: Path, family: str) -> None:
    """``evaluate --quantized`` (tasks, perplexity, mechanism metrics, small n) and the lm-eval
    adapter run on the full-width quantized model next to its bf16 teacher."""
    ev = tmp / "eval"
    peak, stdout = _run(tmp, "fair_calib_ext.evaluate", "--model", str(model), "--quantized", str(out),
                        "--dtype", "bfloat16", "--tasks", "add", "ppl", "metrics", "--n", "2", "--n-ppl", "2",
                        "--n-metrics", "2", "--mc-num", "2", "--batch-size", "2", "--gen-length", "4", "--steps",
                        "4", "--block-length", "4", "--out", str(ev), "--no-progress", "--device", "cpu")
    rows = json.loads((ev / "results.json").read_text())["models"]
    assert [r["label"] for r in rows] == ["FP", "q"] and rows[1]["kernel_path"] == "kernels"
    assert "metrics" in rows[1] and "ppl" in json.dumps(rows[1])
    # the bf16 teacher and the int4 model side by side stay below the model in fp32
    fp32 = _param_bytes(family, 4)
    assert peak < fp32, f"evaluate --quantized peak RSS {peak / GB:.2f} GB >= the fp32 model {fp32 / GB:.2f} GB"
    script = tmp / "lm_eval_check.py"
    script.write_text(_LM_EVAL)
    peak, stdout = _run(tmp, "runpy_path:" + str(script), str(out))
    assert "LL " in stdout and "GEN " in stdout, stdout
    bf16 = _param_bytes(family, 2)
    assert peak < bf16, f"lm-eval adapter peak RSS {peak / GB:.2f} GB >= the bf16 model {bf16 / GB:.2f} GB"


@pytest.mark.parametrize("what,patch,needle", [
    ("memory", "available_memory", "needs about"),
    ("disk", "free_disk", "of disk"),
])
def test_calibrate_refuses_a_run_that_cannot_fit_before_reading_weights(
        shaped: dict[str, Path], tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], what: str, patch: str, needle: str) -> None:
    """The estimate comes from the config and shard headers; a machine with 3 GiB free (or a disk
    with 1 GiB free) is refused with the numbers, in one line, and nothing is written."""
    from fair_calib_ext import calibrate as calibrate_cli
    from fair_calib_ext.models import weights

    monkeypatch.setattr(budget, patch, lambda *a: 3 << 30 if what == "memory" else 1 << 30)
    reads: list[str] = []
    monkeypatch.setattr(weights.CheckpointTensors, "read_many", lambda self, ns, *a, **k: reads.extend(ns))
    rc = calibrate_cli.main(["--model", str(shaped["llada"]), "--method", "rtn", "--nsamples", "4", "--seqlen", "64",
                             "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err and "GiB" in err, err
    assert not reads, "weights were read before the refusal"
    assert not out.exists() and not out.with_name("q.run").exists()
