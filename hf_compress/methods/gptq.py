"""GPTQ (Frantar et al., 2022) on one linear layer, after IST-DASLab's ``gptq.py``.

Calibration inputs give the Hessian ``H = 2/n X^T X`` of the layer's output error; columns of the weight
are then quantized one at a time and each column's error is fed back into the columns not yet quantized
through the upper Cholesky factor of ``H^-1`` (lazily, a block of columns at a time).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..quant.affine import all_finite
from ..quant.layout import QuantizedWeight, check_bits, default_g_idx, num_groups
from .rtn import check_finite, check_observer, group_qparams

logger = logging.getLogger(__name__)

_DAMP_RETRIES = 4  # 10x, 100x, 1000x, 10000x the requested damping


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    loss: float  # sum over columns of the GPTQ loss (w - q)^2 / d^2 / 2 (with the damped Hessian)
    relative_error: float  # tr(D H D^T) / tr(W H W^T), D = W - dequant, undamped H
    damp: float  # the damping actually added to the diagonal of H


def _upper_hinv(H: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of ``(H + damp*I)^-1`` (a column-major matrix), or None when a factorisation fails."""
    # H is damped in place and restored (no copy). The three LAPACK steps (potrf, potri, potrf) all run in one
    # column-major buffer, so none makes the internal column-major copy it would make of a row-major operand:
    # H plus one n x n matrix at the peak instead of H plus two (for a 5632-wide layer, each is 127 MB).
    diag = H.diagonal().clone()
    H.diagonal().add_(damp)
    U = torch.empty(H.shape, dtype=H.dtype, device=H.device).mT
    info = torch.empty((), dtype=torch.int32, device=H.device)
    torch.linalg.cholesky_ex(H, out=(U, info))
    H.diagonal().copy_(diag)  # exactly restored: H may be the caller's Hessian
    if info.item() != 0:
        return None
    torch.cholesky_inverse(U, out=U)
    torch.linalg.cholesky_ex(U, upper=True, out=(U, info))
    if info.item() != 0 or not all_finite(U):
        return None
    return U


def _damped_hinv(H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """``_upper_hinv`` with ``damp_percent`` x mean diagonal, retried with 10x the damping on failure."""
    mean_diag = torch.diag(H).mean().item()
    damp = damp_percent * mean_diag
    Hinv = _upper_hinv(H, damp)
    for _ in range(_DAMP_RETRIES):
        if Hinv is not None:
            break
        damp = damp * 10 if damp > 0 else 0.01 * mean_diag  # damp_percent=0: start from the default 1%
        logger.warning("GPTQ: Hessian not positive definite, retrying with damping %.3g", damp)
        Hinv = _upper_hinv(H, damp)
    if Hinv is None:
        raise ValueError(
            f"GPTQ: Cholesky of the Hessian failed even with damping {damp:.3g}: the calibration data is "
            "degenerate; use more (or more varied) calibration samples or a larger damp_percent"
        )
    return Hinv.to(torch.float32), damp


ROW_CHUNK = 256  # rows per chunk when a whole weight need not be materialised: [rows, in] temporaries, not [out, in]


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor | QuantizedWeight, H: torch.Tensor) -> float:
    """``tr(D H D^T) / tr(W H W^T)`` with ``D = W - approx``: the layer's output error on the calibration inputs
    (``H = 2/n X^T X``) relative to its output energy. ``approx``: a tensor, or a ``QuantizedWeight`` (dequantized
    a chunk of rows at a time)."""
    Hu = H.to(weight.device, torch.float32)
    num = den = 0.0
    for r in range(0, weight.shape[0], ROW_CHUNK):
        Wf = weight[r : r + ROW_CHUNK].detach().float()
        rows = approx.rows(r, r + ROW_CHUNK).dequantize() if isinstance(approx, QuantizedWeight) else approx[r : r + ROW_CHUNK]
        D = Wf - rows.float()
        num += ((D @ Hu) * D).sum().item()
        den += ((Wf @ Hu) * Wf).sum().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


class ColumnRounder:
    """The rounding of one weight column in GPTQ's column loop: ``affine.quantize`` with unsigned codes and zero
    point ``-z``, then the dequantized value rounded to the stored scale dtype (unless float32) --
    exactly what ``QuantizedWeight.dequantize()`` will return. In place in preallocated buffers: the loop runs once
    per input column (13,440 times for pydoc-llama-6m), so per-call set-up would dominate it."""

    def __init__(self, out: int, bits: int, scale_dtype: torch.dtype, device):
        self.q = torch.empty(out, dtype=torch.float32, device=device)
        self.dq = torch.empty(out, dtype=torch.float32, device=device)
        self.qmax = (1 << bits) - 1
        self.round_dtype = scale_dtype if scale_dtype != torch.float32 else None

    def set_group(self, scale: torch.Tensor, neg_zero: torch.Tensor) -> None:
        """The group's float ``scale`` and ``-zero`` codes, ``[out, 1]`` (as :func:`start_group` returns them)."""
        self.scale, self.zero = scale[:, 0].contiguous(), (-neg_zero[:, 0]).float()

    def __call__(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes as float, dequantized)`` of column ``w [out]``; both buffers are overwritten by the next call."""
        q = torch.div(w, self.scale, out=self.q).round_().add_(self.zero).clamp_(0, self.qmax)
        dq = torch.sub(q, self.zero, out=self.dq).mul_(self.scale)  # integer-valued floats: (q - z) is exact
        if self.round_dtype is not None:
            dq.copy_(dq.to(self.round_dtype))
        return q, dq


def start_group(
    Wt: torch.Tensor, i1: int, gs: int, bits: int, sym: bool, scales: torch.Tensor, zeros: torch.Tensor, observer: str
):
    """At a group start: the group's scale and zero code (chosen by ``observer``, see :func:`~.rtn.group_qparams`)
    from the columns ``Wt[i1 : i1 + gs]`` as they are now (every earlier column's error already fed back), stored
    into ``scales``/``zeros [out, n_groups]``; returns ``(scale, -zero)`` ``[out, 1]`` for
    :meth:`ColumnRounder.set_group`."""
    g = i1 // gs
    s, z = group_qparams(Wt[i1 : i1 + gs].t(), bits, -1, sym, scales.dtype, observer)
    scales[:, g : g + 1], zeros[:, g : g + 1] = s, z
    return s.float(), -z


class GPTQ:
    """Accumulates the Hessian of one linear layer's inputs and quantizes its weight with GPTQ."""

    def __init__(self, in_features: int, device=None, hessian_dtype: torch.dtype = torch.float32, uses: int | None = None):
        """``uses``: how many weights will be quantized on this Hessian (3 for q/k/v); after that many
        :meth:`quantize` calls the Hessian and its factor are freed, before the caller builds its layer (for a
        5632-wide input they are 127 MB each). ``None``: kept until :meth:`free`."""
        if hessian_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"hessian_dtype must be torch.float32 or torch.float64, got {hessian_dtype}")
        if uses is not None and not (isinstance(uses, int) and uses > 0):
            raise ValueError(f"uses must be a positive integer or None, got {uses!r}")
        self.in_features = in_features
        self.nsamples = 0
        self.H: torch.Tensor | None = torch.zeros(in_features, in_features, device=device, dtype=hessian_dtype)
        self._factors: dict = {}
        self._uses_left = uses

    def _hessian(self) -> torch.Tensor:
        if self.H is None:
            raise ValueError("this GPTQ object was freed: create a new one and feed it calibration data")
        return self.H

    def add_batch(self, x: torch.Tensor) -> None:
        """Add calibration inputs ``x [..., in_features]``: every row (token) is one sample."""
        H = self._hessian()
        if x.shape[-1] != self.in_features:
            raise ValueError(f"add_batch expects inputs [..., {self.in_features}], got shape {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.in_features).to(H.device, H.dtype)
        m = x.shape[0]
        if m == 0:
            return
        self._factors = {}  # a new batch changes the Hessian
        # running mean, scaled as gptq.py so H stays 2/n X^T X without ever holding X
        H.mul_(self.nsamples / (self.nsamples + m))
        self.nsamples += m
        x = x * math.sqrt(2 / self.nsamples)
        H.addmm_(x.t(), x)

    def free(self) -> None:
        self.H = None
        self._factors = {}

    def _factor(self, dev, desc_act: bool, damp_percent: float):
        """``(dead inputs, act-order permutation or None, upper Cholesky of the damped inverse Hessian, damping)``.

        They depend on the Hessian alone, so the linears sharing it (q/k/v, gate/up) factor it once. Without
        act-order the Hessian is damped and factored in place and restored afterwards (no n x n copy: 127 MB
        for a 5632-wide layer); act-order needs the permuted copy anyway."""
        key = (str(dev), desc_act, damp_percent)
        cached = self._factors.get(key)
        if cached is not None:
            return cached
        H0 = self._hessian()
        H = H0 if H0.device == torch.device(dev) else H0.to(dev)
        diag = torch.diag(H).clone()
        dead = diag == 0
        diag[dead] = 1  # an input that is always 0: any weight works, so make it 0 and keep H invertible
        # act-order; stable so that ties (e.g. equal diagonals) keep the natural order on every device
        perm = torch.argsort(diag, descending=True, stable=True) if desc_act else None
        if perm is not None:
            H = H[perm][:, perm]
            dead_p = dead[perm]
            H[dead_p, dead_p] = 1
            Hinv, damp = _damped_hinv(H, damp_percent)
            del H
        else:
            H[dead, dead] = 1
            try:
                Hinv, damp = _damped_hinv(H, damp_percent)
            finally:
                H[dead, dead] = 0
        self._factors = {key: (dead, perm, Hinv, damp)}  # one entry: a group uses one setting
        return self._factors[key]

    def quantize(
        self,
        weight: torch.Tensor,
        bits: int,
        group_size: int = -1,
        sym: bool = True,
        desc_act: bool = False,
        static_groups: bool = False,
        damp_percent: float = 0.01,
        block_size: int = 128,
        scale_dtype: torch.dtype | None = None,
        observer: str = "minmax",
    ) -> GPTQResult:
        """Quantize ``weight [out, in]``; the result is in the original column order (act-order via g_idx).
        ``observer``: how each group's range is chosen (``"minmax"``, as the reference GPTQ, or ``"mse"``: see
        :func:`~.rtn.group_qparams`)."""
        check_bits(bits)
        check_observer(observer)
        if weight.dim() != 2:
            raise ValueError(f"GPTQ expects a 2-D weight [out, in], got shape {tuple(weight.shape)}")
        if weight.shape[1] != self.in_features:
            raise ValueError(
                f"weight has {weight.shape[1]} input features but the Hessian was built for {self.in_features}"
            )
        H0 = self._hessian()
        if self.nsamples == 0:
            raise ValueError("no calibration data: call add_batch() with the layer's inputs before quantize()")
        check_finite(weight)
        check_finite(H0, "the Hessian (calibration activations)")
        n_groups = num_groups(self.in_features, group_size)  # also validates group_size
        if not (isinstance(block_size, int) and block_size > 0):
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not (math.isfinite(damp_percent) and damp_percent >= 0):
            raise ValueError(f"damp_percent must be a finite number >= 0, got {damp_percent!r}")
        scale_dtype = scale_dtype or (weight.dtype if weight.is_floating_point() else torch.float32)

        dev, (out, n) = weight.device, weight.shape
        gs = n if group_size == -1 else group_size
        dead, perm, Hinv, damp = self._factor(dev, desc_act, damp_percent)  # first: the peak is 2 n x n matrices
        # rows = input columns: each column is then a contiguous row, which makes the per-column rank-1
        # updates an order of magnitude faster than on strided [out, n] columns (one float32 copy of the weight)
        Wt = torch.empty(n, out, dtype=torch.float32, device=dev)
        Wt.copy_(weight.detach().t())
        Wt[dead] = 0

        scales = torch.empty(out, n_groups, dtype=scale_dtype, device=dev)
        zeros = torch.empty(out, n_groups, dtype=torch.int32, device=dev)
        if static_groups:  # params of the natural groups, fixed before any error feedback
            scales, zeros = group_qparams(Wt.t(), bits, group_size, sym, scale_dtype, observer)
        if perm is not None:
            Wt = Wt[perm]
        # group of each column in processing order, for the static lookups and the returned g_idx
        natural = default_g_idx(n, group_size, device=dev)
        col_group = (natural[perm] if perm is not None else natural).tolist() if static_groups else None
        Qt = torch.empty(n, out, dtype=torch.uint8, device=dev)  # codes < 2^8: a quarter of int32's bytes
        rounder = ColumnRounder(out, bits, scale_dtype, dev)
        if static_groups:
            scales_f, neg_zeros = scales.float(), -zeros
        diag = Hinv.diagonal().tolist()
        loss = torch.zeros((), dtype=torch.float32, device=dev)
        i1 = 0
        while i1 < n:
            i2 = min(i1 + block_size, n)
            if not static_groups:
                # a block never straddles a group start, so at each group start Wt holds every earlier
                # column's error (gptq.py reads W there without the pending updates of its own block)
                i2 = min(i2, (i1 // gs + 1) * gs)
                if i1 % gs == 0:
                    rounder.set_group(*start_group(Wt, i1, gs, bits, sym, scales, zeros, observer))
            W1, Hinv1 = Wt[i1:i2], Hinv[i1:i2, i1:i2].contiguous()  # rows of the column-major factor
            Err1 = torch.empty(i2 - i1, out, dtype=torch.float32, device=dev)
            for i in range(i2 - i1):
                if static_groups:
                    g = col_group[i1 + i]
                    rounder.set_group(scales_f[:, g : g + 1], neg_zeros[:, g : g + 1])
                w = W1[i]
                q, dq = rounder(w)
                Qt[i1 + i] = q
                err = torch.sub(w, dq, out=Err1[i]).div_(diag[i1 + i])
                W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
            loss += Err1.square().sum() / 2
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)  # the lazy batch update
            i1 = i2

        if perm is None or static_groups:
            g_idx = natural
        else:
            g_idx = torch.empty_like(natural)
            g_idx[perm] = torch.arange(n, dtype=torch.int32, device=dev) // gs
        del Wt, Hinv
        if self._uses_left is not None:
            self._uses_left -= 1
            if self._uses_left == 0:
                self._factors = {}  # the last weight on this Hessian: drop the factor before the codes are copied
        Q = (Qt.t() if perm is None else Qt[torch.argsort(perm)].t()).contiguous()
        del Qt
        qw = QuantizedWeight(Q.to(torch.int32), scales, zeros, g_idx, bits, group_size)
        del Q
        rel = relative_output_error(weight, qw, H0)
        if self._uses_left == 0:
            del H0
            self.free()
        loss_f = loss.item()
        logger.debug("GPTQ %dx%d %d-bit: loss %.4g, relative error %.4g, damp %.3g", out, n, bits, loss_f, rel, damp)
        return GPTQResult(qw, loss_f, rel, damp)

    def quantize_on_grid(self, weight: torch.Tensor, span: int, make_grid, damp_percent: float = 0.01, block_size: int = 128):
        """GPTQ onto a grid that another format chooses (a GGUF block type): at the start of every ``span`` columns,
        ``make_grid(W [out, span])`` -- the columns as they are now, earlier errors fed back -- returns
        ``(scale, offset, qmax, state)``: each weight of the span becomes ``scale·q − offset`` with ``q`` in
        ``[0, qmax]`` (``scale``/``offset`` ``[out, span]``). Returns ``(codes [out, in] int32, [state per span],
        relative output error)``."""
        H0 = self._hessian()
        if self.nsamples == 0:
            raise ValueError("no calibration data: call add_batch() with the layer's inputs before quantize_on_grid()")
        check_finite(weight)
        out, n = weight.shape
        if n != self.in_features or n % span:
            raise ValueError(f"weight [{out}, {n}] does not fit a {self.in_features}-input Hessian in spans of {span}")
        dev = weight.device
        W = weight.detach().to(torch.float32).clone()
        dead, _, Hinv, _ = self._factor(dev, False, damp_percent)
        W[:, dead] = 0
        Wt, Qt, Dt = W.t().contiguous(), torch.empty(n, out, dtype=torch.int32, device=dev), torch.empty(n, out, device=dev)
        del W
        diag = Hinv.diagonal().tolist()
        states = []
        i1 = 0
        while i1 < n:
            i2 = min(i1 + block_size, (i1 // span + 1) * span, n)
            if i1 % span == 0:
                scale, offset, qmax, state = make_grid(Wt[i1 : i1 + span].t())
                states.append(state)
                scale_t, offset_t = scale.t().float(), offset.t().float()
                inv_t = torch.where(scale_t == 0, torch.zeros_like(scale_t), 1 / torch.where(scale_t == 0, torch.ones_like(scale_t), scale_t))
            W1, Hinv1 = Wt[i1:i2], Hinv[i1:i2, i1:i2].contiguous()  # rows of the column-major factor
            Err1 = torch.empty(i2 - i1, out, dtype=torch.float32, device=dev)
            for i in range(i2 - i1):
                c = (i1 + i) % span
                w = W1[i]
                q = torch.round((w + offset_t[c]) * inv_t[c]).clamp_(0, qmax)
                dq = scale_t[c] * q - offset_t[c]
                Qt[i1 + i], Dt[i1 + i] = q.to(torch.int32), dq
                err = (w - dq) / diag[i1 + i]
                W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
                Err1[i] = err
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)
            i1 = i2
        rel = relative_output_error(weight, Dt.t(), H0)
        return Qt.t().contiguous(), states, rel
