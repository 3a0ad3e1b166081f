"""Benchmark of the W4A4 ops against torch baselines, all in the same run (one table).

For M in {1, 16, 256, 2048} and the LLaDA-8B shapes (K, N) in {(4096, 4096), (4096, 12288),
(12288, 4096)} it times ``fair_calib_ext.nn.W4A4Linear`` (CPU: weights prepacked once into the
kernel layout, activation quantization included), ``fair::w4a4_linear`` on the public packed
layout (prepacks per call) and ``fair::w4a4_gemm`` (pre-quantized activations, public layout)
against ``F.linear`` in fp32 and bf16 and ``torch._int_mm`` (int8, oneDNN on CPU), and prints
GOP/s (2*M*N*K / time), ratios and weight bytes, plus the CPU model and its relevant flags.

    python python/bench_ops.py                       # CPU, all cores, Markdown table
    python python/bench_ops.py --isa avx2 --m 256    # force a CPU kernel path, one M
    python python/bench_ops.py --device cuda         # same table on the GPU

Providers are timed in interleaved rounds (one call of each per round, after a warm-up), so a
load change on a shared machine hits all columns alike; cells are medians, ratios are computed
from the medians and, in a note line, from the best-of times. A slow baseline (e.g.
``torch._int_mm`` on a CPU without VNNI/AMX) is measured on a reduced M when one full call would
take more than ``--max-call-s``; the table marks its number with ``~``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fair_calib_ext
from fair_calib_ext import ops
from fair_calib_ext.nn import W4A4Linear

SHAPES = [(4096, 4096), (4096, 12288), (12288, 4096)]  # (K, N), LLaDA-8B projections
MS = [1, 16, 256, 2048]
CPU_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16")
NAMES = ["F.linear fp32", "F.linear bf16", "torch._int_mm", "w4a4_gemm", "w4a4_linear", "W4A4Linear"]
RATIOS = [  # (column, numerator baseline, our provider)
    ("W4A4Linear vs fp32", "F.linear fp32", "W4A4Linear"),
    ("W4A4Linear vs bf16", "F.linear bf16", "W4A4Linear"),
    ("W4A4Linear vs _int_mm", "torch._int_mm", "W4A4Linear"),
    ("w4a4_linear vs _int_mm", "torch._int_mm", "w4a4_linear"),
]


@dataclass
class Timing:
    seconds: float  # median time of one call at the measured M, scaled to the table's M
    best: float  # fastest call, scaled likewise
    spread: float  # (max - min) / median over the runs
    runs: int
    measured_m: int  # M actually run (< table M only for slow baselines)

    def gops(self, m: int, n: int, k: int) -> float:
        return 2.0 * m * n * k / self.seconds / 1e9


def _sync(device: str) -> Callable[[], None]:
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


# wall clock, or this process's CPU time (--timer cpu, one CPU thread only): on a shared machine the
# CPU time of a single-threaded run does not count the time it spent descheduled
CLOCK: Callable[[], float] = time.perf_counter


def time_once(fn: Callable[[], object], sync: Callable[[], None], inner: int = 1) -> float:
    sync()
    t0 = CLOCK()
    for _ in range(inner):
        fn()
    sync()
    return (CLOCK() - t0) / inner


# ---- providers -------------------------------------------------------------------------------------
# Each provider maps (M, K, N) to a zero-argument callable running one matmul of that shape.


def make_providers(device: str, m: int, k: int, n: int, x_dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x32 = torch.randn(m, k, generator=gen).to(device)
    w32 = torch.randn(n, k, generator=gen).to(device) / k**0.5
    x_lin = x32.to(x_dtype)
    xb, wb = x32.bfloat16(), w32.bfloat16()
    xi8 = torch.randint(-8, 8, (m, k), dtype=torch.int8, generator=gen).to(device)
    wi8_t = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen).to(device).t()  # [K, N] column-major
    w_packed, w_scale = ops.quantize_int4(w32)
    a_packed, a_scale = ops.quantize_int4(x32)
    lin = torch.nn.Linear(k, n, bias=False, device=device)
    with torch.no_grad():
        lin.weight.copy_(w32)
    module = W4A4Linear.from_linear(lin)  # CPU: prepacked once here
    del lin
    return {
        "F.linear fp32": lambda: F.linear(x32, w32),
        "F.linear bf16": lambda: F.linear(xb, wb),
        "torch._int_mm": lambda: torch._int_mm(xi8, wi8_t),
        "w4a4_gemm": lambda: ops.w4a4_gemm(a_packed, a_scale, w_packed, w_scale, None, x_dtype),
        "w4a4_linear": lambda: ops.w4a4_linear(x_lin, w_packed, w_scale, None),
        "W4A4Linear": lambda: module(x_lin),
    }


def measure_row(
    device: str, names: list[str], m: int, k: int, n: int, x_dtype: torch.dtype, args: argparse.Namespace
) -> dict[str, Timing]:
    """Times every provider of one (M, K, N) in interleaved rounds."""
    sync = _sync(device)
    fns = make_providers(device, m, k, n, x_dtype)
    scale = {name: 1.0 for name in names}
    measured_m = {name: m for name in names}
    probe_m = min(m, 64)
    if probe_m < m:  # a baseline that would take minutes per call is measured at M=64
        probes = make_providers(device, probe_m, k, n, x_dtype)
        for name in names:
            if time_once(probes[name], sync) * m / probe_m > args.max_call_s:
                fns[name], scale[name], measured_m[name] = probes[name], m / probe_m, probe_m
    first = {name: time_once(fns[name], sync) for name in names}  # warm-up (and prepack caches)
    # tiny calls: time a loop of calls so that timer and Python overhead do not dominate
    inner = {name: max(1, min(100, int(0.01 / max(first[name], 1e-6)))) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.perf_counter() + args.budget_s * len(names)
    for r in range(args.runs):
        for name in names:
            times[name].append(time_once(fns[name], sync, inner[name]) * scale[name])
        if r >= 1 and time.perf_counter() > deadline:
            break
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = Timing(med, min(ts), (max(ts) - min(ts)) / med, len(ts), measured_m[name])
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The instruction-set flags that matter for these kernels, as /proc/cpuinfo lists them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [fl for fl in CPU_FLAGS if fl in have]
    except OSError:
        pass
    return []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--m", type=int, nargs="+", default=MS, help="token counts M")
    p.add_argument("--shapes", default=None, help="K,N pairs like 4096x4096,4096x12288")
    p.add_argument("--isa", default="auto", help="CPU kernel path: auto|scalar|avx2|avx512_vnni|amx")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--x-dtype", choices=["bf16", "fp32", "fp16"], default="bf16", help="w4a4 input/output dtype")
    p.add_argument("--runs", type=int, default=7, help="interleaved timed rounds per row (after one warm-up)")
    p.add_argument("--budget-s", type=float, default=8.0,
                   help="stop adding rounds after this many seconds per provider")
    p.add_argument("--max-call-s", type=float, default=60.0, help="longer calls are measured at M=64")
    p.add_argument("--providers", default=None, help="comma separated subset of providers")
    p.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time (CPU only, needs --threads 1; robust to a loaded machine)")
    args = p.parse_args()
    if args.device == "cuda":
        run_cuda(args)  # its own table: fp16/bf16 F.linear, _int_mm, M up to 8192, quantize GB/s
        return

    if args.timer == "cpu" and args.threads != 1:
        p.error("--timer cpu measures process CPU time and needs --threads 1")
    global CLOCK
    CLOCK = time.process_time if args.timer == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    ops.set_cpu_isa(args.isa)
    x_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.x_dtype]
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    names = list(NAMES)
    if args.providers:
        names = [n for n in names if n in args.providers.split(",")]

    info = fair_calib_ext.build_info()
    print(f"device: {cpu_name()}, {torch.get_num_threads()} threads, fair CPU path {ops.get_cpu_isa()}; "
          f"torch {torch.__version__}; w4a4 in/out dtype {x_dtype}; timer {args.timer}")
    print(f"cpu flags: {' '.join(cpu_flags()) or 'n/a'}")

    header = ["M", "K", "N"] + [f"{n} ms (GOP/s)" for n in names]
    ratio_cols = [r for r in RATIOS if r[1] in names and r[2] in names]
    header += [r[0] for r in ratio_cols] + ["W int4 / bf16 MB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for m in args.m:
        for k, n in shapes:
            res = measure_row("cpu", names, m, k, n, x_dtype, args)
            cells = [str(m), str(k), str(n)]
            for name in names:
                t = res[name]
                mark = "~" if t.measured_m != m else ""
                cells.append(f"{mark}{t.seconds * 1e3:.2f} ({mark}{t.gops(m, n, k):.0f})")
            for _, base, ours in ratio_cols:
                cells.append(f"{res[base].seconds / res[ours].seconds:.2f}x")
            int4_bytes = n * k // 2 + 4 * n  # packed weights + fp32 scales
            cells.append(f"{int4_bytes / 2**20:.1f} / {2 * n * k / 2**20:.1f} ({2 * n * k / int4_bytes:.2f}x smaller)")
            print("| " + " | ".join(cells) + " |", flush=True)
            notes = [f"{nm} measured at M={t.measured_m}" for nm, t in res.items() if t.measured_m != m]
            noisy = [f"{nm} spread {t.spread:.0%}" for nm, t in res.items() if t.spread > 0.25 and t.runs > 1]
            best = [f"{col} {res[base].best / res[ours].best:.2f}x"
                    for col, base, ours in ratio_cols]
            extra = "; " + "; ".join(notes + noisy) if notes or noisy else ""
            print("  note: best-of ratios: " + ", ".join(best) + extra, flush=True)
    print(f"build: {info}")


# ---- CUDA (csrc/cuda/) ---------------------------------------------------------------------------

CUDA_MS = [16, 256, 2048, 8192]


def cuda_time_ms(fn: Callable[[], object], reps: int = 5, target_ms: float = 20.0) -> tuple[float, float]:
    """Median and (max-min)/median of per-call times in ms, with CUDA events over a loop of calls
    sized to ~target_ms (so launch overhead of tiny calls is amortised, not hidden by a sync)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    iters = max(1, min(1000, int(target_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    med = statistics.median(times)
    return med, (max(times) - min(times)) / med


def cuda_peak_gbs(device: int = 0) -> float | None:
    """Theoretical DRAM bandwidth from the device properties (None if torch does not expose them)."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate


def run_cuda(args: argparse.Namespace) -> None:
    """GPU table: w4a4_linear (quantize included) and w4a4_gemm vs F.linear fp16/bf16 and
    torch._int_mm, same run, same shapes; then quantize_int4 as % of DRAM bandwidth and vs clone().

    Weights of one shape are reused across calls, so at small M a weight matrix that fits in L2
    (H100: 50 MB) is read from L2 for every provider alike; the ratios stay like-for-like.
    """
    if not torch.cuda.is_available():
        raise SystemExit("bench_ops --device cuda: no CUDA device (torch.cuda.is_available() is False)")
    if not fair_calib_ext.build_info()["cuda"]:
        raise SystemExit("bench_ops --device cuda: fair_calib_ext._C was built without CUDA kernels")
    import os

    dev = torch.device("cuda")
    ms = args.m if args.m != MS else CUDA_MS
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    path = os.environ.get("FAIR_CUDA_GEMM_PATH") or ("int8 (forced)" if os.environ.get("FAIR_CUDA_FORCE_INT8") else "auto")
    cap = torch.cuda.get_device_capability()
    print(f"device: {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}); torch {torch.__version__}; "
          f"fair GEMM path {path}")
    names = ["F.linear fp16", "F.linear bf16", "torch._int_mm", "w4a4_gemm", "w4a4_linear"]
    header = ["M", "K", "N"] + [f"{n} ms (TOP/s)" for n in names]
    header += ["linear vs fp16", "linear vs bf16", "linear vs _int_mm", "gemm vs fp16"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    gen = torch.Generator(device="cpu").manual_seed(0)
    for k, n in shapes:
        w32 = (torch.randn(n, k, generator=gen) / k**0.5).to(dev)
        wh, wb = w32.half(), w32.bfloat16()
        wi8_t = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen).to(dev).t()
        w_packed, w_scale = ops.quantize_int4(w32)
        for m in ms:
            x32 = torch.randn(m, k, generator=gen).to(dev)
            xh, xb = x32.half(), x32.bfloat16()
            xi8 = torch.randint(-8, 8, (m, k), dtype=torch.int8, generator=gen).to(dev)
            a_packed, a_scale = ops.quantize_int4(xh)
            providers = {
                "F.linear fp16": lambda: F.linear(xh, wh),
                "F.linear bf16": lambda: F.linear(xb, wb),
                "torch._int_mm": lambda: torch._int_mm(xi8, wi8_t),
                "w4a4_gemm": lambda: ops.w4a4_gemm(a_packed, a_scale, w_packed, w_scale, None, torch.float16),
                "w4a4_linear": lambda: ops.w4a4_linear(xh, w_packed, w_scale, None),
            }
            res: dict[str, float | None] = {}
            notes = []
            for name, fn in providers.items():
                try:
                    t, spread = cuda_time_ms(fn)
                except RuntimeError as exc:  # e.g. torch._int_mm needs M > 16 on CUDA
                    res[name] = None
                    notes.append(f"{name}: {str(exc).splitlines()[0][:80]}")
                    continue
                res[name] = t
                if spread > 0.25:
                    notes.append(f"{name} spread {spread:.0%}")
            cells = [str(m), str(k), str(n)]
            for name in names:
                t = res[name]
                cells.append("n/a" if t is None else f"{t:.3f} ({2 * m * n * k / t / 1e9:.0f})")
            lin, gemm = res["w4a4_linear"], res["w4a4_gemm"]
            for base, mine in (("F.linear fp16", lin), ("F.linear bf16", lin), ("torch._int_mm", lin), ("F.linear fp16", gemm)):
                cells.append("n/a" if res[base] is None or mine is None else f"{res[base] / mine:.2f}x")
            print("| " + " | ".join(cells) + " |", flush=True)
            if notes:
                print("  note: " + "; ".join(notes), flush=True)

    peak = cuda_peak_gbs()
    print()
    print(f"quantize_int4 (fp16 in; bytes = 2MK read + MK/2 + 4M written); peak DRAM "
          f"{'%.0f GB/s' % peak if peak else 'unknown'}")
    print("| M | K | quantize ms | GB/s | % of peak | clone() ms | quantize / clone |")
    print("|---|---|---|---|---|---|---|")
    for m, k in ((8192, 4096), (8192, 12288), (2048, 4096)):
        x = torch.randn(m, k, generator=gen).to(dev).half()
        tq, _ = cuda_time_ms(lambda: ops.quantize_int4(x))
        tc, _ = cuda_time_ms(lambda: x.clone())
        gbs = (2 * m * k + m * k / 2 + 4 * m) / tq / 1e6
        pct = f"{100 * gbs / peak:.0f}%" if peak else "n/a"
        print(f"| {m} | {k} | {tq:.3f} | {gbs:.0f} | {pct} | {tc:.3f} | {tq / tc:.2f}x |", flush=True)
    print(f"build: {fair_calib_ext.build_info()}")


if __name__ == "__main__":
    main()
