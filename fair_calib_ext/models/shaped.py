"""Full-size LLaDA-8B / Dream-7B-shaped checkpoints with random weights, written tensor by tensor.

Nothing can be downloaded here, yet the real-scale paths (streamed loading, block-wise
calibration, quantized 8B models) must be exercised on the shapes they exist for. This module
writes a directory in the official layout of each family: ``config.json`` and
``generation_config.json`` as the official repositories ship them, sharded safetensors with a
``model.safetensors.index.json`` (official tensor names, bf16), and a word-level tokenizer whose
special tokens sit at the official ids ([MASK], EOS, BOS, end of turn). ``layers`` makes a
shallower model of full width, which is what the tests use.

Memory: one shard (``shard_bytes``, 2 GB by default) plus one tensor, whatever the model size.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .config import ModelConfig

__all__ = ["SHAPES", "shaped_config", "write_shaped_checkpoint", "shaped_tensor_specs"]

# official dims and special-token ids (reference/dllm_models.md §1)
SHAPES: dict[str, dict[str, Any]] = {
    "llada-8b": dict(
        family="llada", vocab_size=126464, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, rope_theta=5e5, rms_norm_eps=1e-5,
        max_position_embeddings=4096, attention_bias=False, tie_word_embeddings=False, mask_token_id=126336,
        eos_token_id=126081, pad_token_id=126081, bos_token_id=126080, shift_logits=False,
        rope_full_precision=True),
    "dream-7b": dict(
        family="dream", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
        max_position_embeddings=131072, attention_bias=True, tie_word_embeddings=False, mask_token_id=151666,
        eos_token_id=151643, pad_token_id=151643, bos_token_id=151643, shift_logits=True,
        rope_full_precision=False),
}

# tokenizer size and special tokens (id -> text) of each family's official tokenizer
_SPECIALS: dict[str, tuple[int, dict[int, str]]] = {
    "llada": (126349, {126080: "<|startoftext|>", 126081: "<|endoftext|>", 126336: "<|mdm_mask|>",
                       126346: "<|start_header_id|>", 126347: "<|end_header_id|>", 126348: "<|eot_id|>"}),
    "dream": (151667, {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
                       151665: "<|beginoftext|>", 151666: "<|mask|>"}),
}

_CHAT = {
    "llada": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "dream": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}

_GENERATION = {
    "llada": {"mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081, "bos_token_id": 126080,
              "gen_length": 128, "steps": 128, "block_length": 32, "temperature": 0.0,
              "remasking": "low_confidence"},
    "dream": {"mask_token_id": 151666, "eos_token_id": 151643, "pad_token_id": 151643, "bos_token_id": 151643,
              "alg": "entropy", "alg_temp": 0.0, "temperature": 0.0, "top_p": None, "top_k": None,
              "max_new_tokens": 128, "steps": 128},
}


def shaped_config(shape: str, layers: int | None = None) -> ModelConfig:
    """The config of ``shape`` ("llada-8b" or "dream-7b"), optionally with ``layers`` blocks."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    kw = dict(SHAPES[shape])
    if layers is not None:
        if not isinstance(layers, int) or not 1 <= layers <= kw["num_hidden_layers"]:
            raise ValueError(f"layers must be an int in [1, {kw['num_hidden_layers']}], got {layers!r}")
        kw["num_hidden_layers"] = layers
    return ModelConfig(**kw)


def shaped_tensor_specs(config: ModelConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(native name, shape, init kind) of every tensor, in checkpoint order.

    Init kinds: "norm" (ones), "embed" (std 1, like a trained embedding's scale after the first
    norm), "linear" (std 1/sqrt(fan_in)), "bias" (std 0.02).
    """
    c = config
    d, f, h, hk, dh = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    out: list[tuple[str, tuple[int, ...], str]] = [("embed_tokens.weight", (c.vocab_size, d), "embed")]
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        out += [(p + "attn_norm.weight", (d,), "norm"),
                (p + "attn.q_proj.weight", (h * dh, d), "linear"),
                (p + "attn.k_proj.weight", (hk * dh, d), "linear"),
                (p + "attn.v_proj.weight", (hk * dh, d), "linear")]
        if c.attention_bias:
            out += [(p + "attn.q_proj.bias", (h * dh,), "bias"), (p + "attn.k_proj.bias", (hk * dh,), "bias"),
                    (p + "attn.v_proj.bias", (hk * dh,), "bias")]
        out += [(p + "attn.o_proj.weight", (d, h * dh), "linear"),
                (p + "mlp_norm.weight", (d,), "norm"),
                (p + "mlp.gate_proj.weight", (f, d), "linear"),
                (p + "mlp.up_proj.weight", (f, d), "linear"),
                (p + "mlp.down_proj.weight", (d, f), "linear")]
    out += [("norm.weight", (d,), "norm"), ("lm_head.weight", (c.vocab_size, d), "linear")]
    return out


def _random(shape: tuple[int, ...], kind: str, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if kind == "norm":
        return torch.ones(shape, dtype=dtype)
    std = {"embed": 1.0, "bias": 0.02}.get(kind, shape[-1] ** -0.5)
    out = torch.empty(shape, dtype=dtype)
    rows = max(1, (64 << 20) // (4 * shape[-1]))  # fp32 staging in 64 MB chunks
    flat = out.view(-1, shape[-1])
    for r in range(0, flat.shape[0], rows):
        n = min(rows, flat.shape[0] - r)
        flat[r:r + n].copy_(torch.randn(n, shape[-1], generator=g).mul_(std))
    return out


def _write_tokenizer(out: Path, config: ModelConfig) -> None:
    """A word-level tokenizer: the embedded tiny model's words first, placeholders up to the
    official tokenizer size, and the family's special tokens at their official ids."""
    from .loading import resolve_model_path

    size, specials = _SPECIALS[config.family]
    base = json.loads((resolve_model_path("tiny-llada") / "tokenizer.json").read_text(encoding="utf-8"))
    words = [w for w, _ in sorted(base["model"]["vocab"].items(), key=lambda kv: kv[1]) if not w.startswith("<|")]
    vocab: dict[str, int] = {"<|unk|>": 0}
    nxt = 1
    for w in words:
        while nxt in specials:
            nxt += 1
        vocab[w] = nxt
        nxt += 1
    for i in range(size):
        if i in specials:
            vocab[specials[i]] = i
        elif i >= nxt:
            vocab[f"<|reserved_{i}|>"] = i
    tok = dict(base)
    tok["model"] = {"type": "WordLevel", "vocab": vocab, "unk_token": "<|unk|>"}
    tok["added_tokens"] = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for i, s in sorted(specials.items())]
    tok["post_processor"] = None
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    eos = specials[config.eos_token_id]
    bos = specials[config.bos_token_id] if config.bos_token_id in specials else eos
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_position_embeddings,
            "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
            "bos_token": bos, "eos_token": eos, "pad_token": specials[config.pad_token_id], "unk_token": "<|unk|>",
            "chat_template": _CHAT[config.family]}
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2), encoding="utf-8")
    smap = {k: tcfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(smap, indent=2), encoding="utf-8")


def write_shaped_checkpoint(
    path: str | os.PathLike[str],
    shape: str = "llada-8b",
    *,
    layers: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 2 << 30,
    overwrite: bool = False,
    progress: Callable[[Iterator[Any], int], Iterator[Any]] | None = None,
) -> Path:
    """Write a random ``shape`` checkpoint in the official layout to ``path``; returns the path.

    The directory is built under a temporary sibling name and renamed at the end, so an
    interrupted run never leaves a checkpoint that looks complete. ``progress`` wraps the tensor
    iterator (e.g. ``lambda it, n: tqdm(it, total=n)``).
    """
    from safetensors.torch import save_file

    from . import official_config
    from .loading import _family_module

    if shard_bytes < 1 << 20:
        raise ValueError(f"shard_bytes must be >= 1 MiB, got {shard_bytes}")
    out = Path(path)
    if out.exists() and any(out.iterdir()) if out.is_dir() else out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    config = shaped_config(shape, layers)
    fam = _family_module(config)
    specs = shaped_tensor_specs(config)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    # shard assignment first (from sizes alone), so file names carry the final count
    groups: list[list[int]] = [[]]
    size = 0
    for j, (_, shp, _) in enumerate(specs):
        nbytes = dtype.itemsize * int(torch.Size(shp).numel())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(j)
        size += nbytes
    n = len(groups)
    wmap: dict[str, str] = {}
    total = 0
    it: Iterator[Any] = iter(range(len(specs)))
    if progress is not None:
        it = progress(it, len(specs))
    shard: dict[str, torch.Tensor] = {}
    gi = 0
    for j in it:
        name, shp, kind = specs[j]
        oname = fam.native_to_official(name)
        shard[oname] = _random(shp, kind, dtype, g)
        total += shard[oname].numel() * dtype.itemsize
        if j == groups[gi][-1]:
            fname = f"model-{gi + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            wmap.update({k: fname for k in shard})
            shard = {}
            gi += 1
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    off = official_config(config)
    off["torch_dtype"] = str(dtype).replace("torch.", "")
    (tmp / "config.json").write_text(json.dumps(off, indent=2) + "\n", encoding="utf-8")
    (tmp / "generation_config.json").write_text(json.dumps(_GENERATION[config.family], indent=2) + "\n",
                                               encoding="utf-8")
    _write_tokenizer(tmp, config)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
    return out
