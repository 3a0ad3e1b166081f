"""`python -m fair_calib_ext.evaluate` end to end on tiny random checkpoints (in-process and a
2-rank torchrun on CPU), plus the error path."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fair_calib_ext.evaluate import main
from fair_calib_ext.models.testing import tiny_checkpoint
import fair_calib_ext
# Subprocesses import the same fair_calib_ext as this process: the installed package in CI,
# the source tree (with its in-place build) in a developer checkout.
PKG_PARENT = str(Path(fair_calib_ext.__file__).resolve().parents[1])


REPO = Path(__file__).resolve().parent.parent


def _save_tokenizer(path: Path) -> None:
    spec = importlib.util.spec_from_file_location("tiny_tokenizer", REPO / "python" / "tiny_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.save_tokenizer(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    ids = dict(vocab_size=768, mask_token_id=2, eos_token_id=1, pad_token_id=0, bos_token_id=3)
    fp = tiny_checkpoint(root / "fp", "llada", seed=0, init_std=0.2, **ids)
    # --quantized takes save_quantized dirs only: an RTN W4A4 copy of a second random model
    from fair_calib_ext.calib import calibrate, save_quantized
    from fair_calib_ext.models import load_pretrained

    m = load_pretrained(tiny_checkpoint(root / "other_fp", "llada", seed=5, init_std=0.2, **ids))
    calibrate(m, "rtn", torch.randint(4, 700, (2, 16), generator=torch.Generator().manual_seed(0)), progress=False)
    other = save_quantized(m, root / "other")
    _save_tokenizer(fp)
    return fp, other


ARGS = ["--tasks", "add", "sort", "ppl", "metrics", "--n-per-task", "3", "--n-metrics", "4", "--mc-num", "4",
        "--gen-length", "8", "--steps", "8", "--batch-size", "4", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def single_run(ckpts, tmp_path_factory):
    fp, other = ckpts
    out = tmp_path_factory.mktemp("eval") / "one"
    rc = main(["--model", str(fp), "--quantized", str(other), "--labels", "OTHER", "--out", str(out), *ARGS,
               "--n", "3"])
    assert rc == 0
    return out


def test_cli_writes_results_table_and_plots(single_run):
    out = single_run
    table = (out / "results.md").read_text()
    assert "| FP |" in table and "| OTHER |" in table and "flip %" in table
    res = json.loads((out / "results.json").read_text())
    fp_row, q_row = res["models"]
    assert set(fp_row["tasks"]["per_task"]) == {"add", "sort"}
    assert fp_row["tasks"]["per_task"]["add"]["n"] == 3
    assert fp_row["metrics"]["flips"]["rate"] == 0.0  # the teacher never flips against itself
    assert q_row["metrics"]["flips"]["n_commits"] == 4 * 8
    assert fp_row["ppl"]["n_texts"] == 3 and fp_row["ppl"]["ppl"] > 1
    assert (out / "lag_ccdf.png").stat().st_size > 0 and (out / "flips_by_decile.png").is_file()
    assert str(out / "lag_ccdf.png") in res["plots"]
    # which int4 path ran is recorded (the fake-quant reference when _C did not load)
    assert res["kernels"]["kernel_path"] == ("kernels" if fair_calib_ext._C is not None else "reference")
    assert q_row["kernel_path"] in ("kernels", "reference", "mixed", "none") and "kernel_path" not in fp_row
    assert (out / "step_mse_aligned.png").is_file()


def test_cli_errors_are_one_line_exit_2(ckpts, tmp_path, capsys):
    fp, _ = ckpts
    assert main(["--model", str(fp), "--tasks", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "unknown task" in err and "\n" not in err
    assert main(["--model", str(fp), "--quantized", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nothing"), "--tasks", "ppl", "--out", str(tmp_path)]) == 2


def test_cli_fast_decoding_flags(ckpts, tmp_path, capsys):
    """--cache/--threshold reach the task decoding, are validated before any model is loaded, and
    refuse the mechanism metrics (which compare one full forward per step)."""
    fp, _ = ckpts
    assert main(["--model", str(fp), "--tasks", "add", "--threshold", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--threshold must be a finite number in (0.0, 1.0]" in capsys.readouterr().err
    assert main(["--model", str(fp), "--cache", "dual", "--out", str(tmp_path / "b")]) == 2
    assert "metrics" in capsys.readouterr().err
    out = tmp_path / "fast"
    rc = main(["--model", str(fp), "--tasks", "add", "--n", "2", "--gen-length", "8", "--steps", "8",
               "--block-length", "4", "--cache", "dual", "--threshold", "0.5", "--batch-size", "2", "--no-progress",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["gen_kwargs"]["cache"] == "dual" and res["gen_kwargs"]["threshold"] == 0.5
    assert "cache dual, threshold 0.5" in (out / "results.md").read_text()


def test_torchrun_two_cpu_ranks_match_one_process(ckpts, single_run, tmp_path):
    fp, other = ckpts
    env = {**os.environ, "PYTHONPATH": PKG_PARENT, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    dual = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fair_calib_ext.evaluate", "--model", str(fp), "--quantized", str(other), "--labels", "OTHER",
           *ARGS, "--out", str(dual)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((single_run / "results.json").read_text())
    b = json.loads((dual / "results.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    for ra, rb in zip(a["models"], b["models"]):
        assert ra["tasks"]["per_task"] == rb["tasks"]["per_task"]
        assert ra["ppl"]["ppl"] == pytest.approx(rb["ppl"]["ppl"], rel=1e-5)
        for key in ("flips", "mismatch", "divergence", "lag"):
            ma, mb = dict(ra["metrics"][key]), dict(rb["metrics"][key])
            assert ma.keys() == mb.keys()
            for k in ma:
                if k == "by_margin":
                    continue
                va = ma[k] if isinstance(ma[k], list) else [ma[k]]
                vb = mb[k] if isinstance(mb[k], list) else [mb[k]]
                assert len(va) == len(vb), (key, k)
                for x, y in zip(va, vb):
                    if isinstance(x, float) and isinstance(y, float):
                        # batch composition differs between 1 and 2 ranks: equal up to float rounding
                        assert x == pytest.approx(y, rel=1e-4, abs=1e-9), (key, k)
                    else:
                        assert x == y, (key, k)
