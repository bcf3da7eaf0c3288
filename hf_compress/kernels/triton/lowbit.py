"""Triton kernels for packed ternary (1.58-bit) and binary (1-bit) linear layers, imported lazily.

:func:`lowbit_linear_triton` computes :func:`hf_compress.quant.lowbit.lowbit_linear_reference` in two launches
(three with split-K):

1. ``x' = x * in_scale`` (torch, only when ``in_scale`` is given), then the row quantizer of
   :mod:`.int8` (``quantize_rows``: absmax / 127 per row, round half to even, clamp to +-127, the arithmetic
   of ``quant/int8.py``). Its ``smooth`` vector is a *divisor* (``x / smooth``), and ``x * s`` differs from
   ``x / (1 / s)`` in the last bit, so the product is formed first with torch's float32 multiply, exactly as
   the reference forms it.
2. :func:`_lowbit_matmul`: each program owns a ``[BLOCK_M, BLOCK_N]`` output tile and walks its share of the
   packed bytes ``BLOCK_KB`` at a time. Byte ``c`` of a row holds, at bits ``s*bits``, the weight of column
   ``(c // 64) * 64 * per_byte + 64 * s + c % 64`` (see ``quant/lowbit.py``), so one loaded byte tile gives,
   per shift ``s``, the weights of ``BLOCK_KB`` columns that come in runs of 64 consecutive ones; the
   matching int8 activations are gathered with the same column formula. Codes are unpacked in registers
   (shift, mask, ``code - 1`` for ternary, ``2 * code - 1`` for binary) and accumulated exactly in int32:

   - GEMM (``USE_DOT``, the default for ``M > GEMV_MAX_M``): ``tl.dot`` of int8 ``[BLOCK_M, BLOCK_KB]`` x
     int8 ``[BLOCK_KB, BLOCK_N]`` tiles with int32 accumulation, ``per_byte`` dots per byte tile.
   - GEMV (decode, ``M <= GEMV_MAX_M``): a broadcast multiply and reduce over ``[BLOCK_M, BLOCK_N,
     BLOCK_KB]`` with the weight bytes read along their contiguous axis (a 16-row ``tl.dot`` tile would
     waste most of its rows).

   Either variant may split ``K`` over ``SPLIT_K`` programs (chosen when the output tiles alone would not
   fill the GPU): the int32 partial sums go to a ``[SPLIT_K, M, N]`` buffer that :func:`_splitk_epilogue`
   adds up (still exact) before the epilogue; without a split the epilogue is fused.
   Epilogue, in float32: ``acc * row_scale[:, None] * w_scale[None, :] + bias``, one cast to ``x.dtype``.

Block sizes (:func:`pick_config`, a heuristic rather than autotuning so that it runs the same in the
interpreter; every key can be overridden through ``**config``). They are not timed on a GPU yet: they were
chosen so that ptxas reports no register spills for sm_80 and sm_90 and the loads vectorize (16-byte weight
loads in the GEMV, wgmma on sm_90):

- GEMV: ``BLOCK_M = next_pow2(M)`` (1, 2, 4), ``BLOCK_N = 32``, ``BLOCK_KB = 8192 / (BLOCK_M * BLOCK_N)``
  bytes (256, 128, 64: the int32 product tile stays at 8192 values), 4 warps, 2 stages.
- GEMM, ``(BLOCK_M, BLOCK_N, BLOCK_KB, warps)``: ``M <= 16``: (16, 64, 64, 4); ``M <= 32``: (32, 64, 64, 4);
  ``M <= 64``: (64, 128, 32, 4); larger: (128, 128, 32, 8) ternary, (64, 128, 32, 8) binary (8 unpacked
  tiles per byte tile spill at 128 x 128 on sm_80); 3 stages. ``BLOCK_KB`` bytes are ``4 * BLOCK_KB``
  ternary or ``8 * BLOCK_KB`` binary input columns per step, in dots of ``K = BLOCK_KB`` (at least 32, the
  smallest int8 ``tl.dot`` on NVIDIA GPUs).
- ``SPLIT_K``: when there are fewer output tiles than SMs, ``next_pow2(2 * SMs / tiles)``, at most 16 and
  at most the number of ``BLOCK_KB`` steps.

In Triton's interpreter (``TRITON_INTERPRET=1``, how the tests run without a GPU) smaller tiles are used
so that small shapes still span several tiles, steps and splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...quant.lowbit import BLOCK_BYTES, padded_width
from .gptq import _cdiv, _next_pow2, _sm_count, interpreting
from .int8 import _check_device, quantize_rows

__all__ = ["GEMV_MAX_M", "lowbit_linear_triton", "pick_config"]

# Up to this many activation rows the GEMV variant runs by default (decode batches).
GEMV_MAX_M = 4

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _epilogue(
    acc,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    rs_ptr,
    ws_ptr,
    bias_ptr,
    out_ptr,
    stride_ws,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
):
    """``out = acc * row_scale * w_scale (+ bias)`` in float32, stored in the output's dtype."""
    rs = tl.load(rs_ptr + offs_m, mask=mask_m, other=0.0)
    ws = tl.load(ws_ptr + offs_n * stride_ws, mask=mask_n, other=0.0)  # stride 0: one scale per tensor
    out = acc.to(tl.float32) * rs[:, None] * ws[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        out += b.to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lowbit_matmul(
    q_ptr,
    rs_ptr,
    w_ptr,
    ws_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    KB,
    KB_PER_SPLIT,
    stride_qm,
    stride_qk,
    stride_wn,
    stride_wk,
    stride_ws,
    stride_os,
    stride_om,
    stride_on,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
    USE_DOT: tl.constexpr,
    PARTIAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 8 // BITS
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    q_rows = q_ptr + offs_m.to(tl.int64)[:, None] * stride_qm
    w_rows = w_ptr + offs_n.to(tl.int64) * stride_wn

    # Steps start at multiples of BLOCK_KB (KB_PER_SPLIT is a multiple of it), so the input column of bits 0
    # of byte kb0 + r is col(kb0) + col(r), col(c) = (c // 64) * 64 * PER_BYTE + c % 64: a scalar plus a
    # pattern of 64-column runs that the compiler can see (vectorized activation loads).
    r = tl.arange(0, BLOCK_KB)
    col_r = (r // 64) * (64 * PER_BYTE) + r % 64
    kb_begin = pid_k * KB_PER_SPLIT
    kb_end = tl.minimum(kb_begin + KB_PER_SPLIT, KB)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kb0 in range(kb_begin, kb_end, BLOCK_KB):
        mask_b = kb0 + r < kb_end
        if USE_DOT:  # [BLOCK_KB, BLOCK_N], the dot's right operand
            wb = tl.load(
                w_rows[None, :] + (kb0 + r)[:, None] * stride_wk, mask=mask_b[:, None] & mask_n[None, :], other=0
            )
        else:  # [BLOCK_N, BLOCK_KB], reduced along the bytes' contiguous axis
            wb = tl.load(
                w_rows[:, None] + (kb0 + r)[None, :] * stride_wk, mask=mask_n[:, None] & mask_b[None, :], other=0
            )
        col_base = (kb0 // 64) * (64 * PER_BYTE) + kb0 % 64
        for s in tl.static_range(PER_BYTE):
            cols = col_base + 64 * s + col_r
            # Padded columns (>= K) meet zero activations, whatever their code; so do bytes outside this split.
            a = tl.load(
                q_rows + cols[None, :] * stride_qk, mask=mask_m[:, None] & (mask_b & (cols < K))[None, :], other=0
            )
            code = ((wb >> (s * BITS)) & CODE_MASK).to(tl.int32)
            if BITS == 2:
                w = code - 1  # ternary: code = w + 1
            else:
                w = 2 * code - 1  # binary: bit 1 = +1, bit 0 = -1
            if USE_DOT:
                acc = tl.dot(a, w.to(tl.int8), acc, out_dtype=tl.int32)
            else:
                acc += tl.sum(a.to(tl.int32)[:, None, :] * w[None, :, :], axis=2)

    if PARTIAL:  # split-K: exact int32 partial sums, reduced by _splitk_epilogue
        part_ptrs = out_ptr + pid_k * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(part_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])
    else:
        _epilogue(
            acc,
            offs_m,
            offs_n,
            mask_m,
            mask_n,
            rs_ptr,
            ws_ptr,
            bias_ptr,
            out_ptr,
            stride_ws,
            stride_om,
            stride_on,
            HAS_BIAS,
        )


@triton.jit
def _splitk_epilogue(
    part_ptr,
    rs_ptr,
    ws_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    SPLIT,
    stride_ps,
    stride_pm,
    stride_pn,
    stride_ws,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    ptrs = part_ptr + offs_m.to(tl.int64)[:, None] * stride_pm + offs_n[None, :] * stride_pn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for s in range(SPLIT):
        acc += tl.load(ptrs + s * stride_ps, mask=mask, other=0)
    _epilogue(
        acc,
        offs_m,
        offs_n,
        mask_m,
        mask_n,
        rs_ptr,
        ws_ptr,
        bias_ptr,
        out_ptr,
        stride_ws,
        stride_om,
        stride_on,
        HAS_BIAS,
    )


def pick_config(m: int, n: int, kb: int, bits: int, device: torch.device) -> dict:
    """Heuristic tile sizes for ``M`` rows, ``N`` outputs, ``kb`` packed bytes per weight row and ``bits``
    (module docstring). Keys: ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_KB`` (packed bytes per step, a power of two),
    ``SPLIT_K``, ``USE_DOT``, ``num_warps``, ``num_stages``."""
    interpret = interpreting()
    if m <= GEMV_MAX_M:
        bm = _next_pow2(m)
        bn = 16 if interpret else 32
        bkb = 32 if interpret else 8192 // (bm * bn)
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KB": bkb, "USE_DOT": False, "num_warps": 4, "num_stages": 2}
    elif interpret:
        cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_KB": 32, "USE_DOT": True, "num_warps": 4, "num_stages": 3}
    else:
        # (BLOCK_M, BLOCK_N, BLOCK_KB, num_warps): none of these spills registers on sm_80 or sm_90 (ptxas);
        # binary unpacks 8 tiles per byte tile, so its widest tile is narrower
        if m <= 16:
            bm, bn, bkb, warps = 16, 64, 64, 4
        elif m <= 32:
            bm, bn, bkb, warps = 32, 64, 64, 4
        elif m <= 64 or bits == 1:
            bm, bn, bkb, warps = 64, 128, 32, 4 if m <= 64 else 8
        else:
            bm, bn, bkb, warps = 128, 128, 32, 8
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KB": bkb, "USE_DOT": True, "num_warps": warps, "num_stages": 3}
    tiles = _cdiv(m, cfg["BLOCK_M"]) * _cdiv(n, cfg["BLOCK_N"])
    sms = _sm_count(device)
    split = 1
    if tiles < sms:
        split = max(1, min(_cdiv(kb, cfg["BLOCK_KB"]), 16, _next_pow2(max(1, 2 * sms // tiles))))
    cfg["SPLIT_K"] = split
    return cfg


def _is_pow2(v) -> bool:
    return isinstance(v, int) and v > 0 and v & (v - 1) == 0


def lowbit_linear_triton(
    x: Tensor,
    qweight: Tensor,
    w_scale: Tensor,
    in_scale: Tensor | None,
    bias: Tensor | None,
    bits: int,
    in_features: int,
    **config,
) -> Tensor:
    """:func:`hf_compress.quant.lowbit.lowbit_linear_reference` on CUDA tensors (CPU tensors in the interpreter).

    ``x [..., in_features]`` float16/bfloat16/float32 (any strides), ``qweight`` uint8 ``[N, K_pad / per_byte]``
    (``bits`` 2: ternary, 1: binary; layout in ``quant/lowbit.py``), ``w_scale`` ``[1]`` or ``[N]``,
    ``in_scale`` ``[in_features]`` or None, ``bias`` ``[N]`` or None -> ``[..., N]`` in ``x.dtype``.
    ``config`` overrides :func:`pick_config`'s keys (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_KB``, ``SPLIT_K``,
    ``USE_DOT``, ``num_warps``, ``num_stages``).
    """
    if bits not in (1, 2):
        raise ValueError(f"packed low-bit weights have bits 1 (binary) or 2 (ternary), got {bits}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    k = int(in_features)
    if k <= 0:
        raise ValueError(f"in_features must be positive, got {in_features}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features, the layer expects {k}")
    per_byte = 8 // bits
    kb = padded_width(k, bits) // per_byte
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != kb:
        raise ValueError(
            f"qweight must be uint8 [N, {kb}] (in_features={k} padded to whole {BLOCK_BYTES}-byte blocks at "
            f"{per_byte} weights a byte), got {qweight.dtype} of shape {tuple(qweight.shape)}"
        )
    n = qweight.shape[0]
    if w_scale.numel() not in (1, n):
        raise ValueError(f"w_scale must hold 1 (per tensor) or N={n} (per channel) values, got {w_scale.numel()}")
    if in_scale is not None and tuple(in_scale.shape) != (k,):
        raise ValueError(f"in_scale must be [in_features]={k}, got shape {tuple(in_scale.shape)}")
    if bias is not None:
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be [N]={n}, got shape {tuple(bias.shape)}")
        if not bias.dtype.is_floating_point:
            raise ValueError(f"bias must be a float tensor, got {bias.dtype}")

    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    cfg = pick_config(max(1, m), n, kb, bits, x.device)
    unknown = set(config) - set(cfg)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update(config)
    bm, bn, bkb = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_KB"]
    use_dot = bool(cfg["USE_DOT"])
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_KB"):
        if not _is_pow2(cfg[name]):
            raise ValueError(f"{name} must be a power of two, got {cfg[name]}")
    if use_dot and (min(bm, bn) < 16 or bkb < 32):  # 32: the least K of an int8 tl.dot on NVIDIA GPUs
        raise ValueError(f"the tl.dot variant needs BLOCK_M, BLOCK_N >= 16 and BLOCK_KB >= 32, got {bm}, {bn}, {bkb}")
    _check_device(*(t for t in (x, qweight, w_scale, in_scale, bias) if t is not None))

    if m == 0 or n == 0:
        return x.new_zeros((*lead, n))

    # 1. int8 rows (see the module docstring for why in_scale is applied here and not as `smooth`)
    xs = x2 if in_scale is None else x2.float() * in_scale.float()
    q, row_scale = quantize_rows(xs)

    # 2. the packed GEMV / GEMM
    ws = w_scale.reshape(-1).float().contiguous()
    stride_ws = 0 if ws.numel() == 1 else 1
    bias_arg = bias.contiguous() if bias is not None else ws  # any pointer when unused
    interpret = interpreting()
    # The interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest even): give it an fp32 output.
    out_dtype = torch.float32 if interpret and x.dtype == torch.bfloat16 else x.dtype
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)

    kb_per_split = _cdiv(_cdiv(kb, max(1, int(cfg["SPLIT_K"]))), bkb) * bkb  # whole BLOCK_KB steps per split
    split = _cdiv(kb, kb_per_split)
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.int32, device=x.device)
    launch = {} if interpret else {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    _lowbit_matmul[grid](
        q,
        row_scale,
        qweight,
        ws,
        bias_arg,
        target,
        m,
        n,
        k,
        kb,
        kb_per_split,
        q.stride(0),
        q.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        stride_ws,
        target.stride(0) if split > 1 else 0,
        target.stride(-2),
        target.stride(-1),
        BITS=bits,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_KB=bkb,
        USE_DOT=use_dot,
        PARTIAL=split > 1,
        HAS_BIAS=bias is not None,
        **launch,
    )
    if split > 1:
        em, en = min(16, _next_pow2(m)), min(128, max(16, _next_pow2(n)))
        _splitk_epilogue[(triton.cdiv(m, em), triton.cdiv(n, en))](
            target,
            row_scale,
            ws,
            bias_arg,
            out,
            m,
            n,
            split,
            target.stride(0),
            target.stride(1),
            target.stride(2),
            stride_ws,
            out.stride(0),
            out.stride(1),
            HAS_BIAS=bias is not None,
            BLOCK_M=em,
            BLOCK_N=en,
            **({} if interpret else {"num_warps": 4}),
        )
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out.reshape(*lead, n)
