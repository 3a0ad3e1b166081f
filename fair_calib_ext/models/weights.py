"""A checkpoint's tensors, read lazily through safetensors (single file or sharded with an index).

Nothing is read until a tensor is asked for. A tensor read in its stored dtype is a
copy-on-write memory map of its bytes in the shard (safetensors' own ``safe_open``): its pages
are file-backed, read on first touch, and the kernel can drop and re-read them under memory
pressure, so a bf16 8B model used as it is stored costs page cache rather than process memory
(RSS counts the pages it touched; ``RssAnon`` does not). A write makes a private copy of the
page; the file never changes. A read in another dtype is an ordinary converted copy, so
streaming a model block by block in fp32 costs one block.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch

from ..errors import CheckpointError

__all__ = ["CheckpointTensors", "INDEX_NAME", "SINGLE_NAME", "module_fingerprint"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _open(fname: Path):  # noqa: ANN202 - safetensors' handle
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(fname), framework="pt", device="cpu")
    except SafetensorError as exc:
        msg = str(exc)
        if "not fully covered" in msg or "incomplete" in msg.lower():
            raise CheckpointError(f"{fname}: truncated or damaged safetensors file ({msg})") from None
        raise CheckpointError(f"{fname}: not a safetensors file ({msg})") from None
    except OSError as exc:
        raise CheckpointError(f"{fname}: cannot read ({exc})") from None


class CheckpointTensors:
    """Names, shapes and dtypes of every tensor in a checkpoint directory, and reads on demand.

    The directory holds ``model.safetensors`` or ``model.safetensors.index.json`` plus the
    shards it lists. Every shard's header is parsed (by safetensors) when this is built, so a
    damaged, truncated or inconsistent checkpoint fails before any tensor is read.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index, single = self.path / INDEX_NAME, self.path / SINGLE_NAME
        if index.is_file():
            try:
                wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
                    raise TypeError("weight_map must map tensor names to shard file names")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{index}: not a valid shard index ({type(exc).__name__}: {exc})") from None
            files: dict[str, list[str]] = {}
            for name, fname in wmap.items():
                if Path(fname).name != fname:
                    raise CheckpointError(f"{index}: shard name {fname!r} for {name} is not a file in the directory")
                files.setdefault(fname, []).append(name)
        elif single.is_file():
            files = {SINGLE_NAME: []}
        else:
            if list(self.path.glob("*.bin")) or list(self.path.glob("*.pt")):
                raise CheckpointError(f"{self.path}: only safetensors checkpoints are supported (found .bin/.pt files)")
            raise CheckpointError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME}")
        self._file: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, torch.dtype] = {}
        self._nbytes: dict[str, int] = {}
        for fname, listed in files.items():
            fpath = self.path / fname
            if not fpath.is_file():
                raise CheckpointError(f"{self.path}: shard {fname} listed in the index is missing")
            with _open(fpath) as fh:
                names = set(fh.keys())
                for name in listed:
                    if name not in names:
                        raise CheckpointError(f"{fpath}: the index lists {name}, which the file does not contain")
                for name in (listed or sorted(names)):
                    sl = fh.get_slice(name)
                    dt = _ST_DTYPES.get(sl.get_dtype())
                    if dt is None:
                        raise CheckpointError(f"{fpath}: tensor {name} has unsupported dtype {sl.get_dtype()}")
                    shape = tuple(int(d) for d in sl.get_shape())
                    self._file[name], self._shape[name], self._dtype[name] = fpath, shape, dt
                    self._nbytes[name] = dt.itemsize * _numel(shape)

    def names(self) -> list[str]:
        return list(self._file)

    def __contains__(self, name: object) -> bool:
        return name in self._file

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype."""
        return self._dtype[name]

    def nbytes(self, name: str) -> int:
        return self._nbytes[name]

    def file(self, name: str) -> Path:
        return self._file[name]

    def read(self, name: str, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, in ``dtype`` (floating tensors only; None: as stored) on ``device``."""
        return self.read_many([name], dtype=dtype, device=device)[name]

    def read_many(self, names: Iterable[str], dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Several tensors, each shard opened once for the ones it holds (see :meth:`read`)."""
        from safetensors import SafetensorError

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self._file[n], []).append(n)
        on_cpu = torch.device(device).type == "cpu"
        out: dict[str, torch.Tensor] = {}
        for fpath, group in by_file.items():
            with _open(fpath) as fh:
                for n in group:
                    try:
                        t = fh.get_tensor(n)
                    except SafetensorError as exc:
                        raise CheckpointError(f"{fpath}: cannot read {n} ({exc})") from None
                    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                        t = t.to(dtype)
                    out[n] = t if on_cpu else t.to(device)
        return out

    def fingerprint(self, names: Iterable[str] | None = None, rows: int = 8) -> str:
        """A hash of names, shapes, stored dtypes and ``rows`` evenly spaced rows of each tensor.

        Reads a few kilobytes per tensor (``get_slice``), so it identifies an 8B checkpoint in
        well under a second; any fine-tune of a tensor changes its sampled rows.
        """
        h = hashlib.sha256()
        for name in sorted(names if names is not None else self._file):
            shape, dt = self._shape[name], self._dtype[name]
            h.update(f"{name}:{shape}:{dt}".encode())
            with _open(self._file[name]) as fh:
                sl = fh.get_slice(name)
                if not shape or shape[0] <= rows:
                    t = fh.get_tensor(name)
                else:
                    idx = sorted({round(i * (shape[0] - 1) / (rows - 1)) for i in range(rows)})
                    t = torch.cat([sl[i:i + 1] for i in idx])
            h.update(t.reshape(-1).to(torch.float64 if t.is_floating_point() else torch.int64).numpy().tobytes())
        return h.hexdigest()[:16]


_FINGERPRINT_ELEMS = 1 << 16  # elements hashed per tensor: cheap on 8B models, and any fine-tune changes them


@torch.no_grad()
def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of an in-memory module's tensors: names, shapes, dtypes and up to 65536 evenly
    strided elements per tensor (every element of small tensors). Meta tensors contribute
    their name and shape only."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.is_meta:
            continue
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_ELEMS)
        sample = flat[::step].to("cpu", torch.float64 if t.is_floating_point() else torch.int64)
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
