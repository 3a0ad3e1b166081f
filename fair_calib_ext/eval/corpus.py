"""Text corpus for likelihood / perplexity and for calibration data of the tiny models.

Source: the package's own task generators (``fair_calib_ext.eval.tasks``). Each text is one full
task line, ``prompt + answer`` (e.g. ``Q: 482+937=? A: 1419``), tasks interleaved round-robin.
No third-party text is shipped or downloaded, so the corpus exists on every machine, is
bit-for-bit reproducible from its seed, and carries the project's own license. Every word is in
the tiny models' vocabulary (no ``<|unk|>``), which a natural-language corpus could not promise
for a 740-token word-level tokenizer.

Split: ``calib_texts`` draws from the tasks' *train* split (what the models were trained on, as
calibration data should be); ``heldout_texts`` draws from the *test* split, whose prompts are
disjoint from train for every task except ``mul`` (see ``tasks``).
"""

from __future__ import annotations

from .tasks import TASKS, make_examples

__all__ = ["calib_texts", "calib_pairs", "heldout_texts", "corpus_texts"]


def corpus_texts(split: str, n: int, seed: int = 0) -> list[str]:
    """``n`` task lines from ``split``, tasks interleaved round-robin (deterministic in seed)."""
    return [p + a for p, a in corpus_pairs(split, n, seed)]


def corpus_pairs(split: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs from ``split``, tasks interleaved round-robin."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    per = -(-n // len(TASKS)) if n else 0
    pools = {t: make_examples(t, split, per, seed=seed) for t in TASKS}
    out: list[tuple[str, str]] = []
    for i in range(per):
        for t in TASKS:
            if len(out) < n:
                ex = pools[t][i]
                out.append((ex.prompt, ex.answer))
    return out


def calib_texts(n: int, seed: int = 0) -> list[str]:
    """Calibration texts: ``n`` train-split task lines."""
    return corpus_texts("train", n, seed)


def calib_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Calibration (prompt, answer) pairs: ``n`` train-split examples (the aligned Stage II data)."""
    return corpus_pairs("train", n, seed)


def heldout_texts(n: int, seed: int = 0) -> list[str]:
    """Held-out texts for perplexity: ``n`` test-split task lines."""
    return corpus_texts("test", n, seed)
