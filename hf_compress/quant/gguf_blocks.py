"""llama.cpp's block formats as tensor math: quantize a float matrix to GGUF bytes and dequantize them back.

Pure torch, no transformers or gguf import. Every function works on a 2-D weight ``[rows, cols]`` whose ``cols``
is a multiple of the type's block size and returns ``uint8 [rows, cols / block * type_size]`` (a row's blocks one
after another, exactly as ``ggml`` lays them out). The quantizers follow ``ggml-quants.c``:

- ``Q8_0``, ``Q4_0``, ``Q5_0``, ``Q5_1``, ``TQ1_0``, ``TQ2_0``: the reference (``*_ref``) rounding;
- ``Q4_K``, ``Q5_K``: ``make_qkx2_quants`` (a weighted search over 20 / 15 candidate scales for each 32-weight
  sub-block's scale and min, weights ``av_x + |x|``), then 6-bit sub-block scales under an fp16 super-block scale;
- ``Q6_K``: ``make_qx_quants`` (rmse search over 18 candidate scales per 16 weights), 8-bit sub-block scales;
- ``Q3_K``: ``make_q3_quants`` (absmax codes, then greedy single-code moves) per 16 weights, signed 6-bit
  sub-block scales; ``Q2_K``: ``make_qkx2_quants`` on absolute error per 16 weights, 4-bit scales and mins;
- with an importance matrix (``imatrix``: one weight per input column, the mean of x² over calibration tokens) the
  ``*_impl`` variants: ``make_qkx3_quants`` + ``make_qp_quants`` for K types, ``make_qx_quants`` for Q4_0/Q5_0/Q6_K,
  ``make_qkx3_quants`` for Q5_1 (weights ``imatrix · sqrt(σ² + x²)``), ``make_qx_quants`` twice for Q3_K,
  ``make_qkx3_quants`` + ``make_qp_quants`` for Q2_K;
- then, unless ``refine=False``, blocks are refined beyond ggml, each change kept only where it lowers the block's
  error: in the K types the rounded sub-block scales (and mins) stepped and the fp16 super-block scales refitted
  (ggml rounds the sub-block scales once and never revisits them), on the error ggml's search weighs for a linear's
  Q2_K-Q5_K blocks and on the plain squared error for embedding tables and Q6_K (:func:`_refine_k` says why); in
  Q4_0 / Q5_0 / Q5_1 without an imatrix, the scale (and min) taken from ggml's own search under the plain squared
  error and refitted by least squares (ggml's reference rounding uses the absmax or min-max scale as it is). Q8_0
  and the TQ types are never changed.

The searches run vectorised over all blocks at once; sums are float32 like the C code's, though summed in another
order, so a block can round differently from llama.cpp's own bytes where two candidates tie to float precision.
"""

from __future__ import annotations

import torch

QK_K = 256
# name -> (type id in ggml, weights per block, bytes per block)
TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84),
    "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
    "TQ1_0": (34, 256, 54),
    "TQ2_0": (35, 256, 66),
}
TYPE_NAMES = {v[0]: k for k, v in TYPES.items()}
# A K or TQ type on a row whose width is not a multiple of 256 falls back as llama.cpp's quantize does (TQ to
# Q8_0 rather than llama.cpp's Q4_0: Q8_0 holds ternary values times an fp16 scale exactly).
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "TQ1_0": "Q8_0", "TQ2_0": "Q8_0"}
GROUP_MAX_EPS = 1e-15

__all__ = ["FALLBACK", "QK_K", "TYPES", "TYPE_NAMES", "block_size", "dequantize", "fits", "quantize", "row_bytes"]


def block_size(qtype: str) -> int:
    return TYPES[_check(qtype)][1]


def row_bytes(qtype: str, cols: int) -> int:
    _, blk, size = TYPES[_check(qtype)]
    return cols // blk * size


def fits(qtype: str, cols: int) -> bool:
    return cols % block_size(qtype) == 0


def _check(qtype: str) -> str:
    if qtype not in TYPES:
        raise ValueError(f"unknown GGUF type {qtype!r}: supported {', '.join(TYPES)}")
    return qtype


# ------------------------------------------------------------------------------------------------ helpers
def _nearest(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: round half to even (it adds 1.5·2²³ in float), as int32."""
    return torch.round(x).to(torch.int32)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's ``roundf``: half away from zero."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """``[..., 1]`` float -> ``[..., 2]`` uint8, fp16 little-endian (round to nearest even, as GGML_FP32_TO_FP16)."""
    return x.to(torch.float16).contiguous().view(torch.uint8)


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the fp16 value a block would store, in float32."""
    return x.to(torch.float16).to(torch.float32)


def fp16_values(b: torch.Tensor) -> torch.Tensor:
    """``[..., 2]`` uint8 -> ``[..., 1]`` float32."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return (lo.to(torch.uint8) & 15) | ((hi.to(torch.uint8) & 15) << 4)


def _bits_to_bytes(bits: torch.Tensor) -> torch.Tensor:
    """``[..., 8k]`` 0/1 -> ``[..., k]`` uint8, bit i of byte j = element 8j + i (numpy's little bit order)."""
    b = bits.to(torch.uint8).reshape(*bits.shape[:-1], -1, 8)
    return (b << torch.arange(8, dtype=torch.uint8, device=b.device)).sum(-1, dtype=torch.uint8)


def _bytes_to_bits(b: torch.Tensor) -> torch.Tensor:
    return ((b.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=b.device)) & 1).reshape(*b.shape[:-1], -1)


def _absmax_signed(x: torch.Tensor) -> torch.Tensor:
    """Per row of ``x [B, n]`` the element of largest magnitude, sign kept (the first one on ties), ``[B, 1]``."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))


def _f32(v: float) -> torch.Tensor:
    """A float32 scalar: the searches' candidate numerators are float arithmetic in ggml, rounded at each step."""
    return torch.tensor(v, dtype=torch.float32)


def _safe_inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


# ------------------------------------------------------------------------------------------- the searches
def make_qx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(rmse_type=1)`` on each row of ``x [B, n]``: signed codes in ``[-nmax, nmax)`` (returned
    shifted by ``nmax``) and the scale, ``([B, n] int32, [B, 1])``."""
    w = x * x if weights is None else weights
    amax = x.abs().amax(-1, keepdim=True)
    mx = _absmax_signed(x)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)

    def trial(iscale):
        lv = _nearest(iscale * x).clamp(-nmax, nmax - 1)
        lf = lv.float()
        return lv, (w * x * lf).sum(-1, keepdim=True), (w * lf * lf).sum(-1, keepdim=True)

    L, sumlx, suml2 = trial(-nmax / mx)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)), torch.zeros_like(suml2))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, slx, sl2 = trial(-(nmax + _f32(0.1) * step) / mx)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = torch.where(better, lv, L)
        new_scale = slx / torch.where(sl2 > 0, sl2, torch.ones_like(sl2))
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * slx, best)
    L = torch.where(zero, torch.full_like(L, -nmax), L) + nmax
    return L, torch.where(zero, torch.zeros_like(scale), scale)


def make_qkx_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor, rmin: float, rdelta: float, nstep: int,
                    mad: bool = False):
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (they differ only in their arguments) on each row of
    ``x [B, n]``: codes in ``[0, nmax]``, scale and min (``-min`` as ggml returns it: the offset subtracted).
    ``mad``: candidates compared by weighted absolute error (ggml's ``use_mad``, Q2_K) instead of squared."""
    mn = mn0 = x.amin(-1, keepdim=True).clamp(max=0)
    mx = x.amax(-1, keepdim=True)
    sum_w = weights.sum(-1, keepdim=True)
    sum_x = (weights * x).sum(-1, keepdim=True)
    flat = mx <= mn
    span = torch.where(flat, torch.ones_like(mx), mx - mn)

    def error(L, scale, m):
        diff = scale * L.float() + m - x
        return (weights * (diff.abs() if mad else diff * diff)).sum(-1, keepdim=True)

    iscale = nmax / span
    scale = 1.0 / iscale
    L = _nearest(iscale * (x - mn)).clamp(0, nmax)
    best = error(L, scale, mn)
    for step in range(nstep + 1):
        # ggml divides by max - min with min as the loop has updated it, not the data's min.
        num = (_f32(rmin) + _f32(rdelta) * step) + nmax
        cur_span = mx - mn
        iscale = num / torch.where(flat | (cur_span == 0), torch.ones_like(cur_span), cur_span)
        la = _nearest(iscale * (x - mn)).clamp(0, nmax)
        lf = la.float()
        sum_l = (weights * lf).sum(-1, keepdim=True)
        sum_l2 = (weights * lf * lf).sum(-1, keepdim=True)
        sum_xl = (weights * lf * x).sum(-1, keepdim=True)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 != 0, sum_l2, torch.ones_like(sum_l2)), this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        cur = error(la, this_scale, this_min)
        better = ok & (cur < best)
        L = torch.where(better, la, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat, torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return L, scale, -torch.where(flat, mn0, mn)


def make_qp_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qp_quants`` on each row of ``x [B, n]`` (non-negative values: the sub-block scales or mins)."""
    mx = x.amax(-1, keepdim=True)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)

    def mse(iscale):
        lv = _nearest(iscale * x).clamp(max=nmax)
        d = x - (1 / iscale) * lv.float()
        return (weights * d * d).sum(-1, keepdim=True)

    iscale = nmax / mx
    L0 = _nearest(iscale * x)
    d0 = x - (1 / iscale) * L0.float()
    best = (weights * d0 * d0).sum(-1, keepdim=True)
    for step in range(-4, 5):
        if step == 0:
            continue
        cand = (_f32(0.1) * step + nmax) / mx
        m = mse(cand)
        better = m < best
        best = torch.where(better, m, best)
        iscale = torch.where(better, cand, iscale)
    L, scale = _greedy_codes(x, weights, _nearest(iscale * x).clamp(max=nmax), None, nmax, qp=True)
    return torch.where(zero, torch.zeros_like(L), L), torch.where(zero, torch.zeros_like(scale), scale)


def _greedy_codes(x, w, L, lo: int | None, hi: int, qp: bool):
    """The greedy code moves of ``make_qp_quants`` (``qp``) and ``make_q3_quants``: up to 5 passes over the elements
    in order, each code moved to the one that best fits its x under the others' least-squares scale, and kept if the
    weighted fit ``sumlx² / suml2`` improves. ggml's two copies differ in one guard: qp needs the sums without the
    element positive, q3 the new sum of squares. Returns ``(codes, least-squares scale sumlx / suml2 or 0)``."""
    lf = L.float()
    sumlx = (w * x * lf).sum(-1, keepdim=True)
    suml2 = (w * lf * lf).sum(-1, keepdim=True)
    for _ in range(5):
        changed = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(x.shape[-1]):
            wi, xi, li = w[:, i : i + 1], x[:, i : i + 1], L[:, i : i + 1].float()
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            can = (slx > 0) & (sl2 > 0) if qp else slx > 0
            new_l = _nearest(xi * sl2 / torch.where(can, slx, torch.ones_like(slx))).clamp(lo, hi)
            nf = new_l.float()
            slx2, sl22 = slx + wi * xi * nf, sl2 + wi * nf * nf
            take = can & (new_l != L[:, i : i + 1]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            if not qp:
                take &= sl22 > 0
            L[:, i : i + 1] = torch.where(take, new_l, L[:, i : i + 1])
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    return L, torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), torch.zeros_like(suml2))


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(do_rmse=true)`` on each row of ``x [B, n]``: signed codes in ``[-nmax, nmax)`` from the
    absmax scale, then up to 5 greedy passes that move single codes while the x²-weighted fit improves. Returns the
    codes shifted by ``nmax`` and the least-squares scale, ``([B, n] int32, [B, 1])``."""
    mx = _absmax_signed(x)
    zero = x.abs().amax(-1, keepdim=True) < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    L, scale = _greedy_codes(x, x * x, _nearest((-nmax / mx) * x).clamp(-nmax, nmax - 1), -nmax, nmax - 1, qp=False)
    return torch.where(zero, torch.zeros_like(L), L + nmax), torch.where(zero, torch.zeros_like(scale), scale)


# --------------------------------------------------------------------------------------------- 32-blocks
def _blocks(w: torch.Tensor, size: int) -> torch.Tensor:
    return w.reshape(-1, size)


def _imatrix_per_block(w: torch.Tensor, imatrix: torch.Tensor, n: int) -> torch.Tensor:
    """The importance of every weight of ``w [rows, cols]`` (its column's), as blocks of ``n``: ``[rows·cols/n, n]``."""
    return imatrix.reshape(1, -1).expand(w.shape[0], -1).reshape(-1, n)


def _imatrix_weights(x: torch.Tensor, qw: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """The ``*_impl`` search weights: importance · sqrt(σ² + x²)."""
    return qw * torch.sqrt(sigma2 + x * x)


def _row_sigma2(w: torch.Tensor, n_blocks_per_row: int, block: int) -> torch.Tensor:
    """σ² = mean x² over each whole row, repeated per block: ``[rows*n_blocks, 1]``."""
    s = (w * w).sum(-1, keepdim=True) / w.shape[-1]
    return s.repeat_interleave(n_blocks_per_row, 0)


def _q8_0(w, imatrix, refine):
    x = _blocks(w, 32)
    d = x.abs().amax(-1, keepdim=True) / 127
    q = _roundf(x * _safe_inv(d)).to(torch.int8)
    return torch.cat([_fp16_bytes(d), q.view(torch.uint8)], -1)


def _weights_32(w: torch.Tensor, x: torch.Tensor, imatrix: torch.Tensor) -> torch.Tensor:
    """The ``*_impl`` weights of 32-blocks ``x`` of ``w``: imatrix · sqrt(σ²_row + x²)."""
    return _imatrix_weights(x, _imatrix_per_block(w, imatrix, 32), _row_sigma2(w, w.shape[1] // 32, 32))


def _symmetric_32(w: torch.Tensor, imatrix, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 (nmax 8) / Q5_0 (nmax 16) codes in [0, 2·nmax) and scales: the reference rounding, or make_qx_quants
    weighted by the imatrix."""
    x = _blocks(w, 32)
    if imatrix is None:
        d = _absmax_signed(x) / -nmax
        return torch.trunc(x * _safe_inv(d) + (nmax + 0.5)).clamp(max=2 * nmax - 1).to(torch.int32), d
    L, d = make_qx_quants(x, nmax, _weights_32(w, x, imatrix))
    return L, d


def _refine_32(x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, nmax: int, rounds: int = 3):
    """Lower the squared error of 32-weight blocks (Q4_0 / Q5_0: ``d·(q − nmax)``, codes ``[0, 2·nmax)``; Q5_1 with
    ``m``: ``d·q + m``, codes ``[0, nmax]``) below ggml's absmax / min-max rounding: least-squares refits of the
    scale (and min) on the current codes, rounded to fp16, with the codes re-rounded under them; a block keeps a
    refit only where its error falls. Returns ``(codes, d, m)`` (``d``/``m`` fp16 values)."""
    lo, hi = (0, nmax) if m is not None else (-nmax, nmax - 1)

    def fit(d16, m16):
        inv = _safe_inv(d16)
        q = _nearest((x - (0 if m16 is None else m16)) * inv).clamp(lo, hi)
        q = torch.where(d16 == 0, torch.zeros_like(q), q)
        diff = d16 * q.float() + (0 if m16 is None else m16) - x
        return q, (diff * diff).sum(-1, keepdim=True)

    d = _fp16_round(d)
    m = None if m is None else _fp16_round(m)
    q = L - (0 if m is not None else nmax)
    diff = d * q.float() + (0 if m is None else m) - x
    err = (diff * diff).sum(-1, keepdim=True)
    # a second start: ggml's own scale search under the plain squared error
    ones = torch.ones_like(x)
    if m is None:
        d2, m2 = _fp16_round(make_qx_quants(x, nmax, ones)[1]), None
    else:
        _, d2, nm2 = make_qkx_quants(x, nmax, ones, -0.5, 0.1, 15)
        d2, m2 = _fp16_round(d2), _fp16_round(-nm2)
    q2, e2 = fit(d2, m2)
    better = (e2 < err) & torch.isfinite(d2)
    q, err, d = torch.where(better, q2, q), torch.where(better, e2, err), torch.where(better, d2, d)
    if m is not None:
        m = torch.where(better, m2, m)
    for _ in range(rounds):
        qf = q.float()
        if m is None:
            s2 = (qf * qf).sum(-1, keepdim=True)
            d2 = _fp16_round((qf * x).sum(-1, keepdim=True) / torch.where(s2 > 0, s2, torch.ones_like(s2)))
            d2, m2 = torch.where(s2 > 0, d2, d), None
        else:
            n, sq, sqq = x.shape[-1], qf.sum(-1, keepdim=True), (qf * qf).sum(-1, keepdim=True)
            sx, sqx = x.sum(-1, keepdim=True), (qf * x).sum(-1, keepdim=True)
            det = n * sqq - sq * sq
            ok = det > 0
            det = torch.where(ok, det, torch.ones_like(det))
            d2 = torch.where(ok, _fp16_round((n * sqx - sq * sx) / det), d)
            m2 = torch.where(ok, _fp16_round((sqq * sx - sq * sqx) / det), m)
        q2, e2 = fit(d2, m2)
        better = (e2 < err) & torch.isfinite(d2) & (torch.isfinite(m2) if m2 is not None else True)
        q, err, d = torch.where(better, q2, q), torch.where(better, e2, err), torch.where(better, d2, d)
        if m is not None:
            m = torch.where(better, m2, m)
    return q + (0 if m is not None else nmax), d, m


def _q4_0(w, imatrix, refine):
    L, d = _symmetric_32(w, imatrix, 8)
    if refine and imatrix is None:
        L, d, _ = _refine_32(_blocks(w, 32), L, d, None, 8)
    return torch.cat([_fp16_bytes(d), _nibbles(L[:, :16], L[:, 16:])], -1)


def _q5_pack(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    qs = _nibbles(L[:, :16], L[:, 16:])
    qh = _bits_to_bytes((L >> 4) & 1)  # bit j of the uint32 = bit 4 of L[j]
    return qh, qs


def _q5_0(w, imatrix, refine):
    L, d = _symmetric_32(w, imatrix, 16)
    if refine and imatrix is None:
        L, d, _ = _refine_32(_blocks(w, 32), L, d, None, 16)
    qh, qs = _q5_pack(L)
    return torch.cat([_fp16_bytes(d), qh, qs], -1)


def _q5_1(w, imatrix, refine):
    x = _blocks(w, 32)
    if imatrix is None:
        mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (mx - mn) / 31
        L = torch.trunc((x - mn) * _safe_inv(d) + 0.5).to(torch.int32)
        m = mn
    else:
        L, d, neg_min = make_qkx_quants(x, 31, _weights_32(w, x, imatrix), -0.9, 0.05, 36)
        m = -neg_min
    if refine and imatrix is None:
        L, d, m = _refine_32(x, L, d, m, 31)
    qh, qs = _q5_pack(L)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(m), qh, qs], -1)


# ------------------------------------------------------------------------------------------------ k-quants
def _pack_k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins ``[B, 8]`` -> the 12-byte ``scales`` field of Q4_K / Q5_K."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    s = torch.zeros(ls.shape[0], 12, dtype=torch.uint8, device=ls.device)
    s[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    s[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    s[:, 8:12] = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    return s


def _unpack_k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_scale_min_k4`` for j = 0..7: ``([B, 8], [B, 8])`` int32."""
    s = s.to(torch.int32)
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 6) << 4)], -1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 6) << 4)], -1)
    return sc, mn


def _round_under_max(v: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's reference rounding of a super-block's non-negative sub-block scales (or mins) ``v [B, S]``: codes
    ``nearest(levels · v / max)`` (at most ``levels``) and the step ``max / levels``, both 0 where the max is."""
    mx = v.amax(-1, keepdim=True).clamp(min=0)
    inv = torch.where(mx > 0, levels / mx.clamp(min=1e-30), torch.zeros_like(mx))
    return _nearest(inv * v).clamp(max=levels), mx / levels


def _k_scales_mins(w: torch.Tensor, nmax: int, imatrix, rmin: float, nstep: int, refine: str | None):
    """Sub-block codes, and the super-block's packed scales and fp16 d / dmin, for Q4_K (nmax 15) or Q5_K (31)."""
    xs = w.reshape(-1, 8, 32)
    nb = xs.shape[0]
    x = xs.reshape(-1, 32)
    if imatrix is None:
        av_x = torch.sqrt((x * x).sum(-1, keepdim=True) / 32)
        wt = av_x + x.abs()
        L0, scales, mins = make_qkx_quants(x, nmax, wt, rmin, 0.1, nstep)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        (ls, d), (lm, dmin) = _round_under_max(scales, 63), _round_under_max(mins, 63)
    else:
        sigma2 = 2 * (xs * xs).sum((-1, -2)) / QK_K
        wt = _imatrix_weights(x, _imatrix_per_block(w, imatrix, 32), sigma2.repeat_interleave(8).unsqueeze(-1))
        L0, scales, mins = make_qkx_quants(x, nmax, wt, -0.9, 0.05, 36)
        sw = wt.sum(-1).reshape(nb, 8)
        ls, d = make_qp_quants(scales.reshape(nb, 8), 63, sw)
        lm, dmin = make_qp_quants(mins.reshape(nb, 8), 63, sw)
    head = torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _pack_k_scales(ls, lm)], -1)
    # The codes are recomputed from the rounded scales, as ggml does.
    d16, dm16 = fp16_values(head[:, 0:2]), fp16_values(head[:, 2:4])
    sc, mn = _unpack_k_scales(head[:, 4:16])
    if refine:
        wq = None if refine == "plain" else wt.reshape(xs.shape)
        d16, dm16, sc, mn, L = _refine_k(xs, d16, dm16, sc.float(), mn.float(), nmax, 63, wts=wq)
        head = torch.cat([_fp16_bytes(d16), _fp16_bytes(dm16), _pack_k_scales(sc, mn)], -1)
    else:
        L, _ = _k_codes(xs, d16, dm16, sc, mn, nmax)
    return head, _keep_search_codes(L, L0, d16, sc).reshape(nb, QK_K)


def _keep_search_codes(L: torch.Tensor, L0: torch.Tensor, d: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
    """ggml does not recompute the codes of a sub-block whose scale ``d·sc`` is 0: they stay the search's (they
    dequantize alike; kept so the bytes match). ``L [B, S, n]``, ``L0`` the search's codes in the same order."""
    zero = (d * sc.float()) == 0
    return torch.where(zero.unsqueeze(-1), L0.reshape(L.shape).to(L.dtype), L)


def _k_codes(xs, d, dmin, sc, mn, nmax, wts=None):
    """Nearest codes of super-blocks ``xs [B, S, n]`` under fp16 ``d``/``dmin [B, 1]`` and sub-block ``sc``/``mn
    [B, S]``, and each sub-block's squared error ``[B, S]`` (weighted by ``wts``, like ``xs``, if given)."""
    dd = (d * sc.float()).unsqueeze(-1)
    dm = (dmin * mn.float()).unsqueeze(-1)
    L = _nearest((xs + dm) / torch.where(dd == 0, torch.ones_like(dd), dd)).clamp(0, nmax)
    L = torch.where(dd == 0, torch.zeros_like(L), L)
    diff = dd * L.float() - dm - xs
    return L, (diff * diff if wts is None else wts * diff * diff).sum(-1)


def _refine_k(xs, d, dmin, sc, mn, nmax, smax, rounds: int = 2, wts=None):
    """Lower the error that ggml's search leaves after rounding its scales: per sub-block, the scale and min codes
    one step either way; per super-block, ``d`` and ``dmin`` refitted by (weighted) least squares on the codes and
    rounded to fp16. Each change is kept only where it lowers that block's error, so no block ends worse than
    ggml's own. The error is weighted by ``wts`` (the weights of ggml's search, for a linear's blocks) or plain
    (None: embedding tables, and Q6_K). Measured on pydoc-llama-6m, KL to the float model with one tensor group
    quantized: for linears at 2-4 bits the plain error made things worse (Q2_K q/k 2.8e-3 -> 6.3e-3, Q3_K 6.7e-4 ->
    9.3e-4) and the search's weights better (2.7e-3; Q4_K gate/up 4.65e-4 -> 4.48e-4); for the token embedding the
    plain error is best (Q2_K 1.82e-2 -> 1.40e-2); at 6 bits plain beats the search's x² (output matrix 8.99e-5 ->
    8.23e-5, against 8.53e-5). ``xs [B, S, n]``: S sub-blocks of n weights; scale and min codes in ``[0, smax]``
    (63 for Q4_K / Q5_K, 15 for Q2_K), weight codes in ``[0, nmax]``. Returns ``(d, dmin, sc, mn, codes)``."""
    steps = [(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)]
    L, err = _k_codes(xs, d, dmin, sc, mn, nmax, wts)
    w = torch.ones_like(xs) if wts is None else wts
    for _ in range(rounds):
        for i, j in steps:  # the 6-bit scale and min of each sub-block
            sc2, mn2 = (sc + i).clamp(0, smax), (mn + j).clamp(0, smax)
            L2, e2 = _k_codes(xs, d, dmin, sc2, mn2, nmax, wts)
            better = e2 < err
            sc, mn, err = torch.where(better, sc2, sc), torch.where(better, mn2, mn), torch.where(better, e2, err)
            L = torch.where(better.unsqueeze(-1), L2, L)
        a = sc.unsqueeze(-1) * L.float()  # value = d·a + dmin·b
        b = (-mn).unsqueeze(-1).expand_as(a)
        saa, sab, sbb = (w * a * a).sum((1, 2)), (w * a * b).sum((1, 2)), (w * b * b).sum((1, 2))
        sax, sbx = (w * a * xs).sum((1, 2)), (w * b * xs).sum((1, 2))
        det = saa * sbb - sab * sab
        ok = (det > 0).unsqueeze(-1)
        det = torch.where(det > 0, det, torch.ones_like(det))
        d2 = torch.where(ok, _fp16_round(((sbb * sax - sab * sbx) / det).unsqueeze(-1)), d)
        dm2 = torch.where(ok, _fp16_round(((saa * sbx - sab * sax) / det).unsqueeze(-1)), dmin)
        fine = torch.isfinite(d2) & torch.isfinite(dm2)
        d2, dm2 = torch.where(fine, d2, d), torch.where(fine, dm2, dmin)
        L2, e2 = _k_codes(xs, d2, dm2, sc, mn, nmax, wts)
        better = e2.sum(-1, keepdim=True) < err.sum(-1, keepdim=True)
        d, dmin = torch.where(better, d2, d), torch.where(better, dm2, dmin)
        err = torch.where(better, e2, err)
        L = torch.where(better.unsqueeze(-1), L2, L)
    return d, dmin, sc, mn, L


def _q4_k(w, imatrix, refine):
    head, L = _k_scales_mins(w, 15, imatrix, -1.0, 20, refine)
    L = L.reshape(-1, 4, 2, 32)  # per 64: q[l] = L[l] | L[l + 32] << 4
    qs = _nibbles(L[:, :, 0], L[:, :, 1]).reshape(-1, 128)
    return torch.cat([head, qs], -1)


def _q5_k(w, imatrix, refine):
    head, L = _k_scales_mins(w, 31, imatrix, -0.5, 15, refine)
    L4 = L.reshape(-1, 4, 2, 32)
    qs = _nibbles(L4[:, :, 0], L4[:, :, 1]).reshape(-1, 128)
    hi = ((L >> 4) & 1).reshape(-1, 8, 32)  # bit k of qh[j] = bit 4 of L[32k + j]
    qh = (hi.to(torch.uint8) << torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)).sum(1, dtype=torch.uint8)
    return torch.cat([head, qh, qs], -1)


def _q6_k(w, imatrix, refine):
    x = w.reshape(-1, 16)
    qw = None if imatrix is None else _imatrix_per_block(w, imatrix, 16)
    L0, scales = make_qx_quants(x, 32, qw)
    scales = scales.reshape(-1, 16)
    max_scale = _absmax_signed(scales)
    zero = max_scale.abs() < GROUP_MAX_EPS
    iscale = -128.0 / torch.where(zero, torch.ones_like(max_scale), max_scale)
    d = torch.where(zero, torch.zeros_like(iscale), 1.0 / iscale)
    sc = _nearest(iscale * scales).clamp(max=127)
    sc = torch.where(zero, torch.zeros_like(sc), sc)
    d16 = _fp16_round(d)
    xs = w.reshape(-1, 16, 16)
    if refine:  # on the plain squared error, embedding or not: at 6 bits it gave the lower KL (see _refine_k)
        d16, sc, L = _refine_signed(xs, d16, sc, 32, 127)
        d = d16
    else:
        L, _ = _signed_codes(xs, d16, sc, 32)
    L = _keep_search_codes(L, L0, d16, sc).reshape(-1, 2, 4, 32)  # per 128: four runs of 32
    ql = torch.cat([_nibbles(L[:, :, 0], L[:, :, 2]), _nibbles(L[:, :, 1], L[:, :, 3])], -1).reshape(-1, 128)
    blocks = torch.cat([ql, _pack_2bit(L >> 4), sc.to(torch.int8).view(torch.uint8), _fp16_bytes(d)], -1)
    return torch.where(zero, torch.zeros_like(blocks), blocks)


def _signed_codes(xs, d, sc, nmax, wts=None):
    """Codes (shifted by ``nmax``) in ``[-nmax, nmax)`` of ``xs [B, S, n]`` under fp16 ``d [B, 1]`` and signed
    sub-block scales ``sc [B, S]`` (Q6_K: nmax 32; Q3_K: 4), and each sub-block's squared error ``[B, S]``
    (weighted by ``wts``, like ``xs``, if given)."""
    dd = (d * sc.float()).unsqueeze(-1)
    L = _nearest(xs / torch.where(dd == 0, torch.ones_like(dd), dd)).clamp(-nmax, nmax - 1)
    L = torch.where(dd == 0, torch.zeros_like(L), L)
    diff = dd * L.float() - xs
    return L + nmax, (diff * diff if wts is None else wts * diff * diff).sum(-1)


def _refine_signed(xs, d, sc, nmax, smax, rounds: int = 2, wts=None):
    """:func:`_refine_k` for the symmetric K types (Q6_K, Q3_K): each signed sub-block scale in ``[-smax - 1,
    smax]`` one step either way, ``d`` refitted. Returns ``(d, sc, codes)``."""
    L, err = _signed_codes(xs, d, sc, nmax, wts)
    w = torch.ones_like(xs) if wts is None else wts
    for _ in range(rounds):
        for i in (-1, 1):
            sc2 = (sc + i).clamp(-smax - 1, smax)
            L2, e2 = _signed_codes(xs, d, sc2, nmax, wts)
            better = e2 < err
            sc, err = torch.where(better, sc2, sc), torch.where(better, e2, err)
            L = torch.where(better.unsqueeze(-1), L2, L)
        a = sc.unsqueeze(-1) * (L - nmax).float()
        saa, sax = (w * a * a).sum((1, 2)), (w * a * xs).sum((1, 2))
        d2 = _fp16_round((sax / torch.where(saa > 0, saa, torch.ones_like(saa))).unsqueeze(-1))
        d2 = torch.where((saa > 0).unsqueeze(-1) & torch.isfinite(d2), d2, d)
        L2, e2 = _signed_codes(xs, d2, sc, nmax, wts)
        better = e2.sum(-1, keepdim=True) < err.sum(-1, keepdim=True)
        d, err = torch.where(better, d2, d), torch.where(better, e2, err)
        L = torch.where(better.unsqueeze(-1), L2, L)
    return d, sc, L


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """Codes ``[B, 256]`` in 0..3 -> the 64 ``qs`` bytes of Q2_K / Q3_K: per 128, byte l holds elements l, l + 32,
    l + 64, l + 96 in bits 0-1, 2-3, 4-5, 6-7."""
    L = L.reshape(-1, 2, 4, 32).to(torch.uint8)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_2bit`: ``[B, 64]`` -> ``[B, 256]`` int32 in element order."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK_K).to(torch.int32)


def _q2_k(w, imatrix, refine):
    """Q2_K: 16 sub-blocks of 16 weights, 2-bit codes, 4-bit scale and min each under fp16 ``d`` / ``dmin``."""
    xs = w.reshape(-1, 16, 16)
    nb = xs.shape[0]
    x = xs.reshape(-1, 16)
    if imatrix is None:
        L0, scales, mins = make_qkx_quants(x, 3, x.abs(), -0.5, 0.1, 15, mad=True)
        scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
        (ls, d), (lm, dmin) = _round_under_max(scales, 15), _round_under_max(mins, 15)
    else:
        sigma2 = (xs * xs).sum((-1, -2)) / QK_K
        wt = _imatrix_weights(x, _imatrix_per_block(w, imatrix, 16), sigma2.repeat_interleave(16).unsqueeze(-1))
        L0, scales, mins = make_qkx_quants(x, 3, wt, -0.9, 0.05, 36)
        sw = wt.sum(-1).reshape(nb, 16)
        ls, d = make_qp_quants(scales.reshape(nb, 16), 15, sw)
        lm, dmin = make_qp_quants(mins.reshape(nb, 16), 15, sw)
    ls, lm = ls.clamp(0, 15), lm.clamp(0, 15)
    d16, dm16 = _fp16_round(d), _fp16_round(dmin)
    if refine:
        wq = None if refine == "plain" else (x.abs() if imatrix is None else wt).reshape(xs.shape)
        d16, dm16, ls, lm, L = _refine_k(xs, d16, dm16, ls.float(), lm.float(), 3, 15, wts=wq)
        ls, lm = ls.to(torch.int32), lm.to(torch.int32)
    else:
        L, _ = _k_codes(xs, d16, dm16, ls, lm, 3)
    L = _keep_search_codes(L, L0, d16, ls).reshape(nb, QK_K)
    scales_bytes = (ls | (lm << 4)).to(torch.uint8)
    return torch.cat([scales_bytes, _pack_2bit(L), _fp16_bytes(d16), _fp16_bytes(dm16)], -1)


def _pack_q3_k_scales(ls: torch.Tensor) -> torch.Tensor:
    """16 six-bit scale codes ``[B, 16]`` (the signed scale + 32) -> Q3_K's 12 ``scales`` bytes: low nibbles of
    0..7 and 8..15 in bytes 0..7 (low / high nibble), the top two bits of scale j in byte 8 + j % 4 at 2·(j // 4)."""
    ls = ls.to(torch.uint8)
    s = torch.zeros(ls.shape[0], 12, dtype=torch.uint8, device=ls.device)
    s[:, :8] = (ls[:, :8] & 15) | ((ls[:, 8:] & 15) << 4)
    hi = (ls >> 4).reshape(-1, 4, 4)  # [B, j // 4, j % 4]
    s[:, 8:] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return s


def _unpack_q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_q3_k_scales`: the signed sub-block scales ``[B, 16]`` int32 (code - 32)."""
    s = s.to(torch.int32)
    lo = torch.cat([s[:, :8] & 15, s[:, :8] >> 4], -1)
    hi = torch.stack([(s[:, 8:] >> (2 * k)) & 3 for k in range(4)], 1).reshape(-1, 16)
    return (lo | (hi << 4)) - 32


def _q3_k(w, imatrix, refine):
    """Q3_K: 16 sub-blocks of 16 weights, 3-bit codes (2 low bits in ``qs``, the third in ``hmask``), signed
    6-bit sub-block scales under an fp16 ``d``; symmetric."""
    xs = w.reshape(-1, 16, 16)
    nb = xs.shape[0]
    x = xs.reshape(-1, 16)
    if imatrix is None:
        L0, scales = make_q3_quants(x, 4)
        scales = scales.reshape(nb, 16)
        max_scale = _absmax_signed(scales)
        zero = max_scale == 0
        iscale = -32.0 / torch.where(zero, torch.ones_like(max_scale), max_scale)
        ls = _nearest(iscale * scales).clamp(-32, 31)
        ls = torch.where(zero, torch.zeros_like(ls), ls)
        d = torch.where(zero, torch.zeros_like(iscale), 1.0 / iscale)
        sc = torch.where(zero, torch.full_like(ls, -32), ls)  # all-zero scales bytes: codes 0, i.e. scale -32 x d = 0
    else:
        sigma2 = 2 * (xs * xs).sum((-1, -2)) / QK_K
        wt = _imatrix_weights(x, _imatrix_per_block(w, imatrix, 16), sigma2.repeat_interleave(16).unsqueeze(-1))
        L0, scales = make_qx_quants(x, 4, wt)
        Ls, d = make_qx_quants(scales.reshape(nb, 16), 32, wt.sum(-1).reshape(nb, 16))
        sc = Ls - 32
    d16 = _fp16_round(d)
    if refine:
        wq = None if refine == "plain" else (xs * xs if imatrix is None else wt.reshape(xs.shape))
        d16, sc, L = _refine_signed(xs, d16, sc.float(), 4, 31, wts=wq)
        sc = sc.to(torch.int32)
    else:
        L, _ = _signed_codes(xs, d16, sc, 4)
    L = _keep_search_codes(L, L0, d16, sc).reshape(nb, QK_K)
    return torch.cat([_q3_k_hmask(L), _pack_2bit(L & 3), _pack_q3_k_scales(sc + 32), _fp16_bytes(d16)], -1)


def _q3_k_hmask(L: torch.Tensor) -> torch.Tensor:
    """Q3_K's ``hmask``: the third bit of codes ``[B, 256]`` (0..7), element ``32·b + m`` in bit ``b`` of byte ``m``."""
    return _bits_to_bytes((L > 3).reshape(-1, 8, 32).transpose(1, 2).reshape(-1, QK_K))


# ------------------------------------------------------------------------------------------------- ternary
def ternary_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference TQ rounding: per 256 block d = max|x|, codes round(x / d) + 1 in {0, 1, 2}."""
    x = _blocks(w, QK_K)
    d = x.abs().amax(-1, keepdim=True)
    return (_roundf(x * _safe_inv(d)) + 1).to(torch.uint8), d


def pack_tq2_0(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``codes [B, 256]`` in {0, 1, 2} and ``d [B, 1]`` -> TQ2_0 blocks (four codes a byte, 32-byte runs)."""
    q = codes.reshape(-1, 2, 4, 32) << torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qs = (q[:, :, 0] | q[:, :, 1] | q[:, :, 2] | q[:, :, 3]).reshape(-1, 64)
    return torch.cat([qs, _fp16_bytes(d)], -1)


def pack_tq1_0(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """TQ1_0: five codes a byte in base 3 (as a fixed-point fraction of 243), the last 16 four a byte."""
    q = codes.to(torch.int32)
    n = q.shape[0]
    p5 = torch.tensor([81, 27, 9, 3, 1], dtype=torch.int32).reshape(1, 1, 5, 1)
    qs0 = (q[:, :160].reshape(n, -1, 5, 32) * p5).sum(-2).reshape(n, -1)
    qs1 = (q[:, 160:240].reshape(n, -1, 5, 16) * p5).sum(-2).reshape(n, -1)
    qh = (q[:, 240:].reshape(n, -1, 4, 4) * p5[:, :, :4]).sum(-2).reshape(n, -1)
    qs = torch.cat([qs0, qs1, qh], -1)
    qs = ((qs * 256 + 242) // 243).to(torch.uint8)
    return torch.cat([qs, _fp16_bytes(d)], -1)


def _tq2_0(w, imatrix, refine):
    return pack_tq2_0(*ternary_codes(w))


def _tq1_0(w, imatrix, refine):
    return pack_tq1_0(*ternary_codes(w))


_QUANTIZERS = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q2_K": _q2_k, "Q3_K": _q3_k,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k, "TQ1_0": _tq1_0, "TQ2_0": _tq2_0,
}


def quantize(weight: torch.Tensor, qtype: str, imatrix: torch.Tensor | None = None, refine: bool = True,
             embedding: bool = False) -> torch.Tensor:
    """``weight [rows, cols]`` -> GGUF bytes ``uint8 [rows, row_bytes]``. ``imatrix [cols]``: per-column importance
    (mean of x² over calibration tokens), used by the types llama.cpp weights (ignored by Q8_0 and TQ).
    ``refine``: after ggml's search or rounding, lower each block's error further (Q4_0, Q5_0, Q5_1 and the K types;
    see the module docstring; no block ends worse than ggml's bytes under that error); ``False`` gives ggml's bytes.
    ``embedding``: the weight is an embedding table, looked up by rows: its K blocks are refined on the plain squared
    error (a looked-up row's error is what the model sees); a linear's on the weights ggml's search uses."""
    _check(qtype)
    if weight.dim() != 2:
        raise ValueError(f"quantize takes a 2-D weight [rows, cols], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if qtype in ("F32", "F16"):
        return weight.to(torch.float32 if qtype == "F32" else torch.float16).contiguous().view(torch.uint8).reshape(rows, -1)
    if not fits(qtype, cols):
        raise ValueError(
            f"{qtype} needs rows whose width is a multiple of {block_size(qtype)}; this weight has {cols} columns "
            f"(use {FALLBACK.get(qtype, 'F16')} for it)"
        )
    w = weight.detach().to(torch.float32).cpu().contiguous()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weight holds NaN or inf values: fix the model before exporting it")
    if imatrix is not None:
        imatrix = imatrix.detach().to(torch.float32).cpu().reshape(-1)
        if imatrix.numel() != cols:
            raise ValueError(f"the importance matrix has {imatrix.numel()} entries; the weight has {cols} columns")
    out = _QUANTIZERS[qtype](w, imatrix, ("plain" if embedding else "search") if refine else None)
    return out.reshape(rows, row_bytes(qtype, cols))


# ------------------------------------------------------------------------------------------------ dequantize
def _dq_q8_0(b):
    return fp16_values(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def q4_codes(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 codes: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat([qs & 15, qs >> 4], -1).to(torch.int32)


def _dq_q4_0(b):
    return fp16_values(b[:, :2]) * (q4_codes(b[:, 2:]) - 8).float()


def _q5_codes(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    return q4_codes(qs) | (_bytes_to_bits(qh).to(torch.int32) << 4)


def _dq_q5_0(b):
    return fp16_values(b[:, :2]) * (_q5_codes(b[:, 2:6], b[:, 6:]) - 16).float()


def _dq_q5_1(b):
    return fp16_values(b[:, :2]) * _q5_codes(b[:, 4:8], b[:, 8:]).float() + fp16_values(b[:, 2:4])


def k_scales_mins(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K blocks -> per-32 scale ``d·sc`` and min ``dmin·m``, float32 ``[B, 8]`` each (w = scale·q − min)."""
    sc, mn = _unpack_k_scales(b[:, 4:16])
    return fp16_values(b[:, 0:2]) * sc.float(), fp16_values(b[:, 2:4]) * mn.float()


def q4_k_codes(b: torch.Tensor) -> torch.Tensor:
    """Q4_K blocks -> codes ``[B, 256]`` int32 in element order."""
    qs = b[:, 16:].reshape(-1, 4, 1, 32)
    return torch.cat([qs & 15, qs >> 4], 2).reshape(-1, QK_K).to(torch.int32)


def _dq_q4_k(b):
    s, m = k_scales_mins(b)
    q = q4_k_codes(b).reshape(-1, 8, 32).float()
    return (s.unsqueeze(-1) * q - m.unsqueeze(-1)).reshape(-1, QK_K)


def _dq_q5_k(b):
    s, m = k_scales_mins(b)
    qs = b[:, 48:].reshape(-1, 4, 1, 32)
    lo = torch.cat([qs & 15, qs >> 4], 2).reshape(-1, 8, 32).to(torch.int32)
    qh = b[:, 16:48].to(torch.int32)
    hi = (qh.unsqueeze(1) >> torch.arange(8).reshape(1, 8, 1)) & 1
    q = (lo | (hi << 4)).float()
    return (s.unsqueeze(-1) * q - m.unsqueeze(-1)).reshape(-1, QK_K)


def q6_k_codes(b: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks -> unsigned codes ``[B, 256]`` in 0..63 (the value is ``d·scale·(q − 32)``)."""
    ql = b[:, :128].reshape(-1, 2, 64).to(torch.int32)
    lo = torch.stack([ql[:, :, :32] & 15, ql[:, :, 32:] & 15, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], 2)
    return lo.reshape(-1, QK_K) | (_unpack_2bit(b[:, 128:192]) << 4)


def q6_k_scales(b: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks -> per-16 scales ``d·scale`` float32 ``[B, 16]``."""
    return fp16_values(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()


def _dq_q6_k(b):
    q = (q6_k_codes(b) - 32).reshape(-1, 16, 16).float()
    return (q6_k_scales(b).unsqueeze(-1) * q).reshape(-1, QK_K)


def q2_k_scales_mins(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q2_K blocks -> per-16 scale ``d·(sc & 15)`` and min ``dmin·(sc >> 4)``, float32 ``[B, 16]`` each."""
    sc = b[:, :16].to(torch.int32)
    return fp16_values(b[:, 80:82]) * (sc & 15).float(), fp16_values(b[:, 82:84]) * (sc >> 4).float()


def _dq_q2_k(b):
    s, m = q2_k_scales_mins(b)
    q = _unpack_2bit(b[:, 16:80]).reshape(-1, 16, 16).float()
    return (s.unsqueeze(-1) * q - m.unsqueeze(-1)).reshape(-1, QK_K)


def q3_k_codes(b: torch.Tensor) -> torch.Tensor:
    """Q3_K blocks -> unsigned codes ``[B, 256]`` in 0..7 (the value is ``d·scale·(q − 4)``)."""
    high = _bytes_to_bits(b[:, :32]).reshape(-1, 32, 8).transpose(1, 2).reshape(-1, QK_K)  # element 32b + m
    return _unpack_2bit(b[:, 32:96]) | (high.to(torch.int32) << 2)


def q3_k_scales(b: torch.Tensor) -> torch.Tensor:
    """Q3_K blocks -> per-16 scales ``d·scale`` float32 ``[B, 16]``."""
    return fp16_values(b[:, 108:110]) * _unpack_q3_k_scales(b[:, 96:108]).float()


def _dq_q3_k(b):
    q = (q3_k_codes(b) - 4).reshape(-1, 16, 16).float()
    return (q3_k_scales(b).unsqueeze(-1) * q).reshape(-1, QK_K)


def tq_codes(b: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """TQ1_0 / TQ2_0 blocks -> codes ``[B, 256]`` in {0, 1, 2} (value = d·(code − 1)) and ``d [B, 1]``."""
    if qtype == "TQ2_0":
        qs = b[:, :64].reshape(-1, 2, 1, 32)
        q = (qs >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3
        return q.reshape(-1, QK_K).to(torch.int32), fp16_values(b[:, 64:66])
    n = b.shape[0]
    pw = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32).reshape(1, 1, 5, 1)
    qs = b[:, :48].to(torch.int32)
    q0 = (qs[:, :32].reshape(n, 1, 1, 32) * pw) & 255
    q1 = (qs[:, 32:48].reshape(n, 1, 1, 16) * pw) & 255
    qh = (b[:, 48:52].to(torch.int32).reshape(n, 1, 1, 4) * pw[:, :, :4]) & 255
    q = torch.cat([q0.reshape(n, -1), q1.reshape(n, -1), qh.reshape(n, -1)], -1)
    return (q * 3) >> 8, fp16_values(b[:, 52:54])


def _dq_tq(qtype):
    def run(b):
        q, d = tq_codes(b, qtype)
        return d * (q - 1).float()

    return run


_DEQUANTIZERS = {
    "Q8_0": _dq_q8_0, "Q4_0": _dq_q4_0, "Q5_0": _dq_q5_0, "Q5_1": _dq_q5_1, "Q2_K": _dq_q2_k, "Q3_K": _dq_q3_k,
    "Q4_K": _dq_q4_k, "Q5_K": _dq_q5_k, "Q6_K": _dq_q6_k, "TQ1_0": _dq_tq("TQ1_0"), "TQ2_0": _dq_tq("TQ2_0"),
}


def dequantize(data: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """GGUF bytes ``uint8 [rows, row_bytes]`` -> float32 ``[rows, cols]``."""
    _check(qtype)
    data = data.reshape(-1, row_bytes(qtype, cols)).contiguous()
    rows = data.shape[0]
    if qtype == "F32":
        return data.view(torch.float32).reshape(rows, cols).clone()
    if qtype == "F16":
        return data.view(torch.float16).reshape(rows, cols).float()
    _, _, size = TYPES[qtype]
    return _DEQUANTIZERS[qtype](data.reshape(-1, size)).reshape(rows, cols)


# ------------------------------------------------------------------------ the grid of quantized blocks
def grid(data: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The grid that blocks define: ``(scale, offset, qmax)`` with every weight ``scale·q − offset`` for an unsigned
    code ``q`` in ``[0, qmax]``; ``scale``/``offset`` float32 ``[n_blocks, block]``, one value per weight (what
    GPTQ rounds onto). Types with a grid: Q8_0, Q4_0, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K."""
    _, blk, size = TYPES[_check(qtype)]
    b = data.reshape(-1, size)
    if qtype in ("Q8_0", "Q4_0", "Q5_0"):
        d = fp16_values(b[:, :2])
        mid, qmax = {"Q8_0": (128, 255), "Q4_0": (8, 15), "Q5_0": (16, 31)}[qtype]
        scale, offset = d, d * mid
    elif qtype == "Q5_1":
        scale, offset, qmax = fp16_values(b[:, :2]), -fp16_values(b[:, 2:4]), 31
    elif qtype in ("Q4_K", "Q5_K"):
        s, m = k_scales_mins(b)
        scale, offset, qmax = s.repeat_interleave(32, 1), m.repeat_interleave(32, 1), 15 if qtype == "Q4_K" else 31
    elif qtype == "Q6_K":
        s = q6_k_scales(b).repeat_interleave(16, 1)
        scale, offset, qmax = s, 32 * s, 63
    elif qtype == "Q2_K":
        s, m = q2_k_scales_mins(b)
        scale, offset, qmax = s.repeat_interleave(16, 1), m.repeat_interleave(16, 1), 3
    elif qtype == "Q3_K":
        s = q3_k_scales(b).repeat_interleave(16, 1)
        scale, offset, qmax = s, 4 * s, 7
    else:
        raise ValueError(f"{qtype} has no scale/offset grid (GPTQ onto it is not supported)")
    return scale.expand(-1, blk).contiguous(), offset.expand(-1, blk).contiguous(), qmax


def with_codes(data: torch.Tensor, qtype: str, codes: torch.Tensor) -> torch.Tensor:
    """``data`` (blocks of ``qtype``) with their codes replaced by ``codes`` (unsigned, ``[n_blocks, block]``, the
    ``q`` of :func:`grid`), scales and mins kept."""
    _, blk, size = TYPES[_check(qtype)]
    b = data.reshape(-1, size).clone()
    L = codes.reshape(-1, blk).to(torch.int32)
    if qtype == "Q8_0":
        b[:, 2:] = (L - 128).to(torch.int8).view(torch.uint8)
    elif qtype == "Q4_0":
        b[:, 2:] = _nibbles(L[:, :16], L[:, 16:])
    elif qtype in ("Q5_0", "Q5_1"):
        qh, qs = _q5_pack(L)
        at = 2 if qtype == "Q5_0" else 4
        b[:, at : at + 4], b[:, at + 4 :] = qh, qs
    elif qtype == "Q4_K":
        L4 = L.reshape(-1, 4, 2, 32)
        b[:, 16:] = _nibbles(L4[:, :, 0], L4[:, :, 1]).reshape(-1, 128)
    elif qtype == "Q5_K":
        L4 = L.reshape(-1, 4, 2, 32)
        b[:, 48:] = _nibbles(L4[:, :, 0], L4[:, :, 1]).reshape(-1, 128)
        hi = ((L >> 4) & 1).reshape(-1, 8, 32).to(torch.uint8)
        b[:, 16:48] = (hi << torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)).sum(1, dtype=torch.uint8)
    elif qtype == "Q6_K":
        L6 = L.reshape(-1, 2, 4, 32)
        b[:, :128] = torch.cat([_nibbles(L6[:, :, 0], L6[:, :, 2]), _nibbles(L6[:, :, 1], L6[:, :, 3])], -1).reshape(-1, 128)
        b[:, 128:192] = _pack_2bit(L >> 4)
    elif qtype == "Q2_K":
        b[:, 16:80] = _pack_2bit(L)
    elif qtype == "Q3_K":
        b[:, :32] = _q3_k_hmask(L)
        b[:, 32:96] = _pack_2bit(L & 3)
    else:
        raise ValueError(f"{qtype} has no scale/offset grid")
    return b.reshape(data.shape)
