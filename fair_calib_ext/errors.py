"""Error types shared by the library and the CLIs.

The CLIs print :class:`UsageError` and :class:`CheckpointError` as one ``error: ...`` line and
exit with status 2; every other exception is a bug and keeps its traceback. This module imports
nothing from the package, so every layer (quant, models, calib, eval, the CLIs) can use it.
"""

from __future__ import annotations

import sys
from typing import Callable

__all__ = ["UsageError", "CheckpointError", "ResumeError", "USER_ERRORS", "one_line", "report"]


class UsageError(ValueError):
    """An argument or input the user can fix (names the argument and what was expected)."""


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded (missing files, names, shapes, bytes)."""


class ResumeError(CheckpointError):
    """A calibration run directory that cannot be resumed (other model/config, unreadable file)."""


# what a CLI reports in one line; anything else is an internal error
USER_ERRORS: tuple[type[BaseException], ...] = (UsageError, CheckpointError)


def one_line(exc: BaseException) -> str:
    """The whole message on one line (multi-line reasons joined, never cut off)."""
    parts = [p.strip() for p in str(exc).splitlines() if p.strip()]
    return " ".join(parts) or type(exc).__name__


def report(fn: Callable[[], int]) -> int:
    """Run a CLI body: user errors -> ``error: <one line>`` on stderr and 2; bugs propagate."""
    try:
        return fn()
    except USER_ERRORS as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
