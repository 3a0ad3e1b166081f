"""python/gpu_check.py without a GPU: the plan validates (--dry-run), and a real run refuses
cleanly (exit 2, results file written) when torch has no CUDA device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fair_calib_ext

SCRIPT = Path(__file__).resolve().parents[1] / "python" / "gpu_check.py"
PKG_PARENT = str(Path(fair_calib_ext.__file__).resolve().parents[1])


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=PKG_PARENT)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_dry_run_validates_plan(tmp_path):
    res = _run(["--dry-run"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "plan ok" in res.stdout
    for step in ("[build]", "[tests]", "[bench]", "[llada8b]", "[tiny]"):
        assert step in res.stdout
    assert "--no-build-isolation" in res.stdout and "--device cuda" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would really run")
def test_refuses_cleanly_without_cuda(tmp_path):
    out = tmp_path / "results.md"
    res = _run(["--out", str(out)], tmp_path)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "refused" in res.stderr and "Traceback" not in res.stderr
    text = out.read_text()
    assert "refused:" in text and "| build |" in text and "not run" in text


def test_llada8b_step_code_runs_on_cpu_shrunk(tmp_path):
    """The in-memory LLaDA-8B step's code path (build, FAIR-Calib on 2 blocks with a prior tensor,
    W4A4 vs bf16 forward), on CPU with every dimension divided by 32: a smoke test, not a measure."""
    res = _run(["--step", "llada8b", "--device", "cpu", "--shrink", "32", "--seq", "32",
                "--calib-samples", "2", "--calib-seqlen", "16"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert '"calib_s_per_block": [' in res.stdout and '"forward_finite": true' in res.stdout


def test_full_depth_plan_validates(tmp_path):
    """--full-depth swaps the default steps for the full 32-block checkpoint step; its calibrate
    budgets parse with the real CLI parser (validate_plan)."""
    res = _run(["--dry-run", "--full-depth"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[llada8b-full]" in res.stdout and "[tiny]" not in res.stdout and "plan ok" in res.stdout
