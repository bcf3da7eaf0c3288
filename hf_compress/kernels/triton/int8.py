"""Triton kernels for int8-activation x int8-weight linear layers (W8A8, LLM.int8), imported lazily.

Two launches make ``x @ W.T`` for an int8 weight ``W [N, K]`` with per-output-row scales ``w_scale [N]``:

- :func:`quantize_rows`: activations ``x [M, K]`` -> ``(q int8 [M, K], row_scale float32 [M])``, optionally
  divided by SmoothQuant's per-channel ``smooth [K]`` and with LLM.int8's outlier columns zeroed (they run
  in float elsewhere). Each program owns ``BLOCK_M`` rows and walks ``K`` twice in ``BLOCK_K`` chunks (the
  absmax, then the codes), so any ``K`` works. The arithmetic is the reference's (``quant/int8.py``):
  IEEE float32 divisions (``div_rn``: a plain ``/`` may be approximate on GPUs), ``absmax / 127`` (1 for
  rows of zeros), round half to even, clamp to ``[-127, 127]``.
- :func:`int8_matmul`: a tiled GEMM, ``tl.dot`` on int8 tiles with int32 accumulation (exact), and a fused
  fp32 epilogue ``acc * row_scale[:, None] * w_scale[None, :] + bias`` with one cast at the end. Tile sizes
  come from a small ``triton.autotune`` list keyed on power-of-two buckets of ``M`` (small-``M`` configs for
  decode) and on ``N``, ``K``; in Triton's interpreter a fixed heuristic config runs instead (timing configs
  there would only cost time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gptq import _next_pow2, interpreting

__all__ = ["int8_matmul", "quantize_rows"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------- quantize
@triton.jit
def _round_half_even(y):
    """Round float32 ``y`` (``|y| < 2**23``) half to even, as int32, without libdevice (the interpreter
    has none): truncate, then step away from zero when the exact fraction is above one half, or is one
    half and the truncated value is odd."""
    t = y.to(tl.int32)  # toward zero
    frac = y - t.to(tl.float32)  # exact for |y| < 2**23
    afrac = tl.abs(frac)
    up = (afrac > 0.5) | ((afrac == 0.5) & ((t & 1) != 0))
    step = tl.where(frac < 0, -1, 1)
    return t + tl.where(up, step, 0)


@triton.jit
def _load_rows(
    x_rows,
    mask_m,
    smooth_ptr,
    outlier_ptr,
    k0,
    K,
    stride_xk,
    HAS_SMOOTH: tl.constexpr,
    HAS_OUTLIERS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``v = x / smooth`` with outlier columns zeroed, float32 ``[BLOCK_M, BLOCK_K]`` (0 outside the tensor)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    v = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    v = v.to(tl.float32)
    if HAS_SMOOTH:
        s = tl.load(smooth_ptr + offs_k, mask=mask_k, other=1.0)
        v = tl.math.div_rn(v, s[None, :])
    if HAS_OUTLIERS:
        o = tl.load(outlier_ptr + offs_k, mask=mask_k, other=0)
        v = tl.where(o[None, :] != 0, 0.0, v)
    return v, offs_k, mask_k


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    smooth_ptr,
    outlier_ptr,
    scale_ptr,
    q_ptr,
    rs_ptr,
    M,
    K,
    stride_xm,
    stride_xk,
    stride_qm,
    stride_qk,
    stride_sm,
    HAS_SMOOTH: tl.constexpr,
    HAS_OUTLIERS: tl.constexpr,
    STATIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    q_rows = q_ptr + offs_m.to(tl.int64)[:, None] * stride_qm

    if STATIC:
        scale = tl.load(scale_ptr + offs_m * stride_sm, mask=mask_m, other=1.0).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v, offs_k, mask_k = _load_rows(
                x_rows, mask_m, smooth_ptr, outlier_ptr, k0, K, stride_xk, HAS_SMOOTH, HAS_OUTLIERS, BLOCK_K
            )
            amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
        scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full((BLOCK_M,), 127.0, tl.float32)), 1.0)
    tl.store(rs_ptr + offs_m, scale, mask=mask_m)

    for k0 in range(0, K, BLOCK_K):
        v, offs_k, mask_k = _load_rows(
            x_rows, mask_m, smooth_ptr, outlier_ptr, k0, K, stride_xk, HAS_SMOOTH, HAS_OUTLIERS, BLOCK_K
        )
        y = tl.math.div_rn(v, scale[:, None])
        y = tl.minimum(tl.maximum(y, -127.0), 127.0)  # clamping first rounds the same: the bounds are integers
        q = _round_half_even(y)
        tl.store(q_rows + offs_k[None, :] * stride_qk, q.to(tl.int8), mask=mask_m[:, None] & mask_k[None, :])


def _quantize_config(m: int, k: int) -> dict:
    # Small chunks in the interpreter so that small test shapes still walk several of them.
    bk = min(max(16, _next_pow2(k)), 64 if interpreting() else 1024)
    bm = max(1, min(_next_pow2(m), 8 if interpreting() else max(1, 4096 // bk), 16))
    return {"BLOCK_M": bm, "BLOCK_K": bk, "num_warps": 8 if bm * bk >= 4096 else 4}


# ------------------------------------------------------------------------------------------------- matmul
def _mm_configs() -> list:
    def cfg(bm, bn, bk, warps, stages):
        return triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages
        )

    return [
        # decode / small batches: weight-bandwidth bound, narrow N tiles give more programs
        cfg(16, 32, 256, 4, 4),
        cfg(16, 64, 128, 4, 4),
        cfg(16, 128, 128, 4, 4),
        cfg(32, 64, 128, 4, 4),
        cfg(32, 128, 128, 4, 4),
        # prefill
        cfg(64, 128, 128, 4, 4),
        cfg(128, 64, 128, 4, 4),
        cfg(128, 128, 128, 8, 3),
        cfg(128, 256, 128, 8, 3),
        cfg(256, 128, 128, 8, 3),
    ]


def _prune_mm_configs(configs, named_args, **kwargs):
    """Drop configs whose ``BLOCK_M`` is more than twice the (bucketed) ``M``: they only waste the tile."""
    m = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, 2 * m)]
    return kept or configs[:1]


@triton.jit
def _int8_matmul_kernel(
    q_ptr,
    rs_ptr,
    w_ptr,
    ws_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    stride_qm,
    stride_qk,
    stride_wn,
    stride_wk,
    stride_rs,
    stride_ws,
    stride_b,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped ordering: GROUP_M row tiles share each column tile of W while it is in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = q_ptr + offs_m.to(tl.int64)[:, None] * stride_qm + offs_k[None, :] * stride_qk
    b_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_qk
        b_ptrs += BLOCK_K * stride_wk

    rs = tl.load(rs_ptr + offs_m * stride_rs, mask=mask_m, other=0.0)
    ws = tl.load(ws_ptr + offs_n * stride_ws, mask=mask_n, other=0.0)
    out = acc.to(tl.float32) * rs[:, None] * ws[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n * stride_b, mask=mask_n, other=0.0)
        out += b.to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_int8_matmul_tuned = triton.autotune(
    configs=_mm_configs(),
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": _prune_mm_configs},
)(_int8_matmul_kernel)


def _matmul_config(m: int) -> dict:
    """The interpreter's fixed config (no autotuning there): small tiles so that test shapes still span
    several tiles and ``K`` blocks."""
    return {"BLOCK_M": 16 if m <= 32 else 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2}


# ----------------------------------------------------------------------------------------------- wrappers
def _check_device(*tensors: Tensor) -> None:
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError(
            "the triton int8 kernels run CUDA tensors; CPU tensors need the Triton interpreter "
            "(set TRITON_INTERPRET=1 before triton is first imported)"
        )


def _check_vector(t: Tensor, name: str, length: int, what: str) -> None:
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must be a 1-D tensor of {length} values ({what}), got shape {tuple(t.shape)}")


def quantize_rows(
    x: Tensor, smooth: Tensor | None = None, scale: Tensor | None = None, outlier_cols: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``x [M, K]`` float16/bfloat16/float32 (any strides) -> ``(q int8 [M, K], row_scale float32 [M])``.

    ``v = x.float() / smooth[None, :]`` (``smooth``: SmoothQuant's divisor ``[K]``, optional), then
    ``v[:, outlier_cols] = 0`` (``outlier_cols``: bool ``[K]``, optional: LLM.int8's outlier columns run in
    float elsewhere). Dynamic (``scale`` None): ``row_scale = absmax_k |v| / 127``, 1 for rows of zeros.
    Static: ``scale`` is a float32 0-d tensor used for every row (a ``[M]`` tensor gives one per row).
    ``q = clamp(round_half_to_even(v / row_scale[:, None]), -127, 127)``.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    m, k = x.shape
    tensors = [x]
    if smooth is not None:
        _check_vector(smooth, "smooth", k, "one divisor per input feature")
        if smooth.dtype != torch.float32:
            raise ValueError(f"smooth must be float32, got {smooth.dtype}")
        tensors.append(smooth)
    if outlier_cols is not None:
        _check_vector(outlier_cols, "outlier_cols", k, "one flag per input feature")
        if outlier_cols.dtype != torch.bool:
            raise ValueError(f"outlier_cols must be a bool mask, got {outlier_cols.dtype}")
        tensors.append(outlier_cols)
    if scale is not None:
        if scale.dtype != torch.float32:
            raise ValueError(f"scale must be float32, got {scale.dtype}")
        if scale.dim() != 0 and tuple(scale.shape) != (m,):
            raise ValueError(
                f"scale must be a 0-d tensor (one scale for all rows) or [M]={m}, got {tuple(scale.shape)}"
            )
        tensors.append(scale)
    _check_device(*tensors)

    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    row_scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, row_scale
    smooth_arg = smooth.contiguous() if smooth is not None else row_scale  # any pointer when unused
    outlier_arg = outlier_cols.contiguous().view(torch.uint8) if outlier_cols is not None else row_scale
    scale_arg = scale if scale is not None else row_scale
    stride_sm = scale.stride(0) if scale is not None and scale.dim() else 0
    cfg = _quantize_config(m, k)
    launch = {} if interpreting() else {"num_warps": cfg["num_warps"]}
    grid = (triton.cdiv(m, cfg["BLOCK_M"]),)
    _quantize_rows_kernel[grid](
        x,
        smooth_arg,
        outlier_arg,
        scale_arg,
        q,
        row_scale,
        m,
        k,
        x.stride(0),
        x.stride(1),
        q.stride(0),
        q.stride(1),
        stride_sm,
        HAS_SMOOTH=smooth is not None,
        HAS_OUTLIERS=outlier_cols is not None,
        STATIC=scale is not None,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_K=cfg["BLOCK_K"],
        **launch,
    )
    return q, row_scale


def int8_matmul(
    q: Tensor, row_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """``q int8 [M, K]``, ``row_scale float32 [M]``, ``w int8 [N, K]`` (as stored), ``w_scale float32 [N]``,
    ``bias [N]`` (any float dtype) or None -> ``[M, N]`` in ``out_dtype``:
    ``(q @ w.T in int32) * row_scale[:, None] * w_scale[None, :] + bias``, the epilogue in float32."""
    return _int8_matmul(q, row_scale, w, w_scale, bias, out_dtype)


def _int8_matmul(q, row_scale, w, w_scale, bias, out_dtype, config: dict | None = None) -> Tensor:
    """:func:`int8_matmul`; ``config`` (``BLOCK_M/N/K``, ``GROUP_M``, optionally ``num_warps``/``num_stages``)
    skips autotuning."""
    if q.dim() != 2 or q.dtype != torch.int8:
        raise ValueError(f"q must be int8 [M, K], got {q.dtype} of shape {tuple(q.shape)}")
    if w.dim() != 2 or w.dtype != torch.int8:
        raise ValueError(f"w must be int8 [N, K] (the stored weight codes), got {w.dtype} of shape {tuple(w.shape)}")
    m, k = q.shape
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"q has K={k} input features but w has {w.shape[1]} (w must be [N, K], not transposed)")
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    _check_vector(row_scale, "row_scale", m, "one scale per row of q")
    _check_vector(w_scale, "w_scale", n, "one scale per output feature")
    for name, t in (("row_scale", row_scale), ("w_scale", w_scale)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
    tensors = [q, row_scale, w, w_scale]
    if bias is not None:
        _check_vector(bias, "bias", n, "one per output feature")
        if not bias.dtype.is_floating_point:
            raise ValueError(f"bias must be a float tensor, got {bias.dtype}")
        tensors.append(bias)
    _check_device(*tensors)

    interpret = interpreting()
    # The interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest even): give it an fp32 output.
    direct_dtype = torch.float32 if interpret and out_dtype == torch.bfloat16 else out_dtype
    out = torch.empty((m, n), dtype=direct_dtype, device=q.device)
    if m == 0 or n == 0:
        return out.to(out_dtype)
    bias_arg = bias if bias is not None else w_scale  # any pointer when unused
    m_bucket = min(max(16, _next_pow2(m)), 4096)
    args = (
        q,
        row_scale,
        w,
        w_scale,
        bias_arg,
        out,
        m,
        n,
        k,
        m_bucket,
        q.stride(0),
        q.stride(1),
        w.stride(0),
        w.stride(1),
        row_scale.stride(0),
        w_scale.stride(0),
        bias_arg.stride(0),
        out.stride(0),
        out.stride(1),
    )
    if config is None and not interpret:

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _int8_matmul_tuned[grid](*args, HAS_BIAS=bias is not None)
    else:
        cfg = dict(_matmul_config(m))
        cfg.update(config or {})
        launch = {}
        if not interpret:
            launch = {"num_warps": cfg.pop("num_warps", 4), "num_stages": cfg.pop("num_stages", 3)}
        cfg.pop("num_warps", None)
        cfg.pop("num_stages", None)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _int8_matmul_kernel[grid](*args, HAS_BIAS=bias is not None, **cfg, **launch)
    return out if out.dtype == out_dtype else out.to(out_dtype)
