"""An independent writer (and reader) of bitsandbytes LLM.int8 checkpoints, a test fixture for
``hf_compress.load_bitsandbytes_int8`` / ``export_bitsandbytes``.

Deliberately imports nothing from hf_compress: it is written from the format description (what transformers
+ bitsandbytes write for ``BitsAndBytesConfig(load_in_8bit=True)`` then ``save_pretrained``), so a bug shared
by our loader and our layer code cannot hide behind a fixture built with the same code.

Format, for a quantized linear ``name`` with ``O`` outputs and ``I`` inputs:

* ``name.weight`` int8 ``[O, I]``: ``round(W * 127 / absmax)`` with ``absmax`` the row's ``max |W|``;
* ``name.SCB`` float32 ``[O]``: that ``absmax``, so ``W ~= weight * SCB / 127``;
* ``name.weight_format`` uint8, 0-d: 0 = "row" (1 col32, 2 col_turing, 3 col_ampere: old GPU-tiled layouts);
* ``name.bias`` (if any) and every other parameter in float, under its usual name.

``config.json`` carries ``quantization_config`` = ``BitsAndBytesConfig(load_in_8bit=True).to_dict()``.

LLM.int8 at run time (Dettmers et al. 2022), as :class:`SimulatedLLMInt8Linear` computes it: the input columns
where any ``|x| >= threshold`` (outliers) multiply the dequantized weight columns in float; the other columns
are quantized per token (``absmax / 127`` scale, round, clamp to +-127) and multiply the int8 codes.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Linear layers inside decoder blocks ("model.layers.0.self_attn.q_proj", "model.decoder.layers.1.fc1").
BLOCK_LINEAR = re.compile(r"(^|\.)layers\.\d+\.")


def bnb_config(threshold: float = 6.0, skip_modules: list[str] | None = None, **overrides) -> dict:
    """``quantization_config`` as transformers writes it for ``BitsAndBytesConfig(load_in_8bit=True, ...)``."""
    qc = {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": True,
        "_load_in_4bit": False,
        "load_in_8bit": True,
        "load_in_4bit": False,
        "llm_int8_threshold": threshold,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
    }
    qc.update(overrides)
    return qc


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [O, I], absmax float32 [O])``: bitsandbytes' row-wise absmax quantization."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = torch.round(w * 127 / safe[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, absmax


def dequantize(codes: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    return codes.float() * scb.float()[:, None] / 127


def block_linear_names(model) -> list[str]:
    """The linears bitsandbytes converts with its default skips on these models: those in decoder blocks."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and BLOCK_LINEAR.search(name) and "lm_head" not in name
    ]


def write_bnb_int8_checkpoint(
    model,
    out_dir,
    threshold: float = 6.0,
    skip_modules: list[str] | None = None,
    names: list[str] | None = None,
    weight_format: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """Write ``model`` (a float transformers model) as a bitsandbytes 8-bit checkpoint in ``out_dir``.

    ``names``: the linears to quantize (default: those in decoder blocks, minus ``skip_modules`` entries
    matched exactly). Returns ``{name: {"codes", "scb", "weight" (dequantized float32), "bias"}}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n in block_linear_names(model) if n not in (skip_modules or [])]
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        module = modules[name]
        codes, scb = quantize_rows(module.weight)
        tensors[f"{name}.weight"] = codes
        tensors[f"{name}.SCB"] = scb
        tensors[f"{name}.weight_format"] = torch.tensor(weight_format, dtype=torch.uint8)
        bias = None if module.bias is None else module.bias.detach().float().clone()
        quantized[name] = {"codes": codes, "scb": scb, "weight": dequantize(codes, scb), "bias": bias}
    skip = {f"{name}.weight" for name in names}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if key in skip or not value.is_floating_point():
            continue
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:  # tied weights are written once
            continue
        seen.add(ptr)
        tensors[key] = value.detach().float().contiguous().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"), {"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    config["quantization_config"] = bnb_config(threshold, skip_modules)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return quantized


def read_checkpoint(folder) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of every shard and the parsed config.json."""
    folder = Path(folder)
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
    return tensors, json.loads((folder / "config.json").read_text())


class SimulatedLLMInt8Linear(torch.nn.Module):
    """LLM.int8's matmul from the description above, in float64 (nothing from hf_compress)."""

    def __init__(self, codes: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None, threshold: float):
        super().__init__()
        self.codes, self.scb, self.bias, self.threshold = codes, scb.float(), bias, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1]).float()
        w = dequantize(self.codes, self.scb).double()  # [O, I]
        outlier = (xf.abs() >= self.threshold).any(dim=0) if self.threshold > 0 else torch.zeros(xf.shape[1], dtype=torch.bool)
        out = xf[:, outlier].double() @ w[:, outlier].t()
        rest = xf.masked_fill(outlier, 0.0)
        absmax = rest.abs().amax(dim=1)
        scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
        q = torch.round(rest / scale[:, None]).clamp(-127, 127)
        out = out + (q.double() @ self.codes.double().t()) * scale.double()[:, None] * (self.scb.double() / 127)[None, :]
        if self.bias is not None:
            out = out + self.bias.double()
        return out.to(x.dtype).reshape(*shape[:-1], -1)


def reference_models(model, quantized: dict, threshold: float):
    """``(int8_sim, dequantized)``: float32 copies of ``model`` whose quantized linears run LLM.int8 on the
    stored codes (what a correct loader computes), or a float matmul with the dequantized weight."""
    sim = copy.deepcopy(model).float().eval()
    deq = copy.deepcopy(model).float().eval()
    for name, q in quantized.items():
        parent, _, child = name.rpartition(".")
        setattr(sim.get_submodule(parent), child, SimulatedLLMInt8Linear(q["codes"], q["scb"], q["bias"], threshold))
        with torch.no_grad():
            deq.get_submodule(name).weight.copy_(q["weight"])
    return sim, deq
