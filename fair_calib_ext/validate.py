"""One validation layer: the rules for values and for the JSON files the package reads, written once.

Used by the CLIs (``sample``, ``calibrate``, ``evaluate``), the lm-eval adapter and the public
Python API (``generate``, ``load_pretrained``, ``W4A4Linear``, the op wrappers). Every check
names the argument (a CLI flag, a keyword, a file and its field) and what was expected, and
raises the error type the caller asks for: :class:`~fair_calib_ext.errors.UsageError` for a
CLI flag (one line, exit 2), ``ValueError`` for a Python argument,
:class:`~fair_calib_ext.errors.CheckpointError` for a file.

* :func:`check_int` / :func:`check_float` / :func:`check_choice`: one value.
* :class:`Flag` + :func:`check_flags`: a table of CLI flags (type, range, finiteness), checked
  in one place before any work; :func:`refuse_unused` refuses flags that would have no effect.
* :func:`read_json` / :func:`json_field`: a JSON file that must hold an object, and one field
  of it with its type and range, naming the file and the field.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UsageError

__all__ = ["MAX_SEED", "Flag", "check_choice", "check_flags", "check_float", "check_int", "json_field", "read_json",
           "refuse_unused"]

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def _range_text(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return "a number"


def check_int(value: Any, name: str, *, lo: int | None = None, hi: int | None = None,
              exc: type[Exception] = ValueError) -> int:
    """``value`` as an int in ``[lo, hi]`` (bounds optional); bools and floats are refused."""
    if isinstance(value, bool):
        raise exc(f"{name} must be an integer, got {value!r}")
    if not isinstance(value, int):
        try:  # numpy / torch integer scalars
            value = operator.index(value)
        except TypeError:
            raise exc(f"{name} must be an integer, got {value!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise exc(f"{name} must be an integer {_range_text(lo, hi)}, got {value}")
    return int(value)


def check_float(value: Any, name: str, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False, exc: type[Exception] = ValueError) -> float:
    """``value`` as a finite float in the given range (``lo_open``/``hi_open``: strict bounds)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy / 0-dim torch scalars
        except (TypeError, ValueError):
            raise exc(f"{name} must be a number, got {value!r}") from None
    v = float(value)
    bad = not math.isfinite(v)
    bad = bad or (lo is not None and (v <= lo if lo_open else v < lo))
    bad = bad or (hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        raise exc(f"{name} must be a finite number {_range_text(lo, hi, lo_open, hi_open)}, got {value}")
    return v


def check_choice(value: Any, name: str, choices: Iterable[Any], *, exc: type[Exception] = ValueError) -> Any:
    """``value`` must be one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise exc(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


@dataclass(frozen=True)
class Flag:
    """The rule for one numeric CLI flag: ``kind`` "int" or "float", an inclusive range (``lo_open``
    makes the lower bound strict), and ``hi`` wherever memory or time grows with the value."""

    dest: str
    kind: str = "int"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")


def check_flags(args: argparse.Namespace, flags: Iterable[Flag]) -> None:
    """Checks every flag of the table that was given (``None`` = not given: the default applies)."""
    for f in flags:
        v = getattr(args, f.dest, None)
        if v is None:
            continue
        if f.kind == "int":
            check_int(v, f.flag, lo=None if f.lo is None else int(f.lo), hi=None if f.hi is None else int(f.hi),
                      exc=UsageError)
        else:
            check_float(v, f.flag, lo=f.lo, hi=f.hi, lo_open=f.lo_open, exc=UsageError)


def refuse_unused(args: argparse.Namespace, dests: Iterable[str], reason: str) -> None:
    """Flags in ``dests`` that were given (not None, not False) would have no effect: refuse them
    instead of accepting and recording them. ``reason`` completes "… <reason>"."""
    given = [("--" + d.replace("_", "-")) for d in dests if getattr(args, d, None) not in (None, False)]
    if given:
        raise UsageError(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect {reason}")


# ---- files ----------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike[str], *, kind: type = dict) -> Any:
    """A JSON file whose top level must be a ``kind`` (dict or list); a missing, unreadable,
    non-UTF-8, truncated or wrong-typed file is a one-line :class:`CheckpointError` naming it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{p}: cannot read ({exc})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise CheckpointError(f"{p}: not valid JSON (nested too deeply)") from None
    if not isinstance(obj, kind):
        want = "an object" if kind is dict else "a list"
        raise CheckpointError(f"{p}: expected {want} at the top level, got {type(obj).__name__}")
    return obj


_MISSING = object()


def json_field(d: dict[str, Any], key: str, source: str | os.PathLike[str], kind: str, *,
               lo: float | None = None, hi: float | None = None, lo_open: bool = False,
               default: Any = _MISSING, nullable: bool = False) -> Any:
    """Field ``key`` of a JSON object read from ``source``: ``kind`` is "int", "float", "bool",
    "str", "list" or "dict"; numbers are range-checked. Missing without a ``default``, wrong type
    or out of range -> :class:`CheckpointError` "<source>: field '<key>' ..."."""
    if key not in d:
        if default is _MISSING:
            raise CheckpointError(f"{source}: field {key!r} is missing")
        return default
    v = d[key]
    if v is None and nullable:
        return None
    name = f"{source}: field {key!r}"
    if kind == "int":
        return check_int(v, name, lo=None if lo is None else int(lo), hi=None if hi is None else int(hi),
                         exc=CheckpointError)
    if kind == "float":
        return check_float(v, name, lo=lo, hi=hi, lo_open=lo_open, exc=CheckpointError)
    types = {"bool": bool, "str": str, "list": list, "dict": dict}[kind]
    if not isinstance(v, types):
        raise CheckpointError(f"{name} must be a {kind}, got {v!r}"[:300])
    return v
