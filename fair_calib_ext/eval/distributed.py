"""Sharding evaluation samples across torchrun ranks and gathering the results.

Under ``torchrun --nproc-per-node N`` (WORLD_SIZE > 1) :func:`init_distributed` starts a process
group (NCCL when the evaluation device is CUDA, gloo otherwise); without torchrun everything runs
in one process and the collectives are identities. Samples are sharded round-robin by their
global index, and every result carries that index, so gathered results come back in the
single-process order and per-example randomness (seeded by index) does not depend on N.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "shard", "gather", "gather_indexed", "close_distributed"]

T = TypeVar("T")


@dataclass
class DistContext:
    """Where this process sits: rank, world size, the device it evaluates on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistContext:
    """Join the torchrun process group if there is one.

    Args:
        device: "cpu", "cuda" or None (CUDA if available). Under torchrun with CUDA, each rank
            uses ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))  # the rank itself comes from the process group
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    dev = torch.device(f"cuda:{local}") if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistContext(0, 1, dev, False)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), dev, owns)


def shard(items: Sequence[T], ctx: DistContext) -> tuple[list[int], list[T]]:
    """This rank's share of ``items``: (global indices, items), round-robin."""
    idx = list(range(ctx.rank, len(items), ctx.world_size))
    return idx, [items[i] for i in idx]


def gather(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable; tensors should be on CPU), in rank order, on all ranks."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_indexed(indices: Sequence[int], values: Sequence[T], ctx: DistContext) -> list[T]:
    """Gather per-example values from all ranks and put them back in global index order."""
    if len(indices) != len(values):
        raise ValueError(f"{len(indices)} indices for {len(values)} values")
    pairs = [p for part in gather((list(indices), list(values)), ctx) for p in zip(*part)]
    pairs.sort(key=lambda p: p[0])
    seen = [i for i, _ in pairs]
    if len(set(seen)) != len(seen):
        raise RuntimeError("two ranks returned the same example index")
    return [v for _, v in pairs]


def close_distributed(ctx: DistContext) -> None:
    """Tear down the process group if :func:`init_distributed` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
