"""Saving calibrated models as packed quantized checkpoints.

The directory format itself (config block, tensor names, atomic write) lives in
:mod:`fair_calib_ext.quant.checkpoint`, below both ``models`` and ``calib``; loading is
:func:`fair_calib_ext.models.load_pretrained` (or :func:`load_quantized`). This module keeps the
public names importable from ``fair_calib_ext.calib.checkpoint`` as before.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.loading import load_quantized
from ..quant.checkpoint import (
    QUANT_FORMAT,
    TOKENIZER_FILES,
    quantization_block,
    quantized_specs,
    write_quantized_dir,
)

__all__ = ["save_quantized", "load_quantized", "QUANT_FORMAT", "TOKENIZER_FILES"]


def _package_version() -> str:
    from .. import __version__

    return __version__


def save_quantized(model: nn.Module, out_dir: str | os.PathLike[str], *, overwrite: bool = False,
                   tokenizer_from: str | os.PathLike[str] | None = None,
                   extra: dict[str, Any] | None = None,
                   extra_files: dict[str, bytes | str] | None = None) -> Path:
    """Write a calibrated model (QuantLinear modules) to ``out_dir`` atomically.

    ``extra`` is merged into the quantization_config block; ``extra_files`` (name -> content)
    are written into the directory too (calibration log, prior), inside the same atomic rename.
    """
    from ..models import official_config

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    qconf = quantization_block(quantized_specs(model), getattr(model, "quantization_config", None),
                               _package_version())
    cfg = model.config
    tied = model.lm_head.weight is model.embed_tokens.weight
    off = official_config(cfg)
    if cfg.tie_word_embeddings and not tied:  # QuaRot unties the head: record that
        off["tie_word_embeddings"] = False
        if "weight_tying" in off:
            off["weight_tying"] = False
    if extra:
        qconf.update(extra)
    off["quantization_config"] = qconf
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    return write_quantized_dir(out, off, tensors, overwrite=overwrite, tokenizer_from=tokenizer_from,
                               extra_files=extra_files)
