"""The block-wise engine: weighted loss, every method end to end, resume after a kill, checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fair_calib_ext.calib import MethodConfig, PositionPrior, calibrate, load_quantized, save_quantized
from fair_calib_ext.calib.layerwise import weighted_loss, weighted_mse, weighted_mse_ref
from fair_calib_ext.models import build_model, load_pretrained
from fair_calib_ext.quant.modules import QuantLinear, kernels_available

from test_calib_transforms import tiny_config  # noqa: E402  (same test directory)

import fair_calib_ext
# Subprocesses import the same fair_calib_ext as this process: the installed package in CI,
# the source tree (with its in-place build) in a developer checkout.
PKG_PARENT = str(Path(fair_calib_ext.__file__).resolve().parents[1])



pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


ROOT = Path(__file__).resolve().parent.parent


def _data(n: int = 6, s: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 79, (n, s), generator=torch.Generator().manual_seed(seed))


def test_uniform_weighted_loss_equals_unweighted_mse() -> None:
    a, b = torch.randn(3, 10, 8), torch.randn(3, 10, 8)
    torch.testing.assert_close(weighted_loss(a, b, torch.ones(10)), F.mse_loss(a, b))
    w = torch.rand(10)
    hand = sum(float(w[i]) * float((a[:, i] - b[:, i]).pow(2).sum()) for i in range(10))
    torch.testing.assert_close(weighted_mse(a, b, w), torch.tensor(hand), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weighted_mse_ref(a, b, w), torch.tensor(hand), rtol=1e-5, atol=1e-5)


def test_uniform_prior_run_equals_no_prior_run() -> None:
    """FAIR with a uniform prior is exactly the unweighted FlatQuant objective."""
    cfg = MethodConfig(method="fair", epochs=1)
    m1 = build_model(tiny_config("llada", 1), seed=0, init_std=0.1)
    m2 = build_model(tiny_config("llada", 1), seed=0, init_std=0.1)
    ids = _data()
    calibrate(m1, cfg, ids, PositionPrior.uniform(), progress=False)
    calibrate(m2, MethodConfig(method="flatquant", epochs=1), ids, None, progress=False)
    torch.testing.assert_close(m1(ids).logits, m2(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("method", ["rtn", "smoothquant", "quarot", "gptq", "flatquant", "fair+gptq"])
def test_every_method_quantizes_all_linears(family: str, method: str) -> None:
    m = build_model(tiny_config(family), seed=0, init_std=0.1)
    ids = _data()
    ref = m(ids).logits
    logs: list[dict] = []
    prior = PositionPrior(torch.linspace(2.0, 0.5, 8), floor=0.1) if method.startswith("fair") else None
    calibrate(m, MethodConfig(method=method, epochs=1, batch_size=3), ids, prior, progress=False,
              log=logs.append)
    qls = [mod for mod in m.modules() if isinstance(mod, QuantLinear)]
    assert len(qls) == 7 * 2
    assert all(not isinstance(mod, torch.nn.Linear) for mod in m.layers.modules())
    blocks = [r for r in logs if r["event"] == "block"]
    assert [r["block"] for r in blocks] == [0, 1]
    assert all(r["loss_after"] > 0 for r in blocks)
    assert logs[-1]["event"] == "summary" and "cpu_peak_rss_mb" in logs[-1]
    assert logs[-1]["kernel_path"] == ("kernels" if kernels_available() else "reference")  # logged
    with torch.no_grad():
        out = m(ids).logits
        rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.5  # quantized, but still the same function roughly


def test_learned_and_gptq_methods_beat_rtn_on_block_loss() -> None:
    ids = _data(8, 16)
    res = {}
    for method in ("rtn", "gptq", "flatquant"):
        m = build_model(tiny_config("llada", 1), seed=0, init_std=0.1)
        logs: list[dict] = []
        calibrate(m, MethodConfig(method=method, epochs=4, batch_size=4), ids, progress=False, log=logs.append)
        res[method] = logs[0]["loss_after"]
        assert logs[0]["loss_rtn"] == pytest.approx(res.get("rtn", logs[0]["loss_rtn"]))
    assert res["gptq"] < res["rtn"] and res["flatquant"] < res["rtn"]


@pytest.mark.parametrize("use_kernels", [False, True])
def test_save_load_roundtrip(tmp_path: Path, use_kernels: bool) -> None:
    if use_kernels and not kernels_available():
        pytest.skip("fair _C kernels not built")
    m = build_model(tiny_config("dream"), seed=0, init_std=0.1)
    ids = _data()
    calibrate(m, MethodConfig(method="quarot", epochs=1), ids, progress=False)
    out = tmp_path / "q"
    save_quantized(m, out)
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["method"] == "quarot" and q["bits"] == {"weights": 4, "activations": 4}
    assert q["package_version"] and len(q["modules"]) == 14
    m2 = load_quantized(out, use_kernels=use_kernels)
    m3 = load_pretrained(out)  # the models package delegates to load_quantized
    ref = m(ids).logits
    if use_kernels == all(ql.uses_kernels for ql in m.modules() if isinstance(ql, QuantLinear)):
        assert torch.equal(m2(ids).logits, ref)
    else:
        torch.testing.assert_close(m2(ids).logits, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m3(ids).logits, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(FileExistsError):
        save_quantized(m, out)
    save_quantized(m, out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


_RESUME_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_calib_transforms import tiny_config
    from fair_calib_ext.models import build_model
    from fair_calib_ext.calib import calibrate, MethodConfig, PositionPrior, save_quantized
    run_dir, out, hang_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    m = build_model(tiny_config("llada", 3), seed=0, init_std=0.1)
    ids = torch.randint(0, 79, (6, 16), generator=torch.Generator().manual_seed(1))
    prior = PositionPrior(torch.linspace(2.0, 0.5, 8), floor=0.1)
    def log(rec):
        if rec.get("event") == "block" and rec.get("resumed"):
            print("REPLAYED", rec["block"], flush=True)  # done before the kill, back in the log
        elif rec.get("event") == "block":
            print("BLOCK", rec["block"], flush=True)
            if rec["block"] == hang_at:
                time.sleep(120)   # killed here: mid-run, block {{hang_at}} computed but not checkpointed
    calibrate(m, MethodConfig(method="fair+gptq", epochs=2, batch_size=3), ids, prior,
              run_dir=run_dir, progress=False, log=log)
    save_quantized(m, out)
    print("DONE", flush=True)
""")


def test_resume_after_kill_equals_uninterrupted(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(_RESUME_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": PKG_PARENT, "OMP_NUM_THREADS": "1"}
    py = sys.executable
    # uninterrupted reference
    subprocess.run([py, str(script), str(tmp_path / "ref.run"), str(tmp_path / "ref"), "-1"], env=env,
                   check=True, capture_output=True, timeout=600)
    # killed after block 1 was computed (block 0 checkpointed), then resumed
    proc = subprocess.Popen([py, str(script), str(tmp_path / "kill.run"), str(tmp_path / "res"), "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = []
    deadline = time.time() + 600
    while time.time() < deadline:
        line = proc.stdout.readline()
        seen.append(line.strip())
        if line.startswith("BLOCK 1"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert "BLOCK 1" in seen and proc.returncode != 0
    state = json.loads((tmp_path / "kill.run" / "state.json").read_text())
    assert state["done"] == 1  # block 0 finished and committed; block 1 lost with the kill
    res = subprocess.run([py, str(script), str(tmp_path / "kill.run"), str(tmp_path / "res"), "-1"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "BLOCK 0" not in res.stdout and "BLOCK 1" in res.stdout  # really resumed
    assert "REPLAYED 0" in res.stdout  # and the log still has block 0
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ref" / "model.safetensors"))
    b = load_file(str(tmp_path / "res" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": PKG_PARENT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fair_calib_ext.calibrate", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    r = _cli("--model", str(tmp_path / "nope"), "--method", "rtn", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    r = _cli("--model", "x", "--method", "zeroshot", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown method" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    r = _cli("--model", "x", "--method", "rtn", "--out", str(tmp_path / "full"))
    assert r.returncode == 2 and "--overwrite" in r.stderr


@pytest.mark.parametrize("bits,method", [("w8a8", "rtn"), ("w4a16", "gptq"), ("w4a8", "flatquant")])
def test_other_bit_widths_roundtrip(tmp_path: Path, bits: str, method: str) -> None:
    from fair_calib_ext.quant.quantizer import QuantConfig

    ids = _data()
    errs = {}
    for b in (bits, "w4a4"):
        m = build_model(tiny_config("llada"), seed=0, init_std=0.1)
        ref = m(ids).logits.detach()
        calibrate(m, MethodConfig(method=method, quant=QuantConfig.preset(b), epochs=1), ids, progress=False)
        with torch.no_grad():
            errs[b] = float((m(ids).logits - ref).norm() / ref.norm())
        if b == bits:
            qls = [q for q in m.modules() if isinstance(q, QuantLinear)]
            assert all(not q.uses_kernels and q.linear.w_bits == int(b[1]) for q in qls)
            save_quantized(m, tmp_path / b)
            m2 = load_quantized(tmp_path / b)
            with torch.no_grad():
                assert torch.equal(m2(ids).logits, m(ids).logits)
    assert errs[bits] < errs["w4a4"]  # more bits somewhere, less error


# -- resume state: identifies the model, survives crashes, keeps the log (issue 14) ----------
def test_resume_digest_identifies_the_model(tmp_path: Path) -> None:
    """A second model calibrated into the same run dir with the same settings must not resume
    from the first model's blocks."""
    from fair_calib_ext.errors import ResumeError

    ids, run = _data(), tmp_path / "run"
    calibrate(build_model(tiny_config("llada"), seed=0, init_std=0.1), "rtn", ids, run_dir=run,
              progress=False, stop_after=1)
    with pytest.raises(ResumeError, match="another model"):
        calibrate(build_model(tiny_config("llada"), seed=1, init_std=0.1), "rtn", ids, run_dir=run, progress=False)
    # the same weights still resume
    calibrate(build_model(tiny_config("llada"), seed=0, init_std=0.1), "rtn", ids, run_dir=run, progress=False)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("victim", ["block_0000.safetensors", "block_0000.json", "acts_0001.safetensors"])
def test_truncated_resume_file_names_itself(tmp_path: Path, victim: str, offload: bool) -> None:
    from fair_calib_ext.errors import ResumeError

    ids, run = _data(), tmp_path / "run"
    calibrate(build_model(tiny_config("llada"), seed=0, init_std=0.1), "rtn", ids, run_dir=run,
              progress=False, stop_after=1, offload=offload)
    f = run / victim
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ResumeError, match=rf"{victim}.*delete {run}"):
        calibrate(build_model(tiny_config("llada"), seed=0, init_std=0.1), "rtn", ids, run_dir=run, progress=False,
                  offload=offload)


def _saved(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return json.loads((path / "config.json").read_text()), load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("method", ["rtn", "quarot+gptq", "fair"])
def test_offloaded_blocks_save_the_same_checkpoint(tmp_path: Path, method: str) -> None:
    """offload=True (what the CLI uses: one block in memory) writes exactly the checkpoint that
    the in-memory run writes, also when it resumes from a run stopped half-way."""
    ids = _data()
    cfg = MethodConfig(method=method, epochs=1, batch_size=3)
    prior = PositionPrior(torch.linspace(2.0, 0.5, 8), floor=0.1) if method == "fair" else None
    ref = calibrate(build_model(tiny_config("llada", 3), seed=0, init_std=0.1), cfg, ids, prior, progress=False)
    save_quantized(ref, tmp_path / "ref")
    m = calibrate(build_model(tiny_config("llada", 3), seed=0, init_std=0.1), cfg, ids, prior, progress=False,
                  run_dir=tmp_path / "run", offload=True)
    assert all(p.is_meta for layer in m.layers for p in layer.parameters())  # nothing kept in memory
    assert not any(isinstance(x, QuantLinear) for x in m.modules())
    save_quantized(m, tmp_path / "off")
    # stopped after one block, resumed: the first block is never read back into memory
    calibrate(build_model(tiny_config("llada", 3), seed=0, init_std=0.1), cfg, ids, prior, progress=False,
              run_dir=tmp_path / "run2", offload=True, stop_after=1)
    m2 = calibrate(build_model(tiny_config("llada", 3), seed=0, init_std=0.1), cfg, ids, prior, progress=False,
                   run_dir=tmp_path / "run2", offload=True)
    save_quantized(m2, tmp_path / "res")
    c_ref, t_ref = _saved(tmp_path / "ref")
    for name in ("off", "res"):
        c, t = _saved(tmp_path / name)
        assert c == c_ref, name
        assert t.keys() == t_ref.keys(), name
        assert all(torch.equal(t[k], t_ref[k]) for k in t_ref), name
    with pytest.raises(ValueError, match="run_dir"):
        calibrate(build_model(tiny_config("llada", 1), seed=0, init_std=0.1), "rtn", ids, offload=True)


def test_resume_files_fsynced_before_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fair_calib_ext.calib import layerwise

    synced: set[str] = set()
    replaced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        replaced.append(str(Path(src).resolve()))
        real_replace(src, dst)

    monkeypatch.setattr(layerwise.os, "fsync", fsync)
    monkeypatch.setattr(layerwise.os, "replace", replace)
    calibrate(build_model(tiny_config("llada", 1), seed=0, init_std=0.1), "rtn", _data(), run_dir=tmp_path / "r",
              progress=False)
    assert any(r.endswith(".safetensors.tmp") for r in replaced)
    assert all(r in synced for r in replaced), set(replaced) - synced


def test_log_after_resume_has_the_blocks_done_before(tmp_path: Path) -> None:
    ids, run = _data(), tmp_path / "run"
    first: list[dict] = []
    calibrate(build_model(tiny_config("llada"), seed=0, init_std=0.1), "rtn", ids, run_dir=run,
              progress=False, stop_after=1, log=first.append)
    second: list[dict] = []
    calibrate(build_model(tiny_config("llada"), seed=0, init_std=0.1), "rtn", ids, run_dir=run,
              progress=False, log=second.append)
    blocks = [r["block"] for r in second if r.get("event") == "block"]
    assert blocks == list(range(len(blocks))) and len(blocks) >= 2
    before = next(r for r in first if r.get("event") == "block")
    again = next(r for r in second if r.get("event") == "block" and r["block"] == 0)
    assert {k: v for k, v in again.items() if k != "resumed"} == before


def test_freed_heap_is_returned_after_every_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine trims the C heap after each block: without it, a full-width 32-block fair run
    grew its anonymous memory ~1 GB a block (freed, never returned) until it was killed."""
    from fair_calib_ext.calib import layerwise

    calls: list[int] = []
    monkeypatch.setattr(layerwise, "_return_freed_memory", lambda: calls.append(1))
    calibrate(build_model(tiny_config("llada", 3), seed=0, init_std=0.1), MethodConfig(method="fair", epochs=1),
              _data(), PositionPrior.uniform(), progress=False)
    assert len(calls) == 3


def test_return_freed_memory_runs_here() -> None:
    from fair_calib_ext.calib import layerwise

    layerwise._return_freed_memory()  # glibc: malloc_trim; elsewhere a no-op
    assert layerwise._LIBC is not None
