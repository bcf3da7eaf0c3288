"""Evaluation for compressed models: perplexity, sentence-embedding agreement, size and throughput.

Reference convention (pydoc-llama-6m on pydoc-heldout.txt = 39.28): the file tokenized whole, its first
20,000 tokens, non-overlapping 256-token windows, exp of the mean NLL over all predicted tokens.
``evaluate``-library wrappers live in ``metrics/`` (see :func:`metric_path`).
"""

from __future__ import annotations

from pathlib import Path

from .data import load_sentences, load_text
from .embeddings import embed, embedding_cosine, is_encoder, local_minilm_path, mean_pool
from .perplexity import perplexity, perplexity_stats
from .runner import evaluate_model
from .size import disk_bytes, weight_bytes
from .speed import tokens_per_second

METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def metric_path(name: str) -> str:
    """Absolute folder of one of our ``evaluate`` modules, for ``evaluate.load(metric_path(name))``:
    ``"perplexity"`` or ``"embedding_cosine"``."""
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"unknown metric {name!r}; available: {available}")
    return str(folder)


__all__ = [
    "disk_bytes",
    "embed",
    "embedding_cosine",
    "evaluate_model",
    "is_encoder",
    "load_sentences",
    "load_text",
    "local_minilm_path",
    "mean_pool",
    "metric_path",
    "perplexity",
    "perplexity_stats",
    "tokens_per_second",
    "weight_bytes",
]
