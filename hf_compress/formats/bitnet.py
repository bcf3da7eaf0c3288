"""transformers' native BitNet checkpoint format (``quant_method: bitnet``), both ways.

The format (transformers 5.24, ``integrations/bitnet.py``): config ``{"quant_method": "bitnet", "linear_class":
"bitlinear", "quantization_mode": "offline", "use_rms_norm": false, "modules_to_not_convert": [...]}``; each
converted linear stores ``weight`` uint8 ``[out/4, in]``, ternary values as w + 1 packed along the output
dimension in chunks (bits 2i..2i+1 of packed row r hold row i·(out/4) + r), and ``weight_scale`` ``(1,)`` in the
model's dtype, which ``bitlinear`` *divides* by (so it is 1 / mean|W|; ``autobitlinear`` multiplies by it).
Activations are quantized per token to int8 absmax by the layer.

- :func:`export_bitnet` writes one of our packed per-tensor ternary models in that format, loadable by stock
  transformers with no hf_compress import;
- :func:`import_bitnet` reads such a checkpoint into our packed layers (``BitLinearConfig``), so it runs on our
  kernels and saves as an hf_compress folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging

from ..integrations.config import BitLinearConfig
from ..integrations.save import atomic_dir
from ..nn.bitlinear import BitLinear, OneBitLinear, PackedBitLinear
from ..quant.lowbit import pack_ternary
from .gptq import _local_folder, _safetensors_files

logger = logging.get_logger(__name__)

__all__ = ["export_bitnet", "hf_pack_ternary", "hf_unpack_ternary", "import_bitnet"]

VALUES_PER_BYTE = 4


def hf_pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes ``[out, in]`` in {−1, 0, 1} -> transformers' bitnet ``weight`` uint8 ``[out/4, in]``."""
    n = codes.shape[0]
    if n % VALUES_PER_BYTE:
        raise ValueError(f"the bitnet format packs 4 output rows per byte: out_features={n} is not a multiple of 4")
    rows = n // VALUES_PER_BYTE
    v = (codes.to(torch.int16) + 1).to(torch.uint8)
    packed = torch.zeros(rows, codes.shape[1], dtype=torch.uint8)
    for i in range(VALUES_PER_BYTE):
        packed |= v[i * rows : (i + 1) * rows] << (2 * i)
    return packed


def hf_unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """transformers' bitnet ``weight`` uint8 ``[out/4, in]`` -> int8 codes ``[out, in]``."""
    parts = [((packed >> (2 * i)) & 3) for i in range(VALUES_PER_BYTE)]
    codes = torch.cat(parts, dim=0).to(torch.int8) - 1
    if bool((codes > 1).any()):
        raise ValueError("the packed bitnet weight holds the code 3, which is not a ternary value")
    return codes


def _packed_layers(model) -> dict[str, PackedBitLinear]:
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, (BitLinear, OneBitLinear)):
            raise ValueError(f"{name} is a trainable {type(m).__name__}: pack the model first (hf_compress.pack_bitlinear(model))")
        if not isinstance(m, PackedBitLinear):
            continue
        why = None
        if m.has_in_scale or m.post_norm:
            why = "it is a OneBit layer (sign weights with value vectors and an output LayerNorm)"
        elif m.bits != 1.58:
            why = "its weights are binary (1-bit); the format holds ternary weights"
        elif m.per_channel:
            why = "it has one scale per output channel; the format has one scale per tensor"
        elif m.norm is not None:
            why = "it has a SubLN RMSNorm, which transformers' bitlinear layout (use_rms_norm off) does not express"
        if why:
            raise ValueError(f"cannot export {name} to the bitnet format: {why}. Export per-tensor ternary models "
                             "(BitLinearConfig(bits=1.58, per_channel=False, sub_ln=False))")
        layers[name] = m
    return layers


def export_bitnet(model, save_directory, extra_files=()) -> Path:
    """Write ``model`` (packed per-tensor ternary, from ``BitLinearConfig``) as a transformers ``bitnet``
    checkpoint in ``save_directory`` (atomically, with copies of ``extra_files``, e.g. the tokenizer's). Linears
    left in float are listed in ``modules_to_not_convert``; any other quantized layer is refused."""
    from ..integrations.modules import iter_linears

    layers = _packed_layers(model)
    if not layers:
        raise ValueError("the model has no ternary layers to export: quantize it with "
                         "BitLinearConfig(bits=1.58) (or train and pack it) before exporting to the bitnet format")
    others = [n for n, m in model.named_modules() if hasattr(m, "qweight") and not isinstance(m, PackedBitLinear)]
    if others:
        raise ValueError(f"cannot export to the bitnet format: {others[:3]} hold non-ternary quantized weights "
                         "(the format stores ternary weights only)")
    for name, m in layers.items():
        if m.out_features % VALUES_PER_BYTE:
            raise ValueError(f"cannot export {name}: out_features={m.out_features} is not a multiple of 4 (the bitnet format packs 4 rows per byte)")
    float_linears = sorted(n for n, _ in iter_linears(model))
    dtype = next((m.compute_dtype for m in layers.values()), torch.float32)
    with atomic_dir(save_directory) as tmp:
        model.save_pretrained(tmp)
        for f in _safetensors_files(tmp):
            with safe_open(str(f), "pt") as fh:
                meta = fh.metadata()
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            for name, m in layers.items():
                key = next((k for k in (f"{name}.qweight", f"{model.base_model_prefix}.{name}.qweight") if k in tensors), None)
                if key is None:
                    continue
                prefix = key[: -len(".qweight")]
                tensors.pop(key)
                gamma = tensors.pop(f"{prefix}.weight_scale").float()
                tensors[f"{prefix}.weight"] = hf_pack_ternary(m.codes().cpu())
                tensors[f"{prefix}.weight_scale"] = (1.0 / gamma.clamp(min=1e-12)).reshape(1).to(dtype)
            save_file(tensors, str(f), metadata=meta or {"format": "pt"})
        config = json.loads((tmp / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
                                         "use_rms_norm": False, "rms_norm_eps": 1e-6, "modules_to_not_convert": float_linears or None}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in extra_files:
            if not (tmp / Path(f).name).exists():
                shutil.copy2(f, tmp / Path(f).name)
    logger.info("exported %d ternary layers to the bitnet format in %s", len(layers), save_directory)
    return Path(save_directory)


def _linear_shapes(config) -> dict[str, tuple[int, int]]:
    """``{name: (in, out)}`` of the linears of ``config``'s model, built on the meta device."""
    from transformers import AutoModelForCausalLM

    from ..integrations.modules import iter_linears, linear_shape

    with torch.device("meta"):
        skel = AutoModelForCausalLM.from_config(config)
    return {n: linear_shape(m) for n, m in iter_linears(skel)}


def import_bitnet(path_or_id, **from_pretrained_kwargs):
    """Load a transformers ``bitnet`` checkpoint (``linear_class`` ``bitlinear`` or offline ``autobitlinear``,
    with or without ``use_rms_norm``) onto our packed ternary layers; returns the model (it saves as an
    hf_compress ``BitLinearConfig`` folder)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = _local_folder(str(path_or_id))
    raw = json.loads((folder / "config.json").read_text())
    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") != "bitnet":
        raise ValueError(f"{path_or_id} is not a bitnet checkpoint (quant_method {qc.get('quant_method')!r}); "
                         "import_bitnet reads quant_method 'bitnet'")
    if qc.get("quantization_mode", "offline") != "offline":
        raise ValueError("import_bitnet reads offline (packed) bitnet checkpoints; an online one stores float weights: "
                         "load it with BitLinearConfig(mode='training') instead")
    divides = qc.get("linear_class", "bitlinear") == "bitlinear"  # bitlinear divides by weight_scale, autobitlinear multiplies
    config = AutoConfig.from_pretrained(folder)
    config.quantization_config = None
    shapes = _linear_shapes(config)
    with tempfile.TemporaryDirectory(prefix="hfc-bitnet-") as tmp:
        tmp = Path(tmp)
        skip = set()
        for f in _safetensors_files(folder):
            with safe_open(str(f), "pt") as fh:
                meta = fh.metadata()
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            for key in [k for k, v in tensors.items() if k.endswith(".weight") and v.dtype == torch.uint8]:
                prefix = key[: -len(".weight")]
                name = next((n for n in shapes if prefix == n or prefix.endswith("." + n) or n.endswith("." + prefix)), None)
                packed = tensors.pop(key)
                if name is None:
                    raise ValueError(f"{key} is packed but the model has no linear layer {prefix}")
                in_f, out_f = shapes[name]
                if packed.shape[0] * VALUES_PER_BYTE != out_f or packed.shape[1] != in_f:
                    raise ValueError(
                        f"{key} has {packed.shape[0]} packed rows x {packed.shape[1]} columns, i.e. {packed.shape[0] * 4} output "
                        f"rows, but {name} is a {in_f}->{out_f} layer: the checkpoint does not match its config"
                    )
                scale = tensors.pop(f"{prefix}.weight_scale").float().reshape(-1)
                gamma = 1.0 / scale if divides else scale
                tensors[f"{prefix}.qweight"] = pack_ternary(hf_unpack_ternary(packed))
                tensors[f"{prefix}.weight_scale"] = gamma.reshape(1).clone()
                if f"{prefix}.rms_norm.weight" in tensors:
                    tensors[f"{prefix}.norm.weight"] = tensors.pop(f"{prefix}.rms_norm.weight")
                skip.add(name)
            save_file(tensors, str(tmp / f.name), metadata=meta or {"format": "pt"})
        if not skip:
            raise ValueError(f"{path_or_id} says bitnet but holds no packed uint8 weights")
        for p in folder.iterdir():
            if p.is_file() and p.suffix == ".json" and p.name not in ("config.json",):
                shutil.copy2(p, tmp / p.name)
        ours = BitLinearConfig(mode="inference", bits=1.58, sub_ln=bool(qc.get("use_rms_norm", False)),
                               modules_to_not_convert=sorted(set(shapes) - skip) or None)
        raw["quantization_config"] = ours.to_dict()
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        from_pretrained_kwargs.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_pretrained(tmp, **from_pretrained_kwargs)
        for t in [*model.parameters(), *model.buffers()]:  # nothing may point into the temporary files
            t.data = t.data.clone()
    return model
