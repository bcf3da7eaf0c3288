"""``evaluate_model``: the one-stop evaluation the CLI reports."""

from __future__ import annotations

from typing import Any

import torch
from transformers.utils import logging

from .data import load_sentences
from .embeddings import embed, embedding_cosine, is_encoder
from .perplexity import perplexity_stats
from .size import weight_bytes
from .speed import tokens_per_second

logger = logging.get_logger(__name__)

__all__ = ["evaluate_model"]

_PPL_KEYS = {"seqlen", "max_tokens", "batch_size", "text_column", "progress"}
_EMBED_KEYS = {"embed_batch_size", "max_length", "n_sentences"}
_SPEED_KEYS = {"prompt_len", "new_tokens", "prefill_len", "speed_batch_size", "repeats", "warmup", "seed"}


def evaluate_model(
    model,
    tokenizer,
    *,
    text: Any = None,
    sentences: Any = None,
    reference=None,
    speed: bool = True,
    **kw,
) -> dict:
    """Evaluate ``model`` the way the CLI reports it; returns a flat dict.

    - always: ``is_encoder``, ``num_params`` and the :func:`weight_bytes` fields;
    - causal LMs, if ``text`` is given (path, ``datasets.Dataset``, list of strings or text): ``perplexity``,
      ``nll``, ``ppl_tokens`` (:func:`perplexity`; ``seqlen``, ``max_tokens``, ``batch_size``,
      ``text_column``, ``progress`` pass through ``kw``);
    - encoders, if ``sentences`` is given (a list of strings, or a path/text for :func:`load_sentences`,
      ``n_sentences`` of them): with a ``reference`` model, ``embedding_cosine_mean``/``_min`` against it
      (same tokenizer); without, ``embedding_mean_norm`` (of the un-normalised mean-pooled embeddings) and
      ``embedding_dim``. ``embed_batch_size`` and ``max_length`` pass through ``kw``;
    - if ``speed``: ``decode_tok_s``, ``prefill_tok_s`` (:func:`tokens_per_second`; ``prompt_len``,
      ``new_tokens``, ``prefill_len``, ``speed_batch_size``, ``repeats``, ``warmup``, ``seed``).
    """
    unknown = set(kw) - _PPL_KEYS - _EMBED_KEYS - _SPEED_KEYS
    if unknown:
        raise TypeError(f"evaluate_model got unexpected keyword arguments: {sorted(unknown)}")
    encoder = is_encoder(model)
    result: dict = {
        "model_class": type(model).__name__,
        "is_encoder": encoder,
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    result.update(weight_bytes(model))

    if not encoder and text is not None:
        stats = perplexity_stats(model, tokenizer, text, **{k: kw[k] for k in _PPL_KEYS if k in kw})
        result.update(perplexity=stats["perplexity"], nll=stats["nll"], ppl_tokens=stats["n_tokens"])
    elif encoder and text is not None and sentences is None:
        logger.warning("text is for causal-LM perplexity; pass sentences= to evaluate an encoder")

    if encoder and sentences is not None:
        if not isinstance(sentences, (list, tuple)):
            sentences = load_sentences(sentences, n=kw.get("n_sentences", 200))
        embed_kw = {"batch_size": kw.get("embed_batch_size", 32)}
        if "max_length" in kw:
            embed_kw["max_length"] = kw["max_length"]
        if reference is not None:
            cos = embedding_cosine(model, reference, tokenizer, sentences, **embed_kw)
            result.update(embedding_cosine_mean=cos["mean"], embedding_cosine_min=cos["min"], n_sentences=cos["n"])
        else:
            e = embed(model, tokenizer, sentences, normalize=False, **embed_kw)
            result.update(
                embedding_mean_norm=torch.linalg.vector_norm(e.double(), dim=1).mean().item(),
                embedding_dim=int(e.shape[1]),
                n_sentences=int(e.shape[0]),
            )
    elif not encoder and sentences is not None:
        logger.warning("sentences are for encoder embedding evals; ignored for a causal LM")

    if speed:
        speed_kw = {k: kw[k] for k in _SPEED_KEYS - {"speed_batch_size"} if k in kw}
        if "speed_batch_size" in kw:
            speed_kw["batch_size"] = kw["speed_batch_size"]
        tps = tokens_per_second(model, tokenizer, **speed_kw)
        result.update(decode_tok_s=tps["decode_tok_s"], prefill_tok_s=tps["prefill_tok_s"])
    return result
