"""The Triton kernel: ``out = x @ W.T (+ bias)`` with ``W`` dequantized on the fly from the GPTQ layout.

Every program owns a ``[BLOCK_M, BLOCK_N]`` output tile and walks its share of ``K`` in ``BLOCK_K`` steps.
For each input column ``k`` it reads ``g = g_idx[k]`` (so act-order permutations work), the code from bit
``k*bits`` of the ``qweight`` column (3-bit codes may straddle two words), the zero code of ``(g, n)`` from
``qzeros`` and the scale ``scales[g, n]``, and forms ``w = (q - z) * s`` in fp32 (then the activation
dtype for fp16/bf16 tensor-core dots). Two shapes:

- ``USE_DOT`` (M > 4): ``tl.dot`` tiles, ``BLOCK_M >= 16``.
- GEMV-like (decode, M <= 4): a broadcast multiply-reduce over ``[BLOCK_M, BLOCK_K, BLOCK_N]`` with the
  ``K`` range split over ``SPLIT_K`` programs (fp32 partial sums, reduced afterwards) so a single-row
  product still fills the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gptq_matmul(
    x_ptr,
    qw_ptr,
    qz_ptr,
    s_ptr,
    g_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    K_PER_SPLIT,
    stride_xm,
    stride_xk,
    stride_qwk,
    stride_qwn,
    stride_qzg,
    stride_qzn,
    stride_sg,
    stride_sn,
    stride_os,
    stride_om,
    stride_on,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # zero codes are packed along N: bit n*BITS of row g
    zbit = offs_n * BITS
    zword = zbit // 32
    zshift = (zbit % 32).to(tl.uint32)
    zspill = (zbit % 32) > (32 - BITS)
    zshift_hi = ((32 - zbit % 32) % 32).to(tl.uint32)

    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        mask_kn = mask_k[:, None] & mask_n[None, :]

        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )

        # codes are packed along K: bit k*BITS of column n
        bit = offs_k * BITS
        word = bit // 32
        shift = (bit % 32).to(tl.uint32)
        w0 = tl.load(qw_ptr + word[:, None] * stride_qwk + offs_n[None, :] * stride_qwn, mask=mask_kn, other=0)
        q = w0.to(tl.uint32, bitcast=True) >> shift[:, None]
        if BITS == 3:
            spill = (bit % 32) > 29
            shift_hi = ((32 - bit % 32) % 32).to(tl.uint32)
            w1 = tl.load(
                qw_ptr + (word + 1)[:, None] * stride_qwk + offs_n[None, :] * stride_qwn,
                mask=mask_kn & spill[:, None],
                other=0,
            )
            q = q | (w1.to(tl.uint32, bitcast=True) << shift_hi[:, None])
        q = (q & ((1 << BITS) - 1)).to(tl.int32)

        g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
        s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask_kn, other=0.0)
        zw0 = tl.load(qz_ptr + g[:, None] * stride_qzg + zword[None, :] * stride_qzn, mask=mask_kn, other=0)
        z = zw0.to(tl.uint32, bitcast=True) >> zshift[None, :]
        if BITS == 3:
            zw1 = tl.load(
                qz_ptr + g[:, None] * stride_qzg + (zword + 1)[None, :] * stride_qzn,
                mask=mask_kn & zspill[None, :],
                other=0,
            )
            z = z | (zw1.to(tl.uint32, bitcast=True) << zshift_hi[None, :])
        z = (z & ((1 << BITS) - 1)).to(tl.int32)

        w = (q - z).to(tl.float32) * s.to(tl.float32)
        if USE_DOT:
            if DOT_FP32:
                if ALLOW_TF32:
                    acc += tl.dot(a.to(tl.float32), w, input_precision="tf32")
                else:
                    acc += tl.dot(a.to(tl.float32), w, input_precision="ieee")
            elif UPCAST_DOT:  # interpreter: its tl.dot multiplies bf16 bit patterns as integers
                acc += tl.dot(a.to(tl.float32), w)
            else:
                acc += tl.dot(a, w.to(a.dtype))
        else:
            acc += tl.sum(a.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)

    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
        acc += b.to(tl.float32)[None, :]
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` before triton is imported)."""
    return type(_gptq_matmul).__name__ == "InterpretedFunction"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def pick_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """Heuristic tile sizes (no autotuning: it must also run in the interpreter and stay deterministic)."""
    if m <= 4:
        bm = _next_pow2(m)
        bn = 128 if n >= 128 else max(16, _next_pow2(n))
        bk = max(16, min(128, 8192 // (bm * bn)))
        n_tiles = -(-n // bn)
        k_blocks = -(-k // bk)
        split = max(1, min(k_blocks, 16, _next_pow2(max(1, 2 * _sm_count(device) // n_tiles))))
        return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "USE_DOT": False, "num_warps": 4}
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 64 if m <= 32 else 128
    return {
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_K": 32,
        "SPLIT_K": 1,
        "USE_DOT": True,
        "num_warps": 4,
        "num_stages": 3 if device.type == "cuda" else 1,
    }


def triton_linear(x, qweight, qzeros, scales, g_idx, bias, bits: int, in_features: int, **config):
    """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``. ``config`` overrides :func:`pick_config` keys."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"unsupported bits={bits}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton backend takes fp16/bf16/fp32 activations, got {x.dtype}")
    k = in_features
    n = scales.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the layer expects {k}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    lead = x.shape[:-1]
    if m == 0:
        return x.new_zeros((*lead, n))
    cfg = pick_config(m, n, k, x.device)
    cfg.update(config)
    bm, bn, bk, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    k_per_split = _cdiv(_cdiv(k, split), bk) * bk  # whole BLOCK_K steps per split
    split = _cdiv(k, k_per_split)
    g_idx = g_idx.to(torch.int32).contiguous()
    # The interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest even): give it an fp32 output.
    interpret = interpreting()
    direct_dtype = torch.float32 if interpret and x.dtype == torch.bfloat16 else x.dtype
    if split == 1:
        out = torch.empty((m, n), dtype=direct_dtype, device=x.device)
        has_bias = bias is not None
        stride_os = 0
    else:
        out = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        has_bias = False
        stride_os = out.stride(0)
    bias_arg = bias.contiguous() if has_bias else scales  # any pointer when unused
    if x.device.type != "cuda" and not interpret:
        raise RuntimeError(
            "the triton backend runs CUDA tensors; CPU tensors need the Triton interpreter "
            "(set TRITON_INTERPRET=1 before triton is first imported)"
        )
    launch = {}
    if not interpret:
        launch = {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 2)}
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn), split)
    _gptq_matmul[grid](
        x2,
        qweight,
        qzeros,
        scales,
        g_idx,
        bias_arg,
        out,
        m,
        n,
        k,
        k_per_split,
        x2.stride(0),
        x2.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        qzeros.stride(0),
        qzeros.stride(1),
        scales.stride(0),
        scales.stride(1),
        stride_os,
        out.stride(-2),
        out.stride(-1),
        BITS=bits,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        USE_DOT=bool(cfg["USE_DOT"]),
        HAS_BIAS=has_bias,
        DOT_FP32=x.dtype == torch.float32,
        ALLOW_TF32=bool(torch.backends.cuda.matmul.allow_tf32),
        UPCAST_DOT=interpret and x.dtype == torch.bfloat16,
        **launch,
    )
    if split > 1:
        out = out.sum(0)
        if bias is not None:
            out = out + bias.to(torch.float32)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out.reshape(*lead, n)
