"""Packed quantized checkpoints: safetensors + config.json with a ``quantization_config`` block.

Layout of a saved directory:

    config.json        the official model config (LLaDA / Dream keys) plus
                       "quantization_config": {format, method, bits, granularity, clip values,
                       method config, prior settings, package version, modules: {name: spec}}
    model.safetensors  native tensor names: embeddings, norms, LM head (full precision) and per
                       quantized linear ``<name>.linear.weight_packed`` uint8 [N, K/2] (int4,
                       low nibble = even column), ``.linear.weight_scale`` fp32 [N],
                       ``.linear.bias``, ``.transform.left/right`` (online transform factors)
    tokenizer files    copied from the source model when given

The directory is written under a temporary name next to the target and renamed into place; an
existing non-empty target is never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..quant.modules import QuantLinear
from .layerwise import quantized_specs

__all__ = ["save_quantized", "load_quantized", "QUANT_FORMAT", "TOKENIZER_FILES"]

QUANT_FORMAT = "fair_calib_ext.packed.v1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")


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
    from safetensors.torch import save_file

    from ..models import official_config

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    specs = quantized_specs(model)
    if not specs:
        raise ValueError("model has no QuantLinear modules: calibrate it before save_quantized")
    cfg = model.config
    tied = model.lm_head.weight is model.embed_tokens.weight
    off = official_config(cfg)
    if cfg.tie_word_embeddings and not tied:  # QuaRot unties the head: record that
        off["tie_word_embeddings"] = False
        if "weight_tying" in off:
            off["weight_tying"] = False
    qinfo = dict(getattr(model, "quantization_config", {}) or {})
    first = next(iter(specs.values()))
    qconf = {
        "format": QUANT_FORMAT,
        "method": qinfo.get("method", "unknown"),
        "bits": {"weights": first["w_bits"], "activations": first["a_bits"]},
        "granularity": {"weights": "per_output_channel", "activations": "per_token_dynamic"},
        "symmetric": True,
        "full_precision": ["embed_tokens", "norms", "lm_head", "q/k/v states", "attention"],
        "method_config": qinfo.get("config"),
        "prior": qinfo.get("prior"),
        "package_version": _package_version(),
        "modules": specs,
    }
    if extra:
        qconf.update(extra)
    off["quantization_config"] = qconf
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(off, indent=2) + "\n")
        for fn, content in (extra_files or {}).items():
            (tmp / fn).write_bytes(content if isinstance(content, bytes) else content.encode())
        if tokenizer_from is not None:
            src = Path(tokenizer_from)
            for fn in TOKENIZER_FILES:
                if (src / fn).is_file():
                    shutil.copy2(src / fn, tmp / fn)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _set(root: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, mod)


def load_quantized(path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", use_kernels: bool | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized`; its linears run the packed int4 kernels.

    Full-precision tensors (embeddings, norms, LM head) are cast to ``dtype``; packed weights,
    scales, biases and transforms keep their stored dtypes.
    """
    from safetensors.torch import load_file

    from ..models import DiffusionLM, parse_official_config

    p = Path(path)
    raw = json.loads((p / "config.json").read_text())
    qconf = raw.pop("quantization_config", None)
    if not qconf or qconf.get("format") != QUANT_FORMAT:
        raise ValueError(f"{p}: not a {QUANT_FORMAT} checkpoint (config.json quantization_config)")
    config = parse_official_config(raw)
    with torch.device("meta"):
        model = DiffusionLM(config)
    for name, spec in qconf["modules"].items():
        _set(model, name, QuantLinear.from_spec(spec, use_kernels=use_kernels))
    state = load_file(str(p / "model.safetensors"))
    qnames = tuple(n + "." for n in qconf["modules"])
    for k, v in list(state.items()):
        if not k.startswith(qnames) and v.is_floating_point():
            state[k] = v.to(dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{p}: checkpoint does not match its config: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.quantization_config = {"method": qconf.get("method"), "config": qconf.get("method_config"),
                                 "prior": qconf.get("prior")}
    model.to(device)
    model.requires_grad_(False)
    return model.eval()
