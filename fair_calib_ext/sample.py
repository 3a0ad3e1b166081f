"""``python -m fair_calib_ext.sample``: masked-diffusion decoding from the command line.

Examples::

    python -m fair_calib_ext.sample --prompt "sort: 3 1 2 =" --gen-length 16 --steps 16
    python -m fair_calib_ext.sample --model /ckpt/LLaDA-8B-Instruct --chat --dtype bfloat16 \\
        --prompt "What is 7 * 8?" --gen-length 64 --steps 64 --block-length 32
    python -m fair_calib_ext.sample --quantized runs/llada-w4a4 --prompt "..." --show-steps
    python -m fair_calib_ext.sample --gen-length 32 --steps 32 --block-length 8 --cache dual --threshold 0.9

Bad input (missing directory, inconsistent lengths, prompt longer than the context, a
full-precision dir given as ``--quantized``) prints one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import UsageError, report

DEFAULT_EMBEDDED = "tiny-llada"
# Decoded when no prompt is given, so the bare command shows the embedded model at work.
DEFAULT_PROMPTS = ("Q: sort 7 3 9 1 4 A:", "Q: reverse cat dog sun A:", "Q: 482+937=? A:")
_DTYPES = ("float32", "bfloat16", "float16")



def _flags() -> tuple[Any, ...]:
    """One rule per numeric flag (the lengths' mutual rules are resolve_sampler_settings')."""
    from .cli_common import SAMPLER_FLAGS, SEED_FLAG, THREADS_FLAG
    from .validate import Flag

    return (*SAMPLER_FLAGS, SEED_FLAG, THREADS_FLAG, Flag("temperature", "float", lo=0.0, hi=100.0),
            Flag("cfg_scale", "float", lo=0.0, hi=100.0), Flag("top_p", "float", lo=0.0, lo_open=True, hi=1.0),
            Flag("top_k", lo=0, hi=1 << 24), Flag("alg_temp", "float", lo=0.0, hi=100.0))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fair_calib_ext.sample",
                                description="Generate with a LLaDA / Dream masked-diffusion model.")
    p.add_argument("--model", default=None,
                   help=f"local checkpoint dir or embedded name (default: {DEFAULT_EMBEDDED!r} once it exists)")
    p.add_argument("--quantized", metavar="DIR", default=None,
                   help="a directory written by save_quantized (the tokenizer comes from it or from --model)")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text (repeat for a batch; default: a few embedded-task prompts)")
    p.add_argument("--prompt-file", default=None, help="file with one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--gen-length", type=int, default=None,
                   help="tokens to generate (default: the checkpoint's generation_config.json, else 32)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: generation_config.json, else gen-length)")
    p.add_argument("--block-length", type=int, default=None,
                   help="LLaDA block length (default: generation_config.json, else one block; "
                        "on Dream models without it: Dream's schedule)")
    p.add_argument("--remasking", default=None,
                   help="low_confidence | random | margin | entropy | maskgit_plus | origin "
                        "(default: generation_config.json, else low_confidence for LLaDA, entropy for Dream)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: generation_config.json, else 0)")
    p.add_argument("--cfg-scale", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None, help="Dream schedule only")
    p.add_argument("--top-k", type=int, default=None,
                   help="Dream schedule only; default: generation_config.json, else 50 as in the official "
                        "Dream code; 0 = no truncation")
    p.add_argument("--alg-temp", type=float, default=None, help="Dream schedule only")
    p.add_argument("--cache", default=None, choices=("none", "prefix", "dual"),
                   help="Fast-dLLM approximate KV cache per block: prefix (keys/values before the block) or "
                        "dual (also after it; only the block is recomputed); default none. Needs block-wise "
                        "decoding (Dream: --block-length)")
    p.add_argument("--threshold", type=float, default=None, metavar="T",
                   help="Fast-dLLM parallel decoding: commit every masked position of the current block whose "
                        "confidence is >= T (0 < T <= 1), at least one per step")
    p.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="stop once every row has EOS/EoT after a completed block "
                        "(default: on with --chat or a tokenizer chat template)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=_DTYPES)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--show-steps", action="store_true", help="redraw the canvas after every step")
    return p


def _resolve_model(arg: str | None) -> str:
    from .models import available_embedded

    if arg is not None:
        return arg
    if DEFAULT_EMBEDDED in available_embedded():
        return DEFAULT_EMBEDDED
    raise UsageError(f"no --model given and the embedded model {DEFAULT_EMBEDDED!r} is not built yet "
                     "(fair_calib_ext/assets/ has none); pass --model DIR")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        f = Path(args.prompt_file)
        if not f.is_file():
            raise UsageError(f"prompt file not found: {f}")
        prompts += [line for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.prompt_file and not prompts:
        raise UsageError(f"prompt file {args.prompt_file} has no non-empty line")
    return prompts or list(DEFAULT_PROMPTS)


def _special_id(tok: Any, text: str) -> int | None:
    vocab = tok.get_vocab()
    return vocab.get(text)


def _encode(tok: Any, prompts: list[str], chat: bool) -> list[list[int]]:
    out = []
    for text in prompts:
        if chat:
            if not getattr(tok, "chat_template", None):
                raise UsageError("--chat: this tokenizer has no chat template")
            text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(text)["input_ids"]
        if not ids:
            raise UsageError(f"prompt {text!r} encodes to no tokens")
        out.append(list(ids))
    return out


def _show(tok: Any, x: Any, p: int, mask_id: int, step: int, tty: bool) -> None:
    rows = []
    for row in x[:, p:].tolist():
        rows.append("".join("░" if t == mask_id else tok.decode([t]) for t in row))
    text = "\n".join(rows)
    if tty:
        sys.stdout.write(f"\x1b[2J\x1b[H[step {step + 1}]\n{text}\n")
    else:
        sys.stdout.write(f"[step {step + 1}] {text}\n")
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    import torch

    from .cli_common import check_same_architecture, require_quantized, resolve_device, set_threads
    from .models import load_generation_config, load_pretrained, load_tokenizer, resolve_model_path
    from .sampling import DecodeStats, generate, left_pad
    from .sampling.settings import check_fast_for_family, resolve_sampler_settings
    from .validate import check_flags

    check_flags(args, _flags())
    set_threads(args.threads)
    device = resolve_device(args.device)
    prompts = _read_prompts(args)
    model_arg = _resolve_model(args.model) if args.model or not args.quantized else args.model
    if args.quantized:
        require_quantized(args.quantized)
        if args.model:  # its tokenizer and generation config would decode another model's ids
            check_same_architecture(args.model, args.quantized)
    weights = args.quantized or model_arg
    resolve_model_path(weights)
    gcfg = load_generation_config(weights) or (load_generation_config(model_arg) if model_arg else {})
    st = resolve_sampler_settings(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                                  remasking=args.remasking, generation_config=gcfg, default_gen_length=32,
                                  cache=args.cache, threshold=args.threshold)
    gen_length, steps, block_length = st.gen_length, st.steps, st.block_length
    temperature = args.temperature if args.temperature is not None else float(gcfg.get("temperature") or 0.0)
    tok_dirs = [d for d in (args.quantized, model_arg) if d]
    tok = None
    for d in tok_dirs:
        if (resolve_model_path(d) / "tokenizer.json").is_file() or \
                (resolve_model_path(d) / "tokenizer_config.json").is_file():
            tok = load_tokenizer(d)
            break
    if tok is None:
        raise UsageError(f"no tokenizer found in {' or '.join(map(str, tok_dirs))}"
                         + ("" if args.model else " (pass --model with the original checkpoint)"))
    dtype = getattr(torch, args.dtype)
    model = load_pretrained(weights, dtype=dtype, device=device)

    cfg = model.config
    chat = args.chat
    stop = args.stop_at_eos if args.stop_at_eos is not None else bool(chat or getattr(tok, "chat_template", None))
    eot = next((i for i in (_special_id(tok, "<|eot_id|>"), _special_id(tok, "<|im_end|>")) if i is not None), None)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # our own check reports over-long prompts, in one line
    encoded = _encode(tok, prompts, chat)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (cfg.pad_token_id or cfg.eos_token_id or 0)
    ids, attn = left_pad(encoded, pad)
    dream = cfg.family == "dream"
    remasking = st.remasking or ("entropy" if dream and (block_length is None or st.fast) else "low_confidence")
    check_fast_for_family(st, cfg.family, remasking)
    dream_schedule = dream and block_length is None
    if remasking == "origin" and not dream_schedule:
        raise UsageError("--remasking origin needs Dream's timestep schedule (a Dream model without --block-length)")
    given = [f"--{n.replace('_', '-')}" for n in ("top_p", "top_k", "alg_temp") if getattr(args, n) is not None]
    if given and not (dream_schedule or (dream and st.fast)):
        raise UsageError(f"{', '.join(given)}: Dream's timestep schedule only (a Dream model without --block-length; "
                         "or Dream with --cache/--threshold)")
    if st.fast and args.cfg_scale:
        raise UsageError("--cfg-scale does not apply with --cache/--threshold (Fast-dLLM decoding)")
    longest = max(len(e) for e in encoded)
    if longest + gen_length > cfg.max_position_embeddings:
        raise UsageError(f"prompt ({longest}) + gen_length ({gen_length}) = {longest + gen_length} exceeds the "
                         f"model's context of {cfg.max_position_embeddings} tokens")
    gen = torch.Generator().manual_seed(args.seed)
    tty = sys.stdout.isatty()
    n_steps = [0]

    def on_step(t: int, x: Any) -> None:
        n_steps[0] += 1
        if args.show_steps:
            _show(tok, x, ids.shape[1], cfg.mask_token_id, t, tty)

    kwargs: dict[str, Any] = dict(
        gen_length=gen_length, steps=steps, block_length=block_length, temperature=temperature,
        remasking=remasking, cfg_scale=args.cfg_scale, generator=gen, attention_mask=attn,
        stop_at_eos=stop, eot_token_id=eot, callback=on_step, cache=st.cache, threshold=st.threshold,
        stats=DecodeStats(),
    )
    for name in ("top_p", "top_k", "alg_temp"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    t0 = time.perf_counter()
    out = generate(model, ids, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0

    stop_ids = {i for i in (cfg.eos_token_id, eot) if i is not None}
    p = ids.shape[1]
    for text, row in zip(prompts, out[:, p:].tolist()):
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        answer = tok.decode(row[:cut], skip_special_tokens=True)
        print(f">>> {text}\n{answer}")
    n_tok = out.shape[0] * gen_length
    # the bit widths the checkpoint was calibrated for (not every --quantized dir is W4A4)
    qbits = ((getattr(model, "quantization_config", None) or {}).get("config") or {}).get("quant") or {}
    qlabel = f", W{qbits.get('w_bits', '?')}A{qbits.get('a_bits', '?')}" if args.quantized else ""
    fast = f", cache {st.cache or 'none'}, threshold {st.threshold}" if st.fast else ""
    print(f"[{n_tok} tokens, {n_steps[0]} steps in {dt:.3f} s: {n_tok / dt:.1f} tokens/s, "
          f"{n_steps[0] / dt:.2f} steps/s, NFE {kwargs['stats'].nfe}; {cfg.family}, {args.dtype}, {device}"
          f"{qlabel}{fast}]")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report(lambda: run(args))  # only user errors become one line; bugs keep their traceback


if __name__ == "__main__":
    sys.exit(main())
