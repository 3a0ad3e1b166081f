"""Task-suite accuracy plumbing: padding-invariant batched decoding, scoring, defaults, reports."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fair_calib_ext.eval.accuracy import (
    decode_generation,
    default_gen_kwargs,
    encode_prompts,
    generate_texts,
    length_buckets,
    score_predictions,
    summarize_accuracy,
    task_examples,
)
from fair_calib_ext.eval.report import Column, markdown_table, mean_std
from fair_calib_ext.models.testing import tiny_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.spec_from_file_location("tiny_tokenizer", REPO / "python" / "tiny_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from transformers import PreTrainedTokenizerFast

    t = mod.build_tokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<|pad|>", eos_token="<|eos|>",
                                   bos_token="<|bos|>", unk_token="<|unk|>")


IDS = dict(vocab_size=768, mask_token_id=2, eos_token_id=1, pad_token_id=0, bos_token_id=3)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_batched_padded_decoding_equals_one_by_one(tok, family):
    model = tiny_model(family, seed=0, init_std=0.2, **IDS)
    exs = task_examples(["add", "word"], 2, seed=0)
    ids = encode_prompts(tok, [e.prompt for e in exs])
    assert len({len(i) for i in ids}) > 1  # prompts of different lengths get padded together
    gen = default_gen_kwargs(model, gen_length=6, steps=6)
    batched = generate_texts(model, tok, ids, gen_kwargs=gen, batch_size=4)
    single = generate_texts(model, tok, ids, gen_kwargs=gen, batch_size=1)
    assert batched == single


def test_defaults_per_family():
    llada, dream = tiny_model("llada", seed=0), tiny_model("dream", seed=0)
    from fair_calib_ext.eval.tasks import GEN_LENGTH

    g = GEN_LENGTH
    assert default_gen_kwargs(llada) == {"gen_length": g, "steps": g, "block_length": g,
                                         "remasking": "low_confidence", "temperature": 0.0}
    d = default_gen_kwargs(dream, generation_config={"alg": "entropy", "max_new_tokens": 12, "steps": 12})
    assert d["block_length"] is None and d["remasking"] == "entropy" and d["gen_length"] == 12
    assert default_gen_kwargs(llada, gen_length=8, block_length=4)["block_length"] == 4
    assert default_gen_kwargs(llada, gen_length=8, generation_config={"block_length": 3})["block_length"] == 8


def test_decode_cuts_at_eos_and_scores(tok):
    ids = tok(" 1419", add_special_tokens=False)["input_ids"]
    text = decode_generation(tok, ids + [1, 5, 6], eos_id=1)
    assert text == " 1419"
    exs = task_examples(["add"], 2, seed=0)
    ok = score_predictions(exs, [exs[0].answer + " ", "nope"])
    assert ok == [True, False]
    s = summarize_accuracy(["add", "sub"], exs, ok)
    assert s["per_task"]["add"]["acc"] == 0.5 and s["per_task"]["sub"]["n"] == 0
    assert s["avg"] == 0.5  # tasks without examples do not count


def test_length_buckets_sort_and_chunk():
    seqs = [[1] * n for n in (5, 2, 5, 3, 2)]
    assert length_buckets(seqs, 2) == [[1, 4], [3, 0], [2]]


def test_markdown_mean_std():
    runs = [{"tasks": {"avg": 0.5}}, {"tasks": {"avg": 0.7}}]
    m, s, n = mean_std([0.5, 0.7, None])
    assert n == 2 and m == pytest.approx(0.6) and s == pytest.approx(0.141421, rel=1e-4)
    table = markdown_table([("X", runs), ("Y", [{}])], [Column("avg", "tasks.avg", 100.0, 1)])
    assert "| X | 60.0 ± 14.1 |" in table and "| Y | — |" in table
