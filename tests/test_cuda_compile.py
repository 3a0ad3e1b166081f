"""CI compile check of the CUDA sources: no GPU and no CUDA build of torch needed, only nvcc.

Each csrc/cuda/*.cu file is compiled with ``nvcc -c`` for every arch of TORCH_CUDA_ARCH_LIST
(default 8.0;8.6;8.9;9.0), so a CUDA syntax, template or ptxas error cannot land unnoticed.
It takes about 100 s of CPU time (the GEMM file dominates); the jobs run in parallel under nice.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_cuda_build", ROOT / "python" / "check_cuda_build.py")
check_cuda_build = importlib.util.module_from_spec(_spec)
sys.modules["check_cuda_build"] = check_cuda_build  # dataclasses look their module up there
_spec.loader.exec_module(check_cuda_build)

NVCC = check_cuda_build.find_nvcc()
ARCHS = os.environ.get("TORCH_CUDA_ARCH_LIST") or check_cuda_build.DEFAULT_ARCHS


def _report(jobs) -> str:
    return "\n\n".join(f"{j.name}:\n{j.output}" for j in jobs if not j.skipped and not j.ok)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, PATH, /usr/local/cuda): "
                                         "the CUDA compile check needs the CUDA toolkit")
def test_every_cuda_kernel_file_compiles_for_every_arch() -> None:
    archs = check_cuda_build.parse_archs(ARCHS)
    jobs = check_cuda_build.check(archs, glue=False)
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert len(sources) >= 3, "expected the quantize, GEMM and weighted-MSE kernel files"
    assert len(jobs) == len(sources) * len(archs)
    assert all(j.ok for j in jobs), _report(jobs)


def test_arch_list_parsing() -> None:
    assert check_cuda_build.parse_archs("8.0;8.6 8.9;9.0a;9.0+PTX") == ["80", "86", "89", "90a", "90"]
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        check_cuda_build.parse_archs(" ; ")
    with pytest.raises(ValueError, match="cannot read arch"):
        check_cuda_build.parse_archs("sm90")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the torch glue check needs the CUDA toolkit")
def test_torch_glue_compiles_when_torch_has_cuda() -> None:
    job = check_cuda_build.glue_job(os.environ.get("FAIR_CUDA_TORCH_PYTHON"))
    if job.skipped:
        pytest.skip(f"torch glue not checked: {job.skipped} (set FAIR_CUDA_TORCH_PYTHON)")
    job = check_cuda_build.run_job(job)
    assert job.ok, job.output
