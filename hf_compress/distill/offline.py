"""Offline teacher logits: the teacher's top-k log-probabilities per token, computed once into a ``datasets``
folder on disk, so that training needs no teacher in memory.

Each row keeps the training columns (``input_ids``, ``attention_mask``, ``labels``) and adds, for the
``L − 1`` positions that predict a next token, ``teacher_ids`` ``[L−1, k]`` (int16 when the vocabulary fits,
else int32) and ``teacher_logprobs`` ``[L−1, k]`` (float16 by default, float32 on request): the teacher's k
most likely ids and their log-probabilities under the full softmax at the temperature T of the run. The mass
the teacher puts outside its top k is 1 − Σ exp(logprobs), so the KL stays exact on the partition {top k,
the rest} (see ``losses.topk_distillation_loss``). Storage per token: k × (2 or 4 + 2 or 4) bytes, e.g.
k = 32 with int16 ids and float16 values is 128 bytes per token (the input ids themselves are 8 more).

The folder holds the Arrow files of ``Dataset.save_to_disk`` (no pickles) and ``distill_cache.json`` with
the settings (k, T, teacher, vocabulary size) that the trainer checks against its arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..eval._utils import model_device
from ..integrations.save import atomic_dir
from .data import DistillationCollator
from .losses import teacher_topk

logger = logging.get_logger(__name__)

__all__ = ["CACHE_META", "load_teacher_logits", "precompute_teacher_logits"]

CACHE_META = "distill_cache.json"
VALUE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@torch.no_grad()
def precompute_teacher_logits(
    teacher,
    dataset,
    output_dir,
    *,
    top_k: int = 32,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    batch_size: int = 8,
    value_dtype: str = "float16",
    pad_token_id: int = 0,
):
    """Run ``teacher`` over ``dataset`` (rows with ``input_ids``, e.g. from :func:`text_chunks`) and write the
    top-``top_k`` cache to ``output_dir`` (atomically). ``vocab_size``: the student's vocabulary when the
    teacher's extends it (the top k is then taken over the shared ids). Returns the cached Dataset."""
    from datasets import Dataset, concatenate_datasets

    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {sorted(VALUE_DTYPES)}, got {value_dtype!r}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to precompute")
    teacher.eval()
    device = model_device(teacher)
    vocab = vocab_size or teacher.config.vocab_size
    id_dtype = torch.int16 if vocab <= torch.iinfo(torch.int16).max else torch.int32
    collate = DistillationCollator(pad_token_id)
    columns = [c for c in ("input_ids", "attention_mask", "labels") if c in dataset.column_names]
    parts = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="teacher logits", unit="batch"):
        rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
        batch = collate([{c: r[c] for c in columns} for r in rows])
        logits = teacher(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        ids, logprobs = teacher_topk(logits[:, :-1], top_k, temperature, vocab)
        ids, logprobs = ids.to(id_dtype).cpu(), logprobs.to(VALUE_DTYPES[value_dtype]).cpu()
        lengths = batch["attention_mask"].sum(1).tolist()
        part = {c: [r[c] for r in rows] for c in columns}
        # Only the real positions of each row are kept (a right-padded row's padding predicts nothing).
        part["teacher_ids"] = [ids[i, : max(n - 1, 0)].numpy() for i, n in enumerate(lengths)]
        part["teacher_logprobs"] = [logprobs[i, : max(n - 1, 0)].numpy() for i, n in enumerate(lengths)]
        parts.append(Dataset.from_dict(part))
    cached = concatenate_datasets(parts)
    meta = {
        "top_k": top_k,
        "temperature": temperature,
        "vocab_size": vocab,
        "value_dtype": value_dtype,
        "teacher": str(getattr(teacher, "name_or_path", "") or type(teacher).__name__),
        "rows": len(cached),
        "bytes_per_token": top_k * (torch.tensor([], dtype=id_dtype).element_size() + VALUE_DTYPES[value_dtype].itemsize),
    }
    with atomic_dir(output_dir) as tmp:
        cached.save_to_disk(str(tmp / "data"))
        (tmp / CACHE_META).write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("wrote teacher top-%d logits for %d rows to %s (%d bytes per token)", top_k, len(cached), output_dir, meta["bytes_per_token"])
    return load_teacher_logits(output_dir)[0]


def load_teacher_logits(path) -> tuple:
    """``(dataset, meta)`` from a folder written by :func:`precompute_teacher_logits`."""
    from datasets import load_from_disk

    p = Path(path)
    if not (p / CACHE_META).is_file():
        raise FileNotFoundError(f"{p} is not a teacher-logit cache (no {CACHE_META}): write one with precompute_teacher_logits")
    meta = json.loads((p / CACHE_META).read_text())
    return load_from_disk(str(p / "data")).with_format("torch"), meta
