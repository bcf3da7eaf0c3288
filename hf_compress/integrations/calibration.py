"""Calibration data: token windows for the layer-wise methods (GPTQ, and later SparseGPT, Wanda, static W8A8).

Accepted sources: a local text file path, a list of strings, a string of text, a ``datasets.Dataset`` with a
text column, or token ids (a ``[n, seqlen]`` tensor used as given, or 1-D tensors / lists of ids that are
joined into one stream). Text is tokenized whole and ``n_samples`` windows of ``seqlen`` tokens are cut at
random offsets drawn from a generator seeded with ``seed``, so the same seed and data give the same windows.

Encoders see their inputs framed: a tokenizer that wraps one sequence at both ends (BERT's ``[CLS] ... [SEP]``,
RoBERTa's ``<s> ... </s>``) gets windows framed the same way, ``seqlen`` tokens in all, because an encoder
only ever runs on framed text, and its [CLS]/[SEP] positions carry activations unlike any text token's.
Decoder tokenizers, which only prepend (Llama's BOS), get plain windows of the stream.
"""

from __future__ import annotations

import os

import torch
from transformers.utils import logging

from ..eval._utils import max_positions
from ..eval.data import resolve_text

logger = logging.get_logger(__name__)

DEFAULT_SEQLEN = 2048


def default_seqlen(config) -> int:
    """min(2048, the model's positions): what ``seqlen=None`` means."""
    limit = max_positions(config)
    return min(DEFAULT_SEQLEN, limit) if limit else DEFAULT_SEQLEN


def _token_stream(data) -> torch.Tensor | None:
    """A 1-D id stream if ``data`` is already tokens, else None."""
    if isinstance(data, torch.Tensor):
        if data.is_floating_point():
            raise TypeError("calibration token ids must be an integer tensor, got a floating-point one")
        return data.reshape(-1).long()
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, torch.Tensor) for d in data):
        return torch.cat([_token_stream(d) for d in data])
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, (list, tuple)) for d in data):
        if all(isinstance(i, int) for d in data for i in d):
            return torch.tensor([i for d in data for i in d], dtype=torch.long)
    return None


def sequence_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special ids ``tokenizer`` puts before and after one sequence, when it puts some at both ends (an
    encoder's framing, e.g. BERT's ``([CLS], [SEP])``); ``([], [])`` for decoder tokenizers and for tokenizers
    that add nothing."""
    try:
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a")["input_ids"]
    except (TypeError, KeyError):
        return [], []
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            before, after = list(full[:i]), list(full[i + len(plain) :])
            return (before, after) if before and after else ([], [])
    return [], []


def calibration_windows(
    data, tokenizer, n_samples: int, seqlen: int, *, seed: int = 0, config=None
) -> torch.Tensor:
    """``[n_samples, seqlen]`` int64 token windows from ``data`` (see the module docstring).

    Raises ``ValueError`` with the fix when the data is empty, holds fewer than ``n_samples * seqlen`` tokens,
    or ``seqlen`` exceeds the model's positions (``config``).
    """
    if data is None:
        raise ValueError(
            "no calibration data: pass dataset=... (a text file path, a list of strings, a datasets.Dataset or token ids)"
        )
    if n_samples < 1 or seqlen < 1:
        raise ValueError(f"n_samples and seqlen must be positive, got n_samples={n_samples}, seqlen={seqlen}")
    limit = max_positions(config) if config is not None else None
    if limit is not None and seqlen > limit:
        raise ValueError(
            f"seqlen={seqlen} exceeds the model's {limit} positions: pass seqlen <= {limit} (or seqlen=None for the default)"
        )
    if isinstance(data, torch.Tensor) and data.dim() == 2 and data.shape[1] == seqlen and data.shape[0] >= n_samples:
        return data[:n_samples].long().clone()  # windows chosen by the caller: used as given
    stream = _token_stream(data)
    before, after = [], []
    if stream is None:
        text = resolve_text(data)
        if not text.strip():
            raise ValueError("the calibration data is empty: it holds no text")
        if tokenizer is None:
            raise ValueError("calibration text needs a tokenizer: pass tokenizer=... (or token ids as dataset=...)")
        before, after = sequence_frame(tokenizer)
        if before and seqlen <= len(before) + len(after):
            raise ValueError(f"seqlen={seqlen} leaves no room for text inside the tokenizer's {len(before) + len(after)} framing tokens")
        stream = tokenizer(text, add_special_tokens=not before, verbose=False)["input_ids"]
        stream = torch.tensor(stream, dtype=torch.long)
    width = seqlen - len(before) - len(after)
    asked = n_samples * width
    if stream.numel() < asked:
        raise ValueError(
            f"the calibration data has {stream.numel()} tokens, fewer than the n_samples * seqlen = {n_samples} * "
            f"{width} = {asked} asked for{' (framing tokens not counted)' if before else ''}: pass more text or lower "
            "n_samples/seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - width + 1, (n_samples,), generator=gen)
    windows = torch.stack([stream[s : s + width] for s in starts.tolist()])
    if before:
        head, tail = (torch.tensor(ids, dtype=torch.long).expand(n_samples, -1) for ids in (before, after))
        windows = torch.cat([head, windows, tail], dim=1)
    return windows


def calibration_tokens(model, cfg) -> torch.Tensor:
    """The ``[n_samples, seqlen]`` windows for a calibrating config (``dataset``, ``tokenizer``, ``n_samples``,
    ``seqlen``, ``seed``); the tokenizer defaults to the model's own folder."""
    seqlen = cfg.seqlen or default_seqlen(model.config)
    tokenizer = cfg.tokenizer
    if isinstance(tokenizer, (str, os.PathLike)) or (tokenizer is None and isinstance(cfg.dataset, (str, list))):
        from .loading import load_tokenizer

        tokenizer = load_tokenizer(str(tokenizer or model.name_or_path))
    return calibration_windows(cfg.dataset, tokenizer, cfg.n_samples, seqlen, seed=cfg.seed, config=model.config)
