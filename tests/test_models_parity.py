"""Native LLaDA / Dream forward vs an independent float64 reference of the official math.

The reference works on the *official* state dict (official tensor names) with explicit
softmax attention and per-frequency rotation, written from the LLaDA (OLMo-derived
``LLaDALlamaBlock``) and Dream (Qwen2) definitions — not from our modules.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from fair_calib_ext.models import load_pretrained
from fair_calib_ext.models.testing import tiny_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, H, S, Dh]; pairs (j, j + Dh/2) rotated by angle pos * theta^(-2j/Dh)."""
    dh = x.shape[-1]
    half = dh // 2
    j = torch.arange(half, dtype=torch.float64)
    ang = pos.double()[:, None, :, None] * theta ** (-2.0 * j / dh)  # [B, 1, S, half]
    a, b = x[..., :half], x[..., half:]
    c, s = torch.cos(ang), torch.sin(ang)
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def _attend(q, k, v, key_ok: torch.Tensor | None, query_ok: torch.Tensor | None):
    """Explicit softmax attention; q [B,H,S,D], k/v [B,Hk,S,D]. Masked keys get -inf."""
    rep = q.shape[1] // k.shape[1]
    k = torch.stack([k] * rep, dim=2).flatten(1, 2)  # head h uses kv head h // rep
    v = torch.stack([v] * rep, dim=2).flatten(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_ok is not None:
        scores = scores.masked_fill(~key_ok[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, -1) @ v
    if query_ok is not None:  # fully masked query rows (Dream) come out as zeros
        out = out * query_ok[:, None, :, None]
    return out


def reference_llada(sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor, mask: torch.Tensor | None):
    sd = {k: v.double() for k, v in sd.items()}
    p = "model.transformer."
    h_heads, kv_heads = cfg["n_heads"], cfg["n_kv_heads"]
    dh = cfg["d_model"] // h_heads
    B, S = ids.shape
    x = sd[p + "wte.weight"][ids]
    pos = torch.arange(S).expand(B, S)  # LLaDA: positions ignore padding
    key_ok = mask.bool() if mask is not None else None
    for i in range(cfg["n_layers"]):
        blk = f"{p}blocks.{i}."
        hn = _rms(x, sd[blk + "attn_norm.weight"], cfg["rms_norm_eps"])
        q = (hn @ sd[blk + "q_proj.weight"].T).view(B, S, h_heads, dh).transpose(1, 2)
        k = (hn @ sd[blk + "k_proj.weight"].T).view(B, S, kv_heads, dh).transpose(1, 2)
        v = (hn @ sd[blk + "v_proj.weight"].T).view(B, S, kv_heads, dh).transpose(1, 2)
        q, k = _rotate(q, pos, cfg["rope_theta"]), _rotate(k, pos, cfg["rope_theta"])
        att = _attend(q, k, v, key_ok, None).transpose(1, 2).reshape(B, S, -1)
        x = x + att @ sd[blk + "attn_out.weight"].T
        hn = _rms(x, sd[blk + "ff_norm.weight"], cfg["rms_norm_eps"])
        g = hn @ sd[blk + "ff_proj.weight"].T
        u = hn @ sd[blk + "up_proj.weight"].T
        x = x + (g * torch.sigmoid(g) * u) @ sd[blk + "ff_out.weight"].T
    x = _rms(x, sd[p + "ln_f.weight"], cfg["rms_norm_eps"])
    head = sd[p + "wte.weight"] if cfg["weight_tying"] else sd[p + "ff_out.weight"]
    return x @ head.T


def reference_dream(sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor, mask: torch.Tensor | None):
    sd = {k: v.double() for k, v in sd.items()}
    h_heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    dh = cfg["hidden_size"] // h_heads
    B, S = ids.shape
    x = sd["model.embed_tokens.weight"][ids]
    if mask is not None:  # Dream's generator: tok_idx = cumsum(mask) - 1, pads at position 1
        ok = mask.bool()
        pos = torch.where(ok, mask.long().cumsum(-1) - 1, torch.ones_like(mask.long()))
    else:
        ok, pos = None, torch.arange(S).expand(B, S)
    for i in range(cfg["num_hidden_layers"]):
        lp = f"model.layers.{i}."
        hn = _rms(x, sd[lp + "input_layernorm.weight"], cfg["rms_norm_eps"])
        proj = {n: hn @ sd[f"{lp}self_attn.{n}_proj.weight"].T + sd[f"{lp}self_attn.{n}_proj.bias"] for n in "qkv"}
        q = proj["q"].view(B, S, h_heads, dh).transpose(1, 2)
        k = proj["k"].view(B, S, kv_heads, dh).transpose(1, 2)
        v = proj["v"].view(B, S, kv_heads, dh).transpose(1, 2)
        q, k = _rotate(q, pos, cfg["rope_theta"]), _rotate(k, pos, cfg["rope_theta"])
        att = _attend(q, k, v, ok, ok).transpose(1, 2).reshape(B, S, -1)
        x = x + att @ sd[lp + "self_attn.o_proj.weight"].T
        hn = _rms(x, sd[lp + "post_attention_layernorm.weight"], cfg["rms_norm_eps"])
        g = hn @ sd[lp + "mlp.gate_proj.weight"].T
        u = hn @ sd[lp + "mlp.up_proj.weight"].T
        x = x + (g * torch.sigmoid(g) * u) @ sd[lp + "mlp.down_proj.weight"].T
    x = _rms(x, sd["model.norm.weight"], cfg["rms_norm_eps"])
    head = sd["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else sd["lm_head.weight"]
    return x @ head.T  # raw: position i predicts token i + 1


def _official(path) -> tuple[dict[str, torch.Tensor], dict]:
    import json

    return load_file(str(path / "model.safetensors")), json.loads((path / "config.json").read_text())


REFERENCE = {"llada": reference_llada, "dream": reference_dream}


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("tied", [False, True])
def test_raw_logits_match_reference_fp32(tmp_path, family, tied):
    path = tiny_checkpoint(tmp_path / family, family, seed=3, init_std=0.2, tie_word_embeddings=tied)
    sd, cfg = _official(path)
    model = load_pretrained(path)
    ids = torch.randint(0, 95, (2, 11), generator=torch.Generator().manual_seed(0))
    got = model(ids).logits
    want = REFERENCE[family](sd, cfg, ids, None)
    assert got.dtype == torch.float32 and got.shape == (2, 11, cfg["vocab_size"])
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_padded_batch_matches_reference(tmp_path, family):
    path = tiny_checkpoint(tmp_path / family, family, seed=5, init_std=0.2)
    sd, cfg = _official(path)
    model = load_pretrained(path)
    ids = torch.randint(3, 95, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :1] = 0
    got = model(ids, attention_mask=mask).logits.double()
    want = REFERENCE[family](sd, cfg, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_padding_does_not_change_real_positions(tmp_path, family):
    """Left padding + mask gives the unpadded logits (RoPE is relative; Dream shifts positions)."""
    model = load_pretrained(tiny_checkpoint(tmp_path / family, family, seed=2, init_std=0.2))
    ids = torch.randint(3, 95, (1, 7), generator=torch.Generator().manual_seed(4))
    padded = torch.cat([torch.full((1, 3), 2), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    alone = model(ids).logits
    batch = model(padded, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_denoise_logits_alignment(tmp_path, family):
    model = load_pretrained(tiny_checkpoint(tmp_path / family, family, seed=1))
    ids = torch.randint(0, 95, (2, 6), generator=torch.Generator().manual_seed(0))
    raw = model(ids).logits
    aligned = model.denoise_logits(ids)
    if family == "dream":
        torch.testing.assert_close(aligned[:, 1:], raw[:, :-1])
        torch.testing.assert_close(aligned[:, 0], raw[:, 0])
    else:
        torch.testing.assert_close(aligned, raw)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bf16_close_to_fp32_and_keeps_dtype(tmp_path, family):
    path = tiny_checkpoint(tmp_path / family, family, seed=7, init_std=0.2)
    m32 = load_pretrained(path)
    m16 = load_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    ids = torch.randint(0, 95, (1, 12), generator=torch.Generator().manual_seed(0))
    a, b = m32(ids).logits, m16(ids).logits
    assert b.dtype == torch.bfloat16
    # bf16 has ~3 significant digits; logits here are O(1)
    assert (a - b.float()).abs().max() < 0.15 * a.abs().max()


def test_layer_api_matches_forward(tmp_path):
    """prepare_inputs + per-layer calls reproduce the model (what block-wise calibration runs)."""
    model = load_pretrained(tiny_checkpoint(tmp_path / "d", "dream", seed=9))
    ids = torch.randint(0, 95, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :2] = 0
    h, kw = model.prepare_inputs(ids, mask)
    for layer in model.layers:
        h = layer(h, **kw)
    logits = model.lm_head(model.norm(h))
    torch.testing.assert_close(logits, model(ids, attention_mask=mask).logits)
    lm = model.layer_map()
    layer = model.layers[0]
    for group in ("qkv", "o", "up_gate", "down"):
        for name in lm[group]:
            assert isinstance(layer.get_submodule(name), torch.nn.Linear)
    assert lm["norms"] == {"qkv": "attn_norm", "up_gate": "mlp_norm"}
