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
    """config.json of a checkpoint directory as a dict."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json")
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


def parse_official_config(cfg: dict[str, Any]) -> ModelConfig:
    """Dispatch on ``model_type`` ("llada" or "Dream") to the family parser."""
    mt = cfg.get("model_type")
    if mt not in _FAMILIES:
        # tolerate case differences ("dream"), but name the accepted spellings on failure
        lower = {k.lower(): v for k, v in _FAMILIES.items()}
        if isinstance(mt, str) and mt.lower() in lower:
            return lower[mt.lower()].parse_config(cfg)
        raise CheckpointError(f"unsupported model_type {mt!r}; expected one of {sorted(_FAMILIES)}")
    return _FAMILIES[mt].parse_config(cfg)


def _family_module(config: ModelConfig):
    return llada if config.family == "llada" else dream


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


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_header(fname: Path) -> tuple[dict[str, Any], int]:
    """(tensor entries, byte offset of the data section) of a safetensors file."""
    size = fname.stat().st_size
    with open(fname, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{fname}: not a safetensors file (too short)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or n > 100_000_000 or 8 + n > size:
            raise CheckpointError(f"{fname}: not a safetensors file or truncated (header length {n}, "
                                  f"file size {size})")
        try:
            header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            ends = [int(e["data_offsets"][1]) for e in header.values()]
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            raise CheckpointError(f"{fname}: not a safetensors file (unreadable header: {exc})") from None
    # a file cut short (interrupted copy) is caught here, before any tensor is read
    if 8 + n + max(ends, default=0) > size:
        raise CheckpointError(f"{fname}: truncated ({size} bytes, the header needs {8 + n + max(ends)})")
    return header, 8 + n


_STAGE_BYTES = 64 << 20  # conversion staging buffer: caps the extra memory of a dtype change


def _read_tensor(fh: Any, entry: dict[str, Any], data_start: int, fname: Path, name: str,
                 dtype: torch.dtype, stage: torch.Tensor) -> torch.Tensor:
    """One tensor read straight into fresh CPU memory of ``dtype`` (no mmap).

    Same dtype: the bytes land directly in the result. Otherwise they are converted in chunks
    through ``stage`` (a uint8 buffer reused for every tensor, so conversion neither holds two
    copies of a tensor nor fragments the heap with short-lived large blocks).
    """
    stored = _ST_DTYPES.get(entry["dtype"])
    if stored is None:
        raise CheckpointError(f"{fname}: tensor {name} has unsupported dtype {entry['dtype']}")
    begin, end = entry["data_offsets"]
    shape = entry["shape"]
    numel = 1
    for d in shape:
        numel *= d
    esize = torch.empty((), dtype=stored).element_size()
    if end - begin != numel * esize:
        raise CheckpointError(f"{fname}: tensor {name} byte size {end - begin} does not match its shape")
    out = torch.empty(shape, dtype=dtype if stored.is_floating_point else stored)
    if numel == 0:
        return out
    fh.seek(data_start + begin)
    flat = out.view(-1)
    if out.dtype == stored:
        if fh.readinto(flat.view(torch.uint8).numpy()) != numel * esize:
            raise CheckpointError(f"{fname}: truncated while reading {name}")
        return out
    chunk = max(1, min(numel, stage.numel() // esize))
    buf = stage[: chunk * esize].view(stored)
    for lo in range(0, numel, chunk):
        n = min(chunk, numel - lo)
        if fh.readinto(buf[:n].view(torch.uint8).numpy()) != n * esize:
            raise CheckpointError(f"{fname}: truncated while reading {name}")
        flat[lo:lo + n].copy_(buf[:n])
    return out


def _shard_files(path: Path) -> dict[str, list[str]]:
    """file -> tensor names, from model.safetensors or a sharded index."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        with open(index, encoding="utf-8") as fh:
            wmap: dict[str, str] = json.load(fh)["weight_map"]
        files: dict[str, list[str]] = {}
        for name, fname in wmap.items():
            files.setdefault(fname, []).append(name)
        for fname in files:
            if not (path / fname).is_file():
                raise CheckpointError(f"{path}: shard {fname} listed in the index is missing")
        return files
    if single.is_file():
        return {"model.safetensors": list(_read_header(single)[0])}
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise CheckpointError(f"{path}: only safetensors checkpoints are supported (found .bin/.pt files)")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_pretrained(
    path_or_name: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load an official LLaDA/Dream directory, an embedded model name, or a quantized dir.

    The model is built on the meta device and each tensor is assigned as it is read (converted
    to ``dtype`` on ``device``), so peak memory stays near one copy of the weights. Every
    official tensor name is mapped and its shape checked; missing or unexpected tensors raise
    :class:`CheckpointError` listing them. Directories whose config.json has a
    ``quantization_config`` block are loaded by :func:`load_quantized`.
    """
    path = resolve_model_path(path_or_name)
    raw = read_config(path)
    if "quantization_config" in raw:
        return load_quantized(path, dtype=dtype, device=device)
    config = parse_official_config(raw)
    fam = _family_module(config)
    device = torch.device(device)

    with torch.device("meta"):
        model = DiffusionLM(config)
    expected = {n: p for n, p in model.named_parameters(remove_duplicate=True)}
    tied = config.tie_word_embeddings

    files = _shard_files(path)
    seen: set[str] = set()
    unexpected: list[str] = []
    bad_shape: list[str] = []
    # check every name and shape first, so a bad checkpoint fails before reading gigabytes
    plan: list[tuple[Path, str, str]] = []
    headers: dict[Path, tuple[dict[str, Any], int]] = {}
    for fname, names in files.items():
        fpath = path / fname
        header, _ = headers.setdefault(fpath, _read_header(fpath))
        for oname in names:
            if oname not in header:
                raise CheckpointError(f"{fpath}: the index lists {oname}, which the file does not contain")
            nname = fam.official_to_native(oname)
            if tied and nname == "lm_head.weight":
                continue  # a tied checkpoint that also stores the head: the copy is redundant
            if nname is None or nname not in expected:
                unexpected.append(oname)
                continue
            shape, ref = tuple(header[oname]["shape"]), tuple(expected[nname].shape)
            if shape != ref:
                bad_shape.append(f"{oname}: checkpoint {list(shape)} vs model {list(ref)}")
                continue
            plan.append((fpath, oname, nname))
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
    convert = [headers[f][0][o] for f, o, _ in plan
               if _ST_DTYPES.get(headers[f][0][o]["dtype"], dtype) != dtype
               and _ST_DTYPES[headers[f][0][o]["dtype"]].is_floating_point]
    stage_bytes = min(_STAGE_BYTES, max((e["data_offsets"][1] - e["data_offsets"][0] for e in convert), default=0))
    stage = torch.empty(max(stage_bytes, 8), dtype=torch.uint8)
    handles: dict[Path, Any] = {}
    try:
        for fpath, oname, nname in plan:
            fh = handles.get(fpath)
            if fh is None:
                fh = handles[fpath] = open(fpath, "rb")
            header, start = headers[fpath]
            t = _read_tensor(fh, header[oname], start, fpath, oname, dtype, stage)
            if t.device != device:
                t = t.to(device)  # one tensor at a time through host memory
            mod_name, _, pname = nname.rpartition(".")
            setattr(modules[mod_name], pname, nn.Parameter(t, requires_grad=False))
    finally:
        for fh in handles.values():
            fh.close()
    del stage
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    model.requires_grad_(True)
    # the samplers take Dream's defaults (top_p, top_k, alg_temp, eps) from here
    model.generation_config = load_generation_config(path)
    return model.eval()


def load_quantized(path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", use_kernels: bool | None = None) -> nn.Module:
    """Rebuild a model saved by ``calib.save_quantized``; its linears run the packed int4 kernels.

    Full-precision tensors (embeddings, norms, LM head) are cast to ``dtype``; packed weights,
    scales, biases and transforms keep their stored dtypes. The specs, tensor names, shapes and
    dtypes are checked against the config before any tensor is read, as for official
    checkpoints: a mismatch or a damaged file is a :class:`CheckpointError`.
    """
    p = resolve_model_path(path)
    raw = read_config(p)
    qconf = read_quantization_block(p, raw)
    config = parse_official_config(raw)
    with torch.device("meta"):
        model = DiffusionLM(config)
    install_quant_modules(model, qconf, path=p, use_kernels=use_kernels)
    fname = p / "model.safetensors"
    if not fname.is_file():
        raise CheckpointError(f"{p}: no model.safetensors")
    header, start = _read_header(fname)
    tied = config.tie_word_embeddings
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    qnames = tuple(n + "." for n in qconf["modules"])
    missing = sorted(k for k in expected if k not in header)
    unexpected = sorted(k for k in header if k not in expected and not (tied and k == "lm_head.weight"))
    bad: list[str] = []
    for k, ref in expected.items():
        e = header.get(k)
        if e is None:
            continue
        stored = _ST_DTYPES.get(e["dtype"])
        if tuple(e["shape"]) != tuple(ref.shape):
            bad.append(f"{k}: checkpoint {list(e['shape'])} vs config {list(ref.shape)}")
        elif stored is None or stored.is_floating_point != ref.dtype.is_floating_point or \
                (not stored.is_floating_point and stored != ref.dtype):
            bad.append(f"{k}: dtype {e['dtype']} vs {str(ref.dtype).replace('torch.', '')}")
    if missing or unexpected or bad:
        parts = [f"cannot load {p} as a quantized {config.family}:"]
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:10])}")
        if bad:
            parts.append(f"shape/dtype mismatches ({len(bad)}): {'; '.join(bad[:10])}")
        raise CheckpointError("\n  ".join(parts))
    biggest = max((e["data_offsets"][1] - e["data_offsets"][0] for e in header.values()), default=0)
    stage = torch.empty(max(8, min(_STAGE_BYTES, biggest)), dtype=torch.uint8)
    state: dict[str, torch.Tensor] = {}
    with open(fname, "rb") as fh:
        for k in expected:
            # packed weights, scales, biases, transforms keep their stored dtype; the rest -> dtype
            want = _ST_DTYPES[header[k]["dtype"]] if k.startswith(qnames) else dtype
            state[k] = _read_tensor(fh, header[k], start, fname, k, want, stage)
    del stage
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
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


def load_generation_config(path_or_name: str | os.PathLike[str]) -> dict[str, Any]:
    """generation_config.json of a checkpoint as a dict ({} when absent)."""
    f = resolve_model_path(path_or_name) / "generation_config.json"
    if not f.is_file():
        return {}
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


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
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError) as exc:
        first_error = exc
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        from transformers import Qwen2Tokenizer

        return Qwen2Tokenizer.from_pretrained(str(path), local_files_only=True)
    if (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    raise CheckpointError(f"{path}: cannot load the tokenizer without remote code ({first_error})")
