"""lm-evaluation-harness model type ``fair_dllm`` for LLaDA / Dream checkpoints (FP or quantized).

- ``loglikelihood``: LLaDA's Monte-Carlo ELBO (:mod:`.likelihood`), ``mc_num`` samples; the
  masks of a request are seeded by a hash of its text, so a full-precision and a quantized run
  see identical masks (common random numbers) in any order and on any number of ranks.
  ``is_greedy`` is always False (the official LLaDA evaluator's greedy check is off as well).
- ``loglikelihood_rolling``: the same estimator on the whole text after one start token
  (BOS, else EOS), in windows of ``max_length`` tokens with as much left context as fits.
- ``generate_until``: the diffusion sampler at temperature 0 (LLaDA ``low_confidence`` /
  Dream ``entropy`` by default), output cut at the first stop string.

``lm_eval`` is an optional dependency (``pip install 'fair_calib_ext[eval]'``). Use it as

    python -m fair_calib_ext.eval.lm_eval_adapter run --model fair_dllm \\
        --model_args pretrained=/path/to/LLaDA-8B-Base,dtype=bfloat16,mc_num=128 \\
        --tasks piqa,arc_easy --device cuda --batch_size 32

(batch size and device go through lm-eval's own ``--batch_size`` / ``--device``, not
``--model_args``; local datasets through a task YAML and ``--include_path``)
(this module registers the model type, then hands over to lm-eval's own CLI), or from Python:
``register()`` then ``lm_eval.simple_evaluate(model="fair_dllm", ...)``. Under torchrun each
rank takes its share of the requests (lm-eval splits them by ``rank`` / ``world_size``).
"""

from __future__ import annotations

import sys
import zlib
from typing import Any

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # optional dependency: say how to get it
    raise ImportError(
        "the lm-eval adapter needs lm_eval; install it with `pip install 'fair_calib_ext[eval]'` "
        "(or `pip install lm_eval`)"
    ) from exc

from ..validate import MAX_SEED
from .accuracy import default_gen_kwargs, generate_texts
from .distributed import init_distributed
from .likelihood import mc_elbo_nll

__all__ = ["FairDLLM", "register", "main"]

MODEL_NAME = "fair_dllm"


def _to_bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "y")


def _request_seed(seed: int, *parts: str) -> torch.Generator:
    h = zlib.crc32("\x00".join(parts).encode("utf-8"))
    return torch.Generator().manual_seed(seed * 4_294_967_311 + h)


def _int_arg(value: int | str, name: str, lo: int, hi: int) -> int:
    """A ``--model_args`` integer (given as a string by lm-eval) in [lo, hi]; ValueError naming it."""
    from fair_calib_ext.validate import check_int

    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"fair_dllm: {name} must be an integer, got {value!r}") from None
    return check_int(value, f"fair_dllm: {name}", lo=lo, hi=hi)


class FairDLLM(LM):
    """lm-eval LM over ``fair_calib_ext.models.load_pretrained`` (any LLaDA / Dream / quantized dir).

    Args (all accepted as strings from ``--model_args``):
        pretrained: checkpoint dir or embedded name. tokenizer: tokenizer dir (default: pretrained).
        dtype: float32 | bfloat16 | float16. device: cpu | cuda (default cuda if available).
        mc_num: Monte-Carlo samples per loglikelihood request (default 128).
        batch_size: rows per forward for the ELBO and prompts per sampler batch.
        gen_length, steps, block_length, remasking: sampler settings for generate_until
            (max_gen_toks from the task overrides gen_length when given).
        cache (none | prefix | dual), threshold (0 < T <= 1): Fast-dLLM decoding for
            generate_until (approximate KV cache, confidence-threshold parallel commits).
        max_length: context limit (default: the config's max_position_embeddings).
        seed: seed of the MC masks.
    """

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        mc_num: int | str = 128,
        batch_size: int | str | None = 32,
        gen_length: int | str | None = None,
        steps: int | str | None = None,
        block_length: int | str | None = None,
        remasking: str | None = None,
        cache: str | None = None,
        threshold: float | str | None = None,
        max_length: int | str | None = None,
        seed: int | str = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from fair_calib_ext.models import load_generation_config, load_pretrained, load_tokenizer

        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in ("max_batch_size",))
        if unknown:
            raise ValueError(f"fair_dllm: unknown model_args {unknown}")
        ctx = init_distributed(str(device) if device else None)
        self._ctx = ctx
        self._rank, self._world_size, self._device = ctx.rank, ctx.world_size, ctx.device
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"fair_dllm: dtype must be float32, bfloat16 or float16, got {dtype!r}")
        # the values that do not depend on the checkpoint, checked before it is read
        self.mc_num = _int_arg(mc_num, "mc_num", 1, 4096)
        bs = str(batch_size) if batch_size is not None else "32"
        self.batch_size = 32 if bs == "auto" else _int_arg(bs, "batch_size", 1, 4096)  # "auto" -> a fixed default
        self.seed = _int_arg(seed, "seed", 0, MAX_SEED)
        self.model = load_pretrained(pretrained, dtype=getattr(torch, dtype), device=ctx.device)
        self.tokenizer = load_tokenizer(tokenizer or pretrained)
        ctx_len = int(self.model.config.max_position_embeddings)
        self.max_length = _int_arg(max_length, "max_length", 1, ctx_len) if max_length else ctx_len
        self.gen_kwargs = default_gen_kwargs(
            self.model, gen_length=_int_arg(gen_length, "gen_length", 1, ctx_len) if gen_length else None,
            steps=_int_arg(steps, "steps", 1, ctx_len) if steps else None,
            block_length=_int_arg(block_length, "block_length", 1, ctx_len) if block_length else None,
            remasking=remasking,
            generation_config=load_generation_config(pretrained), cache=cache, threshold=threshold,
        )
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        self._start = [int(start)] if start is not None else []

    # -- tokenization -----------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # trailing context whitespace belongs to the continuation (as in LLaDA's evaluator)
        n_sp = len(context) - len(context.rstrip())
        if n_sp:
            context, continuation = context[:-n_sp], context[-n_sp:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        if whole[: len(ctx)] != ctx:  # tokenization across the boundary changed: encode apart
            return ctx or list(self._start), self._encode(continuation)
        return ctx or list(self._start), whole[len(ctx):]

    # -- lm-eval API ------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(-NELBO of the continuation, False) per (context, continuation) request."""
        from tqdm.auto import tqdm

        out = []
        for req in tqdm(requests, desc="fair_dllm loglikelihood", disable=disable_tqdm or self.rank != 0):
            context, continuation = req.args[0], req.args[1]
            prefix, target = self._encode_pair(context, continuation)
            if not target:
                out.append((0.0, False))
                continue
            keep = max(self.max_length - len(target), 1)
            nll = mc_elbo_nll(self.model, prefix[-keep:], target, mc_num=self.mc_num, batch_size=self.batch_size,
                              generator=_request_seed(self.seed, context, continuation))
            out.append((-nll, False))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (-nll, False))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """-NELBO of each whole text (after one start token), windowed at max_length."""
        from tqdm.auto import tqdm

        out = []
        for req in tqdm(requests, desc="fair_dllm rolling", disable=disable_tqdm or self.rank != 0):
            text = req.args[0]
            ids = self._start + self._encode(text)
            total = 0.0
            window = max(self.max_length // 2, 1)  # score `window` tokens with up to max_length - window of context
            for k, s in enumerate(range(len(self._start), len(ids), window)):
                target = ids[s : s + window]
                prefix = ids[max(0, s - (self.max_length - len(target))) : s]
                total += mc_elbo_nll(self.model, prefix, target, mc_num=self.mc_num, batch_size=self.batch_size,
                                     generator=_request_seed(self.seed, text, str(k)))
            out.append(-total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy diffusion decoding of each context, cut at the first stop string."""
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            kw = dict(req.args[1] or {})
            g = int(kw.get("max_gen_toks") or self.gen_kwargs["gen_length"])
            groups.setdefault((g,), []).append(i)
        texts: list[str] = [""] * len(requests)
        for (g,), idx in groups.items():
            gk = dict(self.gen_kwargs)
            if g != gk["gen_length"]:
                gk["gen_length"] = g
                gk["steps"] = g
                if gk["block_length"] is not None and g % gk["block_length"] != 0:
                    gk["block_length"] = g
            prompts = [self._encode(requests[i].args[0]) or list(self._start) for i in idx]
            keep = max(self.max_length - g, 1)
            prompts = [p[-keep:] for p in prompts]
            outs = generate_texts(self.model, self.tokenizer, prompts, gen_kwargs=gk, batch_size=self.batch_size,
                                  eos_id=self.tokenizer.eos_token_id, progress=not disable_tqdm and self.rank == 0,
                                  desc="fair_dllm generate")
            for i, text in zip(idx, outs):
                until = (requests[i].args[1] or {}).get("until") or []
                if isinstance(until, str):
                    until = [until]
                for u in until:
                    if u and u in text:
                        text = text[: text.index(u)]
                texts[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return texts

    # -- distributed primitives for lm-eval's evaluator --------------------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor)
        return torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "fair_dllm")).replace("/", "__")


def register() -> type[FairDLLM]:
    """Register ``fair_dllm`` with lm-eval's model registry (idempotent)."""
    from lm_eval.api.registry import get_model

    try:
        if get_model(MODEL_NAME) is FairDLLM:
            return FairDLLM
    except (ValueError, KeyError):
        pass
    register_model(MODEL_NAME)(FairDLLM)
    return FairDLLM


def _with_default_device(argv: list[str]) -> list[str]:
    """``argv`` plus ``--device cuda`` or ``--device cpu`` when it names no device.

    lm-eval's own default is ``cuda:0`` even on machines without CUDA; this adapter uses CUDA
    when it is available and the CPU otherwise, and says which on stderr.
    """
    if any(a == "--device" or a.startswith("--device=") for a in argv):
        return argv
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    why = "CUDA is available" if dev == "cuda" else "no CUDA device is available"
    print(f"fair_dllm: no --device given; using {dev} ({why})", file=sys.stderr)
    return [*argv, "--device", dev]


def main() -> None:
    """lm-eval's CLI with ``fair_dllm`` registered (and a device it can use by default)."""
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = _with_default_device(list(sys.argv))
    cli_evaluate()


if __name__ == "__main__":
    sys.exit(main())
