"""Build configuration of the compiled op library (``fair_calib_ext._C``)."""

from __future__ import annotations

from typing import Any


def build_info() -> dict[str, Any]:
    """Describes the compiled extension.

    Keys: ``torch_version`` (the torch it was built against), ``torch_runtime`` (the torch
    running now), ``cuda`` (CUDA kernels compiled), ``cuda_archs`` (their arch list),
    ``cpu_isa_compiled`` / ``cpu_isa_supported`` (CPU kernel paths in the build / usable on this
    CPU) and ``cpu_isa`` (the path chosen at run time; ``FAIR_CPU_ISA`` overrides it).
    Raises ``ImportError`` if the extension was not built.
    """
    import torch

    from ._ext import ERROR as _C_ERROR
    from ._ext import _C

    if _C is None:
        raise ImportError(f"fair_calib_ext._C is not built or failed to load: {_C_ERROR}")
    info = dict(_C.build_info())
    info["torch_runtime"] = torch.__version__
    return info
