"""Vectorised unpacking of the packed GPTQ layout (bit-identical to :mod:`hf_compress.quant.layout`).

:func:`hf_compress.quant.packing.unpack_bits` is the readable reference: it loops over the 32 values of a
word group in int64. The kernels unpack on every reference forward and every backward, so here the same
bit stream is decoded with one broadcast shift in int32 (2/4/8 bits) or a gather plus two fix-ups for the
3-bit values that cross word boundaries. :func:`dequantize` reproduces ``dequantize_layout`` exactly
(same float32 arithmetic, same final cast) and the tests assert bitwise equality.
"""

from __future__ import annotations

import torch

# 3-bit stream: value j starts at bit 3*j; values 10 (bits 30..32) and 21 (bits 63..65) cross words.
_SPLIT_3BIT = ((10, 0, 30), (21, 1, 31))  # (value index, first word, shift)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes packed along dim 0 of an int32 ``[rows, C]`` tensor -> int32 ``[n, C]``."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed codes must be int32, got {packed.dtype}")
    rows, cols = packed.shape
    mask = (1 << bits) - 1
    if bits in (2, 4, 8):
        per = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device).view(1, per, 1)
        # Arithmetic shift of negative words sign-extends, but the mask keeps only the value's own bits.
        vals = (packed.unsqueeze(1) >> shifts) & mask
        out = vals.reshape(rows * per, cols)
    elif bits == 3:
        if rows % 3:
            raise ValueError(f"3-bit packed length {rows} is not a multiple of 3")
        chunks = packed.view(rows // 3, 3, cols)
        offsets = torch.arange(32, device=packed.device) * 3
        word = offsets // 32
        shift = (offsets % 32).to(torch.int32).view(1, 32, 1)
        vals = (chunks.index_select(1, word) >> shift) & mask
        for j, w, s in _SPLIT_3BIT:
            low_bits = 32 - s
            lo = (chunks[:, w] >> s) & ((1 << low_bits) - 1)
            hi = (chunks[:, w + 1] & ((1 << (3 - low_bits)) - 1)) << low_bits
            vals[:, j] = lo | hi
        out = vals.reshape(rows // 3 * 32, cols)
    else:
        raise ValueError(f"unsupported bits={bits}: the packed layout supports 2, 3, 4, 8")
    if n > out.shape[0]:
        raise ValueError(f"asked for {n} values but the packed tensor holds at most {out.shape[0]}")
    return out[:n]


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Codes as int32 ``[in, out]``."""
    return unpack_rows(qweight, bits, in_features)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Zero codes as int32 ``[n_groups, out]``."""
    return unpack_rows(qzeros.t(), bits, out_features).t()


def dequantize(qweight, qzeros, scales, g_idx, bits: int, in_features: int) -> torch.Tensor:
    """Same result, bit for bit, as :func:`hf_compress.quant.layout.dequantize_layout` (``[out, in]``)."""
    wt = dequantize_t(qweight, qzeros, scales, g_idx, bits, in_features)
    return torch.empty((wt.shape[1], wt.shape[0]), dtype=wt.dtype, device=wt.device).copy_(wt.t())


def dequantize_t(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    in_features: int,
) -> torch.Tensor:
    """The transposed weight ``[in, out]`` in the scales' dtype (what ``x @ W.T`` multiplies by), the values of
    :func:`dequantize`. On CPU the C++ kernel writes it in one pass (about a tenth of the time of the tensor
    operations below on a 2048x5632 layer); elsewhere, or without a compiler, the tensor operations."""
    out_features = scales.shape[1]
    n_groups = scales.shape[0]
    z = unpack_qzeros(qzeros, bits, out_features)  # [g, out]
    if qweight.is_cpu and _cpu_kernel():
        from .cpu.lowbit import dequantize_gptq_cpu

        wt = dequantize_gptq_cpu(qweight, z, scales.to(torch.float32), g_idx.to(torch.int32), bits, in_features)
        return wt if scales.dtype == torch.float32 else wt.to(scales.dtype)
    q = unpack_qweight(qweight, bits, in_features)  # [in, out]
    size = contiguous_group_size(g_idx, n_groups)
    if size is not None:  # g_idx = i // size: broadcast per group instead of gathering per column
        pad = n_groups * size - in_features  # the last group may be shorter
        if pad:
            q = torch.cat([q, q.new_zeros(pad, out_features)])
        w = (q.view(n_groups, size, out_features) - z.unsqueeze(1)).to(torch.float32)
        w.mul_(scales.to(torch.float32).unsqueeze(1))
        w = w.view(n_groups * size, out_features)[:in_features]
    else:
        gi = g_idx.long()
        w = (q - z[gi]).to(torch.float32)
        w.mul_(scales[gi].to(torch.float32))
    return w if scales.dtype == torch.float32 else w.to(scales.dtype)


def _cpu_kernel() -> bool:
    from .cpu import lowbit

    return lowbit.available()


def contiguous_group_size(g_idx: torch.Tensor, n_groups: int) -> int | None:
    """``s`` when ``g_idx[i] == i // s`` for all ``i`` (one group: ``len(g_idx)``), else ``None``."""
    k = g_idx.shape[0]
    if n_groups == 1:
        return k if k else None
    size = -(-k // n_groups)
    if size <= 0 or -(-k // size) != n_groups:
        return None
    expected = torch.arange(k, device=g_idx.device, dtype=torch.int32) // size
    return size if torch.equal(g_idx.to(torch.int32), expected) else None
