"""Training data for distillation: text cut into fixed-length token chunks, and the collator that pads them
together with cached teacher logits."""

from __future__ import annotations

from typing import Any

import torch

from ..eval.data import resolve_text

__all__ = ["DistillationCollator", "TEACHER_COLUMNS", "text_chunks"]

# Columns the offline cache adds (see offline.py); the collator pads them and the trainer keeps them.
TEACHER_COLUMNS = ("teacher_ids", "teacher_logprobs")


def text_chunks(tokenizer, source: Any, seq_len: int = 128, *, max_chunks: int | None = None, text_column: str = "text"):
    """A ``datasets.Dataset`` of ``input_ids``/``attention_mask``/``labels`` rows of ``seq_len`` tokens: the
    text of ``source`` (a file path, a string, a list of strings or a Dataset with ``text_column``)
    tokenized whole and cut into consecutive, non-overlapping chunks (the tail shorter than a chunk is
    dropped)."""
    from datasets import Dataset

    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    text = resolve_text(source, text_column=text_column)
    if not text.strip():
        raise ValueError("the training text is empty")
    ids = tokenizer(text, verbose=False)["input_ids"]
    n = len(ids) // seq_len
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise ValueError(f"the training text has {len(ids)} tokens, fewer than one chunk of seq_len={seq_len}")
    chunks = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]
    return Dataset.from_dict({"input_ids": chunks, "attention_mask": [[1] * seq_len] * n, "labels": chunks})


class DistillationCollator:
    """Pads ``input_ids`` (with ``pad_token_id``), ``attention_mask`` (0), ``labels`` (−100; made from
    ``input_ids`` when absent, padding masked) and the teacher columns of the offline cache, right-aligned."""

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id

    @staticmethod
    def _pad(rows: list, value, dtype=None) -> torch.Tensor:
        rows = [torch.as_tensor(r) if dtype is None else torch.as_tensor(r, dtype=dtype) for r in rows]
        length = max(r.shape[0] for r in rows)
        out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), value)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
        return out

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"input_ids": self._pad([f["input_ids"] for f in features], self.pad_token_id, torch.long)}
        if "attention_mask" in features[0]:
            batch["attention_mask"] = self._pad([f["attention_mask"] for f in features], 0, torch.long)
        else:
            batch["attention_mask"] = self._pad([[1] * len(f["input_ids"]) for f in features], 0, torch.long)
        if "labels" in features[0]:
            batch["labels"] = self._pad([f["labels"] for f in features], -100, torch.long)
        else:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        if TEACHER_COLUMNS[0] in features[0]:
            batch["teacher_ids"] = self._pad([f["teacher_ids"] for f in features], 0).long()
            batch["teacher_logprobs"] = self._pad([f["teacher_logprobs"] for f in features], 0.0).float()
        return batch
