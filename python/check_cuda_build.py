"""Compile-check the fair CUDA sources without a GPU (and without a CUDA build of torch).

Every kernel file csrc/cuda/*.cu needs only nvcc (see csrc/cuda/launchers.h), so this compiles
each one with ``nvcc -c`` for every arch of the list, one process per (file, arch) pair, in
parallel, into a temporary directory. A CUDA syntax, template or ptxas error fails the check.
The torch glue (csrc/cuda/ops_cuda.cpp) needs torch's c10/cuda headers, which only a CUDA build
of torch ships; with one (``--torch-python``, or the running torch if it has CUDA) it is
syntax-checked with the host compiler too, otherwise that step is reported as skipped.

Usage:
    python python/check_cuda_build.py [--archs "8.0;8.6;8.9;9.0"] [--jobs N]
                                      [--torch-python /path/to/cuda-torch/python]
Exit status 0 when everything that ran compiled.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"
GLUE = CUDA_DIR / "ops_cuda.cpp"
# One compile takes ~25 s of CPU (the GEMM file, per arch); the cap only stops a hung compiler.
JOB_TIMEOUT_S = 1800


@dataclass
class Job:
    """One compile step and its outcome."""

    name: str
    cmd: list[str]
    ok: bool = False
    seconds: float = 0.0
    output: str = ""
    skipped: str = ""  # non-empty: why the step did not run


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, then PATH, then /usr/local/cuda; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return str(fallback) if fallback.is_file() else None


def find_cuda_include() -> str | None:
    """The CUDA toolkit include dir (holding cuda_runtime.h), or None."""
    nvcc = find_nvcc()
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             str(Path(nvcc).resolve().parents[1]) if nvcc else None, "/usr/local/cuda"]
    for home in homes:
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return str(Path(home) / "include")
    return None


def parse_archs(spec: str) -> list[str]:
    """'8.0;8.6 9.0a;9.0+PTX' -> ['80', '86', '90a', '90'] (the +PTX suffix does not matter for -c)."""
    out = []
    for item in spec.replace(" ", ";").split(";"):
        item = item.strip().replace("+PTX", "")
        if not item:
            continue
        major, _, minor = item.partition(".")
        if not major.isdigit() or not minor[:1].isdigit():
            raise ValueError(f"cannot read arch {item!r} in TORCH_CUDA_ARCH_LIST {spec!r}")
        out.append(major + minor)
    if not out:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST {spec!r} names no arch")
    return out


def kernel_jobs(nvcc: str, archs: list[str], outdir: Path) -> list[Job]:
    """One nvcc -c job per (kernel file, arch); same flags as cmake/cuda.cmake."""
    jobs = []
    for src in sorted(CUDA_DIR.glob("*.cu")):
        for arch in archs:
            obj = outdir / f"{src.stem}.sm_{arch}.o"
            cmd = [nvcc, "-std=c++17", "-O3", "-lineinfo", "-Xptxas", "-warn-spills",
                   "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-c", str(src), "-o", str(obj)]
            jobs.append(Job(f"{src.name} sm_{arch}", cmd))
    return jobs


def glue_job(torch_python: str | None) -> Job:
    """Syntax-check ops_cuda.cpp against a CUDA build of torch, or a skipped Job saying why."""
    py = torch_python or sys.executable
    probe = ("import torch, torch.utils.cpp_extension as c; "
             "print(torch.version.cuda or ''); print(int(torch.compiled_with_cxx11_abi())); "
             "print(torch.__version__); print('\\n'.join(c.include_paths()))")
    try:
        res = subprocess.run([py, "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Job("ops_cuda.cpp (torch glue)", [], skipped=f"cannot run {py}: {exc}")
    if res.returncode != 0:
        return Job("ops_cuda.cpp (torch glue)", [], skipped=f"`import torch` failed in {py}")
    lines = res.stdout.rstrip("\n").split("\n")  # line 0 may be empty (CPU torch)
    cuda_version, abi, version, includes = lines[0], lines[1], lines[2], lines[3:]
    if not cuda_version:
        return Job("ops_cuda.cpp (torch glue)", [],
                   skipped=f"torch {version} in {py} is a CPU build (no c10/cuda headers); "
                           "pass --torch-python with a CUDA build of torch to check the glue")
    cuda_inc = find_cuda_include()
    if cuda_inc is None:
        return Job("ops_cuda.cpp (torch glue)", [], skipped="cuda_runtime.h not found")
    major, minor = (int(p) for p in version.split("+")[0].split(".")[:2])
    std = "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, std, "-fsyntax-only", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-I", str(CUDA_DIR)]
    for inc in includes + [cuda_inc]:
        cmd += ["-isystem", inc]
    cmd.append(str(GLUE))
    return Job(f"ops_cuda.cpp (torch {version}, CUDA {cuda_version})", cmd)


def run_job(job: Job) -> Job:
    """Run one job under `nice` (the CI machine is shared) and record its outcome."""
    if job.skipped:
        return job
    cmd = (["nice", "-n", "10"] if shutil.which("nice") else []) + job.cmd
    start = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        job.seconds = time.perf_counter() - start
        job.output = f"timed out after {JOB_TIMEOUT_S} s: {' '.join(cmd)}"
        return job
    job.seconds = time.perf_counter() - start
    job.ok = res.returncode == 0
    job.output = (res.stdout + res.stderr).strip()
    return job


def check(archs: list[str], jobs: int | None = None, torch_python: str | None = None,
          glue: bool = True) -> list[Job]:
    """Compile every kernel file for every arch (and the glue when possible); return the jobs.

    Raises FileNotFoundError when nvcc is absent.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (CUDA_HOME, PATH, /usr/local/cuda)")
    with tempfile.TemporaryDirectory(prefix="fair_cuda_check_") as tmp:
        todo = kernel_jobs(nvcc, archs, Path(tmp))
        if glue:
            todo.append(glue_job(torch_python))
        # Longest first (the GEMM file dominates), so the pool drains evenly.
        todo.sort(key=lambda j: "w4a4_gemm" not in j.name)
        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
            return list(pool.map(run_job, todo))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints one line per job and a summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS)
    ap.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    ap.add_argument("--torch-python", default=None,
                    help="python of a CUDA build of torch, to syntax-check the torch glue")
    ap.add_argument("--no-glue", action="store_true", help="skip the torch glue check")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    try:
        results = check(parse_archs(args.archs), args.jobs, args.torch_python, not args.no_glue)
    except FileNotFoundError as exc:
        print(f"check_cuda_build: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for job in results:
        if job.skipped:
            print(f"SKIP  {job.name}: {job.skipped}")
            continue
        print(f"{'ok  ' if job.ok else 'FAIL'}  {job.name}  ({job.seconds:.1f} s)")
        spills = [ln for ln in job.output.splitlines() if "spill" in ln.lower()]
        for ln in spills:
            print(f"      {ln}")
        if not job.ok:
            failed += 1
            print(job.output)
    ran = [j for j in results if not j.skipped]
    print(f"{len(ran) - failed} compiled, {failed} failed, {len(results) - len(ran)} skipped "
          f"in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
