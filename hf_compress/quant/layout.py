"""The packed weight layout shared by RTN and GPTQ (the GPTQ checkpoint layout).

For a linear layer with ``in_features`` inputs, ``out_features`` outputs and ``n_groups`` groups:

- ``qweight`` int32 ``[ceil(in*bits/32), out]``: unsigned codes ``q`` packed along the input dimension
  (see :mod:`hf_compress.quant.packing`). When ``in*bits`` is not a multiple of 32, ``in`` is padded with
  zero codes up to whole words (to a multiple of 32 values at 3 bits, whose values cross words): e.g. 704
  inputs at 3 bits -> 66 rows, 100 inputs at 4 bits -> 13 rows.
- ``qzeros`` int32 ``[n_groups, ceil(out*bits/32)]``: unsigned zero codes ``z`` packed along the output
  dimension, padded the same way. In memory ``z`` is exact (GPTQModel's ``gptq_v2`` convention); on disk
  checkpoints default to the ``gptq`` (v1) convention that AutoGPTQ, GPTQModel and vLLM read, ``z - 1``
  (see :func:`shift_zero_codes`; our quantizers never produce ``z = 0``, which v1 cannot hold).
- ``scales`` float ``[n_groups, out]``.
- ``g_idx`` int32 ``[in]``: the group of every input column (``i // group_size`` unless act-order
  permuted it). With a group size that does not divide ``in`` the last group is shorter.

Dequantization: ``W[o, i] = (q[i, o] - z[g_idx[i], o]) * scales[g_idx[i], o]``.
In the affine convention of :mod:`hf_compress.quant.affine` (``X~ = S*(X_q + Z)`` with unsigned codes)
the stored zero code is ``z = -Z``.
"""

from __future__ import annotations

import torch

from .affine import num_groups as ceil_groups
from .packing import pack_bits, packed_length, unpack_bits

LAYOUT_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in LAYOUT_BITS:
        raise ValueError(f"unsupported bits={bits}: the packed layout supports {list(LAYOUT_BITS)}")


def num_groups(in_features: int, group_size: int) -> int:
    """Groups along the input dimension; ``group_size=-1`` means one group (per output channel)."""
    if group_size == -1:
        return 1
    if group_size <= 0:
        raise ValueError(f"group_size must be -1 (per output channel) or a positive integer, got {group_size}")
    return ceil_groups(in_features, group_size)


def default_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    idx = torch.arange(in_features, dtype=torch.int32, device=device)
    return torch.zeros_like(idx) if group_size == -1 else idx // group_size


def packed_shapes(in_features: int, out_features: int, bits: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the four layout tensors; used to build empty modules and to validate checkpoints."""
    check_bits(bits)
    g = num_groups(in_features, group_size)
    return {
        "qweight": (packed_length(in_features, bits), out_features),
        "qzeros": (g, packed_length(out_features, bits)),
        "scales": (g, out_features),
        "g_idx": (in_features,),
    }


def pack_layout(
    q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> dict[str, torch.Tensor]:
    """Pack codes ``q [out, in]`` and zero codes ``zeros [out, n_groups]`` (scales ``[out, n_groups]``)."""
    check_bits(bits)
    return {
        "qweight": pack_bits(q.t(), bits, dim=0),
        "qzeros": pack_bits(zeros.t(), bits, dim=1),
        "scales": scales.t().contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Codes as int32 ``[in, out]``."""
    return unpack_bits(qweight, bits, in_features, dim=0)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Zero codes as int32 ``[n_groups, out]``."""
    return unpack_bits(qzeros, bits, out_features, dim=1)


def shift_zero_codes(qzeros: torch.Tensor, bits: int, out_features: int, delta: int) -> torch.Tensor:
    """Repack ``qzeros`` with every zero code moved by ``delta`` modulo ``2**bits``: ``+1`` reads a v1
    (``z - 1``) checkpoint, ``-1`` writes one. Modulo, because v1 writers store ``z = 0`` as all ones."""
    z = (unpack_qzeros(qzeros, bits, out_features) + delta) % (1 << bits)
    return pack_bits(z, bits, dim=1)


def dequantize_layout(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    in_features: int,
) -> torch.Tensor:
    """The float weight ``[out, in]`` in the dtype of ``scales`` (the reference every kernel is tested against)."""
    out_features = scales.shape[1]
    q = unpack_qweight(qweight, bits, in_features)  # [in, out]
    z = unpack_qzeros(qzeros, bits, out_features)  # [g, out]
    gi = g_idx.long()
    w = (q - z[gi]).to(torch.float32) * scales[gi].to(torch.float32)
    return w.t().to(scales.dtype).contiguous()


class QuantizedWeight:
    """The output of a weight quantization method (RTN, GPTQ): unsigned codes and their group parameters.

    ``codes [out, in]`` and ``zeros [out, n_groups]`` are unsigned int32 codes in ``[0, 2**bits)``, ``scales``
    is ``[out, n_groups]`` in the storage dtype and ``g_idx [in]`` maps input columns to groups.
    """

    __slots__ = ("codes", "scales", "zeros", "g_idx", "bits", "group_size")

    def __init__(self, codes, scales, zeros, g_idx, bits: int, group_size: int):
        check_bits(bits)
        self.codes, self.scales, self.zeros, self.g_idx = codes, scales, zeros, g_idx
        self.bits, self.group_size = bits, group_size

    def pack(self) -> dict[str, torch.Tensor]:
        return pack_layout(self.codes, self.zeros, self.scales, self.g_idx, self.bits)

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Output rows ``start:stop`` (views of the codes and group parameters; ``g_idx`` shared)."""
        return QuantizedWeight(self.codes[start:stop], self.scales[start:stop], self.zeros[start:stop], self.g_idx,
                               self.bits, self.group_size)

    def dequantize(self) -> torch.Tensor:
        gi = self.g_idx.long()
        w = (self.codes - self.zeros[:, gi]).to(torch.float32) * self.scales[:, gi].to(torch.float32)
        return w.to(self.scales.dtype)
