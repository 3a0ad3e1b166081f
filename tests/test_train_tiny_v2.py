"""Second-generation tiny-model training (issue 12), smoke level: tokenizer v2, the v2 flags of
python/train_tiny.py, a 3-step wide-preset run that exports a loadable checkpoint and resumes.
The shipped models keep tokenizer v1; these tests also pin that v1 is unchanged."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PY = REPO / "python"
ASSETS = REPO / "fair_calib_ext" / "assets"


def _load(name: str):
    if str(PY) not in sys.path:
        sys.path.insert(0, str(PY))
    spec = importlib.util.spec_from_file_location(name, PY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tt():
    return _load("tiny_tokenizer")


@pytest.fixture(scope="module")
def tr():
    return _load("train_tiny")


def _task_lines(n: int = 500) -> list[str]:
    from fair_calib_ext.eval.tasks import SPLITS, TASKS, make_examples

    lines = []
    for task in TASKS:
        for split in SPLITS:
            for e in make_examples(task, split, n, seed=7):
                lines += [e.prompt, e.answer, e.prompt + e.answer]
    return lines


def test_tokenizer_v2_round_trip_every_task(tt) -> None:
    tok = tt.build_tokenizer(version=2)
    lines = _task_lines()  # 6 tasks x 3 splits x 500 examples x (prompt, answer, both)
    assert len(lines) >= 27_000
    encs = tok.encode_batch(lines, add_special_tokens=False)
    for s, e in zip(lines, encs):
        assert tt.UNK_ID not in e.ids, s
        assert tok.decode(e.ids, skip_special_tokens=False) == s


def test_tokenizer_v2_one_id_per_digit(tt) -> None:
    tok = tt.build_tokenizer(version=2)
    vocab = tok.get_vocab()
    assert not any(t[-1:].isdigit() and len(t) > 1 for t in vocab), "a multi-char token ends in a digit"
    digit_ids = {str(d): vocab[str(d)] for d in range(10)}
    sp = vocab[tt.SPACE]
    assert tok.encode(" 1419", add_special_tokens=False).ids == [sp] + [digit_ids[c] for c in "1419"]
    # in every task line, every digit character maps to its one id, wherever it stands
    for s in _task_lines(100):
        e = tok.encode(s, add_special_tokens=False)
        digits_in_ids = [i for i in e.ids if i in digit_ids.values()]
        assert digits_in_ids == [digit_ids[c] for c in s if c.isdigit()], s
    assert tok.get_vocab_size() < tt.build_tokenizer(version=1).get_vocab_size()


def test_tokenizer_v1_unchanged_and_shipped(tt) -> None:
    v1 = tt.build_tokenizer()
    assert json.loads(v1.to_str())["model"]["vocab"] == json.loads(tt.build_tokenizer(version=1).to_str())["model"]["vocab"]
    shipped = ASSETS / "tiny-llada" / "tokenizer.json"
    if not shipped.is_file():
        pytest.skip("tiny-llada asset not present")
    from tokenizers import Tokenizer

    ship = Tokenizer.from_file(str(shipped))
    assert ship.get_vocab() == v1.get_vocab()
    for s in _task_lines(20):
        assert ship.encode(s, add_special_tokens=False).ids == v1.encode(s, add_special_tokens=False).ids
    with pytest.raises(ValueError):
        tt.build_tokenizer(version=3)


def test_every_vocabulary_word_reaches_reverse(tt, tr) -> None:
    from fair_calib_ext.eval.tasks import WORDS, split_of, vocabulary_words

    tok = tt.build_tokenizer(version=2)
    words = tt.word_tokens(tok)
    assert set(vocabulary_words()) <= set(words) and set(WORDS) < set(words)
    rng = random.Random(0)
    seen: set[str] = set()
    fmt = re.compile(r"^Q: reverse ([A-Za-z]+ ){1,5}[A-Za-z]+ A:$")
    for _ in range(3000):
        e = tr.reverse_example(words, "train", rng)
        assert fmt.match(e.prompt) and split_of(e.prompt) == "train"
        ws = e.prompt[len("Q: reverse "):-len(" A:")].split()
        assert e.answer == " " + " ".join(reversed(ws))
        enc = tok.encode(e.prompt + e.answer, add_special_tokens=False)
        assert len(enc.ids) == 3 + 2 * len(ws) + 2  # Q : ▁reverse, words (twice), ▁A :
        seen.update(ws)
    assert seen == set(words)  # every word drawn (~3000 * 4 draws over ~350 words)
    # the packer's reverse examples come from the whole word list when asked
    packer = tr.Packer(tok, 4, 96, 0, 0.0, {"reverse": 1.0}, gen_length=20, reverse_words=words)
    packer._refill(200)
    toks = {tok.id_to_token(i) for ids, *_ in packer.pool for i in ids}
    assert any(t[1:] not in WORDS for t in toks if t.startswith(tt.SPACE) and t[1:].isalpha()
               and t[1:] not in ("Q", "A", "reverse"))


def test_curriculum_weights_and_presets(tr) -> None:
    acc = {"add": 50.0, "sub": 100.0, "mul": 90.0, "sort": 0.0, "reverse": 75.0, "word": 20.0}
    w = tr.curriculum_weights(acc, floor=0.05)
    assert w == pytest.approx({"add": 0.5, "sub": 0.05, "mul": 0.1, "sort": 1.0, "reverse": 0.25, "word": 0.8})
    w2 = tr.curriculum_weights({t: 100.0 for t in acc}, floor=0.05, prev=w, ema=0.5)
    assert w2["sort"] == pytest.approx(0.525) and w2["sub"] == pytest.approx(0.05)
    assert tr.resolve_bf16("off") is False and tr.resolve_bf16("on") is True
    wide = tr.PRESETS["wide"]
    assert 192 <= wide["d"] <= 256 and 6 <= wide["layers"] <= 8


def test_wide_v2_smoke_train_export_load_resume(tr, tmp_path, one_thread, monkeypatch) -> None:
    from fair_calib_ext.models import load_generation_config, load_pretrained, load_tokenizer

    out, exp = tmp_path / "run", tmp_path / "export"
    flags = ["--family", "llada", "--out", str(out), "--preset", "wide", "--tokenizer-version", "2",
             "--reverse-words", "all", "--curriculum", "error", "--curriculum-every", "2",
             "--curriculum-n", "2", "--eval-n", "2", "--budget-min", "5", "--rows", "4"]
    old_bf16 = tr.USE_BF16
    try:
        tr.main(flags + ["--max-steps", "3"])
        st = torch.load(out / "state.pt", map_location="cpu", weights_only=False)
        assert st["step"] == 3 and st["meta"]["tokenizer_version"] == 2 and st["meta"]["gen_length"] == 20
        assert st["curriculum"]["weights"] is not None  # estimated at step 2
        curve = [json.loads(x) for x in (out / "curve.jsonl").read_text().splitlines()]
        assert "reverse_any" in curve[-1]
        tr.main(flags + ["--max-steps", "4"])  # re-running resumes
        assert "resumed from" in (out / "train.log").read_text()
        assert torch.load(out / "state.pt", map_location="cpu", weights_only=False)["step"] == 4
        with pytest.raises(SystemExit, match="another tokenizer"):  # another tokenizer on the same run directory is refused
            tr.main([f if f != "2" else "1" for f in flags[:8]] + ["--out", str(out), "--max-steps", "5"])
        tr.main(["--family", "llada", "--out", str(out), "--export", str(exp)])
    finally:
        tr.set_bf16(old_bf16)
    model, tok = load_pretrained(exp), load_tokenizer(exp)
    n = sum(p.numel() for p in model.parameters())
    assert model.config.hidden_size == 256 and model.config.num_hidden_layers == 6
    assert 3e6 < n < 5e6 and n * 4 * 2 < 40 * 2**20  # two fp32 models fit the asset limit
    assert load_generation_config(exp)["gen_length"] == 20
    ids = tok(" 1419", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5 and len(set(ids[1:])) == 3  # ▁ + one id per digit (1 repeats)
    with torch.no_grad():
        logits = model(torch.tensor([tok("Q: 12+7=? A:", add_special_tokens=False)["input_ids"]])).logits
    assert torch.isfinite(logits).all()
    # the model card renders the v2 tokenizer/recipe and the generalisation table
    acc = {t: 10.0 for t in ("add", "sub", "mul", "sort", "reverse", "word", "mean")}
    extra = {"add_w3": 5.0, "reverse_oov": 50.0}
    ev = {"n_per_task": 2, "gen_kwargs": {"gen_length": 20}, "fp": acc, "w4a4_rtn": acc,
          "fp_extra": extra, "w4a4_rtn_extra": extra, "extra_n": {"add_w3": 2, "reverse_oov": 2}}
    (tmp_path / "ev.json").write_text(json.dumps(ev))
    card = _load("tiny_card")
    monkeypatch.setattr(sys, "argv", ["tiny_card.py", "--name", "tiny-llada", "--run", str(out),
                                      "--eval", str(tmp_path / "ev.json"), "--out", str(exp)])
    card.main()
    text = (exp / "MODEL_CARD.md").read_text()
    assert "version 2" in text and "every digit has\nexactly one id" in text and "gen_length 20" in text
    assert "| ≥70 | ≥95 |" in text and "reverse_oov" in text and "reverse_any" in text
    assert "bf16 autocast" in text or "fp32;" in text
