"""fair_calib_ext: W4A4 post-training quantization of diffusion LLMs with FAIR-Calib."""

from __future__ import annotations

__version__ = "0.1.0"

import torch  # noqa: F401,E402  (loads libtorch before the extension that links it)

try:  # importing _C runs the TORCH_LIBRARY registrations of the fair:: ops
    from . import _C  # noqa: F401

    _C_ERROR: Exception | None = None
except ImportError as exc:  # pure-Python parts stay importable without the extension
    _C = None
    _C_ERROR = exc

if _C is not None:
    from . import ops  # noqa: F401,E402  (fake impls and autograd for the ops)

from ._build_info import build_info  # noqa: E402,F401

# Registers LLaDA ("llada") and Dream ("Dream") with transformers' Auto classes so that
# AutoModel.from_pretrained(dir) works without remote code. Cheap (~50 ms): transformers itself
# is not imported here; the registration runs when transformers' auto modules are first loaded.
from . import models as _models  # noqa: E402,F401
