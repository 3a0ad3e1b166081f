"""Embedded task suite with verifiable answers for the tiny diffusion LMs.

Six tasks, each a seeded generator of ``Example(prompt, answer)`` pairs in exactly these formats
(the answer follows the prompt directly and starts with a space):

- ``add``:     ``Q: 482+937=? A:`` -> `` 1419``   (operands of 1-3 digits)
- ``sub``:     ``Q: 482-137=? A:`` -> `` 345``    (non-negative results)
- ``mul``:     ``Q: 48*7=? A:``    -> `` 336``    (a 1-2 digit number times a 1 digit number)
- ``sort``:    ``Q: sort 7 3 9 1 4 A:`` -> `` 1 3 4 7 9``   (3-8 single digits)
- ``reverse``: ``Q: reverse cat dog sun A:`` -> `` sun dog cat``   (2-6 distinct words of WORDS)
- ``word``:    two-step word problems from 12 templates, numbers <= 50, e.g.
  ``Q: Tom has 12 apples. He buys 7 more and gives 5 away. How many apples does Tom have? A:``
  -> `` 14``

Splits. Every (task, split) pair draws from its own random stream (disjoint seed ranges). On top
of that, for every task except ``mul`` the *prompt sets* are disjoint: a prompt belongs to exactly
one split, decided by a stable hash of its text (train 80%, val 10%, test 10%). ``mul`` has only
990 distinct prompts and is a table to memorise rather than an algorithm to generalise, so its
splits share prompts (different seeds, same table); this is stated in the model cards.

Scoring is exact match of the text before the first EOS, stripped of surrounding whitespace.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Callable

__all__ = [
    "TASKS",
    "SPLITS",
    "Example",
    "WORDS",
    "NAMES",
    "OBJECTS",
    "WORD_TEMPLATES",
    "GEN_LENGTH",
    "make_examples",
    "sample_example",
    "split_of",
    "score",
    "strip_answer",
    "vocabulary_words",
]

TASKS: tuple[str, ...] = ("add", "sub", "mul", "sort", "reverse", "word")
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Default generation length for the task suite: every answer (at most 8 sort digits) plus EOS
# fits; the tiny models are trained mostly at this length and with regions of up to 32 tokens.
GEN_LENGTH = 12

# Seed offsets keep the random streams of the splits disjoint for any user seed < 10**6.
_SPLIT_SEED = {"train": 0, "val": 1_000_003, "test": 2_000_003}
_TASK_SEED = {name: i * 10_000_019 for i, name in enumerate(TASKS)}


@dataclass(frozen=True)
class Example:
    """One task instance: ``prompt + answer`` is the full text; ``answer`` starts with a space."""

    task: str
    prompt: str
    answer: str


# 240 common English words (lower case, letters only), used by ``reverse``.
WORDS: tuple[str, ...] = tuple(
    """
    cat dog sun moon star tree bird fish book door house car road rain snow wind fire water
    stone hill river lake sea ship boat train plane bike apple bread milk egg cake rice corn
    salt sugar tea cup box bag hat coat shoe sock bed chair table lamp clock phone key ring
    king queen man woman boy girl baby friend mother father sister brother teacher doctor
    farmer pilot cook hand foot head eye ear nose mouth hair face arm leg heart mind dream
    song music game ball toy kite drum bell flag map pen paper letter word story name city
    town park farm field garden flower grass leaf root seed wood gold iron glass paint color
    red blue green black white brown pink gray light dark day night week month year spring
    summer winter morning evening horse cow pig sheep goat duck hen mouse lion tiger bear wolf
    fox deer frog snake ant bee cloud sky rock sand shell wave island forest desert bridge
    wall roof window floor kitchen school shop market bank church office street corner window
    table money coin price gift party dance smile laugh voice sound noise silence happy sad
    big small tall short long fast slow hot cold warm new old young good bad rich poor soft
    hard loud quiet clean dirty early late open close run walk jump swim sing read write draw
    play work sleep eat drink cook wash build climb fly drive ride push pull carry throw catch
    """.split()
)
# dedupe while keeping order (the literal above repeats a couple of words by accident of typing)
WORDS = tuple(dict.fromkeys(WORDS))

# (name, subject pronoun, object pronoun)
NAMES: tuple[tuple[str, str, str], ...] = (
    ("Tom", "He", "him"), ("Anna", "She", "her"), ("Ben", "He", "him"), ("Mia", "She", "her"),
    ("Sam", "He", "him"), ("Lily", "She", "her"), ("Jack", "He", "him"), ("Emma", "She", "her"),
    ("Leo", "He", "him"), ("Zoe", "She", "her"), ("Max", "He", "him"), ("Ella", "She", "her"),
    ("Omar", "He", "him"), ("Nina", "She", "her"), ("Ravi", "He", "him"), ("Sara", "She", "her"),
    ("Luis", "He", "him"), ("Kate", "She", "her"), ("Paul", "He", "him"), ("Ruth", "She", "her"),
)
OBJECTS: tuple[str, ...] = (
    "apples", "pencils", "marbles", "cookies", "books", "stickers", "cards", "shells", "eggs",
    "oranges", "balls", "coins", "flowers", "candies", "stamps", "toys", "cupcakes", "bananas",
    "crayons", "rocks",
)

Gen = Callable[[random.Random], tuple[str, str]]


def _num(rng: random.Random, max_digits: int, min_digits: int = 1) -> int:
    """Uniform number of digits, then a uniform value with that many digits (1 digit: 0-9)."""
    d = rng.randint(min_digits, max_digits)
    lo = 0 if d == 1 else 10 ** (d - 1)
    return rng.randint(lo, 10**d - 1)


def _gen_add(rng: random.Random) -> tuple[str, str]:
    a, b = _num(rng, 3), _num(rng, 3)
    return f"Q: {a}+{b}=? A:", f" {a + b}"


def _gen_sub(rng: random.Random) -> tuple[str, str]:
    a, b = _num(rng, 3), _num(rng, 3)
    if a < b:
        a, b = b, a
    return f"Q: {a}-{b}=? A:", f" {a - b}"


def _gen_mul(rng: random.Random) -> tuple[str, str]:
    a, b = _num(rng, 2), rng.randint(0, 9)
    return f"Q: {a}*{b}=? A:", f" {a * b}"


def _gen_sort(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 8))]
    return "Q: sort " + " ".join(map(str, xs)) + " A:", " " + " ".join(map(str, sorted(xs)))


def _gen_reverse(rng: random.Random) -> tuple[str, str]:
    ws = rng.sample(WORDS, rng.randint(2, 6))
    return "Q: reverse " + " ".join(ws) + " A:", " " + " ".join(reversed(ws))


def _word_fields(rng: random.Random) -> dict[str, str]:
    (n1, p1, o1), (n2, _, _) = rng.sample(NAMES, 2)
    return {"name": n1, "pron": p1, "obj_pron": o1, "name2": n2, "obj": rng.choice(OBJECTS)}


# Each template: (text with {fields} and {a} {b} {c}, sampler of (a, b, c) -> answer or None).
# Numbers are <= 50 and every answer is a non-negative integer; None means "resample".
def _t_buy_give(a: int, b: int, c: int) -> int | None:
    return a + b - c if a + b - c >= 0 else None


def _t_eat_find(a: int, b: int, c: int) -> int | None:
    return a - b + c if b <= a else None


def _t_bags(a: int, b: int, c: int) -> int | None:
    return a * b - c if a <= 9 and b <= 9 and a * b >= c else None


def _t_box(a: int, b: int, c: int) -> int | None:
    return a + b - c if a + b >= c else None


def _t_pages(a: int, b: int, c: int) -> int | None:
    return a + b + c


def _t_more_than(a: int, b: int, c: int) -> int | None:
    return a + (a + b)


def _t_twice(a: int, b: int, c: int) -> int | None:
    return a + 2 * a


def _t_basket(a: int, b: int, c: int) -> int | None:
    return a - b - c if a >= b + c else None


def _t_earn(a: int, b: int, c: int) -> int | None:
    return a * b - c if a <= 9 and b <= 9 and a * b >= c else None


def _t_half(a: int, b: int, c: int) -> int | None:
    return a // 2 + b if a % 2 == 0 else None


def _t_bake(a: int, b: int, c: int) -> int | None:
    return a + b - c if a + b >= c else None


def _t_gift_lose(a: int, b: int, c: int) -> int | None:
    return a + b - c if a + b >= c else None


WORD_TEMPLATES: tuple[tuple[str, Callable[[int, int, int], int | None]], ...] = (
    ("{name} has {a} {obj}. {pron} buys {b} more and gives {c} away. "
     "How many {obj} does {name} have?", _t_buy_give),
    ("{name} had {a} {obj}. {pron} lost {b} of them and then found {c} more. "
     "How many {obj} does {name} have now?", _t_eat_find),
    ("{name} has {a} bags with {b} {obj} in each bag. {pron} gives away {c} {obj}. "
     "How many {obj} does {name} have left?", _t_bags),
    ("A box holds {a} {obj}. {name} adds {b} {obj} and then {name2} takes {c} {obj}. "
     "How many {obj} are in the box?", _t_box),
    ("{name} reads {a} pages on Monday and {b} pages on Tuesday. On Wednesday {name} reads {c} "
     "pages. How many pages did {name} read in total?", _t_pages),
    ("{name} has {a} {obj} and {name2} has {b} more than {name}. "
     "How many {obj} do they have together?", _t_more_than),
    ("{name} picked {a} {obj}. {name2} picked twice as many. "
     "How many {obj} did they pick in total?", _t_twice),
    ("There are {a} {obj} in a basket. {name} takes {b} and {name2} takes {c}. "
     "How many {obj} are left in the basket?", _t_basket),
    ("{name} earns {a} coins each day for {b} days. {pron} spends {c} coins. "
     "How many coins does {name} have left?", _t_earn),
    ("{name} has {a} {obj}. {pron} gives half of them to {name2} and then buys {b} more. "
     "How many {obj} does {name} have now?", _t_half),
    ("{name} bakes {a} {obj} in the morning and {b} in the evening. {pron} sells {c} of them. "
     "How many {obj} are left?", _t_bake),
    ("{name} had {a} {obj}. {name2} gave {obj_pron} {b} more, and then {name} lost {c}. "
     "How many {obj} does {name} have now?", _t_gift_lose),
)


def _gen_word(rng: random.Random) -> tuple[str, str]:
    text, fn = rng.choice(WORD_TEMPLATES)
    fields = _word_fields(rng)
    while True:
        a, b, c = rng.randint(1, 50), rng.randint(1, 50), rng.randint(1, 50)
        ans = fn(a, b, c)
        if ans is not None:
            break
        # templates with products draw small factors instead of rejecting ~99% of triples
        if fn in (_t_bags, _t_earn):
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            c = rng.randint(1, min(50, a * b))
            ans = fn(a, b, c)
            if ans is not None:
                break
    return "Q: " + text.format(a=a, b=b, c=c, **fields) + " A:", f" {ans}"


_GENERATORS: dict[str, Gen] = {
    "add": _gen_add,
    "sub": _gen_sub,
    "mul": _gen_mul,
    "sort": _gen_sort,
    "reverse": _gen_reverse,
    "word": _gen_word,
}
# tasks whose prompt sets are partitioned across splits by hash (see the module docstring)
_HASH_SPLIT = frozenset(TASKS) - {"mul"}


def split_of(prompt: str) -> str:
    """The split a prompt belongs to for hash-partitioned tasks: stable across runs/machines."""
    h = zlib.crc32(prompt.encode("utf-8")) % 10
    return "train" if h < 8 else ("val" if h == 8 else "test")


def _check(task: str, split: str) -> None:
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if split not in _SPLIT_SEED:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def sample_example(task: str, split: str, rng: random.Random) -> Example:
    """Draw one example of ``task`` belonging to ``split`` from a caller-owned stream."""
    _check(task, split)
    gen = _GENERATORS[task]
    while True:
        prompt, answer = gen(rng)
        if task not in _HASH_SPLIT or split_of(prompt) == split:
            return Example(task, prompt, answer)


def make_examples(task: str, split: str, n: int, seed: int = 0) -> list[Example]:
    """``n`` seeded examples of ``task`` from ``split`` ("train", "val" or "test").

    The same (task, split, n, seed) always gives the same list. Within one call prompts are
    distinct while the task's space allows it (``mul`` val/test may repeat for n > ~900).
    """
    _check(task, split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0 <= seed < 1_000_000:
        raise ValueError(f"seed must be in [0, 10**6) so split streams stay disjoint, got {seed}")
    rng = random.Random(_TASK_SEED[task] + _SPLIT_SEED[split] + seed)
    out: list[Example] = []
    seen: set[str] = set()
    misses = 0
    while len(out) < n:
        ex = sample_example(task, split, rng)
        if ex.prompt in seen and misses < 50 * n:
            misses += 1
            continue
        seen.add(ex.prompt)
        out.append(ex)
    return out


def strip_answer(text: str, eos: str = "<|eos|>") -> str:
    """Text before the first EOS marker, stripped of surrounding whitespace."""
    return text.split(eos, 1)[0].strip()


def score(prediction_text: str, answer: str, eos: str = "<|eos|>") -> bool:
    """Exact match of the prediction (text before its first EOS, stripped) with the answer."""
    return strip_answer(prediction_text, eos) == answer.strip()


def vocabulary_words() -> list[str]:
    """Every word (letters) any generator can emit, in a fixed order (for the tokenizer)."""
    words: list[str] = ["Q", "A", "sort", "reverse"]
    words += list(WORDS)
    for n, p, o in NAMES:
        words += [n, p, o]
    words += list(OBJECTS)
    for text, _ in WORD_TEMPLATES:
        for tok in text.replace(".", " ").replace("?", " ").replace(",", " ").split():
            if not tok.startswith("{"):
                words.append(tok)
    return list(dict.fromkeys(words))
