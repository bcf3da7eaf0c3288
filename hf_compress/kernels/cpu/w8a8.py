"""CPU int8 x int8 GEMM for W8A8 and LLM.int8 layers.

``cpu-onednn``: oneDNN's quantized linear (``onednn::qlinear_pointwise``, the op PyTorch's x86 inductor
quantization lowers to) with uint8 activations (our int8 codes + 128, zero point 128) and the prepacked int8
weight: VNNI int8 dot products, measured 2.0x a bf16 matmul at 512x2048x5632 and ~5x at batch 1 on this
2-core AVX512-VNNI CPU (``torch._int_mm``: 1.75x and 0.7x at 4 rows). The weight scales go in as oneDNN's
per-channel scales; a per-token activation scale cannot, so the kernel runs with ``x_scale = 1`` and the
fp32 output rows are scaled afterwards (one pass over ``[M, N]``).

``cpu-int-mm``: ``torch._int_mm`` (int32 accumulation) and the same epilogue in fp32, for builds without
oneDNN.

Activation quantization (:func:`quantize_activations`) follows :mod:`hf_compress.quant.int8` exactly
(same float32 division and rounding), so codes match the reference bit for bit.
"""

from __future__ import annotations

import torch

from ...quant.int8 import INT8_MAX

__all__ = ["has_vnni", "int8_gemm", "onednn_available", "prepare_onednn", "prepare_state", "quantize_activations"]


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def has_vnni() -> bool:
    """Whether the CPU has an int8 dot-product instruction (AVX512-VNNI or AVX-VNNI) for oneDNN's u8 x s8 GEMM."""
    check = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(check()) if check is not None else False


def prepare_onednn(weight: torch.Tensor) -> torch.Tensor:
    """The int8 weight ``[N, K]`` prepacked for oneDNN (works for any number of activation rows)."""
    return torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)


def quantize_activations(
    x2: torch.Tensor,
    inv_smooth: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    per_tensor: bool,
    zero: int,
    threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``x2 [M, K]`` -> (codes + ``zero`` as uint8 (zero=128) or int8 (zero=0), float32 scale ``[M]`` or 0-d,
    LLM.int8's outlier column indices or None).

    ``inv_smooth`` multiplies ``x`` (SmoothQuant's ``1/s``: the division is done once, at load). Dynamic
    per-token scales come from each row's absmax, per-tensor from the whole tensor's, static from ``act_scale``.
    With ``threshold``, columns where any ``|x| >= threshold`` are found from the same ``|x|`` and zeroed
    (they are computed in float elsewhere).
    """
    xf = x2.float() if x2.dtype != torch.float32 else x2
    if inv_smooth is not None:
        xf = xf * inv_smooth
    idx = None
    if act_scale is not None:
        scale = act_scale
    else:
        a = xf.abs()
        if threshold is not None:
            idx = (a.amax(dim=0) >= threshold).nonzero().squeeze(1)
            if idx.numel():
                xf = xf.index_fill_(1, idx, 0.0) if xf is not x2 else xf.index_fill(1, idx, 0.0)
                a.index_fill_(1, idx, 0.0)
            else:
                idx = None
        absmax = a.amax(dim=-1) if not per_tensor else a.amax()
        scale = torch.where(absmax > 0, absmax / INT8_MAX, 1.0)
    q = torch.div(xf, scale.unsqueeze(-1) if scale.dim() else scale).round_()
    if act_scale is not None:  # dynamic scales map the absmax to 127 (+- float rounding): nothing to clamp
        q = q.clamp_(-INT8_MAX, INT8_MAX)
    q = q.add_(zero).to(torch.uint8) if zero else q.to(torch.int8)
    return q, scale, idx


def _onednn_mm(q_u8: torch.Tensor, x_scale: float, state: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's int8 linear on uint8 codes (zero point 128): float32 ``x_scale * w_scale * sums (+ bias)``."""
    return torch.ops.onednn.qlinear_pointwise(
        q_u8, x_scale, 128, state["packed"], state["w_scale"], state["w_zero"], bias, 1.0, 0, torch.float32, "none", [], ""
    )


def int8_gemm(
    x2: torch.Tensor,
    state: dict,
    bias: torch.Tensor | None,
    *,
    inv_smooth: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    per_tensor: bool = False,
    threshold: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x2 [M, K]`` float -> (``[M, N]`` float32 through the prepared int8 weight (see :func:`prepare_state`),
    the outlier columns left out when ``threshold`` is given, or None). A single row goes through the GEMV
    :func:`single_row_backend` timed faster for this weight shape."""
    backend = state["single_row"] if x2.shape[0] == 1 else state["backend"]
    zero = 128 if backend == "cpu-onednn" else 0
    q, scale, idx = quantize_activations(x2, inv_smooth, act_scale, per_tensor, zero, threshold)
    scalar = scale.dim() == 0
    if backend == "cpu-onednn":
        b = bias.float() if bias is not None and scalar else None
        out = _onednn_mm(q, float(scale) if scalar else 1.0, state, b)
        if scalar:  # scale and bias applied by oneDNN
            return out, idx
    else:
        out = torch.mul(torch._int_mm(q, state["weight_t"]), state["w_scale"])  # int32 * float32 -> float32
        if scalar:
            out.mul_(scale)
    if bias is not None:
        bias = bias if bias.dtype == torch.float32 else bias.float()
        return (out.add_(bias) if scalar else torch.addcmul(bias, out, scale.unsqueeze(1))), idx
    return (out if scalar else out.mul_(scale.unsqueeze(1))), idx


_SINGLE_ROW: dict[tuple[int, int], str] = {}


def single_row_backend(state: dict) -> str:
    """The faster 1-row int8 GEMV for this weight shape, ``torch._int_mm`` or oneDNN's, timed once per shape
    and process (which one wins differs between CPUs: 1.4x either way measured on two hosts of the same
    type). Both give bit-identical float32 outputs, so the choice never changes results."""
    import time

    n, k = state["weight"].shape
    if (n, k) not in _SINGLE_ROW:
        q = torch.ones(1, k, dtype=torch.int8)
        qu = q.to(torch.uint8).add_(128)
        runs = {
            "cpu-int-mm": lambda: torch._int_mm(q, state["weight_t"]),
            "cpu-onednn": lambda: _onednn_mm(qu, 1.0, state, None),
        }
        best = {}
        for name, run in runs.items():
            run()
            t0 = time.perf_counter()
            for _ in range(3):
                run()
            best[name] = time.perf_counter() - t0
        _SINGLE_ROW[(n, k)] = min(best, key=best.get)
    return _SINGLE_ROW[(n, k)]


def prepare_state(weight: torch.Tensor, weight_scale: torch.Tensor, backend: str) -> dict:
    """The tensors ``int8_gemm`` needs for ``backend`` (``cpu-onednn`` or ``cpu-int-mm``), built once per layer."""
    state = {"backend": backend, "weight": weight, "w_scale": weight_scale.float().contiguous()}
    state["weight_t"] = weight.t()
    state["single_row"] = backend
    if backend == "cpu-onednn":
        state["packed"] = prepare_onednn(weight)
        state["w_zero"] = torch.zeros(weight.shape[0], dtype=torch.long)
        state["single_row"] = single_row_backend(state)
    return state
