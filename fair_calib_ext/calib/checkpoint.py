"""Saving calibrated models as packed quantized checkpoints.

The directory format itself (config block, tensor names, atomic write) lives in
:mod:`fair_calib_ext.quant.checkpoint`, below both ``models`` and ``calib``; loading is
:func:`fair_calib_ext.models.load_pretrained` (or :func:`load_quantized`). This module keeps the
public names importable from ``fair_calib_ext.calib.checkpoint`` as before.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..models.loading import load_quantized
from .offload import offloaded_blocks
from ..quant.checkpoint import (
    DEFAULT_SHARD_BYTES,
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
                   extra_files: dict[str, bytes | str] | None = None,
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a calibrated model (QuantLinear modules) to ``out_dir`` atomically.

    ``extra`` is merged into the quantization_config block; ``extra_files`` (name -> content)
    are written into the directory too (calibration log, prior), inside the same atomic rename.
    Tensors are gathered one top-level piece at a time (embeddings, each block, norm, head) and
    written in shards of at most ``max_shard_bytes`` (one ``model.safetensors`` when it all
    fits), so saving an 8B model costs one shard of memory on top of the model. Blocks that
    calibration offloaded (``calibrate(..., offload=True)``) are read back from its run dir.
    """
    from ..models import official_config

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    store = offloaded_blocks(model)
    specs = quantized_specs(model)
    for i in sorted(store.indices) if store is not None else ():
        specs.update({f"layers.{i}.{nm}": spec for nm, spec in store.specs(i).items()})
    qconf = quantization_block(specs, getattr(model, "quantization_config", None), _package_version())
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

    def pieces() -> Iterator[dict[str, torch.Tensor]]:
        for cname, child in model.named_children():
            subs = list(child.named_children()) if isinstance(child, nn.ModuleList) else [(None, child)]
            for sub, mod in subs:
                prefix = cname if sub is None else f"{cname}.{sub}"
                if cname == "layers" and store is not None and int(sub) in store.indices:
                    piece = {f"{prefix}.{k}": t for k, t in store.state(int(sub)).items()}
                    yield piece
                    continue
                piece = {f"{prefix}.{k}": t.detach().to("cpu").contiguous()
                         for k, t in mod.state_dict().items()}
                if tied and cname == "lm_head":
                    piece.pop("lm_head.weight", None)
                yield piece

    return write_quantized_dir(out, off, pieces(), overwrite=overwrite, tokenizer_from=tokenizer_from,
                               extra_files=extra_files, max_shard_bytes=max_shard_bytes)
