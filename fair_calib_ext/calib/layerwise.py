"""The block-wise calibration engine shared by every method (Stage II of FAIR-Calib).

    X_fp ← layer-0 input of the calibration set (FP model), kept on CPU (fp32 or fp16)
    X_q  ← X_fp
    for each block ℓ (only this block on the device):
        Y   = FP block(X_fp)                                   teacher target
        transform(block, X_q or X_fp, Y, w)                    method hook (may learn)
        quantize the pending weights (RTN or GPTQ on the student inputs)
        log weighted loss of plain RTN vs the final block, both on the student inputs
        X_q ← block_q(X_q);  X_fp ← Y                          (fp_inputs: X_q ← Y)
        checkpoint (atomic): block state + activations, then the commit record

The loss everywhere is Σ_b Σ_i w_i ‖Δ_{b,i}‖² / (B·D·Σ_i w_i) via ``torch.ops.fair.weighted_mse``
(pure-torch reference when the extension is not built), w = the position prior mapped onto the
sequence (ones for uniform). Per-block seeds make a resumed run bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import os
import resource
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ResumeError
from ..models.streaming import is_streamed_layer
from ..models.weights import module_fingerprint
from ..quant.checkpoint import quantized_specs
from ..quant.gptq import GPTQ
from ..quant.modules import PendingLinear, QuantLinear, kernel_path, kernel_report, kernels_available
from ..quant.quantizer import quantize_ref
from .data import CalibData, position_weights
from .methods import BlockContext, MethodConfig, _linears, get_transform
from .offload import OffloadedBlocks

__all__ = ["calibrate", "weighted_mse", "weighted_loss", "peak_memory_mb", "quantized_specs", "weight_fingerprint"]


def weighted_mse_ref(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i ‖a_i − b_i‖² over positions i (a, b [..., N, D], w [N]); pure torch."""
    return ((a - b).pow(2).sum(-1) * w).sum()


def weighted_mse(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The fair op when built (differentiable), else the reference formula."""
    if kernels_available():
        from .. import ops

        return ops.weighted_mse(a.contiguous(), b.contiguous(), w.to(a.dtype).contiguous())
    return weighted_mse_ref(a, b, w)


def weighted_loss(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Normalised loss Σ w‖Δ‖² / (D·Σw), with w [S] (shared by the batch) or [B, S] (per
    sample) broadcast over a's leading dims; equals plain MSE when w ≡ 1."""
    total_w = w.expand(a.shape[:-1]).sum()
    return weighted_mse(a, b, w) / (a.shape[-1] * total_w)


def peak_memory_mb(device: torch.device | str = "cpu") -> dict[str, float]:
    """Peak resident memory of this process (MiB) and, on CUDA, peak allocated GPU memory."""
    out = {"cpu_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        out["gpu_peak_alloc_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# -- helpers -----------------------------------------------------------------------------------
def _kwargs_to(kw: dict[str, Any], device: torch.device) -> dict[str, Any]:
    def mv(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, tuple):
            return tuple(mv(t) for t in v)
        return v
    return {k: mv(v) for k, v in kw.items()}


def _make_runner(kw: dict[str, Any], device: torch.device, batch_size: int,
                 act_dtype: torch.dtype) -> Callable[..., torch.Tensor | None]:
    @torch.no_grad()
    def run(layer: nn.Module, x: torch.Tensor, keep: bool = False) -> torch.Tensor | None:
        outs = []
        for i in range(0, x.shape[0], batch_size):
            y = layer(x[i:i + batch_size].to(device, torch.float32), **kw)
            if keep:
                outs.append(y.to("cpu", act_dtype))
        return torch.cat(outs) if keep else None
    return run


def _loss_over(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, kw: dict[str, Any],
               device: torch.device, batch_size: int) -> float:
    tot = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            out = layer(x[i:i + batch_size].to(device, torch.float32), **kw).float()
            tgt = y[i:i + batch_size].to(device, torch.float32)
            tot += float(weighted_loss(out, tgt, w[i:i + batch_size].to(device))) * out.shape[0]
    return tot / x.shape[0]


@torch.no_grad()
def _quantize_weights(layer: nn.Module, cfg: MethodConfig, ctx: BlockContext, run: Callable) -> None:
    """Pending linears -> QuantLinear, with RTN or GPTQ (group by group on the student inputs)."""
    lm = ctx.layer_map
    q = cfg.quant
    use_kernels = None
    if cfg.weight_quant == "rtn" or q.w_bits >= 16:
        for _, nm in _linears(lm):
            pl: PendingLinear = layer.get_submodule(nm)
            if q.w_bits >= 16:
                qw, sc = pl.weight, torch.ones(pl.out_features)
            else:
                qw, sc = quantize_ref(pl.weight, q.w_bits, pl.w_clip)
            _set(layer, nm, pl.to_quant_linear(qw.cpu(), sc.cpu(), use_kernels))
        return
    for role in ("qkv", "o", "up_gate", "down"):
        names = lm[role]
        mods = [layer.get_submodule(nm) for nm in names]
        gptq = GPTQ(mods[0].in_features, device=ctx.device)

        def hook(m: nn.Module, args: tuple[Any, ...]) -> None:
            gptq.add_batch(m.transformed_input(args[0]).float())

        h = mods[0].register_forward_pre_hook(hook)  # one Hessian per shared input
        try:
            run(layer, ctx.x_student)
        finally:
            h.remove()
        for nm, pl in zip(names, mods):
            qw, sc = gptq.quantize(pl.weight, q.w_bits, pl.w_clip, blocksize=cfg.gptq_block,
                                   damp=cfg.gptq_damp, act_order=cfg.gptq_act_order)
            _set(layer, nm, pl.to_quant_linear(qw.cpu(), sc.cpu(), use_kernels).to(ctx.device))


def _set(root: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, mod)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    _fsync_file(tmp)  # the bytes are on disk before the rename publishes them (a crash leaves old or new)
    os.replace(tmp, path)


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


_DISCARD = "delete {rd} (or pass another --run-dir) to start over"


def _read_resume(rd: Path, f: Path, read: Callable[[], Any]) -> Any:
    """``read()`` of a run-dir file; a damaged file (crash mid-write, disk full, edited by
    hand) is a ResumeError that names it and says how to discard the run."""
    from safetensors import SafetensorError

    try:
        return read()
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:  # json, safetensors, state dict
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResumeError(f"cannot resume from {f}: unreadable or damaged ({msg}); "
                          f"{_DISCARD.format(rd=rd)}") from exc


def _read_state(f: Path, n_blocks: int) -> dict[str, Any]:
    """state.json: an object whose ``done`` is a block count in [0, n_blocks] and whose
    ``records`` (optional) is a list; anything else raises CheckpointError naming the field."""
    from ..validate import json_field, read_json

    st = read_json(f)
    json_field(st, "done", f, "int", lo=0, hi=n_blocks)
    json_field(st, "records", f, "list", default=[])
    return st


def _install_block_state(layer: nn.Module, specs: dict[str, dict[str, Any]], state: dict[str, torch.Tensor]) -> None:
    for nm, spec in specs.items():
        _set(layer, nm, QuantLinear.from_spec(spec))
    layer.load_state_dict(state, strict=True, assign=True)  # assign: a streamed block is still on meta


@torch.no_grad()
def weight_fingerprint(model: nn.Module) -> str:
    """A hash of the model's weights: names, shapes, dtypes and up to 65536 evenly strided
    elements per in-memory tensor; for a streamed model (``model.layer_source``) the blocks
    still on disk add their checkpoint fingerprint (sampled rows). Identifies the model in the
    resume digest without reading gigabytes twice."""
    fp = module_fingerprint(model)
    src = getattr(model, "layer_source", None)
    if src is not None:
        fp = hashlib.sha256((fp + src.fingerprint()).encode()).hexdigest()[:16]
    return fp


def _data_digest(ids: torch.Tensor, w: torch.Tensor, cfg: MethodConfig, weights: str = "") -> str:
    h = hashlib.sha256()
    h.update(weights.encode())  # the model: another model must not resume from these blocks
    h.update(ids.cpu().numpy().tobytes())
    h.update(w.float().cpu().numpy().tobytes())
    h.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _norm_like_to(layer: nn.Module, dtype: torch.dtype) -> None:
    """Cast the block's non-quantized parameters (norms) back to the model dtype."""
    for m in layer.modules():
        if isinstance(m, (QuantLinear, PendingLinear)):
            continue
        for p in m.parameters(recurse=False):
            p.data = p.data.to(dtype)


def _materialize(model: nn.Module, i: int, device: torch.device) -> nn.Module:
    """Block i in fp32 on ``device``: built by the model's layer source when it is streamed."""
    layer = model.layers[i]
    src = getattr(model, "layer_source", None)
    if src is not None and is_streamed_layer(layer):
        layer = src.load(i, torch.float32, device)
        model.layers[i] = layer
    else:
        layer.to(device=device, dtype=torch.float32)
    return layer


_LIBC: Any = None


def _return_freed_memory() -> None:
    """Free the finished block's memory now: collect its reference cycles, then give the freed
    heap pages back to the OS (glibc ``malloc_trim``; a no-op where there is none).

    Measured on LLaDA-8B-shaped blocks with ``--method fair``: without both, anonymous memory
    grew ~1 GB a block and a 32-block run was killed at 23.8 GB after 28 blocks.
    """
    global _LIBC
    # first the reference cycles (a FlatBlock and its training linears point at each other, and
    # hold the block's fp32 weights): Python's cyclic GC rarely runs in a loop that creates few
    # objects, so without this each block's cycle stayed alive (~1 GB a block at full width)
    gc.collect()
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _check_block_file(path: Path, specs: dict[str, Any]) -> None:
    """A finished block's file has a readable header naming a tensor of every spec'd layer."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
    missing = [nm for nm in specs if not any(k.startswith(nm + ".") for k in keys)]
    if missing:
        raise KeyError(f"no tensors for {missing[0]}")


def model_kernel_report(model: nn.Module) -> dict[str, Any]:
    """``kernel_report(model)``, counting the blocks offloaded to the run dir as they ran."""
    rep = kernel_report(model)
    store = getattr(model, "offloaded_blocks", None)
    if store is not None and store.kernel_paths:
        paths = {p for p in (rep["kernel_path"], *store.kernel_paths.values()) if p != "none"}
        rep["kernel_path"] = "none" if not paths else paths.pop() if len(paths) == 1 else "mixed"
    return rep


def _rtn_reference_loss(layer: nn.Module, cfg: MethodConfig, lm: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
                        pos_w: torch.Tensor, kw: dict[str, Any], device: torch.device, bs: int) -> float:
    """Loss of plain RTN (no transform) of this block: its linears are swapped for fake-quant
    views of the same fp32 weights and swapped back, so an 8B block is never held twice."""
    q = cfg.quant
    orig = {nm: layer.get_submodule(nm) for _, nm in _linears(lm)}
    try:
        for nm, lin in orig.items():
            ref = PendingLinear(lin.weight, lin.bias, w_bits=q.w_bits, a_bits=q.a_bits, w_clip=q.w_clip,
                                act_clip=q.a_clip, share=True)
            ref.quant = True
            _set(layer, nm, ref)
        return _loss_over(layer, x, y, pos_w, kw, device, bs)
    finally:
        for nm, lin in orig.items():
            _set(layer, nm, lin)


# -- the engine ----------------------------------------------------------------------------------
def calibrate(
    model: nn.Module,
    method: str | MethodConfig,
    data: "torch.Tensor | CalibData",
    prior: Any = None,
    *,
    device: str | torch.device = "cpu",
    act_dtype: torch.dtype = torch.float32,
    batch_size: int | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
    offload: bool = False,
) -> nn.Module:
    """Quantize ``model`` in place, block by block, and return it.

    data: LongTensor [n, S] of fully visible calibration sequences (no padding), or a
    :class:`~fair_calib_ext.calib.data.CalibData` ((prompt, continuation) rows: the prior is
    aligned to each continuation, see :func:`~fair_calib_ext.calib.data.position_weights`).
    prior: a PositionPrior (FAIR-Calib), a tensor of weights [S] or [n, S], or None (uniform).
    method: name or MethodConfig.
    run_dir: checkpoint after every block; an existing run with the same config and data
    resumes from its last finished block. ``stop_after``: return after that many blocks
    (used to test resumption). Only the current block is moved to ``device``; activations
    stay on CPU in ``act_dtype``. ``offload`` (needs ``run_dir``): each finished block is left
    in the run dir only (see :mod:`~fair_calib_ext.calib.offload`), so calibration holds one
    block of an 8B model; write the result with ``save_quantized`` before the run dir goes.
    """
    cfg = method if isinstance(method, MethodConfig) else MethodConfig(method=method)
    device = torch.device(device)
    if offload and run_dir is None:
        raise ValueError("offload=True keeps the finished blocks in run_dir: pass run_dir")
    cdata = data if isinstance(data, CalibData) else None
    if cdata is not None:
        data = cdata.ids
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.dtype != torch.long:
        raise ValueError(f"data must be a LongTensor [n, S] or CalibData, got {getattr(data, 'shape', type(data))}")
    if cfg.transform == "fair" and prior is None:
        warnings.warn("calibrate(..., 'fair') without a prior: every position gets weight 1 (uniform); "
                      "pass a PositionPrior from probe_prior()", stacklevel=2)
    if isinstance(prior, torch.Tensor):
        pos_w = prior.float()
    elif cdata is not None:
        pos_w = position_weights(prior, cdata)
    elif prior is None:
        pos_w = torch.ones(data.shape[1])
    else:
        pos_w = prior.to_positions(data.shape[1])
    if pos_w.shape not in ((data.shape[1],), tuple(data.shape)):
        raise ValueError(f"position weights {tuple(pos_w.shape)} match neither seqlen {data.shape[1]} "
                         f"nor data {tuple(data.shape)}")
    if not bool(torch.isfinite(pos_w).all()) or bool((pos_w < 0).any()) or float(pos_w.sum()) <= 0:
        raise ValueError("position weights must be finite, >= 0 and not all zero")
    pos_w = pos_w.expand(data.shape).contiguous()  # [n, S]: one row per calibration sample
    bs = batch_size or cfg.batch_size
    log = log or (lambda rec: None)
    transform = get_transform(cfg)
    model.eval()
    torch.manual_seed(cfg.seed)
    # before prepare_model (QuaRot rewrites the weights in place), so a resumed run matches
    fingerprint = weight_fingerprint(model) if run_dir is not None else ""
    transform.prepare_model(model)  # exact FP rewrite (QuaRot); teacher = this model
    model_dtype = model.embed_tokens.weight.dtype  # blocks go back to the dtype the model holds
    lm = model.layer_map()
    n_layers = len(model.layers)

    rd = Path(run_dir) if run_dir is not None else None
    digest = _data_digest(data, pos_w, cfg, fingerprint)
    start = 0
    x_fp = x_q = None
    records: list[dict[str, Any]] = []  # block log records, kept in state.json for the final log
    store = OffloadedBlocks(rd) if offload and rd is not None else None
    if store is not None:
        model.offloaded_blocks = store
    if rd is not None:
        rd.mkdir(parents=True, exist_ok=True)
        st_path = rd / "state.json"
        if st_path.is_file():
            st = _read_resume(rd, st_path, lambda: _read_state(st_path, len(model.layers)))
            if st.get("weights") != fingerprint:
                raise ResumeError(f"{rd} holds a run of another model (weight fingerprint {st.get('weights')} vs "
                                  f"{fingerprint}); {_DISCARD.format(rd=rd)}")
            if st.get("digest") != digest:
                raise ResumeError(f"{rd} holds a run with another config or data; {_DISCARD.format(rd=rd)}")
            from safetensors.torch import load_file

            start = int(st["done"])
            for i in range(start):
                f_st, f_js = rd / f"block_{i:04d}.safetensors", rd / f"block_{i:04d}.json"
                specs = _read_resume(rd, f_js, lambda: json.loads(f_js.read_text()))
                if store is not None:  # left on disk: check it is whole now, not when it is saved
                    _read_resume(rd, f_st, lambda: _check_block_file(f_st, specs))
                    store.add(model, i)
                    continue
                blk = _read_resume(rd, f_st, lambda: load_file(str(f_st)))
                _read_resume(rd, f_st, lambda: _install_block_state(model.layers[i], specs, blk))
                _norm_like_to(model.layers[i], model_dtype)
            if start > 0:
                f_acts = rd / f"acts_{start:04d}.safetensors"
                acts = _read_resume(rd, f_acts, lambda: load_file(str(f_acts)))
                x_fp = acts["x_fp"]
                x_q = acts.get("x_q", x_fp)
            records = list(st.get("records", []))
            for rec in records:  # the blocks done before the interruption belong to this run's log
                log({**rec, "resumed": True})
            log({"event": "resume", "from_block": start})

    with torch.no_grad():  # the blocks run in fp32 whatever the model holds (RoPE tables too)
        h0, kw = model.prepare_inputs(data[:1].to(model.device), rope_dtype=torch.float32)
    kw = _kwargs_to(kw, device)
    if x_fp is None:  # capture the FP input of block 0 (embedding output)
        with torch.no_grad():
            x_fp = torch.cat([model.prepare_inputs(data[i:i + bs].to(model.device))[0].to("cpu", act_dtype)
                              for i in range(0, data.shape[0], bs)])
        x_q = x_fp
    run = _make_runner(kw, device, bs, act_dtype)
    loss_fn = weighted_loss
    t0 = time.time()
    it = range(start, n_layers)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"calibrate {cfg.method}", total=n_layers, initial=start)
    for i in it:
        tb = time.time()
        layer = _materialize(model, i, device)
        transform.prepare_block(layer, model)  # exact FP rewrite of this block (QuaRot); teacher = it
        y = run(layer, x_fp, keep=True)
        x_in = x_fp if cfg.fp_inputs else x_q
        # reference point: plain RTN (no transform) of this block on the same inputs
        loss_rtn = _rtn_reference_loss(layer, cfg, lm, x_in, y, pos_w, kw, device, bs)
        ctx = BlockContext(index=i, x_student=x_in, y_target=y, pos_weights=pos_w, layer_kwargs=kw,
                           device=device, model_config=model.config, layer_map=lm, run_batches=run,
                           loss_fn=loss_fn, log=log, progress=progress)
        torch.manual_seed(cfg.seed * 1_000_003 + i)
        transform.transform_block(layer, ctx)
        layer.to(device)
        _quantize_weights(layer, cfg, ctx, run)
        layer.to(device)
        loss_q = _loss_over(layer, x_in, y, pos_w, kw, device, bs)
        x_q_next = y if cfg.fp_inputs else run(layer, x_q, keep=True)
        layer.to("cpu")
        _norm_like_to(layer, model_dtype)
        x_fp, x_q = y, x_q_next
        rec = {"event": "block", "block": i, "method": cfg.method, "loss_rtn": loss_rtn,
               "loss_after": loss_q, "seconds": round(time.time() - tb, 3), **ctx.stats}
        log(rec)
        records.append(rec)
        if progress and hasattr(it, "set_postfix"):
            it.set_postfix(rtn=f"{loss_rtn:.3g}", after=f"{loss_q:.3g}")
        if rd is not None:
            state = {k: v for k, v in layer.state_dict().items()}
            _atomic_save_tensors(state, rd / f"block_{i:04d}.safetensors")
            del state
            _atomic_json(quantized_specs(layer), rd / f"block_{i:04d}.json")
            # fp_inputs: the student inputs are the FP ones (one tensor; safetensors refuses aliases)
            acts = {"x_fp": x_fp} if x_q is x_fp else {"x_fp": x_fp, "x_q": x_q}
            _atomic_save_tensors(acts, rd / f"acts_{i + 1:04d}.safetensors")
            _atomic_json({"digest": digest, "weights": fingerprint, "done": i + 1, "n_layers": n_layers,
                          "config": cfg.to_dict(), "records": records}, rd / "state.json")
            old = rd / f"acts_{i:04d}.safetensors"
            if old.exists():
                old.unlink()
        if store is not None:
            store.add(model, i, kernel_path(layer))
            del layer
        _return_freed_memory()
        if stop_after is not None and i + 1 >= stop_after and i + 1 < n_layers:
            return model
    if getattr(model, "layer_source", None) is not None:
        model.layer_source = None  # every block is built and quantized: the model stands alone
    log({"event": "summary", "method": cfg.method, "seconds": round(time.time() - t0, 3),
         **peak_memory_mb(device), **model_kernel_report(model)})  # which int4 path the W4A4 layers use
    model.quantization_config = {  # type: ignore[attr-defined]
        "method": cfg.method, "config": cfg.to_dict(),
        "prior": getattr(prior, "settings", None) if prior is not None and not isinstance(prior, torch.Tensor) else None,
    }
    return model
