"""fair_calib_ext: W4A4 post-training quantization of diffusion LLMs with FAIR-Calib."""

from __future__ import annotations

__version__ = "0.1.0"

# the compiled ops, loaded once in ._ext (None and the reason when not built)
from ._ext import ERROR as _C_ERROR  # noqa: E402,F401
from ._ext import _C  # noqa: E402,F401

if _C is not None:
    from . import ops  # noqa: F401,E402  (fake impls and autograd for the ops)

from ._build_info import build_info  # noqa: E402,F401

# Registers LLaDA ("llada") and Dream ("Dream") with transformers' Auto classes so that
# AutoModel.from_pretrained(dir) works without remote code. Cheap (~50 ms): transformers itself
# is not imported here; the registration runs when transformers' auto modules are first loaded.
from . import models as _models  # noqa: E402,F401
