"""Throughput: decode tokens/s (greedy generate with KV cache) and prefill tokens/s (one long forward)."""

from __future__ import annotations

import statistics
import time

import torch
from transformers.utils import logging

from ._utils import accepts_kwarg, eval_mode, max_positions, model_device, synchronize
from .embeddings import is_encoder

logger = logging.get_logger(__name__)

__all__ = ["tokens_per_second"]


def _vocab_size(model, tokenizer) -> int:
    sizes = []
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(v, int) and v > 0:
        sizes.append(v)
    if tokenizer is not None:
        sizes.append(len(tokenizer))
    if not sizes:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is None:
            raise ValueError("cannot tell the vocabulary size: pass a tokenizer or a model with config.vocab_size")
        sizes.append(emb.num_embeddings)
    return min(sizes)


def _timed(fn, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def _median_time(fn, device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(_timed(fn, device) for _ in range(repeats))


def tokens_per_second(
    model,
    tokenizer=None,
    *,
    prompt_len: int = 32,
    new_tokens: int = 64,
    prefill_len: int = 512,
    batch_size: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> dict:
    """Measure decode and prefill throughput on random token ids (seeded ``torch.Generator``, within the
    vocabulary), under ``torch.inference_mode`` on the model's device. Times are medians of ``repeats`` runs
    after ``warmup`` untimed ones.

    - decode: ``t_gen`` = greedy ``model.generate`` of exactly ``new_tokens`` tokens (``min_new_tokens =
      max_new_tokens``, ``do_sample=False``, ``use_cache=True``) from a ``prompt_len``-token prompt; ``t_first``
      = the same with 1 new token (the prompt's prefill plus the first token). ``decode_tok_s = batch_size *
      (new_tokens - 1) / (t_gen - t_first)``: the per-token cost of the cached decode steps alone.
    - prefill: one forward over ``prefill_len`` tokens (clipped to the model's ``max_position_embeddings``),
      ``prefill_tok_s = batch_size * prefill_len / t``. For causal LMs only the last position's logits are
      computed when the model supports ``logits_to_keep``, as in generation.

    Encoder-only models (see :func:`is_encoder`) get ``decode_tok_s = None``. Returns ``{"decode_tok_s",
    "prefill_tok_s", "decode_s", "prefill_s", "prompt_len", "new_tokens", "prefill_len", "batch_size",
    "device"}``.
    """
    if min(prompt_len, new_tokens, prefill_len, batch_size, repeats) < 1 or warmup < 0:
        raise ValueError("prompt_len, new_tokens, prefill_len, batch_size and repeats must be positive, warmup >= 0")
    device = model_device(model)
    config = getattr(model, "config", None)
    limit = max_positions(config)
    if limit is not None and prefill_len > limit:
        logger.info("prefill_len %d clipped to the model's %d positions", prefill_len, limit)
        prefill_len = limit
    vocab = _vocab_size(model, tokenizer)
    gen = torch.Generator().manual_seed(seed)
    encoder = is_encoder(model)
    result: dict = {"decode_tok_s": None, "decode_s": None, "batch_size": batch_size, "device": str(device)}

    with eval_mode(model), torch.inference_mode():
        # -- decode ---------------------------------------------------------------------------------------
        if encoder:
            logger.info("encoder-only model: no decode throughput")
        else:
            if limit is not None and prompt_len + new_tokens > limit:
                raise ValueError(
                    f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the model's {limit} positions"
                )
            from transformers import GenerationConfig

            prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=gen).to(device)
            mask = torch.ones_like(prompt)
            gc_src = getattr(model, "generation_config", None)
            eos = getattr(gc_src, "eos_token_id", None) or getattr(config, "eos_token_id", None)
            pad = getattr(gc_src, "pad_token_id", None)
            if pad is None:
                pad = getattr(config, "pad_token_id", None)
            if pad is None:
                pad = eos[0] if isinstance(eos, (list, tuple)) else (eos if eos is not None else 0)

            def generate(n: int):
                gc = GenerationConfig(
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    use_cache=True,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )
                out = model.generate(input_ids=prompt, attention_mask=mask, generation_config=gc)
                if out.shape[1] != prompt_len + n:  # pragma: no cover - defensive
                    raise RuntimeError(f"generate produced {out.shape[1] - prompt_len} tokens, expected {n}")

            t_first = _median_time(lambda: generate(1), device, repeats, warmup)
            if new_tokens > 1:
                t_gen = _median_time(lambda: generate(new_tokens), device, repeats, warmup)
                decode_s = max(t_gen - t_first, 1e-9)
                result["decode_s"] = decode_s
                result["decode_tok_s"] = batch_size * (new_tokens - 1) / decode_s
            else:
                logger.warning("new_tokens=1 measures no decode step; decode_tok_s is None")

        # -- prefill --------------------------------------------------------------------------------------
        ids = torch.randint(0, vocab, (batch_size, prefill_len), generator=gen).to(device)
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if not encoder and accepts_kwarg(model, "logits_to_keep"):
            kw["logits_to_keep"] = 1
        prefill_s = _median_time(lambda: model(**kw), device, repeats, warmup)
        result["prefill_s"] = prefill_s
        result["prefill_tok_s"] = batch_size * prefill_len / prefill_s

    result.update(prompt_len=prompt_len, new_tokens=new_tokens, prefill_len=prefill_len)
    logger.info(
        "throughput on %s: decode %s tok/s, prefill %.1f tok/s",
        device,
        f"{result['decode_tok_s']:.1f}" if result["decode_tok_s"] else "n/a",
        result["prefill_tok_s"],
    )
    return result
