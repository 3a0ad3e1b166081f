"""Clear refusals before the work (issue 14 §3–§5): every CLI turns a wrong argument or a damaged
input into one ``error: ...`` line and exit status 2, and lets internal errors keep their traceback."""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import fair_calib_ext
from fair_calib_ext import calibrate as calibrate_cli
from fair_calib_ext import evaluate as evaluate_cli
from fair_calib_ext import sample as sample_cli
from fair_calib_ext.errors import CheckpointError
from fair_calib_ext.models import ASSETS_DIR, available_embedded, load_pretrained, read_config

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # tests/conftest.py
    pytest.mark.skipif("tiny-llada" not in available_embedded(), reason="embedded tiny-llada not built"),
]

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-llada"
EVAL_ARGS = ["--tasks", "add", "--n", "1", "--no-progress", "--device", "cpu"]
SMALL = ["--nsamples", "2", "--seqlen", "16"]  # no --epochs: rtn refuses it


def _one_line_2(rc: int, capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture(scope="module")
def qdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llada quantized with RTN (seconds), saved with its tokenizer."""
    from fair_calib_ext.calib import calibrate, save_quantized

    torch.set_num_threads(1)
    model = load_pretrained(MODEL)
    calibrate(model, "rtn", torch.randint(4, 700, (2, 16)), progress=False)
    return save_quantized(model, tmp_path_factory.mktemp("q") / "rtn", tokenizer_from=ASSETS_DIR / MODEL)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# -- §3: --quantized takes quantized checkpoints only -----------------------------------------
def test_quantized_refuses_full_precision_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fp = str(ASSETS_DIR / MODEL)
    rc = sample_cli.main(["--quantized", fp, "--prompt", "Q: 1+1=? A:", "--gen-length", "4"])
    _one_line_2(rc, capsys, "--quantized", "quantization_config")
    rc = evaluate_cli.main(["--model", MODEL, "--quantized", fp, "--out", str(tmp_path / "e"), *EVAL_ARGS])
    _one_line_2(rc, capsys, "--quantized", "quantization_config")
    assert not (tmp_path / "e").exists()


# -- issue 20: a quantized checkpoint is compared only with the model it was made from ----------
def test_quantized_of_another_family_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """tiny-dream quantized, compared with --model tiny-llada (same shapes, other family): the
    flips would be measured against the wrong teacher, so the pairing is refused before any work."""
    qd = tmp_path / "qd"
    assert calibrate_cli.main(["--model", "tiny-dream", "--method", "rtn", "--nsamples", "2", "--seqlen", "16",
                               "--out", str(qd), "--no-progress"]) == 0
    capsys.readouterr()
    rc = evaluate_cli.main(["--model", MODEL, "--quantized", str(qd), "--out", str(tmp_path / "e"), *EVAL_ARGS])
    _one_line_2(rc, capsys, "--quantized", "was not made from --model tiny-llada", "family dream vs llada")
    assert not (tmp_path / "e").exists()
    rc = sample_cli.main(["--model", MODEL, "--quantized", str(qd), "--prompt", "Q: 1+1=? A:", "--gen-length", "4"])
    _one_line_2(rc, capsys, "family dream vs llada")
    # a shape difference is named too
    other = _copy(ASSETS_DIR / "tiny-dream", tmp_path / "dream-wide")
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] = 512
    (other / "config.json").write_text(json.dumps(cfg))
    rc = evaluate_cli.main(["--model", str(other), "--quantized", str(qd), "--out", str(tmp_path / "e"), *EVAL_ARGS])
    _one_line_2(rc, capsys, "intermediate_size 384 vs 512")
    # the right pairing still runs
    rc = evaluate_cli.main(["--model", "tiny-dream", "--quantized", str(qd), "--out", str(tmp_path / "e"),
                            *EVAL_ARGS, "--tasks", "add", "--gen-length", "4"])
    assert rc == 0, capsys.readouterr().err


# -- §3: evaluate validates sampler settings exactly as sample does --------------------------
@pytest.mark.parametrize("argv,needle", [
    (["--gen-length", "0"], "--gen-length must be >= 1"),
    (["--gen-length", "8", "--steps", "0"], "--steps must be >= 1"),
    (["--gen-length", "8", "--block-length", "3"], "divisible by --block-length"),
    (["--gen-length", "8", "--steps", "1000"], "--steps (1000) must be <= --gen-length (8)"),
    (["--gen-length", "8", "--steps", "100000000"], "--steps must be an integer <= 1048576, got 100000000"),
    (["--gen-length", "100000000"], "--gen-length must be an integer <= 1048576, got 100000000"),
])
def test_evaluate_validates_sampler_like_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                argv: list[str], needle: str) -> None:
    rc = sample_cli.main(["--model", MODEL, "--prompt", "Q: 1+1=? A:", *argv])
    err_sample = _one_line_2(rc, capsys, needle)
    rc = evaluate_cli.main(["--model", MODEL, "--out", str(tmp_path / "e"), *EVAL_ARGS, *argv])
    err_eval = _one_line_2(rc, capsys, needle)
    assert err_sample == err_eval  # one shared validator
    assert not (tmp_path / "e").exists()


# -- §3: options accepted and ignored ----------------------------------------------------------
def test_quantconfig_has_no_dead_clip_fields() -> None:
    import dataclasses

    from fair_calib_ext.quant import QuantConfig

    names = {f.name for f in dataclasses.fields(QuantConfig)}
    assert not names & {"learn_clip", "clip_init"}  # never read: FlatQuant's clips are MethodConfig's
    # dicts written before the removal still load
    assert QuantConfig.from_dict({"w_bits": 4, "a_bits": 4, "learn_clip": True, "clip_init": 4.0}).w_bits == 4


@pytest.mark.parametrize("argv,needle", [
    (["--method", "flatquant", "--act-clip", "0.9"], "--act-clip"),
    (["--method", "fair", "--w-clip-search", "on"], "--w-clip-search"),
    (["--method", "rtn", "--gptq-block", "64"], "--gptq-block"),
    (["--method", "quarot", "--gptq-act-order"], "--gptq-act-order"),
    (["--method", "smoothquant", "--gptq-damp", "0.1"], "--gptq-damp"),
    (["--method", "quarot+gptq", "--gptq-block", "0"], "--gptq-block must be an integer in [1, 65536], got 0"),
    (["--method", "rtn", "--lr", "nan"], "--lr must be a finite number in (0, 10.0], got nan"),
    (["--method", "fair", "--clip-lr", "inf"], "--clip-lr must be a finite number in (0, 10.0], got inf"),
    (["--method", "gptq", "--gptq-damp", "-1"], "--gptq-damp must be a finite number in (0, 10.0], got -1.0"),
    (["--method", "rtn", "--threads", "-1"], "--threads must be an integer in [1, 4096], got -1"),
    (["--method", "rtn", "--nsamples", "100000000"], "--nsamples must be an integer in [1, 65536], got 100000000"),
    # issue 20: flags that would have no effect are refused, not recorded in method_config
    (["--method", "rtn", "--lr", "0.3", "--epochs", "7"], "--epochs, --lr have no effect with --method rtn"),
    (["--method", "quarot+gptq", "--clip-lr", "0.1"], "--clip-lr has no effect with --method quarot+gptq"),
    (["--method", "fair", "--sq-alpha", "0.7"], "--sq-alpha has no effect with --method fair"),
    (["--method", "fair", "--prior-preset", "literal", "--prior-mode", "uniform", "--probe-steps", "4"],
     "--probe-steps has no effect with a uniform prior"),
    (["--method", "fair", "--prior", "saved/prior", "--lambda1", "5"], "--lambda1 has no effect with --prior"),
    (["--method", "fair", "--prior", "saved/prior", "--probe-policy", "noise"], "--probe-policy has no effect"),
    # issue 20: one line and exit 2 for every value out of its range (both sides of each limit are
    # in test_calibrate_flag_limits)
    (["--method", "rtn", "--seed", "-5"], "--seed must be an integer in [0, 999999], got -5"),
    (["--method", "fair", "--probe-batch-size", "0"], "--probe-batch-size must be an integer in [1, 4096], got 0"),
    (["--method", "fair", "--lambda1", "1e300"], "--lambda1 must be a finite number in [0.0, 1000000.0]"),
    (["--method", "rtn", "--batch-size", "0"], "--batch-size must be an integer in [1, 4096], got 0"),
    (["--method", "fair", "--epochs", "-1"], "--epochs must be an integer in [0, 10000], got -1"),
])
def test_calibrate_refuses_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                       needle: str) -> None:
    out = tmp_path / "q"
    # a small run, so that a refusal that went missing fails the test in seconds, not minutes
    rc = calibrate_cli.main(["--model", MODEL, "--out", str(out), "--no-progress", *SMALL, *argv])
    _one_line_2(rc, capsys, needle)
    assert not out.exists() and not out.with_name("q.run").exists()


# -- §3: the CLI's flatquant is the report's flatquant (FP block inputs) ---------------------
def test_cli_flatquant_uses_fp_inputs_like_reproduce(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_for_test", ROOT / "python" / "reproduce.py")
    rep = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_for_test"] = rep  # dataclasses need the module registered
    spec.loader.exec_module(rep)
    want = rep.row_spec("FlatQuant")[0]["fp_inputs"]
    base = ["--model", MODEL, "--nsamples", "2", "--seqlen", "16", "--epochs", "0", "--no-progress"]
    for extra, expect in (([], want), (["--no-fp-inputs"], False)):
        out = tmp_path / f"fq{len(extra)}"
        assert calibrate_cli.main([*base, "--method", "flatquant", "--out", str(out), *extra]) == 0
        mc = read_config(out)["quantization_config"]["method_config"]
        assert mc["fp_inputs"] is expect
    assert want is True


# -- §4: outputs validated first ---------------------------------------------------------------
def test_out_validated_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    rc = calibrate_cli.main(["--model", MODEL, "--method", "rtn", "--out", str(afile), "--overwrite", *SMALL])
    _one_line_2(rc, capsys, "--out", "not a directory")
    rc = calibrate_cli.main(["--model", MODEL, "--method", "rtn", "--out", str(afile / "sub"), *SMALL])
    _one_line_2(rc, capsys, "--out", "cannot be created")
    rc = calibrate_cli.main(["--model", MODEL, "--method", "rtn", "--out", "/proc/fair_calib_test/q", *SMALL])
    _one_line_2(rc, capsys, "--out")
    rc = evaluate_cli.main(["--model", MODEL, "--out", str(afile), *EVAL_ARGS])
    _one_line_2(rc, capsys, "--out", "not a directory")
    rc = evaluate_cli.main(["--model", MODEL, "--out", "/proc/fair_calib_test/e", *EVAL_ARGS])
    _one_line_2(rc, capsys, "--out")
    assert afile.read_text() == "x"


@pytest.mark.parametrize("layout", ["same", "run-in-out", "out-in-run", "log-in-out"])
def test_overlapping_outputs_refused_and_nothing_deleted(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         layout: str) -> None:
    """issue 20: `--out X --run-dir X --overwrite` used to finish, then delete X with the run dir."""
    x = tmp_path / "x"
    x.mkdir()
    (x / "mine.txt").write_text("keep")
    out, run_dir, log = {"same": (x, x, None), "run-in-out": (x, x / "run", None),
                         "out-in-run": (x / "q", x, None), "log-in-out": (x, tmp_path / "r", x / "log.jsonl")}[layout]
    argv = ["--model", MODEL, "--method", "rtn", "--out", str(out), "--run-dir", str(run_dir), "--overwrite",
            "--no-progress", *SMALL] + (["--log", str(log)] if log else [])
    _one_line_2(calibrate_cli.main(argv), capsys, "must" if layout != "log-in-out" else "--log")
    assert sorted(p.name for p in x.iterdir()) == ["mine.txt"] and (x / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("labels,needle", [
    (["../../escape"], "without path separators"),
    (["a/b"], "without path separators"),
    ([""], "non-empty"),
    (["FP"], "not 'FP'"),
    (["x", "x"], "'x' is given twice"),
    (None, "'rtn' is given twice"),  # two dirs with the same name and no --labels
])
def test_evaluate_labels_that_would_misplace_plots_are_refused(qdir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               labels: list[str] | None, needle: str) -> None:
    """Labels name the prior plots in --out: one with a path separator used to write outside it
    (or fail after the whole evaluation), a repeated one to overwrite the other's plot."""
    twin = _copy(qdir, tmp_path / "other" / "rtn")
    lab = ["--labels", *labels] if labels is not None else []
    if labels is not None and len(labels) == 1:
        qdirs = [str(qdir)]
    else:
        qdirs = [str(qdir), str(twin)]
    rc = evaluate_cli.main(["--model", MODEL, "--quantized", *qdirs, *lab, "--out", str(tmp_path / "e"), *EVAL_ARGS])
    _one_line_2(rc, capsys, "--labels", needle)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("which", ["out", "out-parent", "run-dir", "log"])
def test_outputs_never_replace_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str) -> None:
    """issue 20: `--model D --out D --overwrite` used to replace the full-precision checkpoint
    with the quantized one (its other files deleted)."""
    model = _copy(ASSETS_DIR / MODEL, tmp_path / "runs" / "fp")
    before = sorted(p.name for p in model.iterdir())
    out, run_dir, log = tmp_path / "q", tmp_path / "r", None
    if which == "out":
        out = model
    elif which == "out-parent":
        out = tmp_path / "runs"
    elif which == "run-dir":
        run_dir = model
    else:
        log = model / "config.json"
    argv = ["--model", str(model), "--method", "rtn", "--out", str(out), "--run-dir", str(run_dir), "--overwrite",
            "--no-progress", *SMALL] + (["--log", str(log)] if log else [])
    _one_line_2(calibrate_cli.main(argv), capsys, "--model checkpoint")
    assert sorted(p.name for p in model.iterdir()) == before
    assert "quantization_config" not in read_config(model)


def test_log_is_never_an_input_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "calib.txt"
    data.write_text("some text to calibrate on\n" * 4)
    argv = ["--model", MODEL, "--method", "rtn", "--calib-data", str(data), "--log", str(data),
            "--out", str(tmp_path / "q"), "--no-progress", *SMALL]
    _one_line_2(calibrate_cli.main(argv), capsys, "--log", "is the --calib-data input file")
    assert data.read_text() == "some text to calibrate on\n" * 4


def test_finished_run_removes_only_its_own_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    argv = ["--model", MODEL, "--method", "rtn", "--out", str(tmp_path / "q"), "--run-dir", str(run_dir),
            "--no-progress", *SMALL]
    assert calibrate_cli.main(argv) == 0
    assert [p.name for p in run_dir.iterdir()] == ["notes.txt"]


def test_evaluate_refuses_non_empty_out_unless_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "e"
    out.mkdir()
    (out / "results.json").write_text("{}")
    rc = evaluate_cli.main(["--model", MODEL, "--out", str(out), *EVAL_ARGS, "--gen-length", "4"])
    _one_line_2(rc, capsys, "--out", "--overwrite")
    assert (out / "results.json").read_text() == "{}"
    assert evaluate_cli.main(["--model", MODEL, "--out", str(out), *EVAL_ARGS, "--gen-length", "4",
                              "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["models"][0]["label"] == "FP"


# -- §4: damaged or mismatched quantized checkpoints -------------------------------------------
def test_truncated_and_garbage_quantized_weights(qdir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cut = _copy(qdir, tmp_path / "cut")
    raw = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    junk = _copy(qdir, tmp_path / "junk")
    (junk / "model.safetensors").write_bytes(os.urandom(4096))
    for d, needle in ((cut, "truncated"), (junk, "not a safetensors file")):
        with pytest.raises(CheckpointError, match=needle):
            load_pretrained(d)
        rc = sample_cli.main(["--quantized", str(d), "--prompt", "Q: 1+1=? A:", "--gen-length", "4"])
        _one_line_2(rc, capsys, needle, "model.safetensors")


@pytest.mark.parametrize("value,needle", [(float("nan"), "has inf or NaN values"),
                                          (float("inf"), "has inf or NaN values"),
                                          (-1.0, "must be > 0"), (0.0, "must be > 0")])
def test_quantized_scale_values_are_checked(qdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            value: float, needle: str) -> None:
    """issue 20: a NaN, negative or zero per-channel scale used to load and run silently."""
    from safetensors.torch import load_file, save_file

    d = _copy(qdir, tmp_path / "q")
    st = load_file(str(d / "model.safetensors"))
    key = next(k for k in st if k.endswith("weight_scale"))
    st[key][3] = value
    save_file(st, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=needle):
        load_pretrained(d)
    rc = sample_cli.main(["--quantized", str(d), "--model", MODEL, "--prompt", "x", "--gen-length", "4"])
    _one_line_2(rc, capsys, key, needle)


@pytest.mark.parametrize("key,value,needle", [
    ("act_clip", "x", "field 'act_clip' must be a number"),
    ("act_clip", -1.0, "field 'act_clip' must be a finite number in (0.0, 1000000.0]"),
    ("in_features", 10**9, "field 'in_features' must be an integer in [1, 1048576]"),
    ("bias", "yes", "field 'bias' must be a bool"),
    ("transform", [1], "field 'transform' must be a dict"),
])
def test_quantized_spec_values_are_checked(qdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           key: str, value: object, needle: str) -> None:
    d = _copy(qdir, tmp_path / "q")
    cfg = json.loads((d / "config.json").read_text())
    name = next(iter(cfg["quantization_config"]["modules"]))
    cfg["quantization_config"]["modules"][name][key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    rc = sample_cli.main(["--quantized", str(d), "--model", MODEL, "--prompt", "x", "--gen-length", "4"])
    _one_line_2(rc, capsys, f"spec of {name}", needle)


def test_quantized_spec_and_shape_mismatch(qdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file, save_file

    spec_bad = _copy(qdir, tmp_path / "spec")
    cfg = json.loads((spec_bad / "config.json").read_text())
    name = next(iter(cfg["quantization_config"]["modules"]))
    cfg["quantization_config"]["modules"][name]["out_features"] += 2
    (spec_bad / "config.json").write_text(json.dumps(cfg))
    shape_bad = _copy(qdir, tmp_path / "shape")
    st = load_file(str(shape_bad / "model.safetensors"))
    st[f"{name}.linear.weight_packed"] = st[f"{name}.linear.weight_packed"][:-1].contiguous()
    save_file(st, str(shape_bad / "model.safetensors"))
    for d, needle in ((spec_bad, "specs do not match the model config"), (shape_bad, "shape/dtype mismatches")):
        with pytest.raises(CheckpointError, match=needle):
            load_pretrained(d)
        rc = evaluate_cli.main(["--model", MODEL, "--quantized", str(d), "--out", str(tmp_path / "e"), *EVAL_ARGS])
        _one_line_2(rc, capsys, needle, name)


def test_hidden_size_mismatch_reason_is_not_cut_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _copy(ASSETS_DIR / MODEL, tmp_path / "m")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["d_model"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    rc = calibrate_cli.main(["--model", str(bad), "--method", "rtn", "--out", str(tmp_path / "q")])
    _one_line_2(rc, capsys, "cannot load", "shape mismatches", "checkpoint [128, 128] vs model [64, 64]")
    rc = evaluate_cli.main(["--model", str(bad), "--out", str(tmp_path / "e"), *EVAL_ARGS])
    _one_line_2(rc, capsys, "cannot load", "shape mismatches", "checkpoint [128, 128] vs model [64, 64]")


# -- §4: devices and threads -------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = sample_cli.main(["--model", MODEL, "--prompt", "x", "--device", "cuda"])
    _one_line_2(rc, capsys, "--device cuda", "CUDA")
    rc = evaluate_cli.main(["--model", MODEL, "--out", str(tmp_path / "e"), *EVAL_ARGS, "--device", "cuda"])
    _one_line_2(rc, capsys, "--device cuda", "CUDA")
    rc = calibrate_cli.main(["--model", MODEL, "--method", "rtn", "--out", str(tmp_path / "q"), "--device", "cuda"])
    _one_line_2(rc, capsys, "--device cuda", "CUDA")
    rc = sample_cli.main(["--model", MODEL, "--prompt", "x", "--device", "gpu0"])
    _one_line_2(rc, capsys, "--device", "gpu0")


@pytest.mark.parametrize("threads", ["-1", "0"])
def test_sample_threads_must_be_positive(threads: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = sample_cli.main(["--model", MODEL, "--prompt", "x", "--gen-length", "4", "--threads", threads])
    _one_line_2(rc, capsys, f"--threads must be an integer in [1, 4096], got {threads}")


# -- §4: internal errors keep their traceback --------------------------------------------------
def test_clis_do_not_swallow_internal_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise KeyError("internal bug")

    monkeypatch.setattr("fair_calib_ext.sampling.generate", boom)
    with pytest.raises(KeyError, match="internal bug"):
        sample_cli.main(["--model", MODEL, "--prompt", "x", "--gen-length", "4"])
    monkeypatch.setattr("fair_calib_ext.eval.runner.evaluate_model", boom)
    with pytest.raises(KeyError, match="internal bug"):
        evaluate_cli.main(["--model", MODEL, "--out", str(tmp_path / "e"), *EVAL_ARGS, "--gen-length", "4"])

    def bad_value(*a: object, **k: object) -> None:
        raise ValueError("internal bug")

    monkeypatch.setattr("fair_calib_ext.calib.calibrate", bad_value)
    with pytest.raises(ValueError, match="internal bug"):
        calibrate_cli.main(["--model", MODEL, "--method", "rtn", "--nsamples", "2", "--seqlen", "16",
                            "--out", str(tmp_path / "q"), "--no-progress"])


# -- §4: resume files --------------------------------------------------------------------------
@pytest.mark.parametrize("state,needle", [
    ('{"digest": "ab', "not valid JSON"),  # cut off mid-write by a crash
    ("[1]", "expected an object"),
    ('{"done": "abc"}', "field 'done' must be an integer"),
    ('{"done": -1}', "field 'done' must be an integer in [0, 5], got -1"),
    ('{"done": 99}', "field 'done' must be an integer in [0, 5], got 99"),
    ('{"done": 0, "records": 5}', "field 'records' must be a list"),
])
def test_damaged_resume_state_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], state: str,
                                          needle: str) -> None:
    run = tmp_path / "q.run"
    run.mkdir()
    (run / "state.json").write_text(state)
    rc = calibrate_cli.main(["--model", MODEL, "--method", "rtn", "--nsamples", "2", "--seqlen", "16",
                             "--out", str(tmp_path / "q"), "--no-progress"])
    _one_line_2(rc, capsys, "state.json", str(run), needle)
    assert (run / "state.json").read_text() == state  # the user's run dir is left as it was


@pytest.mark.parametrize("meta,weights,needle", [
    ('{"floor": 0.1, "mode": "both"', None, "prior.json: not valid JSON"),
    ('{"floor": "low", "mode": "both"}', None, "field 'floor' must be a number"),
    ('{"floor": -1, "mode": "both"}', None, "field 'floor' must be a finite number >= 0.0"),
    ('{"floor": 0.1, "mode": "sideways"}', None, "field 'mode' must be one of"),
    ('{"floor": 0.1}', None, "field 'mode' is missing"),
    ('{"floor": 0.1, "mode": "both", "window": 3}', None, "field 'window' is 3 but prior.safetensors holds 4"),
    ('{"floor": 0.1, "mode": "both"}', [1.0, float("nan")], "must be a non-empty 1-D tensor of finite values"),
    ('{"floor": 0.1, "mode": "both"}', b"garbage", "prior.safetensors: not a prior's weights"),
])
def test_damaged_prior_file_is_one_line_before_the_model_is_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, meta: str,
        weights: object, needle: str) -> None:
    from safetensors.torch import save_file

    import fair_calib_ext.models as models

    st = tmp_path / "prior.safetensors"
    if isinstance(weights, bytes):
        st.write_bytes(weights)
    else:
        save_file({"weights": torch.tensor(weights or [1.0, 2.0, 3.0, 4.0])}, str(st))
    (tmp_path / "prior.json").write_text(meta)

    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("the model was read before the prior was checked")

    monkeypatch.setattr(models, "load_pretrained", no_load)
    rc = calibrate_cli.main(["--model", MODEL, "--method", "fair", "--prior", str(tmp_path / "prior"),
                             "--out", str(tmp_path / "q"), "--no-progress", *SMALL])
    _one_line_2(rc, capsys, "--prior", needle)
    assert not (tmp_path / "q").exists()


# -- §4: the lm-eval adapter picks a device it has ---------------------------------------------
def test_lm_eval_adapter_defaults_to_an_available_device(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lm_eval")
    import lm_eval.__main__ as lm_main

    from fair_calib_ext.eval import lm_eval_adapter

    seen: list[list[str]] = []
    monkeypatch.setattr(lm_main, "cli_evaluate", lambda *a, **k: seen.append(list(sys.argv)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["lm_eval_adapter", "run", "--model", "fair_dllm", "--tasks", "x"])
    lm_eval_adapter.main()
    assert seen and seen[0][-2:] == ["--device", "cpu"]
    assert "cpu" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["lm_eval_adapter", "run", "--model", "fair_dllm", "--device", "cuda:1"])
    lm_eval_adapter.main()
    assert seen[1].count("--device") == 1 and "cuda:1" in seen[1]  # an explicit choice is kept


# -- §5: layering ------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    """Absolute module names imported by ``path`` (relative imports resolved)."""
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_quantized_format_sits_below_models_and_calib() -> None:
    pkg = Path(fair_calib_ext.__file__).resolve().parent
    for sub, banned in (("quant", ("fair_calib_ext.models", "fair_calib_ext.calib")),
                        ("models", ("fair_calib_ext.calib",))):
        for f in sorted((pkg / sub).glob("*.py")):
            bad = [m for m in _imports(f) if m.startswith(banned)]
            assert not bad, f"{f.name} imports {bad}: {sub} must not depend on {banned}"
    from fair_calib_ext.calib import checkpoint as calib_ckpt
    from fair_calib_ext.quant import checkpoint as fmt

    assert calib_ckpt.QUANT_FORMAT == fmt.QUANT_FORMAT  # the old import path keeps working
    assert callable(calib_ckpt.load_quantized) and callable(calib_ckpt.save_quantized)


def test_int4_contract_lives_in_the_repo() -> None:
    doc = ROOT / "docs" / "kernels.md"
    assert doc.is_file() and "low four bits" in doc.read_text() and "round half to even" in doc.read_text().lower()
    hits = []
    for d in ("fair_calib_ext", "csrc", "cmake", "tests", "python"):
        for f in (ROOT / d).rglob("*"):
            if f.suffix in (".py", ".cpp", ".h", ".cu", ".cuh", ".cmake", ".txt") and f.name != Path(__file__).name:
                text = f.read_text(errors="ignore")
                if "shared/reference/kernels" in text or text.count("kernels.md") != text.count("docs/kernels.md"):
                    hits.append(str(f.relative_to(ROOT)))
    assert not hits, f"comments point outside the repository: {hits}"


@pytest.mark.parametrize("kw", [dict(lr=float("nan")), dict(clip_lr=-1.0), dict(gptq_block=0), dict(gptq_damp=0.0),
                                dict(sq_alpha=1.5), dict(epochs=-1), dict(epochs=1.5), dict(batch_size=0),
                                dict(seed=-3), dict(flat_alpha=float("nan")), dict(weight_decay=-1.0),
                                dict(lr_min_ratio=2.0), dict(quarot_act_clip=0.0), dict(fp_inputs="yes"),
                                dict(w_clip_search=1)])
def test_method_config_refuses_values_that_break_a_run(kw: dict) -> None:
    from fair_calib_ext.calib import MethodConfig

    with pytest.raises(ValueError, match=next(iter(kw))):
        MethodConfig(method="quarot+gptq", **kw)


def test_cli_calib_log_keeps_blocks_done_before_an_interruption(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted after two blocks, then rerun: the checkpoint's calib_log.jsonl has every block."""
    import fair_calib_ext.calib as calib

    real = calib.calibrate

    def interrupted(*a: object, **k: object) -> None:
        real(*a, **k, stop_after=2)
        raise KeyboardInterrupt  # the "kill": the run dir keeps blocks 0 and 1

    argv = ["--model", MODEL, "--method", "rtn", "--out", str(tmp_path / "q"), "--no-progress", *SMALL]
    monkeypatch.setattr(calib, "calibrate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate_cli.main(argv)
    assert (tmp_path / "q.run" / "state.json").is_file()
    monkeypatch.setattr(calib, "calibrate", real)
    assert calibrate_cli.main(argv) == 0
    recs = [json.loads(line) for line in (tmp_path / "q" / "calib_log.jsonl").read_text().splitlines()]
    blocks = [(r["block"], bool(r.get("resumed"))) for r in recs if r["event"] == "block"]
    assert blocks == [(0, True), (1, True), (2, False), (3, False), (4, False)]
    assert not (tmp_path / "q.run").exists()  # finished: resume state removed
