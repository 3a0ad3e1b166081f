#!/usr/bin/env python
"""Write MODEL_CARD.md of an embedded tiny model from its training run and its evaluation.

    python python/tiny_card.py --name tiny-llada --run /work/ckpt/llada \
        --eval /work/ckpt/llada/eval_test.json --out fair_calib_ext/assets/tiny-llada
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASKS = ("add", "sub", "mul", "sort", "reverse", "word")
BAR = {"add": 80, "sub": 80, "mul": 50, "sort": 90, "reverse": 90, "word": 50}
# issue 12's targets for the second generation (tokenizer v2 runs)
BAR_V2 = {"add": 80, "sub": 80, "mul": 70, "sort": 95, "reverse": 90, "word": 50}


def _curve_table(curve: list[dict]) -> str:
    cols = list(TASKS) + (["reverse_any"] if curve and all("reverse_any" in r for r in curve) else [])
    rows = ["| train min | step | examples | train loss | " + " | ".join(cols) + " | mean |",
            "|---" * (len(cols) + 5) + "|"]
    # a resume from an older state.pt re-logs steps: keep only records no later record precedes
    kept = [r for i, r in enumerate(curve) if all(r["step"] < q["step"] for q in curve[i + 1:])]
    for r in kept:
        rows.append(f"| {r['train_s'] / 60:.1f} | {r['step']} | {r['examples']} | {r['loss']:.3f} | "
                    + " | ".join(f"{r[t]:.1f}" for t in cols) + f" | {r['mean']:.1f} |")
    return "\n".join(rows)


def _acc_table(ev: dict, bar: dict | None = None) -> str:
    bar = bar or BAR
    rows = ["| | " + " | ".join(TASKS) + " | mean |", "|---" * (len(TASKS) + 2) + "|"]
    rows.append("| bar (issue) | " + " | ".join(f"≥{bar[t]}" for t in TASKS) + " | |")
    for key, label in (("fp", "FP32"), ("w4a4_rtn", "W4A4 RTN")):
        if key in ev:
            rows.append(f"| {label} | " + " | ".join(f"{ev[key][t]:.1f}" for t in TASKS)
                        + f" | {ev[key]['mean']:.1f} |")
    if "w4a4_same_as_fp" in ev:
        a = ev["w4a4_same_as_fp"]
        rows.append("| W4A4 answer = FP answer | " + " | ".join(f"{a[t]:.1f}" for t in TASKS) + f" | {a['mean']:.1f} |")
    if "fp" in ev and "w4a4_rtn" in ev:
        rows.append("| Δ (W4A4 − FP) | " + " | ".join(f"{ev['w4a4_rtn'][t] - ev['fp'][t]:+.1f}" for t in TASKS)
                    + f" | {ev['w4a4_rtn']['mean'] - ev['fp']['mean']:+.1f} |")
    return "\n".join(rows)


def _extra_table(ev: dict) -> str:
    """Generalisation sets of ``tiny_eval.py --extra`` (FP and W4A4 RTN), empty when absent."""
    if "fp_extra" not in ev:
        return ""
    names = list(ev["fp_extra"])
    n = ev.get("extra_n", {})
    rows = ["Generalisation (test-split prompts, exact suite formats; `add_wK`/`sub_wK`: both operands "
            "exactly K digits, `_u999`: operands uniform in 0–999, `reverse_oov`: words of the "
            "vocabulary outside `eval.tasks.WORDS`):", "",
            "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
            "| prompts | " + " | ".join(str(n.get(k, "")) for k in names) + " |"]
    for key, label in (("fp_extra", "FP32"), ("w4a4_rtn_extra", "W4A4 RTN")):
        if key in ev:
            rows.append(f"| {label} | " + " | ".join(f"{ev[key][k]:.1f}" for k in names) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--run", required=True, help="training directory (curve.jsonl, train.log)")
    ap.add_argument("--eval", required=True, help="JSON written by python/tiny_eval.py")
    ap.add_argument("--out", required=True, help="asset directory")
    ap.add_argument("--notes", default="", help="extra Markdown (limits, measurements)")
    args = ap.parse_args()
    out = Path(args.out)
    cfg = json.loads((out / "config.json").read_text())
    st = json.loads((out / "training_state.json").read_text())
    ev = json.loads(Path(args.eval).read_text())
    curve = [json.loads(line) for line in (Path(args.run) / "curve.jsonl").read_text().splitlines() if line]
    fam = "Dream" if cfg["model_type"] == "Dream" else "LLaDA"
    d = cfg.get("d_model") or cfg.get("hidden_size")
    layers = cfg.get("n_layers") or cfg.get("num_hidden_layers")
    heads = cfg.get("n_heads") or cfg.get("num_attention_heads")
    ffn = cfg.get("mlp_hidden_size") or cfg.get("intermediate_size")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        n_params = sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape()[1] if len(f.get_slice(k).get_shape()) > 1 else 1)
                       for k in f.keys())
    gk = ev.get("gen_kwargs", {})
    tvocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    n_tok = len(tvocab)
    n_words = sum(t.startswith("\u2581") and t[1:].isascii() and t[1:].isalpha() for t in tvocab)
    meta = st.get("meta") or {}
    v2 = meta.get("tokenizer_version", 1) == 2
    g_len = meta.get("gen_length", 12)
    if v2:
        tok_par = """Built with the `tokenizers` library (`python/tiny_tokenizer.py`, version 2): a normalizer maps
spaces to `▁`, a regex pre-tokenizer cuts one digit, one word or one punctuation mark (words and
punctuation optionally with their leading `▁`), or a bare `▁`; a WordLevel model maps pieces to ids,
the decoder maps `▁` back to a space and concatenates. Every word is one token and **every digit has
exactly one id**: a space before a digit is the standalone `▁` token, so `" 1419"` → `▁ 1 4 1 9`
(version 1, the first generation, had `▁d` and `d`). `decode(encode(s)) == s` for every task
string, so answers are scored on decoded text. Answers are longer in tokens (8 sorted digits: 16),
hence gen_length """ + str(g_len) + """ in `generation_config.json`."""
    else:
        tok_par = """Built with the `tokenizers` library (`python/tiny_tokenizer.py`): a normalizer maps spaces to `▁`,
a regex pre-tokenizer cuts one digit / one word / one punctuation mark (each optionally with
its leading `▁`), a WordLevel model maps pieces to ids, the decoder maps `▁` back to a space and
concatenates. Every word is one token, every digit is one token (`4` and `▁4` are distinct ids:
a digit with and without a preceding space), and `decode(encode(s)) == s` for every task string,
so answers are scored on decoded text. `" 1419"` → `▁1 4 1 9`."""
    rc = meta.get("recipe") or {}  # runs since the issue-12 flags record their recipe
    if rc:
        tw = rc.get("task_weights", {})
        cur = (f"; then an adaptive curriculum: every {rc.get('curriculum_every')} steps the weights are "
               f"re-estimated as each task's error rate on {rc.get('curriculum_n')} fresh val prompts, floor "
               f"{rc.get('curriculum_floor')}, EMA {rc.get('curriculum_ema')} (`curriculum.jsonl` in the run)"
               if rc.get("curriculum", "off") != "off" else "")
        rev = (" `reverse` examples draw their words from every single-token word of the vocabulary "
               f"(all {n_words} `▁word` tokens), not only `eval.tasks.WORDS`; the prompt format is the suite's."
               if meta.get("reverse_words") == "all" else "")
        recipe_mix = (f"""- Tasks mixed in every batch (initial weights {', '.join(f'{k} {v:g}' for k, v in tw.items())}{cur}),
  examples packed into {rc.get('rows')} rows × {rc.get('row_len')} tokens with block-diagonal attention and
  per-example RoPE positions.{rev}""")
        recipe_opt = (f"""- AdamW (β 0.9/0.98, wd {rc.get('wd')} on matrices), lr {rc.get('lr'):g}, {rc.get('warmup')} warmup steps,
  cosine to {100 * rc.get('lr_min_ratio', 0.05):g}% over a wall-clock budget; grad clip 1;
  {'bf16 autocast (the CPU has AVX512-BF16/AMX; see python/TRAINING_V2.md for the measured speed-up)' if meta.get('bf16') else 'fp32'};
  1 thread per process, one process per core.""")
        where = ("a CPU with AVX512-BF16/AMX (bf16 autocast)" if meta.get("bf16") else "a CPU (fp32)") + \
            ", 1 thread, one process per core"
    else:  # the first-generation run, before recipes were recorded
        recipe_mix = """- Tasks mixed in every batch (weights add/sub 1.25, sort/reverse 1.5, mul/word 1), examples packed
  into 16 rows × 96 tokens with block-diagonal attention and per-example RoPE positions (3–6%
  padding)."""
        recipe_opt = """- AdamW (β 0.9/0.98, wd 0.05 on matrices), lr 2e-3, 100 warmup steps, cosine to 5% over a
  wall-clock budget; grad clip 1; fp32 (this machine's CPU has AVX2 only: a bf16 GEMM measured
  4× slower than fp32, so the bf16 autocast advice of the facts file does not apply here);
  1 thread per process (2 threads on the shared 2-core CPU measured 4× slower per step)."""
        where = "a 2-core AMD EPYC (AVX2) shared with other jobs"
    run_flags = (f" --preset {meta.get('preset')} --tokenizer-version {meta.get('tokenizer_version', 1)}"
                 f" --reverse-words {meta.get('reverse_words')} --curriculum {rc.get('curriculum', 'off')}"
                 + (f" --lr {rc['lr']:g} --warmup {rc.get('warmup')}" if "lr" in rc else "")
                 if rc else "")
    init = meta.get("init_from")
    origin = (f"trained on this project's task suite (`fair_calib_ext.eval.tasks`) in two stages — "
              f"continued from {init} (see \"Lineage\" below) —"
              if init else "trained from scratch on this project's task suite (`fair_calib_ext.eval.tasks`)")
    card = f"""# {args.name}

A tiny masked-diffusion LM in the official **{fam}** layout (`model_type` `{cfg['model_type']}`),
{origin} so that the
package has a default model that runs on 2 CPU cores, whose answers can be checked, and that is
sensitive to W4A4 quantization. It is a testbed, not a language model.

- Load: `fair_calib_ext.models.load_pretrained("{args.name}")`, tokenizer:
  `fair_calib_ext.models.load_tokenizer("{args.name}")` (plain `PreTrainedTokenizerFast` files).
- Architecture: d_model {d}, {layers} layers, {heads} heads (head_dim {d // heads}), SwiGLU {ffn},
  RMSNorm, RoPE θ {cfg['rope_theta']}, untied head, vocab {cfg.get('vocab_size')} (tokenizer: {n_tok} tokens),
  {'q/k/v biases, shifted logits (raw logit i predicts token i+1)' if fam == 'Dream' else 'no biases, logit i predicts token i'}.
  **{n_params / 1e6:.2f}M parameters**, fp32 safetensors.
- Special tokens: `<|pad|>` 0, `<|eos|>` 1, `<|mask|>` 2 (`mask_token_id`), `<|bos|>` 3, `<|unk|>` 4.

## Tokenizer

{tok_par}

## Data

The six tasks of `fair_calib_ext.eval.tasks` (add, sub, mul, sort, reverse, word problems), exact
prompt formats there; train split only. Splits are disjoint by seed, and for every task except
`mul` also by prompt (a stable hash assigns each prompt to one split; `mul` has only 990 prompts,
a table to memorise, so its splits share prompts). Text corpus for likelihood/calibration:
`fair_calib_ext.eval.corpus` (task lines generated by the package itself; project license).

## Training recipe (`python/train_tiny.py`)

- LLaDA masked-diffusion objective: per example t ~ U(1e-3, 1] (stratified over the batch); each
  token of the answer region (answer, EOS, EOS fill to a region length: 50% exactly {g_len} = the
  default gen_length, 30% shorter, 20% up to 32) masked with probability t; cross-entropy on masked
  tokens weighted 1/t, normalised by region tokens. 30% of examples are masked over the whole
  sequence (LLaDA pretraining objective; the prompt then carries loss too).{' Dream: the loss at token i uses the raw logit at i−1 (shifted), trained diffusion-only from scratch.' if fam == 'Dream' else ''}
{recipe_mix}
{recipe_opt}
- Trained{' (this stage)' if init else ''}: **{st['step']} steps, {st['examples']} examples, {st['elapsed'] / 60:.0f} min** of training
  time (evaluation excluded) on {where}, seed as in the
  log. Exported from the checkpoint with the best validation mean (`training_state.json`).

Resume or extend: `python python/train_tiny.py --family {'dream' if fam == 'Dream' else 'llada'} --out <run dir> --budget-min <M>{run_flags}{' --init-from <first-stage state>' if init else ''}`
(re-running resumes from `<run dir>/state.pt`{'; the launch commands are in python/TRAINING_V2.md' if v2 else ''}), then
`python python/train_tiny.py --family ... --out <run dir> --export fair_calib_ext/assets/{args.name}`.

## Learning curve (validation, {curve[-1].get('eval_n', 40) if curve else 40} prompts per task, internal sampler = low-confidence, 1 token/step, gen_length {g_len})

{_curve_table(curve)}

## Accuracy (test split, {ev['n_per_task']} prompts per task, exact match, %)

Sampler: `fair_calib_ext.sampling.generate` with the defaults of `fair_calib_ext.eval.accuracy.default_gen_kwargs`:
gen_length {gk.get('gen_length')}, steps {gk.get('steps')}, block_length {gk.get('block_length')},
remasking `{gk.get('remasking')}`, temperature 0, no CFG. W4A4 RTN: every decoder linear
(q/k/v/o/gate/up/down) with int4 per-output-channel symmetric weights and per-token int4
activations, round half to even, no clipping or transforms; embeddings and output head in full
precision; backend: {ev.get('w4a4_backend', 'n/a')}.

{_acc_table(ev, BAR_V2 if rc else BAR)}

{_extra_table(ev)}

{args.notes}
"""
    (out / "MODEL_CARD.md").write_text(card)
    print(f"wrote {out / 'MODEL_CARD.md'}")


if __name__ == "__main__":
    main()
