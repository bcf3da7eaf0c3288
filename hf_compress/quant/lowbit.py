"""1-bit and 1.58-bit (ternary) weights: quantizers, SVID, and the packed layout the kernels read.

Quantizers (BitNet, BitNet b1.58, OneBit):
- ``ternary_absmean``: γ = mean|W| (per tensor, or per output row), W̃ = round(clip(W / (γ + ε), −1, 1)) ∈ {−1, 0, 1},
  W ≈ γ·W̃ (BitNet b1.58).
- ``binary_sign``: W̃ = sign(W − mean(W)) ∈ {−1, +1} (0 maps to +1), β = mean|W|, W ≈ β·W̃ (BitNet).
- ``svid``: W ≈ sign(W) ⊙ (a bᵀ), a bᵀ the best rank-1 approximation of |W| (OneBit's sign-value-independent
  decomposition; SVD or power iteration).

Packed layout (``qweight`` uint8 ``[out, K_pad / per_byte]``, one row per output channel). The input dimension is
cut into blocks of 64 bytes; within a block, byte ``j`` holds ``per_byte`` weights of columns
``block·64·per_byte + 64·s + j``, ``s = 0..per_byte−1``, at bits ``s·bits .. s·bits + bits − 1``:
- ternary: 2 bits per weight, 4 per byte, 256 columns per block, code = w + 1 ∈ {0, 1, 2};
- binary: 1 bit per weight, 8 per byte, 512 columns per block, bit = 1 for +1, 0 for −1.
So unpacking one 64-byte block with a shift of ``s·bits`` and a mask yields the weights of 64 *consecutive*
columns, which a SIMD kernel multiplies with 64 consecutive activations. ``K_pad`` is the input width rounded
up to a whole block; the padded columns hold code 1 (ternary 0) / bit 0 (binary −1) and meet zero activations.
"""

from __future__ import annotations

import torch

__all__ = [
    "BLOCK_BYTES",
    "binary_sign",
    "lowbit_linear_reference",
    "pack_binary",
    "pack_ternary",
    "padded_width",
    "svid",
    "ternary_absmean",
    "unpack_binary",
    "unpack_codes",
    "unpack_ternary",
]

BLOCK_BYTES = 64
EPS = 1e-5


def ternary_absmean(w: torch.Tensor, per_channel: bool = False, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [out, in] in {−1, 0, 1}, γ float32 [1] or [out])`` with W ≈ γ·codes (absmean, BitNet b1.58)."""
    w = w.float()
    gamma = w.abs().mean(dim=1, keepdim=True) if per_channel else w.abs().mean().reshape(1, 1)
    codes = (w / (gamma + eps)).round().clamp(-1, 1).to(torch.int8)
    return codes, gamma.reshape(-1)


def binary_sign(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [out, in] in {−1, +1}, β float32 [1] or [out])``: the sign of the mean-centred weights and
    β = mean|W| (BitNet's 1-bit weights; zero maps to +1)."""
    w = w.float()
    dims = (1,) if per_channel else (0, 1)
    centred = w - w.mean(dim=dims, keepdim=True)
    codes = torch.where(centred >= 0, 1, -1).to(torch.int8)
    beta = w.abs().mean(dim=dims, keepdim=True)
    return codes, beta.reshape(-1)


def svid(w: torch.Tensor, method: str = "svd", iters: int = 30) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sign int8 [out, in] in {−1, +1}, a float32 [out], b float32 [in])`` with W ≈ sign(W) ⊙ (a bᵀ), a bᵀ the
    best rank-1 approximation of |W| in Frobenius norm (``svd``, or ``power`` iteration for large matrices).
    |W| is non-negative, so its top singular vectors can be taken non-negative (Perron-Frobenius)."""
    w = w.float()
    mag = w.abs()
    if method == "svd":
        u, s, vh = torch.linalg.svd(mag, full_matrices=False)
        a, b = u[:, 0] * s[0].sqrt(), vh[0] * s[0].sqrt()
    elif method == "power":
        b = mag.mean(0)
        for _ in range(iters):
            a = mag @ b
            a = a / a.norm().clamp(min=1e-30)
            b = mag.t() @ a
        a = a * b.norm().sqrt()
        b = b / b.norm().clamp(min=1e-30) * a.norm()
    else:
        raise ValueError(f"svid method must be 'svd' or 'power', got {method!r}")
    if a.sum() < 0:  # the sign of a singular pair is arbitrary: make both non-negative
        a, b = -a, -b
    sign = torch.where(w >= 0, 1, -1).to(torch.int8)
    return sign, a.clamp(min=0), b.clamp(min=0)


def padded_width(in_features: int, bits: int) -> int:
    """The input width rounded up to whole 64-byte blocks (256 ternary or 512 binary columns)."""
    per_block = BLOCK_BYTES * (8 // bits)
    return -(-in_features // per_block) * per_block


def _pack(values: torch.Tensor, bits: int, pad_value: int) -> torch.Tensor:
    n, k = values.shape
    per_byte = 8 // bits
    kp = padded_width(k, bits)
    v = torch.full((n, kp), pad_value, dtype=torch.uint8, device=values.device)
    v[:, :k] = values.to(torch.uint8)
    v = v.view(n, kp // (BLOCK_BYTES * per_byte), per_byte, BLOCK_BYTES)  # [n, block, s, j]
    out = torch.zeros(n, kp // (BLOCK_BYTES * per_byte), BLOCK_BYTES, dtype=torch.uint8, device=values.device)
    for s in range(per_byte):
        out |= v[:, :, s, :] << (s * bits)
    return out.view(n, kp // per_byte)


def _unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    n = packed.shape[0]
    per_byte = 8 // bits
    blocks = packed.shape[1] // BLOCK_BYTES
    p = packed.view(n, blocks, 1, BLOCK_BYTES)
    shifts = (torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits).view(1, 1, per_byte, 1)
    v = (p >> shifts) & ((1 << bits) - 1)  # [n, block, s, j]
    return v.reshape(n, blocks * per_byte * BLOCK_BYTES)[:, :in_features]


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes ``[out, in]`` in {−1, 0, 1} -> ``qweight`` uint8 ``[out, K_pad/4]`` (module docstring)."""
    if codes.dim() != 2:
        raise ValueError(f"pack_ternary takes a 2-D [out, in] tensor, got shape {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("pack_ternary: codes must be -1, 0 or 1")
    return _pack(codes.to(torch.int16) + 1, 2, pad_value=1)


def unpack_ternary(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """``qweight`` -> int8 codes ``[out, in_features]`` in {−1, 0, 1}."""
    return _unpack(packed, 2, in_features).to(torch.int8) - 1


def pack_binary(codes: torch.Tensor) -> torch.Tensor:
    """Binary codes ``[out, in]`` in {−1, +1} -> ``qweight`` uint8 ``[out, K_pad/8]`` (module docstring)."""
    if codes.dim() != 2:
        raise ValueError(f"pack_binary takes a 2-D [out, in] tensor, got shape {tuple(codes.shape)}")
    if codes.numel() and not bool(((codes == 1) | (codes == -1)).all()):
        raise ValueError("pack_binary: codes must be -1 or +1")
    return _pack((codes > 0).to(torch.uint8), 1, pad_value=0)


def unpack_binary(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """``qweight`` -> int8 codes ``[out, in_features]`` in {−1, +1}."""
    return _unpack(packed, 1, in_features).to(torch.int8) * 2 - 1


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """``qweight`` -> int8 codes: ternary (``bits=2``) or binary (``bits=1``)."""
    if bits == 2:
        return unpack_ternary(packed, in_features)
    if bits == 1:
        return unpack_binary(packed, in_features)
    raise ValueError(f"packed low-bit weights have bits 1 (binary) or 2 (ternary), got {bits}")


def lowbit_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    in_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    in_features: int,
) -> torch.Tensor:
    """The packed low-bit linear, plainly: ``x' = x ⊙ in_scale`` (OneBit's input vector, if given) quantized per
    row to int8 (absmax / 127, :func:`hf_compress.quant.int8.quantize_rows`), exact integer sums with the
    codes, times the row's scale and ``w_scale`` (``[1]`` per tensor or ``[out]`` per channel), plus ``bias``;
    in ``x``'s dtype. Every fast kernel is tested against this."""
    from .int8 import quantize_rows

    shape = x.shape
    xf = x.reshape(-1, shape[-1]).float()
    if in_scale is not None:
        xf = xf * in_scale.float()
    q, s = quantize_rows(xf)
    codes = unpack_codes(qweight, bits, in_features)
    acc = q.double() @ codes.double().t()
    out = (acc * s.double().unsqueeze(1) * w_scale.double().reshape(1, -1)).float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*shape[:-1], codes.shape[0])
