"""Embedded tiny models: official layout, loading, tokenizer, deterministic decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parent.parent / "fair_calib_ext" / "assets"
NAMES = ["tiny-llada", "tiny-dream"]
PREFIX = {"tiny-llada": "model.transformer.", "tiny-dream": "model."}


def _present(name: str) -> bool:
    """The embedded models are committed: a missing one is a failure, not a skip."""
    assert (ASSETS / name / "model.safetensors").is_file(), f"{name}: fair_calib_ext/assets/{name} is missing"
    return True


def test_assets_size_limit() -> None:
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file()) if ASSETS.is_dir() else 0
    assert total <= 40 * 2**20, f"assets are {total / 2**20:.1f} MiB (limit 40)"


@pytest.mark.parametrize("name", NAMES)
def test_official_layout(name: str) -> None:
    _present(name)
    from safetensors import safe_open

    d = ASSETS / name
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == {"tiny-llada": "llada", "tiny-dream": "Dream"}[name]
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(PREFIX[name]) or k == "lm_head.weight" for k in keys)
    if name == "tiny-dream":
        assert any(k.endswith("self_attn.q_proj.bias") for k in keys)
        assert "lm_head.weight" in keys
    else:
        assert "model.transformer.ff_out.weight" in keys
    assert (d / "MODEL_CARD.md").is_file()
    assert 0 <= cfg["mask_token_id"] < cfg["vocab_size"]


@pytest.mark.parametrize("name", NAMES)
def test_load_and_tokenizer(name: str) -> None:
    _present(name)
    from fair_calib_ext.models import load_pretrained, load_tokenizer

    model = load_pretrained(name)
    tok = load_tokenizer(name)
    assert model.config.family == ("dream" if "dream" in name else "llada")
    assert tok.mask_token_id == model.config.mask_token_id
    assert tok.eos_token_id == model.config.eos_token_id
    assert len(tok) <= model.config.vocab_size
    n = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n < 10e6
    ids = torch.tensor([tok("Q: 12+7=? A:", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_sample(name: str) -> None:
    _present(name)
    from fair_calib_ext.eval.accuracy import default_gen_kwargs  # an import error fails the test
    from fair_calib_ext.sampling import generate
    from fair_calib_ext.models import load_generation_config, load_pretrained, load_tokenizer

    torch.set_num_threads(1)
    model = load_pretrained(name)
    tok = load_tokenizer(name)
    gk = default_gen_kwargs(model, generation_config=load_generation_config(name))
    prompts = ["Q: sort 7 3 9 1 4 A:", "Q: reverse cat dog sun A:"]
    outs = []
    for _ in range(2):
        res = []
        for p in prompts:
            x = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
            y = generate(model, x, **gk)
            assert y.shape == (1, x.shape[1] + gk["gen_length"])
            assert torch.equal(y[:, : x.shape[1]], x)
            assert not (y == model.config.mask_token_id).any()
            res.append(y)
        outs.append(res)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    # decoded at export time with the same sampler settings: a regression guard, not a truth
    want = json.loads((ASSETS / name / "golden_samples.json").read_text())
    # the answers computed independently of any model, which both embedded models get right
    truth = {prompts[0]: " ".join(sorted("7 3 9 1 4".split(), key=int)), prompts[1]: "sun dog cat"}
    for p, y in zip(prompts, outs[0]):
        x_len = len(tok(p, add_special_tokens=False)["input_ids"])
        assert y[0, x_len:].tolist() == want[p]
        answer = tok.decode(y[0, x_len:].tolist(), skip_special_tokens=True).strip()
        assert answer == truth[p], (p, answer)
