"""The compiled op library, loaded once: ``_C`` (None when it is not built) and ``ERROR`` (why).

Importing :mod:`fair_calib_ext._C` runs the ``TORCH_LIBRARY`` registrations of the ``fair::``
ops. Modules that need the ops or want to know whether they exist (``ops``, ``_build_info``,
``quant.modules``) import this small module, not the package root, so there is no import loop
through ``fair_calib_ext/__init__.py``.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension that links it)

try:
    from . import _C
except ImportError as exc:  # pure-Python parts stay importable without the extension
    _C = None
    ERROR: Exception | None = exc
else:
    ERROR = None

__all__ = ["_C", "ERROR", "available"]


def available() -> bool:
    """True when the compiled ``fair`` ops loaded."""
    return _C is not None
