"""``python -m fair_calib_ext.calibrate``: W4A4 calibration of a LLaDA / Dream model.

Examples:
    python -m fair_calib_ext.calibrate --model tiny-llada --method fair --out runs/tiny-llada-fair
    python -m fair_calib_ext.calibrate --model /ckpt/LLaDA-8B-Base --method quarot+gptq \\
        --calib-data wikitext2_train.txt --nsamples 128 --seqlen 1024 --device cuda --out q/llada-quarot

Defaults follow the reference recipe for 8B models (128 x 1024-token windows, 15 epochs,
n_probe 512, K = seqlen/4). For the embedded tiny models on a CPU, a recipe that finishes full
FAIR-Calib (Stage I + II) in under 15 minutes (7.6 min measured on a busy 2-core CPU):
    --nsamples 64 --seqlen 128 --epochs 10 --n-probe 128 --probe-batch-size 16 --threads 1

Writes a packed checkpoint (``load_pretrained(out)`` / ``sample --quantized out``), the per-block
losses as JSON lines (``calib_log.jsonl``, also streamed to ``--log``) and, for ``fair``, the
position prior (``prior.safetensors`` + ``prior.json`` + ``prior.png``). Bad input ends with a
one-line ``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .calib.prior import (COMBINE, DEFAULT_PRIOR, LAMBDA0_SCHEDULES, PRIOR_MODES, PRIOR_PRESETS, PROBE_POLICIES,
                          RELIABILITY)
from .errors import UsageError, report
from .validate import Flag

__all__ = ["main", "build_calibration_data"]


def _read_calib_file(path: Path) -> list[str | tuple[str, str]]:
    """One entry per line: a string, or a (prompt, answer) pair for {"prompt","answer"} objects."""
    if not path.is_file():
        raise UsageError(f"--calib-data {path}: file not found")
    raw = path.read_text(encoding="utf-8")
    if path.suffix in (".jsonl", ".json"):
        texts: list[str | tuple[str, str]] = []
        for ln, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"--calib-data {path}:{ln}: invalid JSON ({exc.msg})") from None
            if isinstance(obj, str):
                texts.append(obj)
            elif isinstance(obj, dict) and "text" in obj:
                texts.append(str(obj["text"]))
            elif isinstance(obj, dict) and "prompt" in obj and "answer" in obj:
                texts.append((str(obj["prompt"]), str(obj["answer"])))
            else:
                raise UsageError(f"--calib-data {path}:{ln}: expected a string or an object with "
                                 f"'text' or 'prompt'+'answer'")
    else:
        texts = [t for t in raw.splitlines() if t.strip()]  # type: ignore[misc]
    if not texts:
        raise UsageError(f"--calib-data {path}: no text found")
    return texts


def _default_gen_length(model: Any) -> int:
    """The model's own generation length (generation_config.json, else the task suite's)."""
    from .eval.accuracy import default_gen_kwargs

    return int(default_gen_kwargs(model, generation_config=getattr(model, "generation_config", {}))["gen_length"])


def build_calibration_data(tokenizer: Any, texts: list[str], nsamples: int, seqlen: int, seed: int,
                           eos_id: int | None) -> torch.Tensor:
    """Token windows [nsamples, seqlen] cut at seeded random offsets from the concatenation of
    ``texts`` (each followed by EOS) — the WikiText-style recipe (``calib.data.build_stream_data``)."""
    from .calib.data import build_stream_data

    return build_stream_data(tokenizer, texts, nsamples, seqlen, seed, eos_id).ids


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fair_calib_ext.calibrate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="official HF dir or embedded name (tiny-llada, tiny-dream)")
    p.add_argument("--method", default="fair",
                   help="rtn | smoothquant | quarot | gptq | flatquant | fair, optionally +gptq")
    p.add_argument("--bits", default="w4a4", help="w4a4 | w4a8 | w8a8 | w4a16")
    p.add_argument("--calib-data", default=None,
                   help="text (one document per line) or jsonl ({'text'} or {'prompt','answer'}); "
                        "default: the embedded corpus (fair_calib_ext.eval.corpus calibration split)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=None, help="default: min(1024, model context)")
    # None = not given: the MethodConfig default, and a learning flag given to a method that does not
    # learn is refused instead of being recorded in method_config
    p.add_argument("--epochs", type=int, default=None, help="flatquant / fair only (default 15)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="flatquant / fair only (default 5e-3)")
    p.add_argument("--clip-lr", type=float, default=None, help="flatquant / fair only (default 5e-2)")
    p.add_argument("--fp-inputs", action=argparse.BooleanOptionalAction, default=None,
                   help="student blocks see FP inputs (FlatQuant's convention) instead of the quantized "
                        "prefix's outputs (default: on for flatquant, as in REPORT.md, off otherwise)")
    p.add_argument("--sq-alpha", type=float, default=None, help="smoothquant only (default 0.5)")
    p.add_argument("--act-clip", type=float, default=None,
                   help="fixed activation clip (default: method's; not for flatquant/fair, which learn it)")
    p.add_argument("--w-clip-search", choices=("auto", "on", "off"), default="auto",
                   help="not for flatquant/fair, which learn the weight clips")
    p.add_argument("--gptq-act-order", action="store_true", help="GPTQ methods only")
    p.add_argument("--gptq-damp", type=float, default=None, help="GPTQ methods only (default 0.01)")
    p.add_argument("--gptq-block", type=int, default=None, help="GPTQ methods only (default 128)")
    p.add_argument("--calib-format", default="auto", choices=("auto", "aligned", "stream"),
                   help="aligned: (prompt, answer) samples, prior position 0 on each answer's first token; "
                        "stream: windows of a text stream, prior on the trailing K positions; auto: aligned "
                        "for {'prompt','answer'} data and the embedded corpus, stream for plain text")
    g = p.add_argument_group("FAIR-Calib Stage I prior (--method fair only; unset values come from --prior-preset)")
    g.add_argument("--prior", default=None, help="load a saved prior (path without suffix or .safetensors)")
    g.add_argument("--prior-preset", default=None,
                   help=f"candidate prior, one of {sorted(PRIOR_PRESETS)} (default {DEFAULT_PRIOR!r}, chosen on "
                        "the val split; see README)")
    g.add_argument("--probe-policy", default=None, choices=PROBE_POLICIES,
                   help="random: random commits in blocks (the paper); sampler: the family's own decoding, "
                        "fragility 1 - (p1 - p2) at each commit; noise: the family's decoding, fragility = an RTN "
                        "student disagrees with the teacher's commit")
    g.add_argument("--prior-mode", default=None, choices=PRIOR_MODES)
    g.add_argument("--prior-combine", default=None, choices=COMBINE,
                   help="literal: w = F + λ1·R; balanced: w = F/mean F + λ1·R/mean R (flat with λ0 early)")
    g.add_argument("--lambda0", default=None, choices=LAMBDA0_SCHEDULES)
    g.add_argument("--lambda0-rate", type=float, default=None, help="decay rate of --lambda0 exp")
    g.add_argument("--lambda1", type=float, default=None)
    g.add_argument("--reliability", default=None, choices=RELIABILITY)
    g.add_argument("--floor", type=float, default=None)
    g.add_argument("--outside-weight", type=float, default=None,
                   help="weight of the positions outside the continuations / before the window (default: the floor)")
    g.add_argument("--n-probe", type=int, default=512)
    g.add_argument("--probe-gen-length", type=int, default=None,
                   help="K; default: the model's generation length for aligned data, seqlen/4 for stream data")
    g.add_argument("--probe-steps", type=int, default=None, help="default K (one commit per step)")
    g.add_argument("--probe-block", type=int, default=None,
                   help="block length of the random-commit probe (default min(32, K/3): several blocks, so that "
                        "commit time follows position and the early boost has a shape to act on)")
    g.add_argument("--probe-batch-size", type=int, default=8)
    g.add_argument("--probe-dtype", default=None, choices=("auto", "fp32", "bf16"),
                   help="dtype of the teacher during Stage I (default auto: fp32 when the fp32 teacher and its "
                        "student fit in the available memory, else bf16, as for LLaDA-8B / Dream-7B on 24 GB)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--run-dir", default=None, help="per-block checkpoints for resume (default: <out>.run)")
    p.add_argument("--log", default=None, help="also append the JSON-lines log here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--act-dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="dtype of the calibration activations held on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (1 is fastest for the tiny models on a busy CPU)")
    p.add_argument("--no-progress", action="store_true")
    return p


# One rule per numeric flag, checked before any work; an upper bound wherever memory or time grows
# with the value (the memory budget then refines nsamples / seqlen / probe-batch-size for the model).
FLAGS = (
    Flag("nsamples", lo=1, hi=1 << 16), Flag("seqlen", lo=2, hi=1 << 20), Flag("epochs", lo=0, hi=10_000),
    Flag("batch_size", lo=1, hi=4096), Flag("lr", "float", lo=0, lo_open=True, hi=10.0),
    Flag("clip_lr", "float", lo=0, lo_open=True, hi=10.0), Flag("sq_alpha", "float", lo=0.0, hi=1.0),
    Flag("act_clip", "float", lo=0, lo_open=True, hi=1.0), Flag("gptq_damp", "float", lo=0, lo_open=True, hi=10.0),
    Flag("gptq_block", lo=1, hi=1 << 16), Flag("lambda0_rate", "float", lo=0.0, hi=1e6),
    Flag("lambda1", "float", lo=0.0, hi=1e6), Flag("floor", "float", lo=0.0, hi=1e6),
    Flag("outside_weight", "float", lo=0.0, hi=1e6), Flag("n_probe", lo=1, hi=1 << 16),
    Flag("probe_gen_length", lo=1, hi=1 << 20), Flag("probe_steps", lo=1, hi=1 << 20),
    Flag("probe_block", lo=1, hi=1 << 20), Flag("probe_batch_size", lo=1, hi=4096),
    Flag("seed", lo=0, hi=10**6 - 1),  # the embedded corpus's split streams stay disjoint below 10**6
    Flag("threads", lo=1, hi=4096),
)

_PRIOR_FLAGS = ("prior", "prior_preset", "probe_policy", "prior_mode", "prior_combine", "lambda0", "lambda0_rate",
                "lambda1", "reliability", "floor", "outside_weight", "probe_gen_length", "probe_steps", "probe_block",
                "probe_dtype")


# the probe that measures a prior, and the flags that shape the prior from its statistics
# (--probe-gen-length is not one: it also sets how far aligned samples are filled, prior or not)
_PROBE_FLAGS = ("probe_policy", "probe_steps", "probe_block", "probe_dtype")
_SHAPE_FLAGS = ("prior_preset", "prior_mode", "prior_combine", "lambda0", "lambda0_rate", "lambda1", "reliability",
                "floor", "outside_weight")


def _refuse_unused_prior_flags(args: argparse.Namespace, spec: Any) -> None:
    """A saved --prior is used as it is (no probe, no reshaping); a uniform prior runs no probe."""
    from .validate import refuse_unused

    if args.prior:
        refuse_unused(args, (*_PROBE_FLAGS, *_SHAPE_FLAGS), f"with --prior {args.prior}: a saved prior is used as "
                      "saved (drop --prior to measure a new one)")
    elif spec.mode == "uniform":
        refuse_unused(args, _PROBE_FLAGS, "with a uniform prior: no probe runs")


def _load_prior(path: str) -> Any:
    from .calib import PositionPrior

    try:
        return PositionPrior.load(path)
    except (FileNotFoundError, ValueError) as exc:  # CheckpointError is a ValueError: names the file
        raise UsageError(f"--prior {path}: {exc}") from None


def _prior_spec_from_args(args: argparse.Namespace) -> Any:
    from .calib import prior_spec

    try:
        return prior_spec(args.prior_preset or DEFAULT_PRIOR, policy=args.probe_policy, mode=args.prior_mode,
                          combine=args.prior_combine, lambda0=args.lambda0, lambda0_rate=args.lambda0_rate,
                          lambda1=args.lambda1, reliability=args.reliability, floor=args.floor,
                          outside=args.outside_weight)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def method_config(args: argparse.Namespace) -> Any:
    """The MethodConfig the arguments ask for; refuses values and flags that would be ignored."""
    from .calib import MethodConfig
    from .calib.methods import parse_method
    from .cli_common import check_finite_positive, check_positive
    from .validate import refuse_unused
    from .quant import QuantConfig

    try:
        transform, weight_quant = parse_method(args.method)
    except ValueError as exc:
        raise UsageError(f"--method: {exc}") from None
    for name in ("lr", "clip_lr", "gptq_damp"):
        check_finite_positive(getattr(args, name), f"--{name.replace('_', '-')}")
    check_positive(args.gptq_block, "--gptq-block")
    if args.sq_alpha is not None and not (math.isfinite(args.sq_alpha) and 0.0 <= args.sq_alpha <= 1.0):
        raise UsageError(f"--sq-alpha must be in [0, 1], got {args.sq_alpha}")
    learns = transform in ("flatquant", "fair")
    if not learns:
        refuse_unused(args, ("epochs", "lr", "clip_lr"), f"with --method {args.method}: only flatquant and fair train")
    if transform != "smoothquant":
        refuse_unused(args, ("sq_alpha",), f"with --method {args.method}: it is SmoothQuant's migration strength")
    if learns and args.act_clip is not None:
        raise UsageError(f"--act-clip does not apply to --method {args.method}: it learns its activation clips "
                         "(use it with rtn, smoothquant, quarot or gptq)")
    if learns and args.w_clip_search != "auto":
        raise UsageError(f"--w-clip-search does not apply to --method {args.method}: it learns its weight clips")
    if weight_quant != "gptq":
        given = [f for f, v in (("--gptq-block", args.gptq_block), ("--gptq-damp", args.gptq_damp),
                                ("--gptq-act-order", args.gptq_act_order or None)) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} applies only to GPTQ weights (--method gptq or <method>+gptq), "
                             f"not --method {args.method}")
    try:
        quant = QuantConfig.preset(args.bits, **({"a_clip": args.act_clip} if args.act_clip is not None else {}))
    except ValueError as exc:  # unknown preset or a clip outside (0, 1]
        raise UsageError(f"--bits {args.bits} / --act-clip {args.act_clip}: {exc}") from None
    wcs = {"auto": None, "on": True, "off": False}[args.w_clip_search]
    # flatquant as REPORT.md (python/reproduce.py) runs it: FP block inputs, FlatQuant's own convention
    fp_inputs = args.fp_inputs if args.fp_inputs is not None else transform == "flatquant"
    given = {k: getattr(args, k) for k in ("gptq_damp", "gptq_block", "sq_alpha", "epochs", "lr", "clip_lr")
             if getattr(args, k) is not None}
    cfg = MethodConfig(method=args.method, quant=quant, seed=args.seed, fp_inputs=fp_inputs, w_clip_search=wcs,
                       gptq_act_order=args.gptq_act_order, batch_size=args.batch_size, **given)
    if args.act_clip is not None and cfg.transform == "quarot":
        cfg.quarot_act_clip = args.act_clip
    return cfg


_RUN_FILES = ("state.json", "block_*.safetensors", "block_*.json", "acts_*.safetensors", "*.tmp")


def _remove_run_dir(run_dir: Path) -> None:
    """Delete the resume files the engine wrote, then the directory if nothing else is in it:
    a --run-dir that holds anything the run did not write is left in place."""
    for pattern in _RUN_FILES:
        for f in run_dir.glob(pattern):
            f.unlink()
    try:
        run_dir.rmdir()
    except OSError:  # not empty: the user's files stay
        pass


def _check_paths(out: Path, run_dir: Path, log: str | None) -> None:
    """Outputs that would overwrite or delete one another are refused before any work."""
    o, r = out.resolve(), run_dir.resolve()
    if o == r or o in r.parents or r in o.parents:
        raise UsageError(f"--run-dir {run_dir} and --out {out} must be separate directories (neither inside the "
                         "other): the run dir is deleted when the run completes")
    if log is not None:
        lg = Path(log).resolve()
        if lg == o or o in lg.parents or lg == r or r in lg.parents:
            raise UsageError(f"--log {log} must not be inside --out {out} or --run-dir {run_dir}")


def _check_model_paths(model_path: Path, out: Path, run_dir: Path, log: str | None,
                       inputs: dict[str, str | None]) -> None:
    """Outputs that would replace, delete or append to the --model checkpoint are refused: with
    --overwrite, --out is replaced as a whole, so an --out that is or holds the model would lose it."""
    m = model_path.resolve()
    for flag, d in (("--out", out), ("--run-dir", run_dir)):
        r = d.resolve()
        if r == m or r in m.parents:
            raise UsageError(f"{flag} {d} is or contains the --model checkpoint {model_path}: it would be "
                             "replaced or deleted; choose another directory")
    if log is not None and m in Path(log).resolve().parents:
        raise UsageError(f"--log {log} is inside the --model checkpoint {model_path}; choose a file elsewhere")
    for flag, f in inputs.items():  # the log is appended to: never to a file the run reads
        if log is not None and f is not None and Path(log).resolve() in (Path(f).resolve(),
                                                                          Path(f).resolve().with_suffix(".json")):
            raise UsageError(f"--log {log} is the {flag} input file; choose another file")


def _check_budget(args: argparse.Namespace, mc: Any, cfg: Any, model_path: Path, seqlen: int, k: int,
                  act_dtype: torch.dtype, device: torch.device, spec: Any, out: Path, run_dir: Path) -> torch.dtype | None:
    """Refuse a run whose memory or disk estimate does not fit; returns the probe dtype (None: no probe)."""
    from .calib import budget
    from .models.weights import CheckpointTensors

    tensors = CheckpointTensors(model_path)
    stored = max((tensors.dtype(n).itemsize for n in tensors.names()), default=4)
    probing = cfg.transform == "fair" and not args.prior and spec.mode != "uniform"
    noise = probing and spec.policy == "noise"
    avail = budget.available_memory()
    probe_dtype = None
    if probing:
        choice = args.probe_dtype or "auto"
        if choice == "auto":
            probe_dtype = budget.choose_probe_dtype(mc, int(0.8 * avail) if avail else 1 << 62, noise)
        else:
            probe_dtype = torch.float32 if choice == "fp32" else torch.bfloat16
    s1, s2 = budget.calibration_budget(
        mc, stored_itemsize=stored, method=cfg.transform, weight_quant=cfg.weight_quant, nsamples=args.nsamples,
        seqlen=seqlen, act_itemsize=act_dtype.itemsize, batch_size=cfg.batch_size,
        probe_itemsize=probe_dtype.itemsize if probe_dtype is not None else None, probe_noise=noise,
        probe_batch=args.probe_batch_size, probe_len=k + 64, device=device.type)
    if avail is not None:
        for name, b in (("Stage I (the prior's probe)", s1), ("Stage II (block-wise calibration)", s2)):
            if b.parts and b.total > avail:
                hint = ("lower --nsamples or --seqlen" if b is s2 else
                        "use --probe-dtype bf16, a saved --prior, or lower --probe-batch-size")
                flags = (f"--nsamples {args.nsamples} --seqlen {seqlen}" if b is s2 else
                         f"--probe-batch-size {args.probe_batch_size}")
                raise UsageError(f"--model {args.model} with {flags}: {name} needs about {budget.fmt_gib(b.total)} of memory "
                                 f"({b.describe()}), more than the {budget.fmt_gib(avail)} available; {hint}")
    need_disk = budget.quantized_bytes(mc, stored) + budget.quantized_bytes(mc, 0) + \
        2 * args.nsamples * seqlen * mc.hidden_size * act_dtype.itemsize  # checkpoint + run dir
    free = budget.free_disk(out.parent)
    if need_disk > free:
        raise UsageError(f"--out {out}: the quantized checkpoint and the resume files need about "
                         f"{budget.fmt_gib(need_disk)} of disk, {budget.fmt_gib(free)} is free there")
    return probe_dtype


def run(args: argparse.Namespace) -> dict[str, Any]:
    from .calib import PositionPrior, build_aligned_data, build_stream_data, calibrate, probe_stats, save_quantized
    from .calib.layerwise import model_kernel_report, peak_memory_mb
    from .cli_common import check_out_dir, check_out_file, resolve_device, set_threads
    from .models import load_pretrained, load_tokenizer, parse_official_config, read_config, resolve_model_path
    from .validate import check_flags

    t_start = time.time()
    # every argument and output path is checked before the model is read
    check_flags(args, FLAGS)
    set_threads(args.threads)
    cfg = method_config(args)
    quant = cfg.quant
    device = resolve_device(args.device)
    out = check_out_dir(args.out, overwrite=args.overwrite)
    run_dir = Path(args.run_dir) if args.run_dir else out.with_name(out.name + ".run")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir}: exists and is not a directory")
    check_out_file(run_dir / "state.json", "--run-dir")
    if args.log:
        check_out_file(args.log, "--log")
    _check_paths(out, run_dir, args.log)
    act_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.act_dtype]
    model_path = resolve_model_path(args.model)
    _check_model_paths(model_path, out, run_dir, args.log, {"--calib-data": args.calib_data, "--prior": args.prior})
    raw = read_config(model_path)
    if "quantization_config" in raw:
        raise UsageError(f"--model {args.model} is already quantized")
    mc = parse_official_config(raw)
    seqlen = args.seqlen or min(1024, mc.max_position_embeddings)
    if seqlen < 2 or seqlen > mc.max_position_embeddings:
        raise UsageError(f"--seqlen {seqlen} outside [2, {mc.max_position_embeddings}] for this model")
    if cfg.transform != "fair":
        given = [f"--{n.replace('_', '-')}" for n in _PRIOR_FLAGS if getattr(args, n) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: prior options are used by --method fair only "
                             f"(got --method {args.method})")
    spec = _prior_spec_from_args(args) if cfg.transform == "fair" else None
    if spec is not None:
        _refuse_unused_prior_flags(args, spec)
    if args.prior:  # a damaged or missing prior file fails now, not after the model is read
        _load_prior(args.prior)
    # memory and disk, from the config and the shard headers alone (the probe length is bounded
    # by the one the run will use: --probe-gen-length, or a quarter of the window)
    k_est = args.probe_gen_length or max(1, seqlen // 4)
    probe_dtype = _check_budget(args, mc, cfg, model_path, seqlen, k_est, act_dtype, device, spec, out, run_dir)
    if args.calib_data:
        entries = _read_calib_file(Path(args.calib_data))
        pairs = [e for e in entries if isinstance(e, tuple)]
        if args.calib_format == "aligned" and len(pairs) != len(entries):
            raise UsageError(f"--calib-format aligned needs {{'prompt','answer'}} objects on every line of "
                             f"--calib-data ({len(entries) - len(pairs)} lines are plain text)")
        fmt = "aligned" if (args.calib_format == "aligned" or (args.calib_format == "auto" and pairs
                                                                and len(pairs) == len(entries))) else "stream"
        texts = [e if isinstance(e, str) else e[0] + e[1] for e in entries]
    else:  # the embedded corpus: the task suite's train split, as (prompt, answer) pairs
        from .eval.corpus import calib_pairs

        pairs = calib_pairs(max(2000, args.nsamples * 8), seed=args.seed)
        texts = [p_ + a_ for p_, a_ in pairs]
        fmt = "stream" if args.calib_format == "stream" else "aligned"
    # Stage II streams the blocks: only embeddings, final norm and head are read now, as stored
    model = load_pretrained(model_path, dtype=None, device="cpu", stream_layers=True)
    try:
        tok = load_tokenizer(model_path)
    except OSError as exc:  # unreadable tokenizer files
        raise UsageError(f"--model {args.model}: cannot load its tokenizer ({exc})") from None
    mc = model.config
    gen_k = _default_gen_length(model)
    k = args.probe_gen_length or (gen_k if fmt == "aligned" else max(1, seqlen // 4))
    if k < 1 or (fmt == "stream" and k >= seqlen):
        raise UsageError(f"--probe-gen-length {k} must be in [1, seqlen {seqlen})")
    try:
        if fmt == "aligned":
            data = build_aligned_data(tok, pairs, args.nsamples, seqlen, args.seed, mc.eos_token_id, fill_to=k)
        else:
            data = build_stream_data(tok, texts, args.nsamples, seqlen, args.seed, mc.eos_token_id)
    except ValueError as exc:
        raise UsageError(f"--calib-data: {exc}") from None

    logs: list[dict[str, Any]] = []
    log_fh = open(args.log, "a", encoding="utf-8") if args.log else None

    def log(rec: dict[str, Any]) -> None:
        logs.append(rec)
        if log_fh is not None:
            log_fh.write(json.dumps(rec) + "\n")
            log_fh.flush()

    prior = None
    t_prior = 0.0
    extra_files: dict[str, bytes | str] = {}
    if cfg.transform == "fair":
        if args.prior:
            prior = _load_prior(args.prior)
        elif spec.mode == "uniform":
            prior = PositionPrior(torch.ones(k), floor=1.0, mode="uniform", settings=spec.to_dict())
        else:
            t0 = time.time()
            if fmt == "aligned":  # probe the continuation after the same kind of prompt Stage II aligns to
                rng = random.Random(args.seed + 1)
                pick = [pairs[rng.randrange(len(pairs))][0] for _ in range(min(args.n_probe, 512))]
                pprompts = [tok.encode(x, add_special_tokens=False) for x in pick]
            else:
                pprompts = build_stream_data(tok, texts, min(args.n_probe, 512), seqlen, args.seed + 1,
                                             mc.eos_token_id).ids[:, :seqlen - k]
            # the whole teacher for the rollouts, then freed before Stage II streams the blocks
            teacher = load_pretrained(model_path, dtype=probe_dtype, device=device)
            stats = probe_stats(teacher, pprompts, policy=spec.policy, n_probe=args.n_probe, gen_length=k,
                                steps=args.probe_steps, block_length=args.probe_block or max(1, min(32, k // 3)),
                                batch_size=args.probe_batch_size, seed=args.seed, progress=not args.no_progress)
            del teacher
            gc.collect()
            prior = stats.prior(spec)
            prior.settings["preset"] = args.prior_preset or DEFAULT_PRIOR
            prior.settings["calib_format"] = fmt
            prior.settings["probe_dtype"] = str(probe_dtype).replace("torch.", "")
            t_prior = time.time() - t0
            w = prior.weights
            log({"event": "prior", "seconds": round(t_prior, 3), "weights": w.tolist(),
                 "max_over_min": float(w.max() / w.min().clamp(min=1e-12)), **prior.settings})
        import tempfile

        with tempfile.TemporaryDirectory() as td:
            st, js = prior.save(Path(td) / "prior")
            extra_files["prior.safetensors"] = st.read_bytes()
            extra_files["prior.json"] = js.read_text()
            try:
                prior.plot(Path(td) / "prior.png")
                extra_files["prior.png"] = (Path(td) / "prior.png").read_bytes()
            except Exception as exc:  # noqa: BLE001 - a missing plotting backend must not fail the run
                log({"event": "warning", "message": f"prior plot skipped: {exc}"})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    # a run dir of another model/config, or a damaged one, is a ResumeError (one line, says how to discard)
    # offload: each finished block stays in the run dir only (one block in memory, whatever the
    # model's size); save_quantized reads them back before the run dir is removed
    calibrate(model, cfg, data, prior, device=device, act_dtype=act_dtype, run_dir=run_dir,
              progress=not args.no_progress, log=log, offload=True)
    t_calib = time.time() - t0
    summary = {"event": "done", "model": str(args.model), "method": cfg.method, "bits": quant.name,
               "calib_format": fmt,
               "nsamples": args.nsamples, "seqlen": seqlen, "epochs": cfg.epochs if cfg.learns else 0,
               "prior_seconds": round(t_prior, 2), "calib_seconds": round(t_calib, 2),
               "total_seconds": round(time.time() - t_start, 2), **peak_memory_mb(device), "out": str(out),
               "kernel_path": model_kernel_report(model)["kernel_path"]}
    log(summary)
    extra_files["calib_log.jsonl"] = "".join(json.dumps(r) + "\n" for r in logs)
    save_quantized(model, out, overwrite=args.overwrite, tokenizer_from=model_path, extra_files=extra_files)
    _remove_run_dir(run_dir)  # finished: the resume state is no longer needed
    if log_fh is not None:
        log_fh.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> int:
        print(json.dumps(run(args)))
        return 0

    return report(body)  # only user errors become one line; internal errors keep their traceback


if __name__ == "__main__":
    sys.exit(main())
