"""Builds fair_calib_ext._C with CMake (CMakeLists.txt is the real build; this only drives it).

Environment switches:
  FAIR_CPU_ONLY=1   never compile CUDA sources
  FORCE_CUDA=1      compile CUDA sources even if nvcc was not found (cross builds)
  MAX_JOBS=N        parallel compile jobs (default: all cores)
  DEBUG=1           -O0 -g build
  CMAKE_ARGS="..."  extra arguments for the CMake configure step
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

RUNTIME_DEPS = ["safetensors", "tokenizers", "transformers", "tqdm", "matplotlib", "numpy"]


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "on", "true", "yes")


def _torch_requirement() -> str:
    """torch==<public version of the torch present at build time> (the ABI the module needs)."""
    try:
        import torch
    except ImportError:  # metadata-only step without torch: fall back to the project pin
        return "torch==2.13.0"
    return "torch==" + torch.__version__.split("+")[0]


def _tool(name: str) -> str | None:
    """A build tool from this Python's environment (pip's cmake / ninja), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds the CMake project, writing the module where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        # A cache from an earlier build may name tools of a deleted isolated build environment
        # (or another Python): configure afresh; ninja still rebuilds only what changed.
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
        cmake = _tool("cmake") or "cmake"
        ninja = _tool("ninja")
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFAIR_OUTPUT_DIR={out_dir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if _truthy('DEBUG') else 'Release'}",
            f"-DFAIR_CPU_ONLY={'ON' if _truthy('FAIR_CPU_ONLY') else 'OFF'}",
            f"-DFORCE_CUDA={'ON' if _truthy('FORCE_CUDA') else 'OFF'}",
        ]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)
        self._copy_into_checkout(Path(self.get_ext_fullpath(ext.name)).resolve())

    @staticmethod
    def _copy_into_checkout(built: Path) -> None:
        """Also place the module in the source tree being installed from.

        `python -m fair_calib_ext.<cli>` run from the repository root imports the source tree
        (the working directory comes first on sys.path), which would otherwise have no kernels.
        """
        dest = ROOT / "fair_calib_ext" / built.name
        if not built.is_file() or dest == built or not dest.parent.is_dir():
            return
        try:
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copy2(built, tmp)
            os.replace(tmp, dest)
        except OSError as exc:  # read-only checkout: the installed copy still works
            print(f"note: could not copy {built.name} into {dest.parent}: {exc}", file=sys.stderr)


setup(
    install_requires=[_torch_requirement(), *RUNTIME_DEPS],
    ext_modules=[CMakeExtension("fair_calib_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
