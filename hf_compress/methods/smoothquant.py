"""Activation calibration for W8A8: SmoothQuant factors and static activation scales, per group of linears
that share an input (q/k/v, gate/up), with no transformers coupling.

Fed the group's input batch by batch (``add_batch``), it records each input channel's absmax (SmoothQuant:
``s_j = max|X_j|^alpha / max_i |W_ij|^(1-alpha)``, the weight maximum taken over every linear of the group)
and feeds a static per-tensor observer. With both smoothing and static scales the observer must see the
smoothed activations ``X / s``, known only once all batches are seen, so it asks for a second pass
(``another_pass``).
"""

from __future__ import annotations

import torch

from ..quant.affine import QuantSpec
from ..quant.int8 import check_finite, smooth_factors
from ..quant.observers import make_observer

# Symmetric int8 in [-127, 127], one scale per tensor: absmax / 127, our activation convention.
ACT_SPEC = QuantSpec(bits=8, symmetric=True, signed=True, restricted=True, granularity="tensor")


class ActivationCalibrator:
    def __init__(self, weights: list[torch.Tensor], smooth_alpha: float | None = None, observer: str | None = None):
        """``weights``: the group's float weights ``[out, in]``; ``observer``: a static-scale observer name, or None."""
        self.alpha = smooth_alpha
        self.weight_absmax = None
        if smooth_alpha is not None:
            self.weight_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
        self.observer = make_observer(observer, ACT_SPEC) if observer is not None else None
        self.channel_absmax: torch.Tensor | None = None
        self.smooth: torch.Tensor | None = None
        self._inv_smooth: torch.Tensor | None = None
        self.n_batches = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        check_finite(x2, "the calibration activations")
        self.n_batches += 1
        if self.alpha is not None and self.smooth is None:
            m = x2.abs().amax(dim=0)
            self.channel_absmax = m if self.channel_absmax is None else torch.maximum(self.channel_absmax, m)
            return
        if self.observer is not None:
            self.observer.observe(x2 if self._inv_smooth is None else x2 * self._inv_smooth)

    def another_pass(self) -> bool:
        """After a pass: compute the smoothing factors once; True if the static observer still has to see data."""
        if self.alpha is not None and self.smooth is None:
            if self.channel_absmax is None:
                raise ValueError("no calibration activations reached this layer: check the calibration data")
            self.smooth = smooth_factors(self.channel_absmax, self.weight_absmax.to(self.channel_absmax.device), self.alpha)
            self._inv_smooth = 1.0 / self.smooth
            return self.observer is not None
        return False

    def input_scale(self) -> torch.Tensor:
        """The static activation scale (0-d float32) of the (smoothed) input."""
        scale, _ = self.observer.compute_qparams()
        return scale.reshape(()).float()

    def free(self) -> None:
        self.observer = None
        self.weight_absmax = self.channel_absmax = None
