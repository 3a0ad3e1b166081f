"""Quantized blocks kept on disk instead of in memory while a large model is calibrated.

With ``calibrate(..., run_dir=D, offload=True)`` every finished block is checkpointed to
``D/block_####.safetensors`` (its state dict, the public int4 layout) and ``D/block_####.json``
(its QuantLinear specs), as for resume, and then dropped from memory: ``model.layers[i]``
becomes an empty meta-device block and ``model.offloaded_blocks`` knows where it is. An 8B
model then costs one block of memory during calibration, not the 4 GB of its int4 weights, and
:func:`~fair_calib_ext.calib.checkpoint.save_quantized` writes the checkpoint by reading the
blocks back one at a time (so the run dir must outlive the save).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.transformer import DecoderLayer

__all__ = ["OffloadedBlocks", "offloaded_blocks"]


class OffloadedBlocks:
    """Blocks ``indices`` of a model, as a calibration run dir holds them."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.indices: set[int] = set()
        self.kernel_paths: dict[int, str] = {}  # which int4 path each block used before it left memory

    def state_path(self, index: int) -> Path:
        return self.run_dir / f"block_{index:04d}.safetensors"

    def specs_path(self, index: int) -> Path:
        return self.run_dir / f"block_{index:04d}.json"

    def add(self, model: nn.Module, index: int, kernel_path: str | None = None) -> None:
        """Replace ``model.layers[index]`` (already checkpointed) by an empty meta block."""
        with torch.device("meta"):
            model.layers[index] = DecoderLayer(model.config)
        self.indices.add(index)
        if kernel_path is not None:
            self.kernel_paths[index] = kernel_path

    def state(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s state dict (names relative to the block), read from disk."""
        from safetensors.torch import load_file

        return load_file(str(self.state_path(index)))

    def specs(self, index: int) -> dict[str, dict[str, Any]]:
        """Block ``index``'s {module name: QuantLinear spec}."""
        return json.loads(self.specs_path(index).read_text())


def offloaded_blocks(model: nn.Module) -> OffloadedBlocks | None:
    """The model's offloaded blocks, or None when every block is in memory."""
    blocks = getattr(model, "offloaded_blocks", None)
    return blocks if blocks is not None and blocks.indices else None
