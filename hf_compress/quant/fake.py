"""Differentiable fake quantization for quantization-aware training (LSQ / LSQ+).

``fake_quantize_ste(x, scale, zero, qmin, qmax)`` returns ``(clamp(round(x / s) + round(z), qmin, qmax) - round(z)) * s``
with straight-through rounding, so autograd gives exactly the Learned Step Size Quantization gradients (Esser et
al. 2020; zero points as in LSQ+, Bhalgat et al. 2020):

- ``x``: 1 inside the clipping range, 0 outside (the clipped values do not move);
- ``s``: ``round(x/s) - x/s`` inside, ``qmin - z`` / ``qmax - z`` outside, scaled by ``grad_factor``;
- ``z``: 0 inside, ``-s`` outside.

``scale`` and ``zero`` broadcast against ``x``. The forward value equals the codes a packed layer stores times
its scale, so a converted model computes what was trained.
"""

from __future__ import annotations

import math

import torch

__all__ = ["fake_quantize_ste", "lsq_grad_factor", "round_ste", "scale_gradient"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward, the identity's gradient in the backward."""
    return x + (torch.round(x) - x).detach()


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward, its gradient multiplied by ``factor`` in the backward."""
    if factor == 1.0:
        return x
    return x * factor + (x - x * factor).detach()


def lsq_grad_factor(values_per_scale: int, qmax: int) -> float:
    """LSQ's gradient scale for a step size shared by ``values_per_scale`` values: ``1 / sqrt(N * Q_P)``."""
    return 1.0 / math.sqrt(max(values_per_scale, 1) * max(qmax, 1))


def fake_quantize_ste(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    qmin: int,
    qmax: int,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the grid ``(q - z) * scale``, ``q`` integer in ``[qmin, qmax]``, differentiably.

    ``zero`` may be None (0) or a float tensor (rounded in the forward with a straight-through gradient). The
    result has ``x``'s dtype; the arithmetic runs in float32.
    """
    s = scale_gradient(scale.float(), grad_factor).clamp(min=torch.finfo(torch.float32).tiny)
    xf = x.float()
    q = round_ste(xf / s)
    if zero is not None:
        z = round_ste(scale_gradient(zero.float(), grad_factor))
        q = torch.clamp(q + z, qmin, qmax) - z
    else:
        q = torch.clamp(q, qmin, qmax)
    return (q * s).to(x.dtype)
