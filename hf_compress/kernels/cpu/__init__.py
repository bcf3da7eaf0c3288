"""CPU fast paths built on PyTorch's weight-only int8/int4 matmul kernels.

Both kernels take bf16 activations (fp32 activations are cast to bf16 and the result cast back: with fp32
activations the same ops are several times slower than an fp32 matmul, measured on torch 2.13).

``cpu-int8`` (bits 8, one group): ``torch._weight_int8pack_mm(x [M,K] bf16, w [N,K] int8, s [N] bf16)``
computes ``x @ (w*s).T``. Our codes are unsigned with a zero code ``z`` per row:
``(q - z)*s = (q - 128)*s + (128 - z)*s``, so the kernel gets ``q - 128`` and a per-row correction
``x.sum(-1) * (128 - z)*s`` is added in fp32 when some ``z != 128`` (symmetric int8 needs none).
The kernel returns wrong results unless ``K % 16 == 0`` and segfaults unless ``K % 4 == 0`` (measured), so
``K`` is padded with zero codes (and ``x`` with zero columns) to a multiple of 16. From
``INT8_DEQUANT_MIN_ROWS`` rows on (prefill) the int8 weight is expanded to a transient bf16 matrix for one
bf16 GEMM instead: the kernel's cost grows like M GEMVs (measured crossover ~28 rows at 2048x5632).

``cpu-int4`` (bits 2, 3, 4): ``torch._convert_weight_to_int4pack_for_cpu(w [N,K] int32 codes 0..15)``
then ``torch._weight_int4pack_mm_for_cpu(x, packed, group, sz)`` with ``sz [K/group, N, 2]`` (x's dtype)
holding ``(scale, zero)`` per block and computing ``w = (q - 8)*scale + zero``. With ``zero = s*(8 - z)``
that is our ``(q - z)*s`` for 4-bit codes. 2- and 3-bit codes go through the same kernel with the zero
code folded into the codes instead (``q - z + 8`` lies in 1..15, ``zero = 0``), which avoids a large bf16
zero term. Constraints (measured): ``group`` in {32, 64, 128, 256} dividing ``K``; ``N % 16 == 0``. We
pick the kernel group size that keeps every kernel block inside one of our groups with the least ``K``
padding (largest group on ties), pad ``N`` to a multiple of 16 (rows sliced off the output) and ``K`` to a
multiple of the kernel group (zero activations), and sort the input columns of an act-order ``g_idx`` once
so groups are contiguous (``x`` columns are permuted the same way at run time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..unpack import unpack_qweight, unpack_qzeros

INT4_GROUPS = (256, 128, 64, 32)
FAST_DTYPES = (torch.float32, torch.bfloat16)
INT8_K_MULTIPLE = 16
INT4_N_MULTIPLE = 16
# Above this many rows the int kernels lose to dequantize-to-bf16 + a bf16 GEMM (see ``int8_linear``).
INT8_DEQUANT_MIN_ROWS = 32


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


def int8_available() -> bool:
    return _has_op("_weight_int8pack_mm")


def int4_available() -> bool:
    return _has_op("_weight_int4pack_mm_for_cpu") and _has_op("_convert_weight_to_int4pack_for_cpu")


# ---------------------------------------------------------------------------------------------- int8
def int8_unsupported(bits: int, n_groups: int) -> str | None:
    """Why ``cpu-int8`` cannot run this layer (``None`` when it can)."""
    if not int8_available():
        return "this torch build has no aten::_weight_int8pack_mm"
    if bits != 8:
        return f"cpu-int8 needs bits=8, got {bits}"
    if n_groups != 1:
        return f"cpu-int8 needs one scale per output row (group_size=-1), got {n_groups} groups"
    return None


def prepare_int8(qweight, qzeros, scales, bits: int, in_features: int) -> dict:
    out_features = scales.shape[1]
    q = unpack_qweight(qweight, bits, in_features)  # [K, N] codes 0..255
    z = unpack_qzeros(qzeros, bits, out_features)[0]  # [N]
    w = (q - 128).t().to(torch.int8)
    pad = -in_features % INT8_K_MULTIPLE
    if pad:
        w = F.pad(w, (0, pad))
    s = scales[0].to(torch.float32)
    corr = None
    if bool((z != 128).any()):
        corr = ((128 - z).to(torch.float32) * s).contiguous()
    return {
        "w_int8": w.contiguous(),
        "scale_bf16": s.to(torch.bfloat16).contiguous(),
        "zero_corr": corr,
        "pad_k": pad,
    }


def int8_linear(x, bias, w_int8, scale_bf16, zero_corr, pad_k: int) -> torch.Tensor:
    """``x [..., K]`` (fp32 or bf16) -> ``[..., N]`` in ``x.dtype``."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    xb = x2 if x2.dtype == torch.bfloat16 else x2.to(torch.bfloat16)
    if pad_k:
        xb = F.pad(xb, (0, pad_k))
    if not xb.is_contiguous():
        xb = xb.contiguous()
    if xb.shape[0] >= INT8_DEQUANT_MIN_ROWS:
        # Prefill-sized batches: the int8 kernel costs ~M GEMVs; a transient bf16 weight + GEMM is faster.
        w = w_int8.to(torch.bfloat16).mul_(scale_bf16.unsqueeze(1))
        y = torch.mm(xb, w.t())
    else:
        y = torch._weight_int8pack_mm(xb, w_int8, scale_bf16)
    if zero_corr is not None:
        xs = x2.sum(-1, keepdim=True, dtype=torch.float32)
        y = torch.addcmul(y.to(torch.float32), xs, zero_corr.unsqueeze(0))
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if bias is not None:
        y = y.add_(bias if bias.dtype == y.dtype else bias.to(y.dtype))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], w_int8.shape[0])


# ---------------------------------------------------------------------------------------------- int4
def plan_int4_groups(g_idx: torch.Tensor, n_groups: int, in_features: int) -> dict | str:
    """The kernel grouping for ``g_idx``: a dict, or the reason no supported grouping exists.

    ``perm`` (or ``None``) sorts the input columns by group; ``group_k`` is the kernel group size;
    ``k_padded`` the padded ``K``; ``block_group [k_padded/group_k]`` our group index of each kernel block.
    """
    gi = g_idx.to(torch.int64)
    if gi.numel() != in_features:
        return f"g_idx has {gi.numel()} entries for in_features={in_features}"
    if in_features == 0:
        return "in_features=0"
    if int(gi.min()) < 0 or int(gi.max()) >= n_groups:
        return f"g_idx values outside [0, {n_groups})"
    perm = None
    if in_features > 1 and bool((gi[1:] < gi[:-1]).any()):
        perm = torch.argsort(gi, stable=True)
        gi = gi[perm]
    best = None
    for gk in INT4_GROUPS:  # largest first: ties on padding keep the largest group
        kp = -(-in_features // gk) * gk
        padded = torch.cat([gi, gi[-1:].expand(kp - in_features)])
        blocks = padded.view(-1, gk)
        if bool((blocks == blocks[:, :1]).all()) and (best is None or kp < best["k_padded"]):
            best = {"perm": perm, "group_k": gk, "k_padded": kp, "block_group": blocks[:, 0].contiguous()}
    if best is None:
        return (
            "cpu-int4 needs every group to be a whole number of 32-column blocks "
            f"(kernel groups {list(INT4_GROUPS)}), which this g_idx does not allow"
        )
    return best


def int4_unsupported(bits: int, plan: dict | str | None) -> str | None:
    if not int4_available():
        return "this torch build has no aten::_weight_int4pack_mm_for_cpu"
    if bits not in (2, 3, 4):
        return f"cpu-int4 needs bits in (2, 3, 4), got {bits}"
    if isinstance(plan, str):
        return plan
    return None


def prepare_int4(qweight, qzeros, scales, bits: int, in_features: int, plan: dict) -> dict:
    out_features = scales.shape[1]
    n_padded = -(-out_features // INT4_N_MULTIPLE) * INT4_N_MULTIPLE
    q = unpack_qweight(qweight, bits, in_features)  # [K, N]
    z = unpack_qzeros(qzeros, bits, out_features)  # [G, N]
    perm, gk, kp, block_group = plan["perm"], plan["group_k"], plan["k_padded"], plan["block_group"]
    if perm is not None:
        q = q[perm]
    s = scales.to(torch.float32)
    if bits <= 3:
        # q - z lies in [-7, 7]: fold the zero code into the codes (q - z + 8 in 1..15) so the kernel's zero
        # term is exactly 0. Keeping zero = s*(8 - z) would cancel against (q - 8)*s ~ 8s and the bf16
        # rounding of that zero term would cost ~1% of a 2-bit weight.
        gi = block_group.repeat_interleave(gk)[:in_features]
        q = q - z[gi] + 8
        zp = torch.zeros_like(s)
    else:
        zp = s * (8 - z).to(torch.float32)  # w = (q - 8)*s + s*(8 - z) = (q - z)*s
    codes = torch.full((n_padded, kp), 8, dtype=torch.int32, device=q.device)
    codes[:out_features, :in_features] = q.t()
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
    sz = torch.zeros((kp // gk, n_padded, 2), dtype=torch.float32, device=q.device)
    sz[:, :out_features, 0] = s[block_group]
    sz[:, :out_features, 1] = zp[block_group]
    return {
        "packed": packed,
        "scales_zeros": sz.to(torch.bfloat16).contiguous(),
        "perm": perm,
        "group_k": gk,
        "pad_k": kp - in_features,
        "out_features": out_features,
    }


def int4_linear(x, bias, packed, scales_zeros, perm, group_k: int, pad_k: int, out_features: int) -> torch.Tensor:
    """``x [..., K]`` (fp32 or bf16) -> ``[..., N]`` in ``x.dtype`` (the decode hot path: no needless copies)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if perm is not None:
        x2 = x2.index_select(1, perm)
    if x2.dtype != torch.bfloat16:
        x2 = x2.to(torch.bfloat16)
    if pad_k:
        x2 = F.pad(x2, (0, pad_k))
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch._weight_int4pack_mm_for_cpu(x2, packed, group_k, scales_zeros)
    if y.shape[1] != out_features:
        y = y[:, :out_features]
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if bias is not None:
        y = y + (bias if bias.dtype == y.dtype else bias.to(y.dtype))
    elif not y.is_contiguous():
        y = y.contiguous()
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)
