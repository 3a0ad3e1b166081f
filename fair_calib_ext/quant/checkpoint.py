"""The packed quantized-checkpoint format: what a ``save_quantized`` directory contains.

Layout of a saved directory:

    config.json        the official model config (LLaDA / Dream keys) plus
                       "quantization_config": {format, method, bits, granularity, clip values,
                       method config, prior settings, package version, modules: {name: spec}}
    model.safetensors  (or model-0000i-of-0000n.safetensors + model.safetensors.index.json
                       when larger than one shard) native tensor names: embeddings, norms, LM head (full precision) and per
                       quantized linear ``<name>.linear.weight_packed`` uint8 [N, K/2] (int4,
                       low nibble = even column, see docs/kernels.md), ``.linear.weight_scale``
                       fp32 [N], ``.linear.bias``, ``.transform.left/right`` (online transforms)
    tokenizer files    copied from the source model when given

This module sits next to the quantized modules and below both ``models`` (which rebuilds a model
from such a directory) and ``calib`` (which writes one), so neither imports the other for it.
The directory is written under a temporary name next to the target and renamed into place; an
existing non-empty target is never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import CheckpointError
from ..validate import json_field
from .modules import QuantLinear

__all__ = [
    "QUANT_FORMAT",
    "TOKENIZER_FILES",
    "quantized_specs",
    "quantization_block",
    "write_quantized_dir",
    "DEFAULT_SHARD_BYTES",
    "read_quantization_block",
    "install_quant_modules",
]

QUANT_FORMAT = "fair_calib_ext.packed.v1"
DEFAULT_SHARD_BYTES = 1 << 30  # shard size of saved checkpoints: a save adds ~2x this (safetensors serializes a copy)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")
_SPEC_KEYS = ("in_features", "out_features", "bias", "w_bits", "a_bits", "act_clip")


def quantized_specs(module: nn.Module, prefix: str = "") -> dict[str, dict[str, Any]]:
    """{qualified name: QuantLinear.spec()} for every QuantLinear under ``module``."""
    return {prefix + n: m.spec() for n, m in module.named_modules() if isinstance(m, QuantLinear)}


def quantization_block(specs: dict[str, dict[str, Any]], qinfo: dict[str, Any] | None,
                       package_version: str) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json for modules ``specs``."""
    if not specs:
        raise ValueError("model has no QuantLinear modules: calibrate it before save_quantized")
    qinfo = dict(qinfo or {})
    first = next(iter(specs.values()))
    return {
        "format": QUANT_FORMAT,
        "method": qinfo.get("method", "unknown"),
        "bits": {"weights": first["w_bits"], "activations": first["a_bits"]},
        "granularity": {"weights": "per_output_channel", "activations": "per_token_dynamic"},
        "symmetric": True,
        "full_precision": ["embed_tokens", "norms", "lm_head", "q/k/v states", "attention"],
        "method_config": qinfo.get("config"),
        "prior": qinfo.get("prior"),
        "package_version": package_version,
        "modules": specs,
    }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_quantized_dir(out_dir: str | os.PathLike[str], config: dict[str, Any],
                        tensors: dict[str, torch.Tensor] | Iterable[dict[str, torch.Tensor]], *,
                        overwrite: bool = False, tokenizer_from: str | os.PathLike[str] | None = None,
                        extra_files: dict[str, bytes | str] | None = None,
                        max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write config.json (with its quantization block), the weights, ``extra_files`` and the
    tokenizer files of ``tokenizer_from`` into ``out_dir`` with one atomic rename.

    ``tensors`` is one dict or an iterable of dicts (pieces, gathered lazily): pieces are
    grouped into shards of at most ``max_shard_bytes`` and each shard is written and released
    before the next piece is gathered. One shard is ``model.safetensors``; more are named as
    Hugging Face does, with ``model.safetensors.index.json``.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        shards: list[Path] = []
        wmap: dict[str, int] = {}
        total = 0
        pending: dict[str, torch.Tensor] = {}
        size = 0

        def flush() -> None:
            nonlocal pending, size
            if pending:
                f = tmp / f"shard-{len(shards):05d}.part"
                save_file(pending, str(f), metadata={"format": "pt"})
                wmap.update({k: len(shards) for k in pending})
                shards.append(f)
            pending, size = {}, 0

        for piece in ([tensors] if isinstance(tensors, dict) else tensors):
            for k, t in piece.items():
                nbytes = t.numel() * t.element_size()
                if pending and size + nbytes > max_shard_bytes:
                    flush()
                pending[k] = t.contiguous()
                size += nbytes
                total += nbytes
            del piece
        flush()
        if len(shards) == 1:
            os.replace(shards[0], tmp / "model.safetensors")
        else:
            n = len(shards)
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            for f, name in zip(shards, names):
                os.replace(f, tmp / name)
            index = {"metadata": {"total_size": total},
                     "weight_map": {k: names[i] for k, i in sorted(wmap.items())}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for fn, content in (extra_files or {}).items():
            (tmp / fn).write_bytes(content if isinstance(content, bytes) else content.encode())
        if tokenizer_from is not None:
            src = Path(tokenizer_from)
            for fn in TOKENIZER_FILES:
                if (src / fn).is_file():
                    shutil.copy2(src / fn, tmp / fn)
        for f in tmp.iterdir():  # on disk before the rename makes the directory visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_quantization_block(path: str | os.PathLike[str], raw: dict[str, Any]) -> dict[str, Any]:
    """The validated ``quantization_config`` block of a config.json dict (popped from ``raw``)."""
    qconf = raw.pop("quantization_config", None)
    if not isinstance(qconf, dict) or qconf.get("format") != QUANT_FORMAT:
        raise CheckpointError(f"{path}: not a {QUANT_FORMAT} checkpoint (config.json quantization_config "
                              f"format is {qconf.get('format') if isinstance(qconf, dict) else qconf!r})")
    modules = qconf.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{path}: config.json quantization_config has no 'modules' specs")
    for name, spec in modules.items():
        missing = [k for k in _SPEC_KEYS if not isinstance(spec, dict) or k not in spec]
        if missing:
            raise CheckpointError(f"{path}: quantization_config spec of {name} lacks {missing}")
        if spec["w_bits"] not in (4, 8, 16) or spec["a_bits"] not in (4, 8, 16):
            raise CheckpointError(f"{path}: {name}: w_bits/a_bits must be 4, 8 or 16, got "
                                  f"{spec['w_bits']}/{spec['a_bits']}")
        # the values the modules are built from, named in the file before anything is built
        src = f"{path}/config.json quantization_config spec of {name}"
        for key in ("in_features", "out_features"):
            json_field(spec, key, src, "int", lo=1, hi=1 << 20)
        json_field(spec, "bias", src, "bool")
        json_field(spec, "act_clip", src, "float", lo=0.0, lo_open=True, hi=1e6)
        json_field(spec, "transform", src, "dict", nullable=True, default=None)
    return qconf


def install_quant_modules(model: nn.Module, qconf: dict[str, Any], *, path: str | os.PathLike[str] = "",
                          use_kernels: bool | None = None) -> None:
    """Replace each nn.Linear named in ``qconf['modules']`` by an empty QuantLinear of its spec.

    A spec that names no linear of ``model``, or whose sizes differ from that linear's, is a
    :class:`CheckpointError` (the config and the specs describe different models).
    """
    bad: list[str] = []
    for name, spec in qconf["modules"].items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            bad.append(f"{name}: no such linear in the model")
            continue
        if not isinstance(lin, nn.Linear):
            bad.append(f"{name}: is {type(lin).__name__}, not a linear")
            continue
        if (spec["in_features"], spec["out_features"]) != (lin.in_features, lin.out_features):
            bad.append(f"{name}: spec [{spec['out_features']}, {spec['in_features']}] vs config "
                       f"[{lin.out_features}, {lin.in_features}]")
            continue
        try:
            q = QuantLinear.from_spec(spec, use_kernels=use_kernels)
        except (ValueError, KeyError, TypeError) as exc:  # a malformed transform spec
            bad.append(f"{name}: bad spec ({exc})")
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    if bad:
        raise CheckpointError(f"{path}: quantization_config specs do not match the model config "
                              f"({len(bad)}): {'; '.join(bad[:10])}" + (" ..." if len(bad) > 10 else ""))
