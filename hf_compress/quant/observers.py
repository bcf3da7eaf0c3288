"""Range observers: turn weights or streams of activation batches into a quantization range.

Every observer follows the same protocol::

    obs = make_observer("mse", spec)
    for batch in calibration:
        obs.observe(batch)           # any number of times
    scale, zero = obs.compute_qparams()

``observe`` reduces each batch according to ``spec.granularity`` (see :mod:`hf_compress.quant.affine`):
``"tensor"`` gives one range, ``"channel"`` one range per index of ``spec.axis`` (reduced over every
other dimension, so activation batches may have different leading sizes), ``"group"`` one range per
group of the last dimension (batches must then all have the same shape, e.g. a weight).
:meth:`Observer.compute_range` returns the chosen ``(min, max)``; :meth:`Observer.compute_qparams`
feeds it to :func:`~hf_compress.quant.affine.qparams_from_minmax`.

Observers that sample (percentile on huge batches, the MSE reservoir) use a private generator seeded
with ``seed`` and re-seeded by :meth:`Observer.reset`, so equal inputs give bit-identical results.
"""

from __future__ import annotations

import math

import torch

from .affine import (
    _EPS,
    QuantSpec,
    _channel_axis,
    _check_group_input,
    num_groups,
    qparams_from_minmax,
    reduce_minmax,
)

__all__ = [
    "OBSERVERS",
    "HistogramObserver",
    "KLObserver",
    "MSEObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "Observer",
    "PercentileObserver",
    "make_observer",
]

# torch.quantile refuses inputs with more elements than this.
_QUANTILE_LIMIT = 1 << 24


def _rows(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Size]:
    """``x`` as ``[P, N]``: one row per quantization unit, and the shape those ``P`` units take.

    Group rows are NaN-padded when ``group_size`` does not divide the last dimension.
    """
    if spec.granularity == "tensor":
        return x.reshape(1, -1), torch.Size([])
    if spec.granularity == "channel":
        axis = _channel_axis(x.dim(), spec.axis)
        return x.movedim(axis, 0).reshape(x.shape[axis], -1), torch.Size([x.shape[axis]])
    _check_group_input(x.dim())
    n, g = x.shape[-1], spec.group_size
    ng = num_groups(n, g)
    if ng * g != n:
        x = torch.cat([x, x.new_full((*x.shape[:-1], ng * g - n), float("nan"))], dim=-1)
    return x.reshape(-1, g), torch.Size((*x.shape[:-1], ng))


def _fake_quant_rows(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize ``rows [P, K]`` with one ``scale``/``zero`` per row (a new tensor).

    Same values as affine.fake_quantize: ``clamp(r - Z, qmin, qmax) + Z == clamp(r, qmin + Z, qmax + Z)``
    exactly for the integer-valued floats involved, and it saves two passes.
    """
    s = scale.reshape(-1, 1)
    z = zero.reshape(-1, 1).float()
    return torch.div(rows, s).round_().clamp_(z + spec.qmin, z + spec.qmax).mul_(s)


class Observer:
    """Base class: tracks the running min/max of everything observed (as ``min_val``/``max_val``)."""

    def __init__(self, spec: QuantSpec):
        if not isinstance(spec, QuantSpec):
            raise ValueError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self.reset()

    def reset(self) -> None:
        """Forget everything observed (and re-seed any sampling)."""
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.num_batches = 0

    @property
    def has_data(self) -> bool:
        return self.num_batches > 0

    def _prepare(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"observe() expects a torch.Tensor, got {type(x).__name__}")
        if x.numel() == 0:
            raise ValueError(f"observe() got an empty tensor of shape {tuple(x.shape)}")
        x = x.detach().float()
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(
                f"observed tensor contains NaN or inf ({bad} values): fix the calibration inputs "
                "(e.g. overflow in float16) before calibrating"
            )
        return x

    def _check_shape(self, old: torch.Tensor, new: torch.Tensor) -> None:
        if old.shape != new.shape:
            hint = (
                " per-group observers need every batch to have the same shape (use granularity 'tensor' or "
                "'channel' for activation streams)"
                if self.spec.granularity == "group"
                else " observe tensors with the same size along the channel axis"
            )
            raise ValueError(
                f"this batch reduces to ranges of shape {tuple(new.shape)} but earlier batches gave "
                f"{tuple(old.shape)}:{hint}"
            )

    def observe(self, x: torch.Tensor) -> None:
        """Update the statistics with one batch (any number of calls)."""
        x = self._prepare(x)
        lo, hi = reduce_minmax(x, self.spec)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self._check_shape(self.min_val, lo)
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)
        self._update(x, lo, hi)
        self.num_batches += 1

    def _update(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Subclass hook: ``x`` is the float32 batch, ``lo``/``hi`` its reduced min/max."""

    def _require_data(self) -> None:
        if not self.has_data:
            raise RuntimeError("observer has seen no data: call observe() with calibration tensors first")

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen ``(min, max)`` (float32, shaped by the granularity)."""
        self._require_data()
        return self.min_val, self.max_val

    def compute_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale float32, zero int32)`` for the chosen range."""
        lo, hi = self.compute_range()
        return qparams_from_minmax(lo, hi, self.spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bits={self.spec.bits}, granularity={self.spec.granularity!r}, batches={self.num_batches})"


class MinMaxObserver(Observer):
    """The running min and max of all observed values."""


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min/max: ``m <- m + c * (batch_m - m)``; the first batch initialises."""

    def __init__(self, spec: QuantSpec, averaging_constant: float = 0.01):
        if not (isinstance(averaging_constant, (int, float)) and 0.0 < averaging_constant <= 1.0):
            raise ValueError(f"averaging_constant must be a number in (0, 1], got {averaging_constant!r}")
        self.averaging_constant = float(averaging_constant)
        super().__init__(spec)

    def reset(self) -> None:
        super().reset()
        self.avg_min: torch.Tensor | None = None
        self.avg_max: torch.Tensor | None = None

    def _update(self, x, lo, hi) -> None:
        if self.avg_min is None:
            self.avg_min, self.avg_max = lo, hi
            return
        c = self.averaging_constant
        self.avg_min = self.avg_min + c * (lo - self.avg_min)
        self.avg_max = self.avg_max + c * (hi - self.avg_max)

    def compute_range(self):
        self._require_data()
        return self.avg_min, self.avg_max


class PercentileObserver(Observer):
    """Per-batch ``(100 - percentile)`` and ``percentile`` quantiles of the values, averaged over batches.

    A unit with more than ``max_samples`` values in a batch is estimated from ``max_samples`` values
    drawn (with replacement) by the seeded generator; rows are processed in chunks that respect
    torch.quantile's 2**24-element limit.
    """

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, max_samples: int = 1 << 22, seed: int = 0):
        if not (isinstance(percentile, (int, float)) and 50.0 < percentile <= 100.0):
            raise ValueError(f"percentile must be a number in (50, 100], got {percentile!r}")
        if not (isinstance(max_samples, int) and 1 <= max_samples <= _QUANTILE_LIMIT):
            raise ValueError(f"max_samples must be an integer in 1..{_QUANTILE_LIMIT}, got {max_samples!r}")
        self.percentile = float(percentile)
        self.max_samples = max_samples
        self.seed = seed
        super().__init__(spec)

    def reset(self) -> None:
        super().reset()
        self._gen = torch.Generator().manual_seed(self.seed)
        self._sum_lo: torch.Tensor | None = None
        self._sum_hi: torch.Tensor | None = None

    def _update(self, x, lo, hi) -> None:
        rows, shape = _rows(x, self.spec)
        p, n = rows.shape
        if n > self.max_samples:
            idx = torch.randint(0, n, (self.max_samples,), generator=self._gen).to(rows.device)
            rows = rows[:, idx]
            n = self.max_samples
        ql, qh = 1.0 - self.percentile / 100.0, self.percentile / 100.0
        if self.spec.granularity != "group" and _tail_size(ql, n) <= n // 8:
            blo, bhi = _tail_quantile(rows, ql, low=True), _tail_quantile(rows, qh, low=False)
            blo, bhi = blo.reshape(shape), bhi.reshape(shape)
        else:
            q = torch.tensor([ql, qh], device=rows.device)
            # NaN only appears as padding of a short last group; nanquantile skips it.
            fn = torch.nanquantile if self.spec.granularity == "group" else torch.quantile
            step = max(1, _QUANTILE_LIMIT // n)
            out = torch.cat([fn(rows[i : i + step], q, dim=1) for i in range(0, p, step)], dim=1)
            blo, bhi = out[0].reshape(shape), out[1].reshape(shape)
        if self._sum_lo is None:
            self._sum_lo, self._sum_hi = blo, bhi
        else:
            self._sum_lo = self._sum_lo + blo
            self._sum_hi = self._sum_hi + bhi

    def compute_range(self):
        self._require_data()
        return self._sum_lo / self.num_batches, self._sum_hi / self.num_batches


def _tail_size(q_low: float, n: int) -> int:
    """How many of the smallest (or largest) values the ``q_low`` (or ``1 - q_low``) quantile needs."""
    return int(math.floor(q_low * (n - 1))) + 2


def _tail_quantile(rows: torch.Tensor, q: float, low: bool) -> torch.Tensor:
    """``torch.quantile(rows, q, dim=1)`` (linear interpolation) for a quantile near one end, from ``topk``
    of that tail: O(n) instead of a full sort (the 99.99th percentile of a 2048 x 5632 activation needs its
    1,155 largest values, not 11.5 M sorted)."""
    n = rows.shape[1]
    pos = q * (n - 1)
    i = int(math.floor(pos))
    frac = pos - i
    if low:
        tail = torch.topk(rows, min(i + 2, n), dim=1, largest=False, sorted=True).values
        below, above = tail[:, i], tail[:, min(i + 1, n - 1)]
    else:
        t = n - 1 - i  # the value at ascending index i is the t-th largest (0-based)
        tail = torch.topk(rows, t + 1, dim=1, largest=True, sorted=True).values
        below, above = tail[:, t], tail[:, max(t - 1, 0)]
    return torch.lerp(below, above, frac)


class MSEObserver(Observer):
    """Min/max shrunk by the factor that minimises the Lp quantization error on the observed values.

    Candidates are ``alpha * (min, max)`` for ``alpha = 1 - i/grid``, ``i = 0..round(max_shrink*grid)``
    (so from 1 down to ``1 - max_shrink``), searched independently for every quantization unit; ties keep
    the larger range. The error is measured on a uniform sample (without replacement, seeded) of at most
    ``max_samples`` values per unit and ``max_total`` values overall; smaller inputs are kept whole.
    """

    def __init__(
        self,
        spec: QuantSpec,
        grid: int = 100,
        max_shrink: float = 0.8,
        norm: float = 2.0,
        max_samples: int = 1 << 20,
        max_total: int = 1 << 26,
        seed: int = 0,
    ):
        if not (isinstance(grid, int) and grid >= 1):
            raise ValueError(f"grid must be a positive integer, got {grid!r}")
        if not (isinstance(max_shrink, (int, float)) and 0.0 <= max_shrink < 1.0):
            raise ValueError(f"max_shrink must be a number in [0, 1), got {max_shrink!r}")
        if not (isinstance(norm, (int, float)) and norm > 0):
            raise ValueError(f"norm must be a positive number, got {norm!r}")
        for name, v in (("max_samples", max_samples), ("max_total", max_total)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.grid, self.max_shrink, self.norm = grid, float(max_shrink), float(norm)
        self.max_samples, self.max_total, self.seed = max_samples, max_total, seed
        super().__init__(spec)

    def reset(self) -> None:
        super().reset()
        self._gen = torch.Generator().manual_seed(self.seed)
        self._values: torch.Tensor | None = None  # [P, K], NaN = padding
        self._keys: torch.Tensor | None = None  # sampling keys, created on the first overflow

    def _rand_keys(self, values: torch.Tensor) -> torch.Tensor:
        keys = torch.rand(values.shape, generator=self._gen).to(values.device)
        return keys.masked_fill_(values.isnan(), 2.0)  # padding sorts after every real value

    def _update(self, x, lo, hi) -> None:
        rows, _ = _rows(x, self.spec)
        if self._values is None:
            values = rows.clone()  # never alias the caller's tensor: it may be modified in place later
            keys = None
        else:
            values = torch.cat([self._values, rows], dim=1)
            keys = None if self._keys is None else torch.cat([self._keys, self._rand_keys(rows)], dim=1)
        cap = max(1, min(self.max_samples, self.max_total // values.shape[0]))
        if values.shape[1] > cap:
            # Bottom-k by i.i.d. keys is a uniform sample without replacement and merges across batches.
            # Values kept so far were never subsampled before the first overflow, so keys made then are valid.
            if keys is None:
                keys = self._rand_keys(values)
            keys, idx = torch.topk(keys, cap, dim=1, largest=False, sorted=False)
            values = values.gather(1, idx)
        self._values, self._keys = values, keys

    def compute_range(self):
        self._require_data()
        shape = self.min_val.shape
        lo, hi = self.min_val.reshape(-1), self.max_val.reshape(-1)
        values = self._values
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        steps = int(round(self.max_shrink * self.grid))
        chunk = max(1, (1 << 22) // values.shape[1])  # bound the temporaries of one candidate
        padded = self.spec.granularity == "group"  # NaN padding of a short last group
        for i in range(steps + 1):
            alpha = 1.0 - i / self.grid
            clo, chi = lo * alpha, hi * alpha
            scale, zero = qparams_from_minmax(clo, chi, self.spec)
            err = torch.empty_like(lo)
            for r in range(0, values.shape[0], chunk):
                v = values[r : r + chunk]
                d = _fake_quant_rows(v, scale[r : r + chunk], zero[r : r + chunk], self.spec).sub_(v)
                d = d.square_() if self.norm == 2.0 else d.abs_().pow_(self.norm)
                err[r : r + chunk] = d.nansum(dim=1) if padded else d.sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, clo, best_lo)
            best_hi = torch.where(better, chi, best_hi)
        return best_lo.reshape(shape), best_hi.reshape(shape)


class HistogramObserver(Observer):
    """Per-tensor histogram + KL-divergence (entropy) threshold search, TensorRT style.

    Symmetric specs histogram ``|x|`` on ``[0, T]`` and pick ``T``; the range is ``(-T, T)``.
    Asymmetric specs histogram ``x`` and pick the upper threshold (lower end fixed at the minimum), then
    the lower one (upper fixed), then the upper one again (coordinate descent). A candidate window of ``n >= quant_bins`` histogram bins is compared
    with its ``quant_bins``-level quantized version; mass outside the window is folded into its edge bins;
    the window with the smallest KL divergence wins (ties: the widest).

    Thresholds are bin edges, so the range is resolved to one bin width, and a window is never narrower
    than ``quant_bins`` bins. The histogram range starts at the first batch's range and grows by whole powers of two of the bin
    width when later batches exceed it, so old bins merge exactly into new ones.
    ``quant_bins`` defaults to the number of codes covering the histogram: ``2**(bits-1)`` for
    symmetric specs, ``qmax - qmin + 1`` otherwise.
    """

    def __init__(self, spec: QuantSpec, bins: int = 2048, quant_bins: int | None = None):
        if spec.granularity != "tensor":
            raise ValueError(
                f"{type(self).__name__} supports granularity='tensor' only, got {spec.granularity!r}: "
                "use 'percentile' or 'mse' for per-channel or per-group ranges"
            )
        if quant_bins is None:
            quant_bins = spec.qmax_positive + 1 if spec.symmetric else spec.qmax - spec.qmin + 1
        if not (isinstance(quant_bins, int) and quant_bins >= 2):
            raise ValueError(f"quant_bins must be an integer >= 2, got {quant_bins!r}")
        if not (isinstance(bins, int) and bins >= quant_bins):
            raise ValueError(f"bins must be an integer >= quant_bins ({quant_bins}), got {bins!r}")
        self.bins, self.quant_bins = bins, quant_bins
        super().__init__(spec)

    def reset(self) -> None:
        super().reset()
        self.hist: torch.Tensor | None = None  # float64 counts, on the CPU
        self.hist_min = 0.0
        self.bin_width = 0.0

    def _grow(self, vlo: float, vhi: float) -> None:
        lo, w, bins = self.hist_min, self.bin_width, self.bins
        if vlo >= lo and vhi <= lo + bins * w:
            return
        m = max(0, -(-(lo - vlo) // w))  # whole old bins added below, so old bin edges stay new-bin edges
        new_lo = lo - m * w
        k = 0
        while new_lo + bins * w * 2**k < max(vhi, lo + bins * w):
            k += 1
        new_w = w * 2**k
        centers = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * w
        # An old bin lies inside exactly one new bin; its centre finds that bin without rounding trouble.
        idx = ((centers - new_lo) / new_w).floor().clamp_(0, bins - 1).long()
        self.hist = torch.zeros_like(self.hist).index_add_(0, idx, self.hist)
        self.hist_min, self.bin_width = new_lo, new_w

    def _update(self, x, lo, hi) -> None:
        v = x.abs() if self.spec.symmetric else x
        vlo = 0.0 if self.spec.symmetric else float(lo)
        vhi = float(v.max())
        if self.hist is None:
            span = max(vhi - vlo, _EPS * max(1.0, abs(vlo), abs(vhi)))
            self.hist = torch.zeros(self.bins, dtype=torch.float64)  # on the CPU: small, and float64 everywhere
            self.hist_min, self.bin_width = vlo, span / self.bins
        else:
            self._grow(vlo, vhi)
        idx = ((v - self.hist_min) / self.bin_width).floor_().clamp_(0, self.bins - 1).long()
        self.hist += torch.bincount(idx.reshape(-1), minlength=self.bins).cpu().double()

    def _search(self, hist: torch.Tensor, starts, ends, widest_last: bool) -> tuple[int, int]:
        """The window ``[a, b)`` (bin indices) of smallest KL among the candidates (ties: the widest)."""
        a = torch.as_tensor(starts, dtype=torch.long)
        b = torch.as_tensor(ends, dtype=torch.long)
        a, b = torch.broadcast_tensors(a, b)
        step = max(1, (1 << 22) // self.quant_bins)  # bound the [candidates, quant_bins] temporaries
        kl = torch.cat(
            [_kl_windows(hist, a[i : i + step], b[i : i + step], self.quant_bins) for i in range(0, len(a), step)]
        )
        i = len(kl) - 1 - int(torch.argmin(kl.flip(0))) if widest_last else int(torch.argmin(kl))
        return int(a[i]), int(b[i])

    def compute_range(self):
        self._require_data()
        hist = self.hist
        nq, bins = self.quant_bins, self.bins
        # Upper threshold first (lower end at the histogram minimum): larger b is wider, keep the last minimum.
        _, b = self._search(hist, 0, range(nq, bins + 1), widest_last=True)
        a = 0
        if not self.spec.symmetric:
            # Then the lower threshold for that upper one (smaller a is wider: first minimum), then the
            # upper one again for the chosen lower end: coordinate descent never increases the divergence.
            a, _ = self._search(hist, range(0, b - nq + 1), b, widest_last=False)
            _, b = self._search(hist, a, range(a + nq, bins + 1), widest_last=True)
        lo = self.hist_min + a * self.bin_width
        hi = self.hist_min + b * self.bin_width
        if self.spec.symmetric:
            lo = -hi
        dev = self.min_val.device
        return torch.tensor(lo, dtype=torch.float32, device=dev), torch.tensor(hi, dtype=torch.float32, device=dev)


def _kl_windows(hist: torch.Tensor, a: torch.Tensor, b: torch.Tensor, nq: int) -> torch.Tensor:
    """KL(P || Q) for each histogram window ``[a[i], b[i])`` of at least ``nq`` bins (float64 ``hist``).

    P is the histogram restricted to the window, with the mass below/above it folded into its first/last
    bin (clipping). Q splits the window into ``nq`` chunks (bin ``j`` -> ``(j - a) * nq // n``) and spreads
    each chunk's mass evenly over its non-empty bins, as TensorRT's entropy calibration does.
    Computed from prefix sums in O(nq) per window: with N the total and W the window mass, the bins of
    chunk k (mass S_k, c_k non-empty bins, H_k = sum h log h) contribute
    ``(H_k - S_k log N - S_k log(S_k / (c_k W))) / N``; the two edge bins are then corrected for the
    folded mass.
    """
    h = hist
    pos = h > 0
    total = h.sum()

    def prefix(t):
        return torch.cat([t.new_zeros(1), t.cumsum(0)])

    ch, cn, chl = prefix(h), prefix(pos.double()), prefix(torch.where(pos, h * h.log(), 0.0))
    n = (b - a)[:, None]
    k = torch.arange(nq + 1)[None, :]
    edges = a[:, None] + (k * n + nq - 1) // nq  # first bin of each chunk; edges[:, nq] == b
    lo_e, hi_e = edges[:, :-1], edges[:, 1:]
    s = ch[hi_e] - ch[lo_e]
    cnt = cn[hi_e] - cn[lo_e]
    hl = chl[hi_e] - chl[lo_e]
    w = ch[b] - ch[a]
    log_n = total.log()
    mean_q = s / (cnt * w[:, None])  # normalised Q value of each non-empty bin of the chunk
    kl = torch.where(s > 0, hl - s * (log_n + mean_q.log()), 0.0).sum(1) / total
    # Edge bins: replace the plain term by the one with the folded (clipped) mass.
    for j, chunk, extra in ((a, 0, ch[a]), (b - 1, nq - 1, total - ch[b])):
        hj = h[j]
        q = torch.where(hj > 0, mean_q[:, chunk], 0.0)
        old = torch.where(hj > 0, hj / total * (hj / total / q).log(), 0.0)
        pj = (hj + extra) / total
        # Q empty under mass of P (outliers folded into an empty edge bin) gets a large finite penalty.
        new = torch.where(pj > 0, pj * (pj / q.clamp(min=1e-12)).log(), 0.0)
        kl = kl + new - old
    return torch.where(w > 0, kl, float("inf"))


KLObserver = HistogramObserver

OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving-average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": HistogramObserver,
    "histogram": HistogramObserver,
}


def make_observer(name: str, spec: QuantSpec, **kw) -> Observer:
    """Build an observer by name: ``minmax``, ``moving-average``, ``percentile``, ``mse``, ``kl`` (alias ``histogram``)."""
    cls = OBSERVERS.get(name)
    if cls is None:
        raise ValueError(f"unknown observer {name!r}: choose one of {', '.join(map(repr, OBSERVERS))}")
    return cls(spec, **kw)
