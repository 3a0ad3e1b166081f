"""What a calibration run needs in memory and on disk, estimated before any weight is read.

The run has two phases that never overlap:

- **Stage I** (``--method fair`` with a probed prior): the whole teacher in the probe dtype,
  plus (``noise`` policy) its W4A4 RTN student: int4 blocks sharing the teacher's embeddings
  and head, built one fp32 block at a time; plus a probe batch's logits.
- **Stage II** (every method): embeddings, final norm and head in their stored dtype, the
  blocks quantized so far (int4, one copy), one block in fp32 with the engine's working copies
  (the RTN reference, the pending linears, GPTQ's Hessians or FlatQuant's training state),
  and the calibration activations (FP inputs, student inputs, targets) on the CPU.

The numbers are deliberately simple sums of the big tensors; the fixed overhead of the Python
process and torch is added once. They are checked against ``MemAvailable`` (not total RAM), so
a machine that is already busy refuses earlier, and the refusal lists the parts.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["Budget", "calibration_budget", "quantized_bytes", "available_memory", "free_disk", "fmt_gib",
           "OVERHEAD_BYTES", "choose_probe_dtype"]

OVERHEAD_BYTES = 1 << 30  # interpreter, torch, tokenizer, allocator slack
_GIB = float(1 << 30)


def fmt_gib(n: float) -> str:
    return f"{n / _GIB:.1f} GiB"


@dataclass
class Budget:
    """Named parts of a peak (bytes); ``total`` is their sum."""

    parts: dict[str, int] = field(default_factory=dict)
    # memory-mapped, read-only weights: file-backed pages the kernel can drop and re-read, so
    # they show in RSS but never cause an out-of-memory kill; reported, not counted in ``total``
    mapped: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        out = [f"{k} {fmt_gib(v)}" for k, v in self.parts.items() if v >= (1 << 24)]
        out += [f"{k} {fmt_gib(v)} (memory-mapped, not counted)" for k, v in self.mapped.items()]
        return ", ".join(out)


def _shapes(config) -> dict[str, int]:  # noqa: ANN001 - ModelConfig
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    h, hk, dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    block = d * h * dh + 2 * d * hk * dh + h * dh * d + 3 * d * f  # q, k, v, o, gate, up, down
    return {"d": d, "f": f, "v": v, "h": h, "block": block, "layers": config.num_hidden_layers,
            "heads": v * d * (1 if config.tie_word_embeddings else 2)}


def quantized_bytes(config, fp_itemsize: int) -> int:  # noqa: ANN001
    """Size of a W4A4 checkpoint: int4 linears (+ fp32 scales) and full-precision embeddings/head."""
    s = _shapes(config)
    scales = s["layers"] * 4 * (3 * s["d"] + 3 * s["f"] + s["d"]) * 2
    return s["layers"] * s["block"] // 2 + scales + s["heads"] * fp_itemsize


def calibration_budget(config, *, stored_itemsize: int, method: str, weight_quant: str, nsamples: int,  # noqa: ANN001
                       seqlen: int, act_itemsize: int, batch_size: int, probe_itemsize: int | None,
                       probe_noise: bool, probe_batch: int, probe_len: int, device: str = "cpu") -> tuple[Budget, Budget]:
    """(Stage I, Stage II) host-memory peaks in bytes; Stage I is empty without a probe."""
    s = _shapes(config)
    int4_blocks = s["layers"] * s["block"] // 2
    fp32_block = s["block"] * 4
    on_host = device == "cpu"
    stage1 = Budget()
    if probe_itemsize is not None:
        teacher = (s["layers"] * s["block"] + s["heads"]) * probe_itemsize
        if on_host and probe_itemsize == stored_itemsize:  # safetensors maps it copy-on-write
            stage1.mapped["teacher"] = teacher
        else:
            stage1.parts["teacher"] = teacher
        if probe_noise:
            stage1.parts["RTN student (int4)"] = int4_blocks
            stage1.parts["student block being built (fp32)"] = 3 * fp32_block
        stage1.parts["probe logits"] = 4 * probe_batch * probe_len * s["v"] * 4
        stage1.parts["overhead"] = OVERHEAD_BYTES
    stage2 = Budget()
    stage2.parts["embeddings + head"] = s["heads"] * stored_itemsize
    stage2.parts["quantized blocks (int4)"] = int4_blocks
    if on_host:
        working = 3 * fp32_block  # the block, its RTN reference copy, the pending linears
        if weight_quant == "gptq":
            working += 3 * max(s["d"], s["f"]) ** 2 * 4  # Hessian, its inverse, Cholesky workspace
        if method in ("flatquant", "fair"):
            # training: each linear's folded weight (recomputed in backward, the fake-quantized
            # result kept), optimizer state and allocator slack — measured peak 5.5 fp32 blocks
            # above the rest on full-width LLaDA / Dream blocks, rounded up
            working += 6 * fp32_block
        stage2.parts["one block in fp32 + working copies"] = working
        # per batch inside a block: MLP intermediates and attention scores
        stage2.parts["block activations"] = batch_size * seqlen * (6 * s["f"] + 3 * s["h"] * seqlen) * 4
    stage2.parts["calibration activations"] = 3 * nsamples * seqlen * s["d"] * act_itemsize
    stage2.parts["overhead"] = OVERHEAD_BYTES
    return stage1, stage2


def choose_probe_dtype(config, budget_bytes: int, probe_noise: bool) -> torch.dtype:  # noqa: ANN001
    """fp32 when the fp32 teacher (and its student) fit in ``budget_bytes``, else bf16."""
    s = _shapes(config)
    need = (s["layers"] * s["block"] + s["heads"]) * 4 + OVERHEAD_BYTES
    if probe_noise:
        need += s["layers"] * s["block"] // 2 + 3 * s["block"] * 4
    return torch.float32 if need <= budget_bytes else torch.bfloat16


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), else total physical memory, else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(path: str | os.PathLike[str]) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free
