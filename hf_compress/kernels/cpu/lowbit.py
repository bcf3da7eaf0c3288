"""The C++ CPU kernel for packed ternary (1.58-bit) and binary (1-bit) linear layers (``lowbit.cpp``).

The op ``torch.ops.hf_compress_lowbit.linear(x, qweight, w_scale, in_scale, bias, bits, in_features, isa=-1)``
computes exactly :func:`hf_compress.quant.lowbit.lowbit_linear_reference` (the int8 activation codes and the
integer sums are bit-identical; the float epilogue uses the reference's operations in the same order): the
activation quantization is fused into the op, the 2-bit / 1-bit codes are read straight from the packed
layout. ``isa`` (for tests; results never depend on it): -1 picks automatically, 0 / 1 / 2 force the scalar /
AVX2 / AVX512-VNNI kernel (an error if the CPU lacks it), 3 the large-batch route (weight chunks expanded to
int8 in L2 and ``at::_int_mm``, which auto takes from 16 rows on). See the header of ``lowbit.cpp``.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` into torch's extensions
directory (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and reused afterwards (rebuilt
only when the source changes). The first build takes 16-19 s on the 2-core development host (g++ 12, ninja,
``-O3 -fopenmp``; the ATen headers dominate), loading a built one well under a second. Without a C++
compiler, or if the build fails, :func:`available` returns False (the reason is logged once) and nothing
else breaks.
"""

from __future__ import annotations

import os
import threading

import torch

__all__ = ["available", "best_isa", "dequantize_gptq_cpu", "lowbit_linear_cpu", "unavailable_reason"]

_NAME = "hf_compress_lowbit"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lowbit.cpp")
ISA_AUTO, ISA_SCALAR, ISA_AVX2, ISA_AVX512_VNNI, ISA_INT_MM = -1, 0, 1, 2, 3

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "reason": str | None


def _logger():
    from transformers.utils import logging

    return logging.get_logger(__name__)


def _op_registered() -> bool:
    try:
        torch.ops.hf_compress_lowbit.linear  # noqa: B018 (raises AttributeError when not loaded)
    except (AttributeError, RuntimeError):
        return False
    return True


def _build() -> None:
    from torch.utils.cpp_extension import load

    # -fopenmp: at::parallel_for is inline in ATen's headers; with torch's OpenMP backend it runs on one
    # thread unless the extension itself is compiled with OpenMP (measured: 2 threads no faster without it).
    # At run time the extension shares torch's libgomp.so.1 (same soname, already loaded), so one pool.
    flags = ["-O3", "-fopenmp"] if "backend: OpenMP" in torch.__config__.parallel_info() else ["-O3"]
    load(
        name=_NAME,
        sources=[_SOURCE],
        extra_cflags=flags,
        extra_ldflags=flags[1:],
        is_python_module=False,
        verbose=False,
    )


def _register_fake() -> None:
    # Shape-only implementation so torch.compile / FakeTensor tracing goes through the op.
    @torch.library.register_fake(f"{_NAME}::linear")
    def _(x, qweight, w_scale, in_scale, bias, bits, in_features, isa=-1):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _short_reason(e: Exception) -> str:
    """One line for the log: the compiler's first ``error:`` line if there is one, else the last line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]
    text = (errors or lines or [""])[0 if errors else -1]
    return f"{type(e).__name__}: {text[:300]}"


def available() -> bool:
    """Whether the C++ kernel is built and loaded (builds it on the first call; the result is cached)."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        reason = None
        try:
            if not _op_registered():
                _build()
            if not _op_registered():
                reason = "the extension built but did not register torch.ops.hf_compress_lowbit.linear"
        except Exception as e:  # a missing compiler or ninja, a build or load error: never break the caller
            reason = _short_reason(e)
        if reason is None:
            try:
                _register_fake()
            except Exception as e:  # tracing support only; the eager op still works
                _logger().warning("hf_compress low-bit CPU kernel: no fake implementation registered (%s)", e)
        else:
            _logger().warning("hf_compress low-bit CPU kernel unavailable, using the reference path: %s", reason)
        _state["reason"] = reason
        _state["ok"] = reason is None
    return bool(_state["ok"])


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (``None`` when it is True or was not asked yet)."""
    return _state.get("reason")  # type: ignore[return-value]


def best_isa() -> int:
    """The kernel ``isa=-1`` takes on this CPU below 16 activation rows: 0 scalar, 1 AVX2, 2 AVX512-VNNI."""
    if not available():
        raise RuntimeError(f"the low-bit CPU kernel is not available: {unavailable_reason()}")
    return int(torch.ops.hf_compress_lowbit.best_isa())


def lowbit_linear_cpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    w_scale: torch.Tensor,
    in_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    in_features: int,
    isa: int = ISA_AUTO,
) -> torch.Tensor:
    """``x [..., in_features]`` (float32 or bfloat16) times the packed ``qweight`` -> ``[..., out]`` in ``x.dtype``;
    the same arguments and result as :func:`hf_compress.quant.lowbit.lowbit_linear_reference`."""
    if not available():
        raise RuntimeError(f"the low-bit CPU kernel is not available: {unavailable_reason()}")
    return torch.ops.hf_compress_lowbit.linear(x, qweight, w_scale, in_scale, bias, bits, in_features, isa)


def dequantize_gptq_cpu(qweight, zeros, scales, g_idx, bits: int, in_features: int) -> torch.Tensor:
    """The packed GPTQ layout's float32 weight, transposed (``[in, out]``), in one threaded pass: ``zeros`` are the
    unpacked zero codes (int32 ``[groups, out]``), ``scales`` float32 ``[groups, out]``, ``g_idx`` int32 ``[in]``;
    bit-identical to :func:`hf_compress.kernels.unpack.dequantize` (transposed)."""
    if not available():
        raise RuntimeError(f"the low-bit CPU kernel is not available: {unavailable_reason()}")
    return torch.ops.hf_compress_lowbit.dequantize_gptq(qweight, zeros, scales, g_idx, bits, in_features)
