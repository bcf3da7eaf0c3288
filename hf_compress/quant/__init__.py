"""Pure quantization math (no transformers): affine qparams, observers, bit packing, the packed layout."""

from .affine import (
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    integer_range,
    qparams_from_minmax,
    quantization_error,
    quantize,
    reduce_minmax,
)
from .layout import QuantizedWeight, dequantize_layout, pack_layout, packed_shapes
from .observers import OBSERVERS, make_observer
from .packing import pack_bits, pack_int4, unpack_bits, unpack_int4

__all__ = [
    "OBSERVERS",
    "QuantSpec",
    "QuantizedWeight",
    "compute_qparams",
    "dequantize",
    "dequantize_layout",
    "fake_quantize",
    "integer_range",
    "make_observer",
    "pack_bits",
    "pack_int4",
    "pack_layout",
    "packed_shapes",
    "qparams_from_minmax",
    "quantization_error",
    "quantize",
    "reduce_minmax",
    "unpack_bits",
    "unpack_int4",
]
