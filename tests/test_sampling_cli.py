"""``python -m fair_calib_ext.sample`` on a tiny checkpoint with a word-level tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fair_calib_ext import sample
from fair_calib_ext.models.testing import tiny_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _write_tokenizer(path: Path, chat: bool = False) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<|bos|>", "<|eos|>", "<|eot_id|>"] + [f"w{i}" for i in range(4, 95)] + ["<|mdm_mask|>"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<|bos|>", "<|eos|>", "<|eot_id|>", "<|mdm_mask|>"])
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
           "pad_token": "<|eos|>", "unk_token": "<unk>", "model_max_length": 256}
    if chat:
        cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}w5 {{ m['content'] }} <|eot_id|> {% endfor %}"
                                "{% if add_generation_prompt %}w6 {% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory.mktemp("llada") / "m", "llada", seed=3)
    _write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def dream_ckpt(tmp_path_factory):
    path = tiny_checkpoint(tmp_path_factory.mktemp("dream") / "m", "dream", seed=3)
    _write_tokenizer(path, chat=True)
    return path


def test_generates_and_reports_speed(ckpt, capsys):
    rc = sample.main(["--model", str(ckpt), "--prompt", "w7 w8 w9", "--prompt", "w10",
                      "--gen-length", "8", "--steps", "4", "--block-length", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count(">>> ") == 2 and ">>> w7 w8 w9" in out
    assert "16 tokens, 4 steps" in out and "tokens/s" in out and "steps/s" in out


def test_same_seed_same_text(ckpt, capsys):
    argv = ["--model", str(ckpt), "--prompt", "w7", "--gen-length", "8", "--temperature", "1.0",
            "--remasking", "random", "--seed", "5"]
    sample.main(argv)
    a = capsys.readouterr().out.split("[")[0]
    sample.main(argv)
    b = capsys.readouterr().out.split("[")[0]
    assert a == b


def test_dream_chat_and_show_steps(dream_ckpt, capsys):
    rc = sample.main(["--model", str(dream_ckpt), "--chat", "--prompt", "w11 w12", "--gen-length", "6",
                      "--show-steps", "--top-k", "10", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "[step 1]" in out and "░" in out  # first frame still has masks
    assert "bfloat16" in out


@pytest.mark.parametrize("argv,match", [
    (["--gen-length", "10", "--block-length", "4"], "divisible by --block-length"),
    (["--gen-length", "8", "--block-length", "4", "--steps", "3"], "divisible by the number of blocks"),
    (["--gen-length", "8", "--prompt", " ".join(["w9"] * 300)], "exceeds the model's context"),
    (["--gen-length", "8", "--chat"], "no chat template"),
    (["--gen-length", "8", "--remasking", "bogus"], "remasking must be one of"),
    (["--gen-length", "8", "--threshold", "1.5"], "--threshold must be a finite number in (0.0, 1.0]"),
    (["--gen-length", "8", "--threshold", "0"], "--threshold must be a finite number in (0.0, 1.0]"),
    (["--gen-length", "8", "--cache", "dual", "--remasking", "margin"], "--remasking must be low_confidence or random"),
    (["--gen-length", "8", "--cache", "dual", "--cfg-scale", "1"], "--cfg-scale does not apply"),
])
def test_bad_input_one_line_exit_2(ckpt, capsys, argv, match):
    if "--prompt" not in argv:
        argv = argv + ["--prompt", "w7"]
    rc = sample.main(["--model", str(ckpt)] + argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and match in err


def test_fast_decoding_reports_nfe(ckpt, capsys):
    """--cache/--threshold run Fast-dLLM decoding; the summary names the NFE, which is what the
    library call with the same settings counts."""
    from fair_calib_ext.models import load_pretrained
    from fair_calib_ext.sampling import DecodeStats, generate

    rc = sample.main(["--model", str(ckpt), "--prompt", "w7 w8 w9", "--gen-length", "8", "--steps", "8",
                      "--block-length", "4", "--cache", "dual", "--threshold", "0.3", "--no-stop-at-eos"])
    out = capsys.readouterr().out
    assert rc == 0 and "tokens/s" in out and "cache dual, threshold 0.3" in out
    st = DecodeStats()
    generate(load_pretrained(ckpt), torch.tensor([[7, 8, 9]]), gen_length=8, steps=8, block_length=4, cache="dual",
             threshold=0.3, stats=st)
    assert f"NFE {st.nfe};" in out and st.nfe < 8  # parallel commits saved forwards
    assert sample.main(["--model", str(ckpt), "--prompt", "w7", "--gen-length", "8", "--cache", "none"]) == 0
    assert "NFE 8;" in capsys.readouterr().out  # none: the default sampler, one forward per step


def test_fast_decoding_dream_needs_blocks(dream_ckpt, capsys):
    assert sample.main(["--model", str(dream_ckpt), "--prompt", "w7", "--gen-length", "8", "--cache", "prefix"]) == 2
    assert "need --block-length" in capsys.readouterr().err
    rc = sample.main(["--model", str(dream_ckpt), "--prompt", "w7", "--gen-length", "8", "--block-length", "4",
                      "--cache", "prefix", "--top-k", "10"])
    assert rc == 0 and "cache prefix, threshold None" in capsys.readouterr().out


def test_missing_model_dir(tmp_path, capsys):
    assert sample.main(["--model", str(tmp_path / "nope"), "--prompt", "w7"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and err.count("\n") == 1


def test_default_model_message(monkeypatch, capsys):
    monkeypatch.setattr("fair_calib_ext.models.available_embedded", lambda: [])
    assert sample.main(["--prompt", "hello"]) == 2
    assert "tiny-llada" in capsys.readouterr().err


def test_module_entry_point_exit_status(ckpt):
    """The real ``python -m`` entry point turns bad input into exit status 2 and one line."""
    env = dict(os.environ, PYTHONPATH=str(Path(sample.__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "fair_calib_ext.sample", "--model", str(ckpt), "--prompt", "w7",
                          "--gen-length", "5", "--block-length", "2"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert res.stdout == ""


@pytest.mark.skipif("tiny-llada" not in __import__("fair_calib_ext.models", fromlist=["x"]).available_embedded(),
                    reason="embedded tiny-llada not built")
def test_default_embedded_model(capsys):
    """Without --model the embedded tiny-llada runs with its generation_config.json defaults."""
    assert sample.main(["--prompt", "Q: sort 7 3 9 1 4 A:"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(">>> Q: sort 7 3 9 1 4 A:\n") and "llada, float32, cpu" in out


def test_default_prompts_answered_correctly(capsys):
    """The README's first command (no arguments) shows the embedded model getting its demo prompts
    right; the expected answers are computed here, independently of the model and the suite."""
    assert sample.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = {"Q: sort 7 3 9 1 4 A:": " " + " ".join(sorted("73914")),
                "Q: reverse cat dog sun A:": " sun dog cat",
                "Q: 482+937=? A:": f" {482 + 937}"}
    assert set(sample.DEFAULT_PROMPTS) == set(expected)
    for p, want in expected.items():
        i = lines.index(f">>> {p}")
        assert lines[i + 1] == want, (p, lines[i + 1])


def test_quantized_dir(ckpt, tmp_path, capsys):
    """--quantized DIR: a save_quantized directory loads through load_pretrained and samples."""
    calib = pytest.importorskip("fair_calib_ext.calib")
    if getattr(__import__("fair_calib_ext"), "_C", None) is None:
        pytest.skip("W4A4 kernels not built")
    from fair_calib_ext.models import load_pretrained

    qmodel = calib.calibrate(load_pretrained(ckpt), "rtn", torch.randint(4, 90, (2, 16)), progress=False)
    calib.save_quantized(qmodel, tmp_path / "q", tokenizer_from=ckpt)
    rc = sample.main(["--quantized", str(tmp_path / "q"), "--prompt", "w7 w8", "--gen-length", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and "W4A4" in out and "tokens/s" in out
