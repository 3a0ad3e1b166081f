"""Decoder blocks built one at a time, so a model larger than memory can be calibrated.

A *streamed* DiffusionLM holds its embeddings, final norm and LM head, while each entry of
``model.layers`` is an empty block on the meta device and ``model.layer_source`` knows how to
build it. The calibration engine asks the source for block i when it reaches it (in fp32, on
the compute device), quantizes it, and keeps only the quantized block. Two sources:

- :class:`CheckpointLayerSource`: the block's tensors read from the checkpoint shards;
- :class:`ModuleLayerSource`: a copy of another in-memory model's block (an RTN student built
  from a teacher without a second full-precision copy of the model).
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch
from torch import nn

from .config import ModelConfig
from .transformer import DecoderLayer
from .weights import CheckpointTensors, module_fingerprint

__all__ = ["LayerSource", "CheckpointLayerSource", "ModuleLayerSource", "is_streamed_layer", "streamed_layers"]


class LayerSource(Protocol):
    """Builds decoder block ``index`` with full-precision weights."""

    def load(self, index: int, dtype: torch.dtype, device: torch.device | str) -> nn.Module: ...

    def block_bytes(self, index: int, dtype: torch.dtype) -> int: ...

    def fingerprint(self) -> str: ...


def is_streamed_layer(layer: nn.Module) -> bool:
    """True for a block that is still a meta-device placeholder."""
    return any(p.is_meta for p in layer.parameters())


def streamed_layers(model: nn.Module) -> list[int]:
    """Indices of the blocks not yet materialized."""
    return [i for i, layer in enumerate(model.layers) if is_streamed_layer(layer)]


class CheckpointLayerSource:
    """Blocks read from a checkpoint: ``plan[i]`` = [(name inside the block, stored name)]."""

    def __init__(self, config: ModelConfig, tensors: CheckpointTensors,
                 plan: dict[int, list[tuple[str, str]]]) -> None:
        self.config, self.tensors, self.plan = config, tensors, plan

    def load(self, index: int, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        with torch.device("meta"):
            layer = DecoderLayer(self.config)
        mods = dict(layer.named_modules())
        stored = self.tensors.read_many([o for _, o in self.plan[index]], dtype=dtype, device=device)
        for rel, oname in self.plan[index]:
            mod_name, _, pname = rel.rpartition(".")
            setattr(mods[mod_name], pname, nn.Parameter(stored.pop(oname)))
        return layer

    def block_bytes(self, index: int, dtype: torch.dtype) -> int:
        return sum(self.tensors.nbytes(o) // self.tensors.dtype(o).itemsize * dtype.itemsize
                   for _, o in self.plan[index])

    def fingerprint(self) -> str:
        return self.tensors.fingerprint([o for names in self.plan.values() for _, o in names])


class ModuleLayerSource:
    """Blocks copied from ``model.layers`` of an in-memory model (which is left untouched)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def load(self, index: int, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        # converted tensor by tensor: no same-dtype deepcopy of the block before the widening
        src = self.model.layers[index]
        with torch.device("meta"):
            layer = DecoderLayer(self.model.config)
        layer.load_state_dict({k: v.detach().to(device=device, dtype=dtype, copy=True)
                               for k, v in src.state_dict().items()}, strict=True, assign=True)
        return layer

    def block_bytes(self, index: int, dtype: torch.dtype) -> int:
        return sum(p.numel() for p in self.model.layers[index].parameters()) * dtype.itemsize

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for layer in self.model.layers:
            h.update(module_fingerprint(layer).encode())
        return h.hexdigest()[:16]
