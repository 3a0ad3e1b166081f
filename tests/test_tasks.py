"""Task suite: formats, correct answers, disjoint splits, scoring, corpus, tokenizer round trip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fair_calib_ext.eval import corpus, tasks
from fair_calib_ext.eval.tasks import TASKS, make_examples, score

ASSETS = Path(__file__).resolve().parent.parent / "fair_calib_ext" / "assets"

FORMATS = {
    "add": re.compile(r"^Q: (\d{1,3})\+(\d{1,3})=\? A:$"),
    "sub": re.compile(r"^Q: (\d{1,3})-(\d{1,3})=\? A:$"),
    "mul": re.compile(r"^Q: (\d{1,2})\*(\d)=\? A:$"),
    "sort": re.compile(r"^Q: sort ((?:\d )*\d) A:$"),
    "reverse": re.compile(r"^Q: reverse ((?:[a-z]+ )*[a-z]+) A:$"),
    "word": re.compile(r"^Q: [A-Z].*\? A:$"),
}


def _solve(task: str, prompt: str) -> str:
    """Independent solver for the prompt formats (not the generators' code path)."""
    m = FORMATS[task].match(prompt)
    assert m, (task, prompt)
    if task in ("add", "sub", "mul"):
        a, b = int(m.group(1)), int(m.group(2))
        return str({"add": a + b, "sub": a - b, "mul": a * b}[task])
    if task == "sort":
        return " ".join(sorted(m.group(1).split()))
    if task == "reverse":
        return " ".join(reversed(m.group(1).split()))
    raise AssertionError(task)


@pytest.mark.parametrize("task", [t for t in TASKS if t != "word"])
def test_formats_and_answers(task: str) -> None:
    for split in ("train", "val", "test"):
        for ex in make_examples(task, split, 200, seed=3):
            assert ex.answer.startswith(" ") and not ex.answer.startswith("  ")
            assert ex.answer[1:] == _solve(task, ex.prompt)


def test_ranges() -> None:
    exs = {t: make_examples(t, "train", 500, seed=1) for t in TASKS}
    subs = [int(e.answer) for e in exs["sub"]]
    assert min(subs) >= 0
    sort_lens = {len(e.answer.split()) for e in exs["sort"]}
    assert sort_lens == set(range(3, 9))
    rev_lens = {len(e.answer.split()) for e in exs["reverse"]}
    assert rev_lens == set(range(2, 7))
    for e in exs["reverse"]:
        ws = e.answer.split()
        assert len(set(ws)) == len(ws) and all(w in tasks.WORDS for w in ws)
    add_digits = {len(e.prompt.split()[1].split("+")[0]) for e in exs["add"]}
    assert add_digits == {1, 2, 3}
    assert len(tasks.WORDS) >= 200


def test_word_problems() -> None:
    exs = make_examples("word", "test", 400, seed=0)
    seen_templates = set()
    for e in exs:
        assert FORMATS["word"].match(e.prompt), e.prompt
        nums = [int(x) for x in re.findall(r"\d+", e.prompt)]
        assert nums and max(nums) <= 50
        assert int(e.answer) >= 0 and e.answer == f" {int(e.answer)}"
        for i, (text, _) in enumerate(tasks.WORD_TEMPLATES):
            head = text.split("{a}")[0].replace("{name}", "").strip()
            if head and head in e.prompt:
                seen_templates.add(i)
    assert len(tasks.WORD_TEMPLATES) >= 10 and len(seen_templates) >= 8
    # the example is one of the templates, with its arithmetic
    t0 = tasks.WORD_TEMPLATES[0]
    text = "Q: " + t0[0].format(name="Tom", pron="He", obj="apples", a=12, b=7, c=5) + " A:"
    assert text == "Q: Tom has 12 apples. He buys 7 more and gives 5 away. How many apples does Tom have? A:"
    assert t0[1](12, 7, 5) == 14


def test_deterministic_and_seeded() -> None:
    for t in TASKS:
        assert make_examples(t, "val", 20, seed=5) == make_examples(t, "val", 20, seed=5)
        assert make_examples(t, "val", 20, seed=5) != make_examples(t, "val", 20, seed=6)


@pytest.mark.parametrize("task", [t for t in TASKS if t != "mul"])
def test_splits_disjoint(task: str) -> None:
    sets = {s: {e.prompt for e in make_examples(task, s, 300, seed=0)} for s in ("train", "val", "test")}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    for s, prompts in sets.items():
        assert all(tasks.split_of(p) == s for p in prompts)


def test_mul_streams_differ() -> None:
    # mul shares its 990-prompt table across splits; the split streams must still differ
    a = [e.prompt for e in make_examples("mul", "train", 50)]
    b = [e.prompt for e in make_examples("mul", "test", 50)]
    assert a != b


def test_score() -> None:
    assert score(" 1419", " 1419")
    assert score("1419<|eos|><|eos|>", " 1419")
    assert score(" 1419 <|eos|> 7", " 1419")
    assert not score(" 141", " 1419")
    assert not score(" 14190", " 1419")
    assert not score("", " 1419")
    assert score(" sun dog cat", " sun dog cat")
    assert not score(" sun  dog cat", " sun dog cat")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        make_examples("div", "train", 1)
    with pytest.raises(ValueError):
        make_examples("add", "dev", 1)
    with pytest.raises(ValueError):
        make_examples("add", "train", -1)


def test_corpus_split() -> None:
    cal = corpus.calib_texts(60, seed=0)
    held = corpus.heldout_texts(60)
    assert len(cal) == 60 and len(held) == 60
    assert cal == corpus.calib_texts(60, seed=0)
    assert all(t.startswith("Q: ") and " A: " in t for t in cal + held)
    non_mul = [t for t in cal if "*" not in t]
    assert not set(non_mul) & set(held)


@pytest.mark.skipif(not (ASSETS / "tiny-llada" / "tokenizer.json").is_file(), reason="tiny-llada asset not built")
def test_tokenizer_round_trip() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tiny-llada"), local_files_only=True)
    for t in TASKS:
        for e in make_examples(t, "test", 30):
            for s in (e.prompt, e.answer, e.prompt + e.answer):
                ids = tok(s, add_special_tokens=False)["input_ids"]
                assert tok.decode(ids) == s
                assert tok.unk_token_id not in ids
    ids = tok(" 1419", add_special_tokens=False)["input_ids"]
    # every digit is its own token: tokenizer v1 "▁1 4 1 9", v2 (python/TRAINING_V2.md) "▁ 1 4 1 9"
    assert [t.lstrip("\u2581") for t in tok.convert_ids_to_tokens(ids) if t != "\u2581"] == list("1419")
    assert len(tok(" reverse", add_special_tokens=False)["input_ids"]) == 1  # words are single tokens
    assert tok.mask_token_id is not None and tok.eos_token_id is not None
