"""Pytest plugin: skipped tests grouped by reason, and (with ``FAIR_SKIPS=hardware``, as CI sets)
a failed run when a test is skipped for any reason other than missing hardware.

A skip hides a test; in CI the only acceptable reason is the machine: no GPU / CUDA toolkit, or
a CPU without an ISA (AMX, AVX-512, ...). A missing optional dependency, a missing asset or an
unbuilt extension is a broken install and fails the run. ``tests/conftest.py`` imports the hooks.
"""

from __future__ import annotations

import os
import re

import pytest

# what "missing hardware" looks like in this suite's skip reasons
HARDWARE_SKIP = re.compile(r"cuda|gpu|nvcc|\bsm_\d+|\bamx\b|avx|\bisa\b|this cpu", re.IGNORECASE)

_SKIPS: dict[str, list[str]] = {}


def _record(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    lr = report.longrepr
    reason = lr[2] if isinstance(lr, tuple) else str(lr)
    _SKIPS.setdefault(reason.removeprefix("Skipped: "), []).append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:  # module-level skips
    _record(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "setup" or report.skipped:
        _record(report)


def not_hardware(skips: dict[str, list[str]]) -> dict[str, list[str]]:
    """The skips whose reason is not missing hardware."""
    return {r: ids for r, ids in skips.items() if not HARDWARE_SKIP.search(r)}


def _enforced() -> bool:
    return os.environ.get("FAIR_SKIPS", "").lower() == "hardware"


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _enforced() and not_hardware(_SKIPS) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    if not _SKIPS:
        return
    tr = terminalreporter
    tr.section("skipped tests by reason")
    bad = not_hardware(_SKIPS)
    for reason, ids in sorted(_SKIPS.items(), key=lambda kv: -len(kv[1])):
        tag = "NOT HARDWARE " if reason in bad else ""
        tr.write_line(f"{tag}{len(ids)} x {reason}")
        for nodeid in ids[:3]:
            tr.write_line(f"    {nodeid}")
    if bad and _enforced():
        tr.write_line(f"FAIR_SKIPS=hardware: {sum(map(len, bad.values()))} test(s) skipped for a reason other "
                      "than missing hardware (a GPU, the CUDA toolkit, a CPU ISA); the run fails", red=True)
