"""Quantization configs: ``QuantizationConfigMixin`` subclasses, validated, versioned, JSON round-trippable.

Each config declares its serialized fields (written to ``config.json``) and its runtime-only fields
(calibration datasets, tokenizers: accepted as arguments, never written). Unknown fields are an error, so
a typo or a checkpoint from an incompatible version fails loudly instead of being ignored.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..quant.layout import LAYOUT_BITS

FORMAT_VERSION = 1
_META_FIELDS = ("quant_method", "format_version")


class HfCompressConfig(QuantizationConfigMixin):
    """Base of every hf_compress config. Subclasses set ``quant_method``, ``fields`` and ``runtime_fields``."""

    quant_method: ClassVar[str]
    fields: ClassVar[dict[str, Any]] = {}  # serialized field -> default
    runtime_fields: ClassVar[dict[str, Any]] = {}  # runtime-only field -> default

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - set(self.fields) - set(self.runtime_fields) - set(_META_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown field(s) {unknown} for {type(self).__name__}; valid fields: {sorted(self.fields) + sorted(self.runtime_fields)}"
            )
        qm = kwargs.pop("quant_method", self.quant_method)
        if qm != self.quant_method:
            raise ValueError(f"{type(self).__name__} has quant_method {self.quant_method!r}, got {qm!r}")
        version = kwargs.pop("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses hf_compress format_version {version}, newer than this install supports "
                f"({FORMAT_VERSION}): upgrade hf-compress (pip install -U hf-compress)"
            )
        self.format_version = version
        for name, default in {**self.fields, **self.runtime_fields}.items():
            setattr(self, name, copy.deepcopy(kwargs.get(name, default)))
        self.post_init()

    def post_init(self) -> None:
        """Validate fields; subclasses extend."""

    def to_dict(self) -> dict[str, Any]:
        d = {"quant_method": self.quant_method, "format_version": self.format_version}
        d.update({name: copy.deepcopy(getattr(self, name)) for name in self.fields})
        return d

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def update(self, **kwargs):
        unused = super().update(**kwargs)
        self.post_init()
        return unused

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        config = cls(**config_dict)
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config


def check_bits_and_group(bits, group_size) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in LAYOUT_BITS:
        raise ValueError(f"bits must be one of {list(LAYOUT_BITS)}, got {bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size != -1 and group_size <= 0):
        raise ValueError(
            f"group_size must be -1 (one scale per output channel) or a positive integer, got {group_size!r}"
        )


def check_module_list(value, name: str) -> None:
    if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
        raise ValueError(f"{name} must be a list of module names (strings) or None, got {value!r}")


class WeightOnlyConfig(HfCompressConfig):
    """Fields shared by the weight-only methods that write the packed GPTQ layout (RTN, GPTQ)."""

    fields = {"bits": 4, "group_size": -1, "sym": True, "modules_to_not_convert": None}

    def post_init(self) -> None:
        check_bits_and_group(self.bits, self.group_size)
        if not isinstance(self.sym, bool):
            raise ValueError(f"sym must be True or False, got {self.sym!r}")
        check_module_list(self.modules_to_not_convert, "modules_to_not_convert")


class RTNConfig(WeightOnlyConfig):
    """Round-to-nearest weight-only quantization.

    Args:
        bits: 2, 3, 4 or 8.
        group_size: -1 (default) for one scale per output channel, else the number of input columns that
            share a scale (the last group is shorter when it does not divide the input width).
        sym: symmetric (absmax, zero code at the midpoint) or asymmetric (min/max with a zero point).
        modules_to_not_convert: module names (or name suffixes) kept in float, in addition to the output
            embeddings and tied weights that are always kept.
    """

    quant_method = "hf_compress_rtn"
