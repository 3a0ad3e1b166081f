"""Session-wide checks: which fair_calib_ext is under test, and that its extension loaded."""

from __future__ import annotations

import os

import pytest

import fair_calib_ext
from skip_budget import (  # noqa: F401  (hooks: skips grouped by reason, FAIR_SKIPS=hardware budget)
    pytest_collectreport,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)


def pytest_report_header(config: pytest.Config) -> list[str]:
    info = fair_calib_ext.build_info() if fair_calib_ext._C is not None else {}
    return [
        f"fair_calib_ext from {os.path.dirname(fair_calib_ext.__file__)}",
        f"fair_calib_ext build: {info or 'extension not loaded: ' + repr(fair_calib_ext._C_ERROR)}",
    ]


def pytest_sessionstart(session: pytest.Session) -> None:
    # Op tests skip when the kernels are not registered; in CI that would hide a broken build
    # behind a green run, so there a missing extension is an error.
    required = os.environ.get("FAIR_REQUIRE_EXT", os.environ.get("CI", "")).lower() in ("1", "true", "yes")
    if required and fair_calib_ext._C is None:
        raise pytest.UsageError(
            f"fair_calib_ext._C did not load ({fair_calib_ext._C_ERROR!r}); "
            "install the package (pip install .) and run `pytest` from the repo root")


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny shapes: a threaded pool on a busy 2-core machine spin-waits
    (measured up to ~100x slower here); restores the previous count afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
