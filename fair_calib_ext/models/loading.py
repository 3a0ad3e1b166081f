"""Building, loading and saving DiffusionLMs in the official Hugging Face layouts.

Nothing here executes code from a checkpoint directory: config.json is parsed as JSON and
weights are read from safetensors only.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import CheckpointError
from ..validate import json_field, read_json
from ..quant.checkpoint import install_quant_modules, read_quantization_block
from . import dream, llada
from .config import ModelConfig
from .transformer import DiffusionLM

__all__ = [
    "ASSETS_DIR",
    "available_embedded",
    "resolve_model_path",
    "read_config",
    "parse_official_config",
    "official_config",
    "build_model",
    "load_pretrained",
    "save_pretrained",
    "load_tokenizer",
    "load_generation_config",
    "load_quantized",
    "CheckpointError",
]

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"

_FAMILIES = {llada.MODEL_TYPE: llada, dream.MODEL_TYPE: dream}




def available_embedded() -> list[str]:
    """Names of the embedded models shipped under fair_calib_ext/assets/."""
    if not ASSETS_DIR.is_dir():
        return []
    return sorted(p.name for p in ASSETS_DIR.iterdir() if (p / "config.json").is_file())


def resolve_model_path(path_or_name: str | os.PathLike[str]) -> Path:
    """A local directory, or an embedded model name -> its directory under assets/."""
    p = Path(path_or_name).expanduser()
    if p.is_dir():
        return p
    name = str(path_or_name)
    if os.sep not in name and "/" not in name:
        cand = ASSETS_DIR / name
        if (cand / "config.json").is_file():
            return cand
        avail = available_embedded()
        raise CheckpointError(
            f"{name!r} is neither a directory nor an embedded model; embedded models available: "
            f"{', '.join(avail) if avail else 'none yet (fair_calib_ext/assets/ is empty)'}"
        )
    raise CheckpointError(f"model directory not found: {p}")


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of a checkpoint directory as a dict (a damaged file: one line naming it)."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json")
    return read_json(f)


# integer fields of the LLaDA and Dream config.json files (their official names)
_SIZE_KEYS = ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "mlp_ratio", "embedding_size",
              "max_sequence_length", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "mask_token_id")


def parse_official_config(cfg: dict[str, Any], source: str | os.PathLike[str] = "config.json") -> ModelConfig:
    """Dispatch on ``model_type`` ("llada" or "Dream") to the family parser.

    A missing, wrong-typed or out-of-range field is a :class:`CheckpointError` naming ``source``
    (the file the dict was read from), raised before anything is built.
    """
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    mt = cfg.get("model_type")
    family = _FAMILIES.get(mt) if isinstance(mt, str) else None
    if family is None and isinstance(mt, str):  # tolerate case differences ("dream")
        family = {k.lower(): v for k, v in _FAMILIES.items()}.get(mt.lower())
    if family is None:
        raise CheckpointError(f"{source}: unsupported model_type {mt!r}; expected one of {sorted(_FAMILIES)}")
    for key in _SIZE_KEYS:  # named here; the upper limits are ModelConfig's
        json_field(cfg, key, source, "int", lo=0 if key == "mask_token_id" else 1, nullable=True, default=None)
    for key in ("rope_theta", "rms_norm_eps"):
        json_field(cfg, key, source, "float", lo=0.0, lo_open=True, nullable=True, default=None)
    try:
        return family.parse_config(cfg)
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as exc:  # int("abc"), d // 0, a missing key
        raise CheckpointError(f"{source}: {exc}") from None


_BY_FAMILY = {"llada": llada, "dream": dream}  # ModelConfig.family -> the family's module


def _family_module(config: ModelConfig):  # noqa: ANN202 - a module
    """The family module of ``config``; a family nobody registered is refused, never taken for Dream."""
    try:
        return _BY_FAMILY[config.family]
    except KeyError:
        raise CheckpointError(f"model family {config.family!r} is not registered; known: {sorted(_BY_FAMILY)}") \
            from None


def official_config(config: ModelConfig) -> dict[str, Any]:
    """The official config.json dict for a ModelConfig."""
    return _family_module(config).official_config(config)


def _init_weights(model: DiffusionLM, std: float, generator: torch.Generator | None) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            with torch.no_grad():
                w = torch.empty(m.weight.shape, dtype=torch.float32)
                w.normal_(0.0, std, generator=generator)
                m.weight.copy_(w)
                if getattr(m, "bias", None) is not None:
                    b = torch.empty(m.bias.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
                    m.bias.copy_(b)


def build_model(
    config: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int | None = 0,
    init_std: float = 0.02,
) -> DiffusionLM:
    """A randomly initialised DiffusionLM (normal(0, init_std) linears/embeddings, unit norms).

    ``seed`` makes the weights reproducible (drawn in fp32 on CPU, then cast).
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    model = DiffusionLM(config)
    _init_weights(model, init_std, gen)
    model.generation_config = {}
    return model.to(device=device, dtype=dtype).eval()


def _layer_key(native: str) -> tuple[int, str] | None:
    """'layers.3.attn.q_proj.weight' -> (3, 'attn.q_proj.weight'); None outside the blocks."""
    head, _, rest = native.partition(".")
    if head != "layers":
        return None
    idx, _, rel = rest.partition(".")
    return int(idx), rel


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_dtype_device(dtype: Any, device: Any, fn: str) -> None:
    """A floating dtype (or None: as stored) and a device this torch has, named when wrong."""
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{fn}: dtype must be one of {', '.join(map(str, _FLOAT_DTYPES))} or None, got {dtype!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{fn}: device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{fn}: device {device!r}, but no CUDA device is available to this torch")
    if dev.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{fn}: device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def load_pretrained(
    path_or_name: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    stream_layers: bool = False,
) -> nn.Module:
    """Load an official LLaDA/Dream directory, an embedded model name, or a quantized dir.

    The model is built on the meta device and each tensor is assigned as it is read (converted
    to ``dtype`` on ``device``; ``dtype=None`` keeps every tensor in its stored dtype), so peak
    memory stays near one copy of the weights plus one tensor. Every official tensor name is
    mapped and its shape checked before anything is read; missing or unexpected tensors raise
    :class:`CheckpointError` listing them. Directories whose config.json has a
    ``quantization_config`` block are loaded by :func:`load_quantized`.

    ``stream_layers=True`` reads only the embeddings, final norm and LM head: the decoder blocks
    stay empty (meta device) and ``model.layer_source`` builds block i on request
    (:mod:`fair_calib_ext.models.streaming`), which is how calibration handles models larger
    than memory.
    """
    from .streaming import CheckpointLayerSource
    from .weights import CheckpointTensors

    _check_dtype_device(dtype, device, "load_pretrained")
    path = resolve_model_path(path_or_name)
    raw = read_config(path)
    if "quantization_config" in raw:
        if stream_layers:
            raise CheckpointError(f"{path} is a quantized checkpoint: stream_layers applies to full-precision ones")
        return load_quantized(path, dtype=dtype, device=device)
    config = parse_official_config(raw, path / "config.json")
    fam = _family_module(config)
    device = torch.device(device)

    with torch.device("meta"):
        model = DiffusionLM(config)
    expected = {n: p for n, p in model.named_parameters(remove_duplicate=True)}
    tied = config.tie_word_embeddings

    tensors = CheckpointTensors(path)
    seen: set[str] = set()
    unexpected: list[str] = []
    bad_shape: list[str] = []
    # check every name and shape first, so a bad checkpoint fails before reading gigabytes
    plan: list[tuple[str, str]] = []
    for oname in tensors.names():
        nname = fam.official_to_native(oname)
        if tied and nname == "lm_head.weight":
            continue  # a tied checkpoint that also stores the head: the copy is redundant
        if nname is None or nname not in expected:
            unexpected.append(oname)
            continue
        shape, ref = tensors.shape(oname), tuple(expected[nname].shape)
        if shape != ref:
            bad_shape.append(f"{oname}: checkpoint {list(shape)} vs model {list(ref)}")
            continue
        if not tensors.dtype(oname).is_floating_point:
            bad_shape.append(f"{oname}: stored as {tensors.dtype(oname)}, a full-precision model needs floats")
            continue
        plan.append((oname, nname))
        seen.add(nname)
    missing = sorted(fam.native_to_official(n) for n in expected if n not in seen)
    if missing or unexpected or bad_shape:
        parts = [f"cannot load {path} as {config.family}:"]
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}"
                         + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(sorted(unexpected)[:20])}"
                         + (" ..." if len(unexpected) > 20 else ""))
        if bad_shape:
            parts.append(f"shape mismatches ({len(bad_shape)}): {'; '.join(bad_shape[:20])}")
        raise CheckpointError("\n  ".join(parts))
    modules = dict(model.named_modules())
    blocks: dict[int, list[tuple[str, str]]] = {}
    for oname, nname in plan:
        key = _layer_key(nname) if stream_layers else None
        if key is not None:
            blocks.setdefault(key[0], []).append((key[1], oname))
            continue
        t = tensors.read(oname, dtype=dtype, device=device)  # one tensor at a time through host memory
        mod_name, _, pname = nname.rpartition(".")
        setattr(modules[mod_name], pname, nn.Parameter(t, requires_grad=False))
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    model.requires_grad_(True)
    if stream_layers:
        model.layer_source = CheckpointLayerSource(config, tensors, blocks)
    # the samplers take Dream's defaults (top_p, top_k, alg_temp, eps) from here
    model.generation_config = load_generation_config(path)
    return model.eval()


def _check_quantized_values(p: Path, name: str, t: torch.Tensor) -> None:
    """A quantized layer's float tensors (scales, biases, transforms) must be finite, and its
    per-channel scales > 0: a damaged or hand-edited value would give garbage outputs silently."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{p}: tensor {name} has inf or NaN values")
    if name.endswith("weight_scale") and not bool((t > 0).all()):
        raise CheckpointError(f"{p}: tensor {name} must be > 0 (per-channel scales), found {float(t.min())}")


def load_quantized(path: str | os.PathLike[str], *, dtype: torch.dtype | None = torch.float32,
                   device: str | torch.device = "cpu", use_kernels: bool | None = None) -> nn.Module:
    """Rebuild a model saved by ``calib.save_quantized``; its linears run the packed int4 kernels.

    Full-precision tensors (embeddings, norms, LM head) are cast to ``dtype`` (None: as
    stored); packed weights, scales, biases and transforms keep their stored dtypes. The specs,
    tensor names, shapes and dtypes are checked against the config before any tensor is read, as
    for official checkpoints: a mismatch or a damaged file is a :class:`CheckpointError`. Tensors
    are read module by module (single file or shards), so a CPU model holds one int4 copy of
    each weight, never the public and the prepacked layouts of all of them at once.
    """
    from .weights import CheckpointTensors

    p = resolve_model_path(path)
    raw = read_config(p)
    qconf = read_quantization_block(p, raw)
    config = parse_official_config(raw, p / "config.json")
    with torch.device("meta"):
        model = DiffusionLM(config)
        install_quant_modules(model, qconf, path=p, use_kernels=use_kernels)
    tensors = CheckpointTensors(p)
    tied = config.tie_word_embeddings
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    qnames = tuple(n + "." for n in qconf["modules"])
    stored = set(tensors.names())
    missing = sorted(k for k in expected if k not in stored)
    unexpected = sorted(k for k in stored if k not in expected and not (tied and k == "lm_head.weight"))
    bad: list[str] = []
    for k, ref in expected.items():
        if k not in stored:
            continue
        st_dtype = tensors.dtype(k)
        if tensors.shape(k) != tuple(ref.shape):
            bad.append(f"{k}: checkpoint {list(tensors.shape(k))} vs config {list(ref.shape)}")
        elif st_dtype.is_floating_point != ref.dtype.is_floating_point or \
                (not st_dtype.is_floating_point and st_dtype != ref.dtype):
            bad.append(f"{k}: dtype {str(st_dtype).replace('torch.', '')} vs {str(ref.dtype).replace('torch.', '')}")
    if missing or unexpected or bad:
        parts = [f"cannot load {p} as a quantized {config.family}:"]
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:10])}")
        if bad:
            parts.append(f"shape/dtype mismatches ({len(bad)}): {'; '.join(bad[:10])}")
        raise CheckpointError("\n  ".join(parts))
    # one top-level piece at a time: embeddings, each block, final norm, head
    pieces: dict[str, list[str]] = {}
    for k in expected:
        lk = _layer_key(k)
        pieces.setdefault(f"layers.{lk[0]}" if lk else k.partition(".")[0], []).append(k)
    for prefix, keys in pieces.items():
        state = {}
        for k in keys:
            want = None if k.startswith(qnames) else dtype
            state[k[len(prefix) + 1:]] = tensors.read(k, dtype=want)
            if want is None and k.startswith(qnames):
                _check_quantized_values(p, k, state[k[len(prefix) + 1:]])
        try:
            model.get_submodule(prefix).load_state_dict(state, strict=True, assign=True)
        except (RuntimeError, ValueError) as exc:  # out-of-range codes, wrong transform shapes
            raise CheckpointError(f"{p}: cannot load {prefix}: {str(exc).splitlines()[-1].strip()}") from None
        del state
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    model.quantization_config = {"method": qconf.get("method"), "config": qconf.get("method_config"),
                                 "prior": qconf.get("prior")}
    model.to(device)
    model.requires_grad_(False)
    model.generation_config = load_generation_config(p)
    return model.eval()


def _atomic_write(target: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_pretrained(
    model: DiffusionLM,
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` in the official layout: config.json + model.safetensors (official names).

    ``max_shard_bytes`` splits the weights into model-0000i-of-0000n.safetensors with a
    model.safetensors.index.json, as Hugging Face does. ``generation_config`` (a dict) is
    written as generation_config.json. Files are written under temporary names and renamed.
    """
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    fam = _family_module(cfg)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = p.detach()
        if dtype is not None:
            t = t.to(dtype)
        tensors[fam.native_to_official(name)] = t.to("cpu").contiguous()
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        _atomic_write(out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata=meta))
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = t
            size += nbytes
        n = len(shards)
        wmap = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            _atomic_write(out / fname, lambda tmp, s=shard: save_file(s, tmp, metadata=meta))
            wmap.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}
        _atomic_write(out / "model.safetensors.index.json",
                      lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2) + "\n"))
    off = official_config(cfg)
    if dtype is not None:
        off["torch_dtype"] = str(dtype).replace("torch.", "")
    _atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(off, indent=2) + "\n"))
    if generation_config is not None:
        _atomic_write(out / "generation_config.json",
                      lambda tmp: Path(tmp).write_text(json.dumps(generation_config, indent=2) + "\n"))
    return out


# the generation_config.json fields the samplers read: kind and range (None is allowed: "not set")
_GENERATION_FIELDS: dict[str, tuple[str, float | None, float | None, bool]] = {
    "gen_length": ("int", 1, 1 << 20, False), "max_new_tokens": ("int", 1, 1 << 20, False),
    "steps": ("int", 1, 1 << 20, False), "block_length": ("int", 1, 1 << 20, False),
    "temperature": ("float", 0.0, None, False), "top_p": ("float", 0.0, 1.0, True),
    "top_k": ("int", 0, None, False), "alg_temp": ("float", 0.0, None, False), "eps": ("float", 0.0, 1.0, True),
    "remasking": ("str", None, None, False), "alg": ("str", None, None, False),
}


def load_generation_config(path_or_name: str | os.PathLike[str]) -> dict[str, Any]:
    """generation_config.json of a checkpoint as a dict ({} when absent); a damaged file or a
    sampler field of the wrong type or range is one line naming the file and the field."""
    f = resolve_model_path(path_or_name) / "generation_config.json"
    if not f.is_file():
        return {}
    gc = read_json(f)
    for key, (kind, lo, hi, lo_open) in _GENERATION_FIELDS.items():
        if key in gc:
            json_field(gc, key, f, kind, lo=lo, hi=hi, lo_open=lo_open, nullable=True)
    return gc


def load_tokenizer(path_or_name: str | os.PathLike[str]):
    """The checkpoint's tokenizer from local files only, never running code from the directory.

    AutoTokenizer first. Checkpoints whose tokenizer_config.json names a remote-code class
    (Dream's ``DreamTokenizer``, a copy of Qwen2's byte-level BPE) fall back to transformers'
    own ``Qwen2Tokenizer`` when vocab.json + merges.txt are present, else to
    ``PreTrainedTokenizerFast`` over tokenizer.json. Special tokens and the chat template come
    from tokenizer_config.json either way.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(path_or_name)
    # the JSON files the tokenizer classes read, checked first: a damaged one is one line naming it,
    # not a traceback from deep inside transformers / tokenizers
    for name in ("config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "vocab.json"):
        if (path / name).is_file():
            read_json(path / name)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - remote-code classes, or a file the library cannot parse
        first_error = exc
    try:
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            from transformers import Qwen2Tokenizer

            return Qwen2Tokenizer.from_pretrained(str(path), local_files_only=True)
        if (path / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises its own types for bad files
        raise CheckpointError(f"{path}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from None
    raise CheckpointError(f"{path}: cannot load the tokenizer without remote code ({first_error})")
