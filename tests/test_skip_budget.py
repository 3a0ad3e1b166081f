"""tests/skip_budget.py: CI fails when a test is skipped for a reason other than missing hardware."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = str(Path(__file__).resolve().parent)

pytest_plugins = ["pytester"]

INNER = '''
import pytest

def test_runs():
    pass

@pytest.mark.skip(reason="no CUDA device (torch.cuda.is_available() is False)")
def test_gpu():
    pass

def test_isa():
    pytest.skip("this CPU/build lacks amx")
'''


@pytest.mark.parametrize("extra,enforced,rc", [  # rc: the inner run's exit code
    ("", True, 0),  # hardware skips only
    ('\n@pytest.mark.skip(reason="lm_eval not installed")\ndef test_dep():\n    pass\n', True, 1),
    ('\n@pytest.mark.skip(reason="lm_eval not installed")\ndef test_dep():\n    pass\n', False, 0),
    ("MODULE", True, 1),  # a module skipped at import (an optional dependency missing)
])
def test_only_hardware_skips_pass_in_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                        extra: str, enforced: bool, rc: int) -> None:
    monkeypatch.setenv("FAIR_SKIPS", "hardware" if enforced else "")
    monkeypatch.setenv("PYTHONPATH", TESTS)  # the inner run imports the plugin from tests/
    if extra == "MODULE":
        pytester.makepyfile(test_inner=INNER, test_dep='import pytest\npytest.importorskip("no_such_module_fair")\n')
    else:
        pytester.makepyfile(test_inner=INNER + extra)
    res = pytester.runpytest_subprocess("-p", "skip_budget", "-p", "no:cacheprovider")
    assert res.ret == rc, res.stdout.str()
    res.stdout.fnmatch_lines(["*skipped tests by reason*"])
    if rc:
        res.stdout.fnmatch_lines(["*NOT HARDWARE*", "*the run fails*"])
