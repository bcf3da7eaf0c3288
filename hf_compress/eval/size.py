"""Model size: weight bytes in memory (packed layers at their real size) and checkpoint bytes on disk."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["disk_bytes", "weight_bytes", "is_linear_like"]


def _nbytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    return t.numel() * t.element_size()


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (and subclasses), GPT-2's ``Conv1D``, or any module reporting ``packed_weight_bytes()``."""
    if callable(getattr(module, "packed_weight_bytes", None)):
        return True
    if isinstance(module, nn.Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def _logical_shape(module: nn.Module) -> tuple[int, int] | None:
    inf, outf = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(inf, int) and isinstance(outf, int):
        return outf, inf
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:  # Conv1D: nf/nx, weight [in, out]
        return tuple(w.shape)  # type: ignore[return-value]
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    if isinstance(nf, int) and isinstance(nx, int):
        return nf, nx
    return None


def weight_bytes(model: nn.Module) -> dict:
    """Bytes the model's tensors take in memory.

    - ``linear_weight_bytes``: weights of linear-like layers as stored (``nn.Linear``/``Conv1D`` weight
      tensors; a module with a ``packed_weight_bytes()`` method, e.g. ``QuantLinear``, reports its packed
      buffers through it). Biases are not included (see ``linear_bias_bytes``). The LM head counts (it is a
      Linear); a head tied to the input embedding shares its storage, so it shows in both
      ``linear_weight_bytes`` and ``embedding_bytes`` but only once in ``total_param_bytes``.
    - ``linear_weight_numel``: logical number of weights of those layers (out * in), so
      ``bits_per_linear_weight = 8 * linear_weight_bytes / linear_weight_numel``.
    - ``total_param_bytes``: all parameters plus persistent buffers (shared tensors once; buffers registered
      non-persistent, such as RoPE ``inv_freq``, are left out).
    - ``param_bytes``, ``buffer_bytes``, ``embedding_bytes``, ``other_bytes`` (total minus linear weights),
      ``num_linear_layers``, ``num_packed_layers``.
    """
    seen: set[int] = set()  # ids of tensors already counted in linear weights

    linear_w = linear_b = linear_numel = n_linear = n_packed = 0
    packed_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in packed_prefixes):
            continue  # inside a packed layer: already reported by packed_weight_bytes()
        if not is_linear_like(module):
            continue
        n_linear += 1
        shape = _logical_shape(module)
        if shape is not None:
            linear_numel += shape[0] * shape[1]
        packed = getattr(module, "packed_weight_bytes", None)
        if callable(packed):
            n_packed += 1
            linear_w += int(packed())
            packed_prefixes.append(name + "." if name else "")
        else:
            w = module.weight
            if id(w) not in seen:
                seen.add(id(w))
                linear_w += _nbytes(w)
        b = getattr(module, "bias", None)
        if isinstance(b, torch.Tensor) and id(b) not in seen:
            seen.add(id(b))
            linear_b += _nbytes(b)

    param_bytes = buffer_bytes = emb_bytes = 0
    counted: set[int] = set()
    for module in model.modules():
        skip_meta_weight = callable(getattr(module, "packed_weight_bytes", None))
        for pname, p in module._parameters.items():
            if p is None or id(p) in counted:
                continue
            if skip_meta_weight and p.is_meta:
                continue  # a quantize-on-load placeholder, not real storage
            counted.add(id(p))
            param_bytes += _nbytes(p)
            if isinstance(module, nn.Embedding) and pname == "weight":
                emb_bytes += _nbytes(p)
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for bname, b in module._buffers.items():
            if b is None or bname in non_persistent or id(b) in counted:
                continue
            counted.add(id(b))
            buffer_bytes += _nbytes(b)

    total = param_bytes + buffer_bytes
    return {
        "linear_weight_bytes": linear_w,
        "linear_bias_bytes": linear_b,
        "linear_weight_numel": linear_numel,
        "bits_per_linear_weight": (8.0 * linear_w / linear_numel) if linear_numel else float("nan"),
        "total_param_bytes": total,
        "param_bytes": param_bytes,
        "buffer_bytes": buffer_bytes,
        "embedding_bytes": emb_bytes,
        "other_bytes": total - linear_w,
        "num_linear_layers": n_linear,
        "num_packed_layers": n_packed,
    }


def disk_bytes(path: str | os.PathLike) -> int:
    """Total size of the ``*.safetensors`` files in folder ``path`` (not recursive: a saved model's shards),
    or the size of ``path`` itself if it is a file."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        raise FileNotFoundError(f"no such file or folder: {p}")
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {p}")
    return sum(f.stat().st_size for f in files)
