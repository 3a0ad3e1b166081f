"""Argument checks shared by the CLIs (``sample``, ``calibrate``, ``evaluate``).

Every check runs before any long work and raises :class:`~fair_calib_ext.errors.UsageError`
naming the flag and what was expected; the CLIs print it as one line and exit with status 2.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from .errors import UsageError
from .validate import MAX_SEED, Flag

__all__ = ["set_threads", "resolve_device", "check_out_dir", "check_out_file", "require_quantized",
           "check_positive", "check_finite_positive", "check_same_architecture",
           "SAMPLER_FLAGS", "THREADS_FLAG"]

# Upper bounds only for the lengths: their lower bounds and mutual rules (steps <= gen_length, block
# divisibility) are sampling.settings.resolve_sampler_settings', shared by sample, evaluate and lm-eval.
SAMPLER_FLAGS = (Flag("gen_length", hi=1 << 20), Flag("steps", hi=1 << 20), Flag("block_length", hi=1 << 20),
                 Flag("threshold", "float", lo=0.0, lo_open=True, hi=1.0))  # Fast-dLLM's confidence threshold
THREADS_FLAG = Flag("threads", lo=1, hi=4096)
SEED_FLAG = Flag("seed", lo=0, hi=MAX_SEED)


def set_threads(n: int | None, flag: str = "--threads") -> None:
    """torch intra-op threads; None keeps torch's default."""
    if n is None:
        return
    if n < 1:
        raise UsageError(f"{flag} must be >= 1, got {n}")
    torch.set_num_threads(n)


def resolve_device(arg: str | None, flag: str = "--device") -> torch.device:
    """``cpu`` / ``cuda`` / ``cuda:N``; None = CUDA when available, else the CPU."""
    if arg is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(arg)
    except RuntimeError:
        raise UsageError(f"{flag} {arg!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"{flag} {arg!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {arg}: no CUDA device is available to this torch "
                             f"(torch.cuda.is_available() is False); use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {arg}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def _probe_writable(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a directory we can create files in."""
    anc = path.absolute()
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"{flag} {path}: cannot be created, {anc} is a file")
    try:  # a real probe: os.access says yes to root on a read-only file system
        fd, tmp = tempfile.mkstemp(dir=anc, prefix=".fair-write-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write in {anc} ({exc.strerror or exc})") from None


def check_out_dir(path: str | os.PathLike[str], *, overwrite: bool, flag: str = "--out") -> Path:
    """An output directory: absent or empty, or non-empty only with ``--overwrite``; writable."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{flag} {out} exists and is not empty (pass --overwrite to replace it)")
    _probe_writable(out if out.is_dir() else out.parent, flag)
    return out


def check_out_file(path: str | os.PathLike[str], flag: str) -> Path:
    """An output file (appended to or created): not a directory, its directory writable."""
    f = Path(path)
    if f.is_dir():
        raise UsageError(f"{flag} {f}: is a directory, expected a file")
    _probe_writable(f.parent, flag)
    return f


def require_quantized(path: str, flag: str = "--quantized") -> None:
    """A directory written by save_quantized (config.json with a quantization_config block)."""
    from .errors import CheckpointError
    from .models import read_config, resolve_model_path

    try:
        raw = read_config(resolve_model_path(path))
    except CheckpointError as exc:
        raise UsageError(f"{flag} {path}: {exc}") from None
    except ValueError as exc:  # config.json is not JSON
        raise UsageError(f"{flag} {path}: config.json is not valid JSON ({exc})") from None
    if "quantization_config" not in raw:
        raise UsageError(f"{flag} {path}: config.json has no quantization_config, so this is a "
                         "full-precision checkpoint; pass it as --model, or a directory written by "
                         "fair_calib_ext.calibrate")


# what must agree between a --model and a quantized checkpoint compared with it or sharing its tokenizer
_ARCH_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "mask_token_id")


def check_same_architecture(model: str, quantized: str, flag: str = "--quantized") -> None:
    """A quantized checkpoint must be of the --model's family and shape: evaluating one against
    another model's teacher (or decoding it with another tokenizer) would report numbers that mean
    nothing. Compares the two config.json files, before any weight is read."""
    from .errors import CheckpointError
    from .models import parse_official_config, read_config, resolve_model_path

    try:
        ref = parse_official_config(read_config(resolve_model_path(model)))
        q = parse_official_config(read_config(resolve_model_path(quantized)))
    except CheckpointError as exc:
        raise UsageError(f"{flag} {quantized} / --model {model}: {exc}") from None
    diff = [f"{f} {getattr(q, f)} vs {getattr(ref, f)}" for f in _ARCH_FIELDS if getattr(q, f) != getattr(ref, f)]
    if diff:
        raise UsageError(f"{flag} {quantized} was not made from --model {model}: its config.json differs in "
                         f"{'; '.join(diff)} (quantized vs model)")


def check_positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} must be >= 1, got {value}")


def check_finite_positive(value: float | None, flag: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} must be a finite number > 0, got {value}")
