#!/usr/bin/env python
"""Train the embedded tiny diffusion LMs (``tiny-llada``, ``tiny-dream``) on the task suite.

Recipe (see fair_calib_ext/assets/*/MODEL_CARD.md for the measured outcome):
- LLaDA's masked-diffusion objective: per example t ~ U(eps, 1] (stratified across the batch),
  each token of the example's *answer region* (answer + EOS fill) masked with probability t,
  cross-entropy on masked tokens weighted by 1/t, normalised by the number of region tokens.
  A fraction ``--pretrain-frac`` of the examples are instead masked over the whole sequence
  (LLaDA's pretraining objective): the prompt's tokens then carry loss too, and for copy-like
  tasks (reverse, sort) predicting a masked prompt word from the answer trains the same
  position-matching attention as the forward direction.
- The answer region is the answer, EOS, then EOS fill up to a random region length (<= 32), as in
  LLaDA SFT, so the model knows where answers end at any gen_length <= 32.
- Tasks mixed in every batch; examples packed into fixed-length rows with block-diagonal
  attention (per-example RoPE positions), so padding costs almost nothing.
- bf16 autocast only where the CPU has AVX512-BF16/AMX (``--bf16 auto``, the default; on an
  AVX2-only machine a bf16 GEMM was 4x slower than fp32, so auto means fp32 there; with
  AVX512-BF16 a wide-preset step measured 2.8x faster, python/TRAINING_V2.md); a hand-written attention (torch's bf16 SDPA backward is ~4x slower at these
  shapes on the 2-core CPU, see shared/reference/tiny_training_facts.md).
- AdamW, linear warmup then cosine decay over a *wall-clock* budget (the constraint here).
- Dream: same model with q/k/v biases and shifted logits (raw logit i predicts token i+1). It can
  start from a trained tiny-llada state (``--init-from``), the analogue of Dream's own recipe of
  adapting a pretrained model; the biases start at zero.

Outputs in ``--out`` (outside git): ``state.pt`` (resumable: model, optimizer, step, elapsed
time, RNG), ``best.pt`` (weights with the best validation mean), ``curve.jsonl`` (elapsed
seconds -> per-task validation accuracy and loss), ``train.log``. Re-running the same command
resumes from ``state.pt``. ``--export DIR`` writes an official-layout checkpoint (config.json,
model.safetensors, tokenizer files) from ``best.pt`` and exits.

Second generation (issue 12; all behind flags, the defaults above are unchanged, see
python/TRAINING_V2.md): ``--tokenizer-version 2`` (one id per digit; gen_length 20),
``--reverse-words all`` (reverse training draws from every single-token word of the vocabulary;
the eval task format is unchanged), ``--preset wide`` (d_model 256, 6 layers, ~4.3M parameters),
``--bf16 auto|on|off`` (bf16 autocast; auto = on when the CPU has AVX512-BF16 or AMX),
``--curriculum error`` (task weights proportional to each task's current error on fresh
validation prompts, re-estimated every ``--curriculum-every`` steps, floored).

Examples:
    nohup python python/train_tiny.py --family llada --out /work/ckpt/llada --budget-min 70 &
    python python/train_tiny.py --family llada --out /work/ckpt/llada --export \
        fair_calib_ext/assets/tiny-llada
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tiny_tokenizer import (  # noqa: E402
    BOS_ID, EOS_ID, GEN_LENGTH_V2, MASK_ID, PAD_ID, build_tokenizer, save_tokenizer, word_tokens,
)

from fair_calib_ext.eval.tasks import (  # noqa: E402
    GEN_LENGTH, TASKS, Example, make_examples, sample_example, split_of,
)
from fair_calib_ext.models import ModelConfig, build_model, save_pretrained  # noqa: E402
from fair_calib_ext.models.transformer import apply_rope, rope_cos_sin  # noqa: E402

MAX_REGION = 32
# bf16 autocast only pays on CPUs with AVX512-BF16/AMX; on AVX2-only CPUs it is ~4x slower.
# Set by main() from --bf16 (auto: on when the CPU has it); TINY_BF16=0/1 overrides "auto".
USE_BF16 = os.environ.get("TINY_BF16", "0") == "1"
TASK_WEIGHTS = {"add": 1.25, "sub": 1.25, "mul": 1.0, "sort": 1.5, "reverse": 1.5, "word": 1.0}
# --preset: architecture/recipe defaults; explicit flags override them. "small" = the shipped
# first-generation models (1.26M params). "wide" = issue 12's second generation: d_model 256,
# 6 layers, 8 heads of 32, SwiGLU 512 (powers of two for Hadamard-based methods), ~4.3M params,
# 17 MB fp32 per model, so both stay under the 40 MB asset limit (SwiGLU 683 would not).
PRESETS = {
    "small": {"d": 128, "layers": 5, "heads": 4, "mlp": 384, "rows": 24, "lr": 2e-3, "warmup": 100},
    "wide": {"d": 256, "layers": 6, "heads": 8, "mlp": 512, "rows": 16, "lr": 1.5e-3, "warmup": 200},
}


def cpu_has_bf16() -> bool:
    """True when /proc/cpuinfo lists AVX512-BF16 or AMX-BF16 (bf16 autocast then pays)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_bf16(mode: str) -> bool:
    """--bf16 on/off, or auto: TINY_BF16 when set, else whether the CPU has bf16 units."""
    if mode in ("on", "off"):
        return mode == "on"
    env = os.environ.get("TINY_BF16")
    return env == "1" if env is not None else cpu_has_bf16()


def set_bf16(on: bool) -> None:
    global USE_BF16
    USE_BF16 = bool(on)


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left unset (None) from ``--preset``."""
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def gen_length_for(args: argparse.Namespace) -> int:
    """Generation length of the suite for this tokenizer (v2 answers are longer in tokens)."""
    if getattr(args, "gen_length", 0):
        return int(args.gen_length)
    return GEN_LENGTH_V2 if getattr(args, "tokenizer_version", 1) == 2 else GEN_LENGTH


def make_config(family: str, args: argparse.Namespace, vocab: int) -> ModelConfig:
    """ModelConfig of a tiny model (vocab padded to a multiple of 64)."""
    v = -(-vocab // 64) * 64
    common = dict(
        vocab_size=v, hidden_size=args.d, intermediate_size=args.mlp,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, head_dim=args.d // args.heads, rope_theta=10000.0,
        max_position_embeddings=256, tie_word_embeddings=False, mask_token_id=MASK_ID,
        eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
    )
    if family == "llada":
        return ModelConfig(family="llada", rms_norm_eps=1e-5, attention_bias=False,
                           shift_logits=False, rope_full_precision=True, **common)
    return ModelConfig(family="dream", rms_norm_eps=1e-6, attention_bias=True,
                       shift_logits=True, rope_full_precision=False, **common)


# ----------------------------------------------------------------------------- data
def parse_task_weights(spec: str | None) -> dict[str, float]:
    """'add=2,sort=0.5' -> TASK_WEIGHTS with those entries replaced."""
    weights = dict(TASK_WEIGHTS)
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        if name.strip() not in weights or not value:
            raise SystemExit(f"--task-weights: expected task=weight with task in {sorted(weights)}, "
                             f"got {item!r}")
        weights[name.strip()] = float(value)
    return weights


def reverse_example(words: list[str], split: str, rng: random.Random) -> Example:
    """A ``reverse`` example in the suite's exact format over an arbitrary word list, belonging
    to ``split`` by the suite's prompt hash (so val/test prompts never reach training)."""
    while True:
        ws = rng.sample(words, rng.randint(2, 6))
        prompt = "Q: reverse " + " ".join(ws) + " A:"
        if split_of(prompt) == split:
            return Example("reverse", prompt, " " + " ".join(reversed(ws)))


def draw_example(task: str, split: str, rng: random.Random, reverse_words: list[str] | None) -> Example:
    if task == "reverse" and reverse_words:
        return reverse_example(reverse_words, split, rng)
    return sample_example(task, split, rng)


def curriculum_weights(acc: dict[str, float], floor: float, prev: dict[str, float] | None = None,
                       ema: float = 0.0) -> dict[str, float]:
    """Task weights proportional to the error rate (1 - accuracy), each at least ``floor``;
    with ``prev`` (the last weights) and ``ema`` > 0, ``ema * prev + (1 - ema) * new`` (damps
    the noise of small estimates)."""
    new = {t: max(1.0 - acc[t] / 100.0, floor) for t in TASKS}
    if prev and ema > 0:
        new = {t: ema * prev.get(t, new[t]) + (1.0 - ema) * new[t] for t in TASKS}
    return new


class Packer:
    """Endless stream of packed batches of mixed-task examples (train split)."""

    def __init__(self, tok, rows: int, row_len: int, seed: int, pretrain_frac: float,
                 task_weights: dict[str, float] | None = None, gen_length: int = GEN_LENGTH,
                 reverse_words: list[str] | None = None) -> None:
        self.tok, self.rows, self.row_len = tok, rows, row_len
        self.rng = random.Random(seed)
        self.pretrain_frac = pretrain_frac
        self.gen_length = gen_length
        self.reverse_words = reverse_words
        self.set_weights(task_weights or TASK_WEIGHTS)
        self.pool: list[tuple[list[int], int, int, bool]] = []

    def set_weights(self, weights: dict[str, float]) -> None:
        """Sampling weights of the tasks (for examples drawn from now on)."""
        self.tasks = list(weights)
        self.weights = [weights[t] for t in self.tasks]

    def _refill(self, n: int = 256) -> None:
        exs = [draw_example(self.rng.choices(self.tasks, self.weights)[0], "train", self.rng,
                            self.reverse_words) for _ in range(n)]
        enc_p = self.tok.encode_batch([e.prompt for e in exs], add_special_tokens=False)
        enc_a = self.tok.encode_batch([e.answer for e in exs], add_special_tokens=False)
        for p, a in zip(enc_p, enc_a):
            p_ids, a_ids = p.ids, a.ids
            # region: answer + EOS, then EOS fill. Half the regions are exactly gen_length (the
            # evaluation setting), 30% shorter, 20% up to MAX_REGION (other gen_lengths work).
            lo, u = len(a_ids) + 1, self.rng.random()
            if u < 0.5:
                region = max(lo, self.gen_length)
            else:
                region = self.rng.randint(lo, max(lo, self.gen_length if u < 0.8 else MAX_REGION))
            ids = p_ids + a_ids + [EOS_ID] * (region - len(a_ids))
            self.pool.append((ids, len(p_ids), region, self.rng.random() < self.pretrain_frac))

    def batch(self) -> dict[str, torch.Tensor]:
        """ids, pos, seg [R, L]; region, full (loss-eligible masks) [R, L]; t [R, L]."""
        R, L = self.rows, self.row_len
        ids = torch.full((R, L), PAD_ID, dtype=torch.long)
        pos = torch.zeros((R, L), dtype=torch.long)
        seg = torch.full((R, L), -1, dtype=torch.long)
        elig = torch.zeros((R, L), dtype=torch.bool)
        tt = torch.ones((R, L))
        ex_i = 0
        for r in range(R):
            if len(self.pool) < 128:
                self._refill()
            fill = 0
            j = 0
            while j < len(self.pool) and fill < L - 8:
                e, plen, region, full = self.pool[j]
                if len(e) <= L - fill:
                    self.pool.pop(j)
                    n = len(e)
                    ids[r, fill:fill + n] = torch.tensor(e)
                    pos[r, fill:fill + n] = torch.arange(n)
                    seg[r, fill:fill + n] = ex_i
                    if full:  # whole sequence eligible except the first token (always "Q")
                        elig[r, fill + 1:fill + n] = True
                    else:
                        elig[r, fill + plen:fill + n] = True
                    ex_i += 1
                    fill += n
                else:
                    j += 1
        n_ex = ex_i
        # stratified t per example: t_i = eps + (1-eps) * ((u + i/n) mod 1)
        u = self.rng.random()
        ts = torch.tensor([1e-3 + (1 - 1e-3) * ((u + i / n_ex) % 1.0) for i in range(n_ex)])
        perm = torch.randperm(n_ex, generator=torch.Generator().manual_seed(self.rng.randrange(2**31)))
        ts = ts[perm]
        valid = seg >= 0
        tt[valid] = ts[seg[valid]]
        return {"ids": ids, "pos": pos, "seg": seg, "elig": elig, "t": tt}


# ----------------------------------------------------------------------------- model forward
def attn_bias(seg: torch.Tensor) -> torch.Tensor:
    """Additive block-diagonal bias [R, 1, L, L]: 0 within an example, -1e4 elsewhere."""
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
    eye = torch.eye(seg.shape[1], dtype=torch.bool)[None]
    same = same | eye  # padding rows attend to themselves (their outputs are never used)
    return torch.where(same, 0.0, -1e4)[:, None]


def hidden_states(model, ids: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Final-norm hidden states [R, L, D] with a hand-written attention (training speed)."""
    cfg = model.config
    h = model.embed_tokens(ids)
    rope_dtype = torch.float32 if (cfg.rope_full_precision or not USE_BF16) else torch.bfloat16
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, rope_dtype)
    b, s, _ = ids.shape[0], ids.shape[1], None
    scale = cfg.head_dim ** -0.5
    for layer in model.layers:
        a = layer.attn
        x = layer.attn_norm(h)
        q = a.q_proj(x).view(b, s, a.num_heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(b, s, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(b, s, a.num_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        sc = torch.matmul(q, k.transpose(-1, -2)) * scale
        if bias is not None:
            sc = sc + bias
        p = torch.softmax(sc.float(), dim=-1).to(v.dtype)
        o = torch.matmul(p, v).transpose(1, 2).reshape(b, s, -1)
        h = h + a.o_proj(o)
        h = h + layer.mlp(layer.mlp_norm(h))
    return model.norm(h)


def loss_fn(model, batch: dict[str, torch.Tensor], gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Masked-diffusion loss on a packed batch (see the module docstring)."""
    ids, elig, t = batch["ids"], batch["elig"], batch["t"]
    masked = elig & (torch.rand(ids.shape, generator=gen) < t)
    x = torch.where(masked, torch.full_like(ids, MASK_ID), ids)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=USE_BF16):
        h = hidden_states(model, x, batch["pos"], attn_bias(batch["seg"]))
        r, c = masked.nonzero(as_tuple=True)
        if model.config.shift_logits:  # Dream: token i is predicted from raw position i-1
            hs = h[r, c - 1]
        else:
            hs = h[r, c]
        logits = model.lm_head(hs)
    ce = F.cross_entropy(logits.float(), ids[r, c], reduction="none")
    loss = (ce / t[r, c]).sum() / elig.sum().clamp(min=1)
    return loss, {"ce": ce.mean().item() if ce.numel() else 0.0, "n_masked": int(masked.sum())}


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def decode_low_confidence(model, prompts: list[list[int]], gen_length: int) -> list[list[int]]:
    """LLaDA low-confidence remasking, temperature 0, one token per step (steps = gen_length),
    pure diffusion (block = gen_length). Prompts of equal length are batched unpadded."""
    out: list[list[int] | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for plen, idx in by_len.items():
        for s0 in range(0, len(idx), 128):
            chunk = idx[s0:s0 + 128]
            x = torch.tensor([prompts[i] + [MASK_ID] * gen_length for i in chunk])
            pos = torch.arange(x.shape[1]).expand_as(x)
            for _ in range(gen_length):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=USE_BF16):
                    h = hidden_states(model, x, pos, None)
                    logits = model.lm_head(h).float()
                if model.config.shift_logits:
                    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
                probs = logits.softmax(-1)
                conf, x0 = probs.max(-1)
                is_m = x == MASK_ID
                conf = torch.where(is_m, conf, torch.full_like(conf, -1.0))
                j = conf.argmax(-1)
                rows = torch.arange(x.shape[0])
                commit = is_m[rows, j]
                x[rows[commit], j[commit]] = x0[rows[commit], j[commit]]
            for k, i in enumerate(chunk):
                out[i] = x[k, plen:].tolist()
    return out  # type: ignore[return-value]


def answer_text(tok, ids: list[int]) -> str:
    """Decoded text before the first EOS."""
    if EOS_ID in ids:
        ids = ids[:ids.index(EOS_ID)]
    return tok.decode(ids, skip_special_tokens=False)


@torch.no_grad()
def evaluate(model, tok, val: dict[str, list], gen_length: int = GEN_LENGTH) -> dict[str, float]:
    """Exact-match accuracy (%) per task on the validation examples."""
    model.eval()
    res = {}
    for task, exs in val.items():
        prompts = [tok.encode(e.prompt, add_special_tokens=False).ids for e in exs]
        outs = decode_low_confidence(model, prompts, gen_length)
        ok = sum(answer_text(tok, o).strip() == e.answer.strip() for o, e in zip(outs, exs))
        res[task] = 100.0 * ok / len(exs)
    suite = [t for t in val if t in TASKS] or list(val)  # extra sets (reverse_any) are reported only
    res["mean"] = sum(res[t] for t in suite) / len(suite)
    model.train()
    return res


# ----------------------------------------------------------------------------- main
def lr_at(step: int, frac: float, args: argparse.Namespace) -> float:
    """Linear warmup over ``--warmup`` steps, then cosine to ``--lr-min-ratio`` by the budget."""
    warm = min(1.0, (step + 1) / args.warmup)
    frac = min(max(frac, 0.0), 1.0)
    cos = args.lr_min_ratio + (1 - args.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return args.lr * warm * cos


def save_state(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export(args: argparse.Namespace) -> None:
    """Write the official-layout checkpoint + tokenizer from best.pt (or state.pt)."""
    out = Path(args.out)
    src = out / "best.pt" if (out / "best.pt").is_file() else out / "state.pt"
    st = torch.load(src, map_location="cpu", weights_only=False)
    cfg = ModelConfig.from_dict(st["config"])
    model = build_model(cfg)
    model.load_state_dict(st["model"])
    ids = {"mask_token_id": MASK_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "bos_token_id": BOS_ID}
    # runs from before the v2 flags carry no "meta": tokenizer v1, the suite's GEN_LENGTH
    meta = st.get("meta") or {}
    tv, g = int(meta.get("tokenizer_version", 1)), int(meta.get("gen_length", GEN_LENGTH))
    if cfg.family == "dream":  # Dream's generation_config keys
        gen_cfg = {**ids, "max_new_tokens": g, "steps": g, "temperature": 0.0, "alg": "entropy"}
    else:  # LLaDA generate.py argument names
        gen_cfg = {**ids, "gen_length": g, "steps": g, "block_length": g,
                   "temperature": 0.0, "remasking": "low_confidence"}
    dst = Path(args.export)
    save_pretrained(model, dst, dtype=torch.float32, generation_config=gen_cfg)
    save_tokenizer(dst, version=tv)
    info = {k: st.get(k) for k in ("step", "elapsed", "best", "examples", "meta")}
    info["source"] = str(src)
    (dst / "training_state.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"exported {src} -> {dst}: {info}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["llada", "dream"], default="llada")
    ap.add_argument("--out", required=True, help="checkpoint/log directory (outside git)")
    ap.add_argument("--budget-min", type=float, default=60.0, help="wall-clock budget of the LR schedule")
    ap.add_argument("--threads", type=int, default=1,
                    help="1 is fastest on a shared 2-core CPU (OpenMP spin-waits when oversubscribed)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small",
                    help="defaults of --d/--layers/--heads/--mlp/--rows/--lr/--warmup: "
                         + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--mlp", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--lr-min-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--row-len", type=int, default=96)
    ap.add_argument("--pretrain-frac", type=float, default=0.3)
    ap.add_argument("--eval-every-s", type=float, default=300.0)
    ap.add_argument("--eval-n", type=int, default=60, help="validation examples per task")
    ap.add_argument("--save-every-s", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-from", default=None, help="state.pt/best.pt of another run to start from")
    ap.add_argument("--task-weights", default=None,
                    help="sampling weights, e.g. 'add=2,sub=2,sort=0.75' (others keep the default)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: budget)")
    ap.add_argument("--export", default=None, help="export best.pt to this dir and exit")
    ap.add_argument("--tokenizer-version", type=int, choices=[1, 2], default=1,
                    help="1: the shipped models' tokenizer; 2: one id per digit (python/tiny_tokenizer.py)")
    ap.add_argument("--gen-length", type=int, default=0,
                    help="answer-region length of the suite (0: 12 for tokenizer v1, 20 for v2)")
    ap.add_argument("--reverse-words", choices=["tasks", "all"], default="tasks",
                    help="reverse training words: the suite's WORDS list, or every single-token word "
                         "of the vocabulary (val also reports reverse_any, out-of-list words)")
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                    help="bf16 autocast on CPU; auto: TINY_BF16 if set, else on when the CPU has "
                         "AVX512-BF16 or AMX")
    ap.add_argument("--curriculum", choices=["off", "error"], default="off",
                    help="error: task weights proportional to each task's current error on fresh "
                         "val prompts (replaces --task-weights once estimated)")
    ap.add_argument("--curriculum-every", type=int, default=1000,
                    help="re-estimate every N steps (wide preset, bf16: ~165 s of training; an "
                         "estimate at the default --curriculum-n costs ~4.5 s, not counted as training)")
    ap.add_argument("--curriculum-ema", type=float, default=0.5,
                    help="weight of the previous weights in each update (0: the latest estimate only)")
    ap.add_argument("--curriculum-n", type=int, default=32, help="fresh val prompts per task per estimate")
    ap.add_argument("--curriculum-floor", type=float, default=0.05,
                    help="minimum weight (error rate) of a task")
    args = ap.parse_args(argv)
    apply_preset(args)

    if args.export:
        export(args)
        return
    torch.set_num_threads(args.threads)
    set_bf16(resolve_bf16(args.bf16))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train.log", "a", buffering=1)

    def say(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log.write(line + "\n")

    tok = build_tokenizer(version=args.tokenizer_version)
    gen_length = gen_length_for(args)
    reverse_words = word_tokens(tok) if args.reverse_words == "all" else None
    meta = {"tokenizer_version": args.tokenizer_version, "gen_length": gen_length,
            "reverse_words": args.reverse_words, "preset": args.preset, "bf16": USE_BF16,
            # a continuation says what it started from (the model card's lineage)
            "init_from": str(args.init_from) if args.init_from else None,
            "recipe": {k: getattr(args, k) for k in (
                "lr", "lr_min_ratio", "warmup", "wd", "rows", "row_len", "pretrain_frac", "seed",
                "budget_min", "curriculum", "curriculum_every", "curriculum_n", "curriculum_floor",
                "curriculum_ema")} | {"task_weights": parse_task_weights(args.task_weights)}}
    cfg = make_config(args.family, args, tok.get_vocab_size())
    torch.manual_seed(args.seed)
    model = build_model(cfg, seed=args.seed).train()
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    step, elapsed, best, examples = 0, 0.0, -1.0, 0
    packer = Packer(tok, args.rows, args.row_len, args.seed, args.pretrain_frac,
                    parse_task_weights(args.task_weights), gen_length=gen_length,
                    reverse_words=reverse_words)
    gen = torch.Generator().manual_seed(args.seed + 1)
    cur_rng = random.Random(args.seed + 2)  # fresh val prompts for the curriculum's estimates
    cur_weights: dict[str, float] | None = None
    cur_step = 0  # step of the last curriculum estimate
    state_path = out / "state.pt"
    if state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        old = st.get("meta") or {"tokenizer_version": 1, "gen_length": GEN_LENGTH}
        if old.get("tokenizer_version") != meta["tokenizer_version"] or st.get("config") != cfg.to_dict():
            raise SystemExit(f"{state_path} was trained with another tokenizer or model config "
                             f"({old}, {st.get('config')}); use another --out or the same flags")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed, best, examples = st["step"], st["elapsed"], st["best"], st.get("examples", 0)
        packer.rng.setstate(st["py_rng"])
        gen.set_state(st["gen_rng"])
        cur = st.get("curriculum") or {}
        if cur.get("rng") is not None:
            cur_rng.setstate(cur["rng"])
        cur_weights, cur_step = cur.get("weights"), cur.get("step", step)
        if cur_weights and args.curriculum != "off":
            packer.set_weights(cur_weights)
        say(f"resumed from {state_path} at step {step}, {elapsed / 60:.1f} min"
            + (f", curriculum weights {cur_weights}" if cur_weights else ""))
    elif args.init_from:
        st = torch.load(args.init_from, map_location="cpu", weights_only=False)
        missing, unexpected = model.load_state_dict(st["model"], strict=False)
        if unexpected or any(not m.endswith(".bias") for m in missing):
            raise SystemExit(f"--init-from mismatch: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for m in missing:  # Dream's q/k/v biases start at zero
                model.get_parameter(m).zero_()
        say(f"initialised from {args.init_from} (step {st.get('step')}); zeroed {len(missing)} biases")
    n_params = sum(p.numel() for p in model.parameters())
    say(f"{cfg.family}: {n_params / 1e6:.2f}M params, bf16 autocast {USE_BF16}, meta {meta}, "
        f"config {cfg.to_dict()}, args {vars(args)}")

    val = {t: make_examples(t, "val", args.eval_n, seed=0) for t in TASKS}
    if reverse_words:  # out-of-list words: reported, not part of the mean that selects best.pt
        vrng = random.Random(12_345)
        val["reverse_any"] = [reverse_example(reverse_words, "val", vrng) for _ in range(args.eval_n)]

    def state_dict_all() -> dict:
        return {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                "elapsed": elapsed, "best": best, "examples": examples,
                "py_rng": packer.rng.getstate(), "gen_rng": gen.get_state(),
                "config": cfg.to_dict(), "args": vars(args), "meta": meta,
                "curriculum": {"weights": cur_weights, "step": cur_step, "rng": cur_rng.getstate()}}

    budget = args.budget_min * 60.0
    t_last_eval = elapsed  # no evaluation of the untrained model
    t_last_save = elapsed
    t0 = time.time() - elapsed
    run_loss, run_n, t_log = 0.0, 0, time.time()
    while True:
        elapsed = time.time() - t0
        if elapsed - t_last_eval >= args.eval_every_s or elapsed >= budget or (
                args.max_steps and step >= args.max_steps):
            te = time.time()
            res = evaluate(model, tok, val, gen_length)
            t0 += time.time() - te  # evaluation time is not training time
            rec = {"step": step, "train_s": round(elapsed, 1), "examples": examples, "eval_n": args.eval_n,
                   "loss": round(run_loss / max(run_n, 1), 4), "eval_s": round(time.time() - te, 1),
                   "time": time.strftime("%H:%M:%S"), **{k: round(v, 1) for k, v in res.items()}}
            with open(out / "curve.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            say("eval " + json.dumps(rec))
            if res["mean"] >= best:
                best = res["mean"]
                save_state(out / "best.pt", {"model": model.state_dict(), "config": cfg.to_dict(),
                                             "step": step, "elapsed": elapsed, "best": best,
                                             "examples": examples, "eval": rec, "meta": meta})
            t_last_eval = elapsed
            if elapsed >= budget or (args.max_steps and step >= args.max_steps):
                break
        if args.curriculum != "off" and step - cur_step >= args.curriculum_every:
            te = time.time()
            cval = {t: [draw_example(t, "val", cur_rng, reverse_words) for _ in range(args.curriculum_n)]
                    for t in TASKS}
            cres = evaluate(model, tok, cval, gen_length)
            t0 += time.time() - te  # not training time either
            cur_weights = curriculum_weights(cres, args.curriculum_floor, cur_weights, args.curriculum_ema)
            cur_step = step
            packer.set_weights(cur_weights)
            crec = {"step": step, "train_s": round(elapsed, 1), "eval_s": round(time.time() - te, 1),
                    "acc": {k: round(v, 1) for k, v in cres.items()},
                    "weights": {k: round(v, 3) for k, v in cur_weights.items()}}
            with open(out / "curriculum.jsonl", "a") as fh:
                fh.write(json.dumps(crec) + "\n")
            say("curriculum " + json.dumps(crec))
        lr = lr_at(step, elapsed / budget, args)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = packer.batch()
        loss, info = loss_fn(model, batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        examples += int(batch["seg"].max()) + 1
        run_loss += loss.item()
        run_n += 1
        if time.time() - t_log >= 30:
            say(f"step {step} {elapsed / 60:.1f}/{budget / 60:.0f} min lr {lr:.2e} "
                f"loss {run_loss / run_n:.4f} ce {info['ce']:.3f} "
                f"pad {(batch['seg'] < 0).float().mean():.3f} ex {examples}")
            run_loss, run_n, t_log = 0.0, 0, time.time()
        if elapsed - t_last_save >= args.save_every_s:
            save_state(state_path, state_dict_all())
            t_last_save = elapsed
    save_state(state_path, state_dict_all())
    say(f"done: step {step}, {elapsed / 60:.1f} min, best val mean {best:.1f}")


if __name__ == "__main__":
    main()
