"""The validation layer (fair_calib_ext.validate) and the flag tables of the three CLIs (issue 20).

Table-driven: every numeric flag of ``calibrate``, ``evaluate`` and ``sample`` gets the values on
both sides of each of its limits, NaN/inf (floats) and a non-integer (ints); the CLIs answer a bad
value with exit 2, one ``error:`` line naming the flag, and nothing written. Every JSON reader
gets truncated, garbage, wrong-typed and non-UTF-8 files and names the file.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from fair_calib_ext import calibrate as calibrate_cli
from fair_calib_ext import evaluate as evaluate_cli
from fair_calib_ext import sample as sample_cli
from fair_calib_ext.errors import CheckpointError, UsageError
from fair_calib_ext.validate import Flag, check_flags, check_float, check_int, json_field, read_json

TABLES = {"calibrate": calibrate_cli.FLAGS, "evaluate": evaluate_cli._flags(), "sample": sample_cli._flags()}
CASES = [(cli, f) for cli, flags in TABLES.items() for f in flags]


def _bad_and_good(f: Flag) -> tuple[list[object], list[object]]:
    """Values just outside each limit (and NaN / inf / 1.5 by kind), and the limits themselves."""
    bad: list[object] = []
    good: list[object] = []
    step = 1 if f.kind == "int" else 1e-6 * max(1.0, abs(f.lo or 0), abs(f.hi or 0))
    if f.lo is not None:
        (bad if f.lo_open else good).append(f.lo)
        bad.append(f.lo - step)
        if f.lo_open:
            good.append(f.lo + step)
    if f.hi is not None:
        good.append(f.hi)
        bad.append(f.hi + step)
    if f.kind == "float":
        bad += [math.nan, math.inf, -math.inf]
    else:
        bad += [1.5, True]
    return bad, good


@pytest.mark.parametrize("cli,flag", CASES, ids=[f"{c}{f.flag}" for c, f in CASES])
def test_every_flag_limit_both_sides(cli: str, flag: Flag) -> None:
    assert flag.lo is not None or flag.hi is not None, f"{cli} {flag.flag} has no limit"
    bad, good = _bad_and_good(flag)
    for v in good:
        check_flags(argparse.Namespace(**{flag.dest: v}), [flag])
    for v in bad:
        with pytest.raises(UsageError, match=f"^{flag.flag} must be "):
            check_flags(argparse.Namespace(**{flag.dest: v}), [flag])
    check_flags(argparse.Namespace(**{flag.dest: None}), [flag])  # not given: the default applies


def test_every_numeric_flag_has_a_rule() -> None:
    """A numeric flag added to a parser without a rule in its table fails here."""
    parsers = {"calibrate": calibrate_cli._parser(), "evaluate": evaluate_cli.build_parser(),
               "sample": sample_cli.build_parser()}
    for cli, p in parsers.items():
        numeric = {a.dest for a in p._actions if a.type in (int, float)}
        ruled = {f.dest for f in TABLES[cli]}
        assert numeric <= ruled, (cli, sorted(numeric - ruled))


def _one_line_2(rc: int, capsys: pytest.CaptureFixture[str], needle: str) -> None:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("cli,flag", CASES, ids=[f"{c}{f.flag}" for c, f in CASES])
def test_cli_refuses_a_bad_value_in_one_line(cli: str, flag: Flag, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = _bad_and_good(flag)[0][0]  # just outside the first limit
    value = str(int(bad)) if flag.kind == "int" else repr(float(bad))
    out = tmp_path / "out"
    argv = {"calibrate": ["--model", "tiny-llada", "--method", "fair", "--out", str(out), "--no-progress"],
            "evaluate": ["--model", "tiny-llada", "--tasks", "add", "--out", str(out), "--no-progress"],
            "sample": ["--model", "tiny-llada", "--prompt", "x"]}[cli]
    main = {"calibrate": calibrate_cli.main, "evaluate": evaluate_cli.main, "sample": sample_cli.main}[cli]
    _one_line_2(main([*argv, f"{flag.flag}={value}"]), capsys, flag.flag)
    assert not out.exists() and not tmp_path.joinpath("out.run").exists()


# ---- single values -----------------------------------------------------------------------------


def test_check_int_and_float_name_the_argument() -> None:
    assert check_int(3, "n", lo=1, hi=3) == 3
    for v, msg in ((0, r"n must be an integer in \[1, 3\], got 0"), (4, "got 4"), ("3", "n must be an integer"),
                   (3.0, "n must be an integer"), (False, "n must be an integer")):
        with pytest.raises(ValueError, match=msg):
            check_int(v, "n", lo=1, hi=3)
    assert check_float(0.5, "t", lo=0.0, lo_open=True, hi=1.0) == 0.5
    for v in (0.0, 1.5, math.nan, math.inf, "x", None):
        with pytest.raises(ValueError, match="t must be a"):
            check_float(v, "t", lo=0.0, lo_open=True, hi=1.0)


# ---- files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("content,match", [
    (b'{"a": 1', "not valid JSON"),
    (b"garbage", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[1, 2]", "expected an object at the top level, got list"),
    (b'"text"', "expected an object at the top level, got str"),
    (b"\xff\xfe{}", "cannot read"),
    (b"[" * 100_000, "not valid JSON"),
])
def test_read_json_names_the_file(tmp_path: Path, content: bytes, match: str) -> None:
    f = tmp_path / "x.json"
    f.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as e:
        read_json(f)
    assert str(e.value).startswith(f"{f}: ") and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="file not found"):
        read_json(tmp_path / "absent.json")


def test_json_field_types_and_ranges() -> None:
    d = {"n": 3, "x": 0.5, "s": "a", "b": True, "none": None, "f": 2.5}
    assert json_field(d, "n", "c.json", "int", lo=1) == 3
    assert json_field(d, "missing", "c.json", "int", default=7) == 7
    assert json_field(d, "none", "c.json", "int", nullable=True) is None
    for key, kind, kw, match in (("n", "int", {"hi": 2}, r"c.json: field 'n' must be an integer <= 2, got 3"),
                                 ("f", "int", {}, "field 'f' must be an integer"),
                                 ("b", "int", {}, "field 'b' must be an integer"),
                                 ("s", "float", {}, "field 's' must be a number"),
                                 ("s", "dict", {}, "field 's' must be a dict"),
                                 ("missing", "int", {}, "field 'missing' is missing")):
        with pytest.raises(CheckpointError, match=match):
            json_field(d, key, "c.json", kind, **kw)
    json.dumps(d)


# ---- damaged checkpoint files: one line naming the file (and the field), exit 2 -------------------

def _cfg_with(**kw: object):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **kw}))
    return edit


def _write(name: str, text: str):
    return lambda d: (d / name).write_text(text)


def _shard_index(text: str):
    def edit(d: Path) -> None:
        (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
        (d / "model.safetensors.index.json").write_text(text)
    return edit


DAMAGED = {
    "config truncated": (_write("config.json", '{"d_model": 12'), "config.json: not valid JSON"),
    "config a list": (_write("config.json", "[1]"), "config.json: expected an object"),
    "config garbage bytes": (lambda d: (d / "config.json").write_bytes(b"\xff\x00\x01"), "config.json: cannot read"),
    "n_layers huge": (_cfg_with(n_layers=10**9), "num_hidden_layers must be an integer in [1, 1024], got 1000000000"),
    "d_model a string": (_cfg_with(d_model="abc"), "config.json: field 'd_model' must be an integer, got 'abc'"),
    "d_model negative": (_cfg_with(d_model=-128), "field 'd_model' must be an integer >= 1, got -128"),
    "n_heads zero": (_cfg_with(n_heads=0), "field 'n_heads' must be an integer >= 1, got 0"),
    "eps a string": (_cfg_with(rms_norm_eps="x"), "field 'rms_norm_eps' must be a number"),
    "unknown family": (_cfg_with(model_type="gpt2"), "unsupported model_type 'gpt2'"),
    "generation_config truncated": (_write("generation_config.json", '{"steps":'), "generation_config.json: not valid"),
    "generation_config a list": (_write("generation_config.json", "[]"), "generation_config.json: expected an object"),
    "generation steps a string": (_write("generation_config.json", '{"steps": "many"}'),
                                  "generation_config.json: field 'steps' must be an integer, got 'many'"),
    "generation top_p out of range": (_write("generation_config.json", '{"top_p": 2}'), "field 'top_p' must be"),
    "tokenizer.json truncated": (_write("tokenizer.json", '{"model":'), "tokenizer.json: not valid JSON"),
    "tokenizer.json wrong shape": (_write("tokenizer.json", '{"model": 5}'), "cannot load the tokenizer"),
    "tokenizer_config truncated": (_write("tokenizer_config.json", "{"), "tokenizer_config.json: not valid JSON"),
    "shard index truncated": (_shard_index('{"weight_map": '), "model.safetensors.index.json: not a valid shard index"),
    "shard index a list": (_shard_index("[]"), "model.safetensors.index.json: not a valid shard index"),
    "safetensors truncated": (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00"), "model.safetensors: "),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_checkpoint_file_is_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from fair_calib_ext.models import ASSETS_DIR

    edit, needle = DAMAGED[case]
    d = shutil.copytree(ASSETS_DIR / "tiny-llada", tmp_path / "m")
    edit(d)
    rc = sample_cli.main(["--model", str(d), "--prompt", "x", "--gen-length", "4"])
    _one_line_2(rc, capsys, needle)


def test_model_config_refuses_sizes_before_building() -> None:
    from fair_calib_ext.models.testing import tiny_config

    # refused by the config itself, so nothing (build_model, load_pretrained) starts building
    with pytest.raises(ValueError, match="num_hidden_layers must be an integer in"):
        tiny_config("llada", num_hidden_layers=10**9)
    tiny_config("llada", num_hidden_layers=1024)  # the limit itself is accepted
    with pytest.raises(ValueError, match="rms_norm_eps must be a finite number"):
        tiny_config("dream", rms_norm_eps=float("nan"))


@pytest.mark.parametrize("kw,match", [
    ({"dtype": "float32"}, "dtype must be one of"),
    ({"dtype": __import__("torch").int8}, "dtype must be one of"),
    ({"device": "gpu"}, "device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ({"device": 3.5}, "device must be"),
])
def test_load_pretrained_names_a_bad_dtype_or_device(kw: dict, match: str) -> None:
    from fair_calib_ext.models import load_pretrained

    with pytest.raises(ValueError, match=match):
        load_pretrained("tiny-llada", **kw)
