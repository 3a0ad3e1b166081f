"""One-command GPU check: build, CUDA op tests and benchmark, tiny-llada on CUDA, and FAIR-Calib on
two LLaDA-8B-shaped blocks, into one Markdown file.

    python python/gpu_check.py                      # on a CUDA machine (<= 8 min on an H200)
    python python/gpu_check.py --skip-build         # the extension is already installed
    python python/gpu_check.py --dry-run            # any machine: validate the plan, run nothing

Steps (each a subprocess with its own time limit, all within one overall deadline):

1. ``env``      torch / CUDA / GPU / nvcc versions; refuses (exit 2) without a CUDA device.
2. ``build``    ``pip install --no-build-isolation .`` (TORCH_CUDA_ARCH_LIST = this GPU's arch
                unless set), then checks in a fresh process that the installed extension has the
                CUDA kernels.
3. ``tests``    ``pytest -q tests/test_ops_cuda.py`` (on the installed package).
4. ``bench``    ``python/bench_ops.py --device cuda`` (fp16/bf16 F.linear, _int_mm, w4a4 ops).
5. ``llada8b``  a LLaDA-8B-shaped model (d 4096, FFN 12288, 32 heads, vocab 126464; random
                weights built in memory, 2 decoder layers), FAIR-Calib on both blocks (few
                samples, 1 epoch, a decaying position prior) with seconds per block and peak GPU
                memory, then a forward at sequence 512, W4A4 vs the bf16 model.
6. ``tiny``     ``python -m fair_calib_ext.calibrate --model tiny-llada --method fair --device
                cuda`` on a few samples, then ``python -m fair_calib_ext.sample`` on the result.

With ``--full-depth`` the plan is ``build`` (unless ``--skip-build``) and one step instead:

7. ``llada8b-full``  a full 32-block LLaDA-8B-shaped checkpoint written to disk (16 GB, random
                weights, official layout), ``python -m fair_calib_ext.calibrate --device cuda``
                with ``rtn`` and with ``fair`` (small stated budgets: the GPU holds one block at a
                time), peak GPU memory and time of each, then one forward at ``--seq``, the W4A4
                checkpoint vs the bf16 one, both loaded on the GPU. Needs ~40 GB of free disk and
                about 9 minutes; everything it wrote is deleted at the end.

A step that would start after the overall deadline is marked skipped (and fails the check).

Results go to ``--out`` (default ``gpu_check_results.md``): a summary table and each step's
command, time and output tail. The exit code is 0 only if every step passed; the file is written
in every case (also after a refusal or a timeout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 470.0  # the whole check, under the 8 minutes asked for on an H200
FULL_DEPTH_BUDGET_S = 560.0  # --full-depth: under the 10 minutes one device call may run
# small, stated budgets for the full-depth step (the CPU benchmark, python/bench_scale.py, uses the same)
FULL_DEPTH_CALIB = {
    "rtn": ["--nsamples", "8", "--seqlen", "128"],
    "fair": ["--nsamples", "4", "--seqlen", "64", "--epochs", "1", "--n-probe", "4", "--probe-gen-length", "8",
             "--probe-batch-size", "4"],
}
TAIL_CHARS = 4000


@dataclass
class Step:
    name: str
    budget_s: float
    what: str
    cmd: list[str] = field(default_factory=list)  # filled by plan()
    cwd: Path | None = None
    status: str = "not run"  # passed | failed | timeout | skipped | not run
    seconds: float = 0.0
    output: str = ""
    result: dict = field(default_factory=dict)  # JSON lines the step printed (llada8b)


def python_for_tests() -> list[str]:
    """pytest on the *installed* package: -P keeps the working directory (the source tree, with
    no CUDA build in it) off sys.path (Python >= 3.11); else the pytest script of this env."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", "pytest"]
    return [str(Path(sys.executable).with_name("pytest"))]


def plan(args: argparse.Namespace, work: Path) -> list[Step]:
    py = sys.executable
    tiny_out = work / "tiny-llada-fair"
    steps = [
        Step("build", 200, "pip install --no-build-isolation . and check the CUDA kernels loaded",
             [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "."], REPO),
        Step("tests", 75, "CUDA op tests", python_for_tests() + ["-q", "-x", "tests/test_ops_cuda.py"], REPO),
        Step("bench", 45, "CUDA op benchmark",
             [py, str(REPO / "python" / "bench_ops.py"), "--device", "cuda", "--m", "16", "2048",
              "--shapes", "4096x4096,4096x12288"], work),
        Step("llada8b", 150, "LLaDA-8B-shaped model (random weights, 2 blocks): FAIR-Calib + W4A4 forward",
             [py, str(Path(__file__).resolve()), "--step", "llada8b", "--seq", str(args.seq),
              "--layers", str(args.layers), "--calib-samples", str(args.calib_samples),
              "--calib-seqlen", str(args.calib_seqlen)], work),
        Step("tiny", 50, "tiny-llada: FAIR-Calib W4A4 on CUDA, then sampling",
             [py, "-m", "fair_calib_ext.calibrate", "--model", "tiny-llada", "--method", "fair",
              "--device", "cuda", "--nsamples", "8", "--seqlen", "64", "--epochs", "1", "--n-probe", "8",
              "--probe-batch-size", "8", "--out", str(tiny_out), "--overwrite", "--no-progress"], work),
    ]
    if args.full_depth:
        steps = [steps[0], Step("llada8b-full", FULL_DEPTH_BUDGET_S,
                                "full-depth LLaDA-8B-shaped checkpoint: calibrate rtn and fair on CUDA, W4A4 vs bf16",
                                [py, str(Path(__file__).resolve()), "--step", "llada8b-full", "--seq", str(args.seq),
                                 "--work", str(work)], work)]
    if args.skip_build:
        steps = [s for s in steps if s.name != "build"]
    return steps


TINY_SAMPLE_ARGS = ["--model", "tiny-llada", "--device", "cuda", "--gen-length", "32", "--steps", "32",
                    "--prompt", "12+34="]


def validate_plan(steps: list[Step], work: Path) -> list[str]:
    """Checks that need no GPU: files exist, the CLIs accept the planned flags, the imports work."""
    problems = []
    for rel in ("tests/test_ops_cuda.py", "python/bench_ops.py", "setup.py", "pyproject.toml"):
        if not (REPO / rel).is_file():
            problems.append(f"missing {rel}")
    sys.path.insert(0, str(REPO))
    try:
        from fair_calib_ext import calibrate as calibrate_cli
        from fair_calib_ext import sample as sample_cli
        from fair_calib_ext.calib import MethodConfig, calibrate  # noqa: F401
        from fair_calib_ext.models import ModelConfig, build_model  # noqa: F401

        for m, budget in FULL_DEPTH_CALIB.items():
            calibrate_cli._parser().parse_args(["--model", "x", "--method", m, "--device", "cuda", "--out", "q",
                                                *budget])
        tiny = next((s for s in steps if s.name == "tiny"), None)
        if tiny is not None:
            calibrate_cli._parser().parse_args(tiny.cmd[3:])
            sample_cli.build_parser().parse_args(["--quantized", str(work / "q")] + TINY_SAMPLE_ARGS)
        MethodConfig(method="fair", epochs=1, batch_size=2)
    except SystemExit as exc:  # argparse rejected a planned flag
        problems.append(f"a planned CLI call does not parse (exit {exc.code})")
    except Exception as exc:  # noqa: BLE001 - report, do not crash the check
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        sys.path.pop(0)
    return problems


def env_info() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=20).stdout
        info["nvcc"] = out.strip().splitlines()[-1] if out.strip() else "not found"
    except (OSError, subprocess.TimeoutExpired):
        info["nvcc"] = "not found"
    return info


def refusal(info: dict) -> str | None:
    if not info["torch_cuda"]:
        return f"torch {info['torch']} is a CPU-only build (torch.version.cuda is None); install a CUDA torch first"
    if not info["cuda_available"]:
        return "torch.cuda.is_available() is False: no usable CUDA device on this machine"
    return None


def run_step(step: Step, deadline: float, env: dict[str, str]) -> None:
    left = deadline - time.monotonic()
    if left < 10:
        step.status, step.output = "skipped", "out of time (overall deadline)"
        return
    limit = min(step.budget_s, left)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(step.cmd, cwd=step.cwd, env=env, capture_output=True, text=True, timeout=limit)
        step.output = (proc.stdout + proc.stderr)[-TAIL_CHARS:]
        step.status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        for line in proc.stdout.splitlines():
            if line.startswith("{") and line.endswith("}"):
                try:
                    step.result.update(json.loads(line))
                except json.JSONDecodeError:
                    pass
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        step.output = (out.decode(errors="replace") if isinstance(out, bytes) else out)[-TAIL_CHARS:]
        step.status = f"timeout after {limit:.0f} s"
    step.seconds = time.monotonic() - t0


def write_report(path: Path, info: dict, steps: list[Step], note: str | None) -> None:
    lines = ["# GPU check (`python/gpu_check.py`)", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    if note:
        lines += ["", f"**{note}**"]
    lines += ["", "| step | what | status | seconds |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.what} | {s.status} | {s.seconds:.0f} |" for s in steps]
    for name, title in (("llada8b", "LLaDA-8B-shaped blocks"), ("llada8b-full", "LLaDA-8B-shaped, full depth")):
        big = next((s for s in steps if s.name == name and s.result), None)
        if big is not None:
            lines += ["", f"## {title}", "", "| measure | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in big.result.items()]
    for s in steps:
        lines += ["", f"## {s.name}: {s.status}", "", "```", " ".join(map(str, s.cmd)), "```", "",
                  "```", s.output.strip() or "(no output)", "```"]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


# ---- the in-memory LLaDA-8B-shaped step (run as a subprocess: --step llada8b) -------------------


def step_llada8b(args: argparse.Namespace) -> int:
    import copy

    import torch

    from fair_calib_ext.calib import MethodConfig, calibrate
    from fair_calib_ext.models import ModelConfig, build_model

    def emit(**kv: object) -> None:
        print(json.dumps(kv), flush=True)

    dev = args.device
    cuda = dev == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def reset_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_mib() -> int | None:
        return round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None

    # LLaDA-8B dims; --shrink divides them (a CPU smoke test of this step's code, not a measurement)
    d, f, v = 4096 // args.shrink, 12288 // args.shrink, 126464 // args.shrink
    heads = max(1, 32 // args.shrink)
    cfg = ModelConfig(
        family="llada", vocab_size=v, hidden_size=d, intermediate_size=f,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=d // heads, rope_theta=5e5, rms_norm_eps=1e-5, max_position_embeddings=4096,
        attention_bias=False, tie_word_embeddings=False, mask_token_id=v - 1,
    )
    t0 = time.time()
    model = build_model(cfg, dtype=torch.bfloat16, seed=0)
    ref = copy.deepcopy(model)
    emit(build_model_s=round(time.time() - t0, 1), layers=args.layers, calib_samples=args.calib_samples,
         calib_seqlen=args.calib_seqlen)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, v - 2, (args.calib_samples, args.calib_seqlen), generator=gen)
    prior = torch.linspace(2.0, 0.5, args.calib_seqlen)  # a decaying position weight (FAIR's shape)
    logs: list[dict] = []
    reset_peak()
    t0 = time.time()
    calibrate(model, MethodConfig(method="fair", epochs=1, batch_size=2), ids, prior, device=dev,
              act_dtype=torch.bfloat16, progress=False, log=logs.append)
    blocks = [r for r in logs if r.get("event") == "block"]
    emit(calib_total_s=round(time.time() - t0, 1),
         calib_s_per_block=[r["seconds"] for r in blocks],
         calib_loss_rtn=[round(r["loss_rtn"], 5) for r in blocks],
         calib_loss_after=[round(r["loss_after"], 5) for r in blocks],
         calib_peak_gpu_mib=peak_mib())

    # forward at sequence `seq`, batch 1: W4A4 (calibrated) vs the bf16 model
    x = torch.randint(0, v - 2, (1, args.seq), generator=gen).to(dev)
    times = {}
    logits = {}
    for label, m in (("bf16", ref), ("W4A4", model)):
        m.to(dev)
        reset_peak()
        with torch.no_grad():
            for _ in range(2):
                out = m(x).logits
            sync()
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                out = m(x).logits
                sync()
                ts.append(time.perf_counter() - t)
        times[label] = sorted(ts)[len(ts) // 2]
        logits[label] = out.float()
        emit(**{f"forward_{label}_ms": round(times[label] * 1e3, 2),
                f"forward_{label}_peak_gpu_mib": peak_mib()})
        m.to("cpu")
        if cuda:
            torch.cuda.empty_cache()
    a, b = logits["bf16"], logits["W4A4"]
    emit(forward_W4A4_vs_bf16=f"{times['bf16'] / times['W4A4']:.2f}x",
         forward_finite=bool(torch.isfinite(b).all()),
         top1_agreement=round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4),
         note=f"forward = {args.layers} decoder layers + embedding + {v}-way LM head (16-bit in both)")
    return 0


def step_llada8b_full(args: argparse.Namespace) -> int:
    """Full depth from disk, as a user runs it: the CLIs on a written checkpoint, then a forward."""
    import torch

    from fair_calib_ext.models import load_pretrained
    from fair_calib_ext.models.shaped import write_shaped_checkpoint

    def emit(**kv: object) -> None:
        print(json.dumps(kv), flush=True)

    work = Path(args.work)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    ckpt = work / "llada-8b"
    try:
        t0 = time.time()
        write_shaped_checkpoint(ckpt, "llada-8b", layers=args.layers_full, overwrite=True)
        emit(write_checkpoint_s=round(time.time() - t0, 1), layers=args.layers_full or 32)
        for method, budget in FULL_DEPTH_CALIB.items():
            out = work / f"q-{method}"
            cmd = [sys.executable, "-m", "fair_calib_ext.calibrate", "--model", str(ckpt), "--method", method,
                   "--device", str(dev), *budget, "--out", str(out), "--overwrite", "--no-progress"]
            t0 = time.time()
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                emit(**{f"calibrate_{method}": f"failed (exit {p.returncode})"})
                print(p.stderr[-3000:], file=sys.stderr)
                return 1
            summary = json.loads(p.stdout.strip().splitlines()[-1])
            emit(**{f"calibrate_{method}_s": round(time.time() - t0, 1),
                    f"calibrate_{method}_peak_gpu_mib": round(summary.get("gpu_peak_alloc_mb", 0)),
                    f"calibrate_{method}_peak_rss_mib": round(summary["cpu_peak_rss_mb"]),
                    f"calibrate_{method}_kernel_path": summary.get("kernel_path")})
            if method != "rtn":
                shutil.rmtree(out, ignore_errors=True)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 1000, (1, args.seq), generator=gen).to(dev)
        times = {}
        for label, path in (("bf16", ckpt), ("W4A4", work / "q-rtn")):
            t0 = time.time()
            m = load_pretrained(path, dtype=torch.bfloat16, device=dev)
            load_s = time.time() - t0
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                m(x)
                ts = []
                for _ in range(3):
                    if cuda:
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    m(x)
                    if cuda:
                        torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t)
            times[label] = sorted(ts)[1]
            emit(**{f"load_{label}_s": round(load_s, 1), f"forward_{label}_ms": round(times[label] * 1e3, 1),
                    f"forward_{label}_peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None})
            del m
            if cuda:
                torch.cuda.empty_cache()
        emit(forward_W4A4_vs_bf16=f"{times['bf16'] / times['W4A4']:.2f}x", seq=args.seq)
        return 0
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
        for p in work.glob("q-*"):
            shutil.rmtree(p, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_results.md", help="Markdown results file")
    ap.add_argument("--dry-run", action="store_true", help="validate the plan and print it; run nothing")
    ap.add_argument("--skip-build", action="store_true", help="use the installed extension")
    ap.add_argument("--seq", type=int, default=512, help="sequence length of the LLaDA-8B-shaped forward")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the LLaDA-8B-shaped model")
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--full-depth", action="store_true",
                    help="instead of the default steps: a full 32-block LLaDA-8B-shaped checkpoint through calibrate "
                         "(rtn, fair) on CUDA and a W4A4 vs bf16 forward (~9 min, ~40 GB of disk)")
    ap.add_argument("--step", choices=["llada8b", "llada8b-full"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # --step only
    ap.add_argument("--shrink", type=int, default=1, help=argparse.SUPPRESS)  # CPU smoke test
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)  # --step llada8b-full
    ap.add_argument("--layers-full", type=int, default=None, help=argparse.SUPPRESS)  # CPU smoke test
    args = ap.parse_args(argv)
    if args.step == "llada8b":
        return step_llada8b(args)
    if args.step == "llada8b-full":
        return step_llada8b_full(args)

    out = Path(args.out).resolve()
    work = Path(tempfile.mkdtemp(prefix="fair_gpu_check_"))
    steps = plan(args, work)
    budget_s = FULL_DEPTH_BUDGET_S if args.full_depth else TOTAL_BUDGET_S
    if args.dry_run:
        problems = validate_plan(steps, work)
        total = sum(s.budget_s for s in steps)
        for s in steps:
            print(f"[{s.name}] <= {s.budget_s:.0f} s, cwd {s.cwd}: {' '.join(map(str, s.cmd))}")
        print(f"plan: {len(steps)} steps, budgets sum {total:.0f} s, overall deadline {budget_s:.0f} s")
        shutil.rmtree(work, ignore_errors=True)
        if problems:
            print("plan problems:\n  " + "\n  ".join(problems))
            return 1
        print("plan ok (dry run: nothing was run)")
        return 0

    info = env_info()
    why = refusal(info)
    if why is not None:
        for s in steps:
            s.status = "not run"
        write_report(out, info, steps, f"refused: {why}")
        shutil.rmtree(work, ignore_errors=True)
        print(f"gpu_check: refused: {why} (wrote {out})", file=sys.stderr)
        return 2

    deadline = time.monotonic() + budget_s
    env = dict(os.environ)
    env.setdefault("TORCH_CUDA_ARCH_LIST", info["capability"])  # build only this GPU's arch
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    for s in steps:
        if s.name == "tiny":
            run_step(s, deadline, env)
            if s.status == "passed":  # sampling from the calibrated checkpoint
                calib = Step("tiny", 0, "")
                calib.cmd = [sys.executable, "-m", "fair_calib_ext.sample",
                             "--quantized", str(work / "tiny-llada-fair"), *TINY_SAMPLE_ARGS]
                calib.cwd, calib.budget_s = work, 35
                run_step(calib, deadline, env)
                s.output += "\n--- sample ---\n" + calib.output
                s.status, s.seconds = calib.status, s.seconds + calib.seconds
                s.cmd = s.cmd + ["&&"] + calib.cmd
        else:
            run_step(s, deadline, env)
        if s.name == "build" and s.status == "passed":  # the installed package has the CUDA kernels
            chk = Step("build", 0, "")
            chk.cmd = [sys.executable, "-c", "import json, fair_calib_ext as f; i = f.build_info(); "
                       "print(json.dumps(i)); print(f.__file__); assert i['cuda'], 'no CUDA kernels'"]
            chk.cwd, chk.budget_s = work, 60
            run_step(chk, deadline, env)
            s.output += "\n--- installed build ---\n" + chk.output
            s.status = chk.status
        write_report(out, info, steps, None)  # keep the file current after every step
        print(f"[{s.name}] {s.status} in {s.seconds:.0f} s", flush=True)
    write_report(out, info, steps, None)
    ok = all(s.status == "passed" for s in steps)
    print(f"gpu_check: {'all steps passed' if ok else 'some steps failed'}; results in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
