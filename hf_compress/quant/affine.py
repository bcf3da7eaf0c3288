"""Affine (uniform) quantization math: specs, ranges, scales/zero points, (fake) quantization.

Convention used everywhere in ``hf_compress``::

    X_q = clamp(round(X / S) - Z, qmin, qmax)        # int32 codes
    X~  = S * (X_q + Z)                               # dequantized values (float32)

``S`` (scale, float32) is positive. ``Z`` (zero point, int32) is *subtracted* when quantizing and
*added* when dequantizing, and it may lie outside ``[qmin, qmax]`` (so torch's built-in quantize ops,
which use ``X/S + Z`` and clamp ``Z`` to the code range, are not a reference). ``round`` is
:func:`torch.round` (round half to even).

Scales and zero points:

- symmetric, signed codes: ``S = max(|min|, |max|) / (2**(b-1) - 1)``, ``Z = 0``.
- symmetric, unsigned codes (midpoint zero): same ``S``, ``Z = -2**(b-1)`` (``-(2**(b-1) - 1)`` when
  ``restricted``), so ``0`` maps to the middle code and ``+max`` to ``qmax``.
- asymmetric: ``S = (max - min) / (qmax - qmin)`` and ``Z`` solves ``S * (qmin + Z) = min``, i.e.
  ``Z = min / S - qmin``, made an integer by ``zero_rounding``: ``"round"`` (nearest, the default) or
  ``"trunc"`` (toward zero). The range is *not* widened to include 0.

A zero range (all-equal inputs) would give ``S = 0``; the scale is floored at
``finfo(float32).eps * max(1, |min|, |max|)``, which also keeps ``|Z| <= 2**23 + 256`` (exact in float32).

Worked example (int8 signed ``[-128, 127]``, asymmetric, per tensor), ``X = [[1.2, 2.4, 3.6],
[11.2, 12.4, 13.6]]``: ``S*(127 + Z) = 13.6`` and ``S*(-128 + Z) = 1.2`` give ``S = 12.4/255 ~ 0.048627``
and ``Z = 152.68``.

- ``zero_rounding="round"``: ``Z = 153``, ``X_q = [[-128, -104, -79], [77, 102, 127]]``,
  ``X~ ~ [[1.2157, 2.3827, 3.5984], [11.1843, 12.4000, 13.6157]]``, ``||X - X~||^2 ~ 0.00104``.
- ``zero_rounding="trunc"``: ``Z = 152``, ``X_q = [[-127, -103, -78], [78, 103, 127]]`` (the last code is
  clamped from 128).

Granularity (shape of ``S``/``Z`` for an input ``x``):

- ``"tensor"``: ``()``.
- ``"channel"``: ``(x.shape[axis],)``; any axis, negative allowed.
- ``"group"``: ``(*x.shape[:-1], ceil(x.shape[-1] / group_size))``: contiguous groups of ``group_size``
  along the last (input) dimension; the last group is shorter when ``group_size`` does not divide it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "GRANULARITIES",
    "ZERO_ROUNDINGS",
    "QuantSpec",
    "broadcast_qparams",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "integer_range",
    "num_groups",
    "qparams_from_minmax",
    "quantization_error",
    "quantize",
    "reduce_minmax",
]

GRANULARITIES = ("tensor", "channel", "group")
ZERO_ROUNDINGS = ("round", "trunc")
_EPS = torch.finfo(torch.float32).eps


_FINITE_CHUNK = 1 << 22  # elements per isfinite call: its temporaries (|x| and two masks) ~30 MB, not 2.5x the tensor


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite, checked a chunk at a time (a 5632² Hessian is 127 MB)."""
    x = x.detach()
    if x.dim() == 2 and not x.is_contiguous() and x.mT.is_contiguous():
        x = x.mT  # a column-major matrix (a Cholesky factor): flattening it as it is would copy it
    flat = x.reshape(-1)
    return all(bool(torch.isfinite(c).all()) for c in flat.split(_FINITE_CHUNK))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_bits(bits) -> None:
    if not _is_int(bits) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")


def integer_range(bits: int, signed: bool = True, restricted: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)`` of ``bits``-bit codes.

    signed: ``[-2**(b-1), 2**(b-1)-1]`` (restricted: ``[-(2**(b-1)-1), 2**(b-1)-1]``);
    unsigned: ``[0, 2**b-1]`` (restricted: ``[0, 2**b-2]``).
    """
    _check_bits(bits)
    if signed:
        hi = (1 << (bits - 1)) - 1
        return (-hi if restricted else -hi - 1), hi
    return 0, (1 << bits) - (2 if restricted else 1)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: bit width, code range, symmetric or not, and the granularity of ``S``/``Z``.

    ``axis`` is used only with ``granularity="channel"``, ``group_size`` only with ``"group"`` (where it
    is required).
    """

    bits: int
    symmetric: bool = True
    signed: bool = True
    restricted: bool = False
    granularity: str = "tensor"
    axis: int = 0
    group_size: int | None = None
    zero_rounding: str = "round"

    def __post_init__(self):
        _check_bits(self.bits)
        for name in ("symmetric", "signed", "restricted"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {', '.join(map(repr, GRANULARITIES))}, got {self.granularity!r}"
            )
        if not _is_int(self.axis):
            raise ValueError(f"axis must be an integer (negative allowed), got {self.axis!r}")
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size <= 0):
            raise ValueError(f"group_size must be a positive integer (e.g. 128), got {self.group_size!r}")
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("granularity='group' needs group_size: pass a positive integer such as group_size=128")
        if self.zero_rounding not in ZERO_ROUNDINGS:
            raise ValueError(
                f"zero_rounding must be one of {', '.join(map(repr, ZERO_ROUNDINGS))}, got {self.zero_rounding!r}"
            )

    @property
    def qmin(self) -> int:
        return integer_range(self.bits, self.signed, self.restricted)[0]

    @property
    def qmax(self) -> int:
        return integer_range(self.bits, self.signed, self.restricted)[1]

    @property
    def qmax_positive(self) -> int:
        """Largest positive code step from zero used by symmetric scales: ``2**(bits-1) - 1``."""
        return (1 << (self.bits - 1)) - 1

    @property
    def symmetric_zero(self) -> int:
        """The zero point of symmetric quantization: 0 for signed codes, the midpoint for unsigned ones."""
        return self.qmax_positive - self.qmax


def num_groups(in_features: int, group_size: int) -> int:
    """``ceil(in_features / group_size)``."""
    return -(-in_features // group_size)


def _check_tensor(x: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}): there is nothing to quantize")


def _channel_axis(ndim: int, axis: int) -> int:
    if ndim == 0 or not -ndim <= axis < ndim:
        raise ValueError(
            f"channel axis {axis} is out of range for a {ndim}-D tensor: use an axis in [-{max(ndim, 1)}, {max(ndim, 1) - 1}]"
        )
    return axis % ndim


def _check_group_input(ndim: int) -> None:
    if ndim == 0:
        raise ValueError("granularity='group' needs a tensor with at least 1 dimension (groups run along the last)")


def _group_index(in_features: int, group_size: int, device) -> torch.Tensor:
    return torch.arange(in_features, device=device) // group_size


def reduce_minmax(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` over each quantization unit of ``spec`` (float32).

    Shapes: tensor ``()``; channel ``(x.shape[axis],)``; group ``(*x.shape[:-1], n_groups)``.
    """
    _check_tensor(x)
    x = x.detach()
    if spec.granularity == "tensor":
        lo, hi = torch.aminmax(x)
    elif spec.granularity == "channel":
        axis = _channel_axis(x.dim(), spec.axis)
        rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        lo, hi = torch.aminmax(rows, dim=1)
    else:
        _check_group_input(x.dim())
        n, g = x.shape[-1], spec.group_size
        ng = num_groups(n, g)
        pad = ng * g - n
        if pad:  # repeat the last value: it changes neither the min nor the max of the short group
            x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
        lo, hi = torch.aminmax(x.reshape(*x.shape[:-1], ng, g), dim=-1)
    return lo.float(), hi.float()


def qparams_from_minmax(min_val, max_val, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) for the range ``[min_val, max_val]`` (tensors or numbers).

    The outputs have the broadcast shape of ``min_val`` and ``max_val``. See the module docstring for
    the formulas.
    """
    lo = torch.as_tensor(min_val).detach()
    device = lo.device
    # float64 maths (on the CPU for devices without float64, e.g. MPS); results go back to `device`.
    work = torch.device("cpu") if device.type == "mps" else device
    lo = lo.to(work, torch.float64)
    hi = torch.as_tensor(max_val).detach().to(work, torch.float64)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("min_val/max_val contain NaN or inf: observe finite data (check the inputs for overflow)")
    if (lo > hi).any():
        raise ValueError("min_val must be <= max_val everywhere: got a range with min > max")
    lo, hi = torch.broadcast_tensors(lo, hi)
    # float64 so (max - min) of huge float32 values cannot overflow before the division.
    absmax = torch.maximum(lo.abs(), hi.abs())
    floor = _EPS * absmax.clamp(min=1.0)
    if spec.symmetric:
        scale = (absmax / spec.qmax_positive).clamp(min=floor).float()
        zero = torch.full_like(lo, spec.symmetric_zero, dtype=torch.int32)
        return scale.to(device), zero.to(device)
    qmin, qmax = spec.qmin, spec.qmax
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=floor).float()
    # Z from the float32 scale that is actually stored, so S*(qmin+Z) ~ min holds for it.
    z = lo / scale.double() - qmin
    z = torch.round(z) if spec.zero_rounding == "round" else torch.trunc(z)
    return scale.to(device), z.to(device, torch.int32)


def compute_qparams(x: torch.Tensor, spec: QuantSpec, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reduce_minmax` then :func:`qparams_from_minmax`.

    ``clip_ratio`` in ``(0, 1]`` scales ``min`` and ``max`` (toward 0) before computing the parameters,
    i.e. clips the range.
    """
    _check_tensor(x)
    if not (isinstance(clip_ratio, (int, float)) and 0.0 < clip_ratio <= 1.0):
        raise ValueError(f"clip_ratio must be a number in (0, 1], got {clip_ratio!r}")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"x contains NaN or inf ({bad} values): cannot derive a quantization range; fix the input")
    lo, hi = reduce_minmax(x, spec)
    if clip_ratio != 1.0:
        lo, hi = lo * clip_ratio, hi * clip_ratio
    return qparams_from_minmax(lo, hi, spec)


def broadcast_qparams(p, x_shape, spec: QuantSpec) -> torch.Tensor:
    """Expand a scale or zero point of ``spec``'s granularity to ``x_shape`` (a view where possible).

    Accepted inputs: a tensor already of shape ``x_shape`` (returned as is); for ``"tensor"`` anything
    broadcastable to ``x_shape``; for ``"channel"`` shape ``(C,)`` (or an already-broadcastable shape);
    for ``"group"`` shape ``(..., n_groups)``, each group's value repeated over its columns (the last,
    shorter group included).
    """
    p = torch.as_tensor(p)
    x_shape = torch.Size(x_shape)
    if p.shape == x_shape:
        return p
    try:
        if spec.granularity == "tensor":
            return p.broadcast_to(x_shape) if p.dim() else p.expand(x_shape)
        if spec.granularity == "channel":
            axis = _channel_axis(len(x_shape), spec.axis)
            if p.dim() == 1 and p.shape[0] == x_shape[axis]:
                view = [1] * len(x_shape)
                view[axis] = x_shape[axis]
                return p.reshape(view).expand(x_shape)
            return p.broadcast_to(x_shape)
        _check_group_input(len(x_shape))
        n = x_shape[-1]
        ng = num_groups(n, spec.group_size)
        if p.dim() == 0 or p.shape[-1] != ng:
            raise RuntimeError
        return p[..., _group_index(n, spec.group_size, p.device)].broadcast_to(x_shape)
    except RuntimeError:
        raise ValueError(
            f"quantization parameters of shape {tuple(p.shape)} do not match granularity={spec.granularity!r} "
            f"for an input of shape {tuple(x_shape)}: compute them with reduce_minmax/compute_qparams and the same spec"
        ) from None


def quantize(x: torch.Tensor, scale, zero, spec: QuantSpec) -> torch.Tensor:
    """Integer codes ``clamp(round(x / S) - Z, qmin, qmax)`` as int32, same shape as ``x``."""
    xf = x.detach().float()
    s = broadcast_qparams(torch.as_tensor(scale, device=x.device), x.shape, spec).float()
    z = broadcast_qparams(torch.as_tensor(zero, device=x.device), x.shape, spec).float()
    # clamp in float before the int cast so out-of-range values cannot overflow int32.
    q = (torch.round(xf / s) - z).clamp_(spec.qmin, spec.qmax)
    return q.to(torch.int32)


def dequantize(q: torch.Tensor, scale, zero, spec: QuantSpec) -> torch.Tensor:
    """Float32 values ``S * (q + Z)``, same shape as ``q``."""
    s = broadcast_qparams(torch.as_tensor(scale, device=q.device), q.shape, spec).float()
    z = broadcast_qparams(torch.as_tensor(zero, device=q.device), q.shape, spec)
    # integer add first: exact, then a single rounding in the multiply.
    return (q.to(torch.int32) + z.to(torch.int32)).float() * s


def fake_quantize(x: torch.Tensor, scale, zero, spec: QuantSpec) -> torch.Tensor:
    """``dequantize(quantize(x))`` cast back to ``x.dtype`` (no straight-through gradient)."""
    return dequantize(quantize(x, scale, zero, spec), scale, zero, spec).to(x.dtype)


def quantization_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``||x - x_hat||^2``: the sum of squared differences, a float32 scalar."""
    d = x.detach().float() - x_hat.detach().float()
    return (d * d).sum().float()
