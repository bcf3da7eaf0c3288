"""An independent writer of GPTQ-format checkpoints, used as a test fixture for ``hf_compress.load_gptq``.

Deliberately imports nothing from hf_compress: it is written from the public format description
(as AutoGPTQ / GPTQModel / vLLM read it), so a bug shared by the loader and its own packing code
cannot hide behind a fixture built with the same code.

Format, for a quantized linear ``name`` with ``I`` inputs, ``O`` outputs, ``b`` bits, group size ``G``
(``-1`` means one group, ``G = I``) and ``n_groups = ceil(I / G)``:

* ``name.qweight`` int32 ``[ceil(I*b/32), O]``: unsigned codes ``q[i, o]`` packed along the input dim,
  LSB-first, as one continuous bitstream per output column (value ``i`` occupies bits
  ``[i*b, (i+1)*b)``; word ``k`` holds bits ``[32k, 32k+32)``; for 3 bits values straddle words).
  ``I`` is padded with zero codes until the codes fill whole words: to a multiple of 32 / b values at
  2/4/8 bits, of 32 values (3 words) at 3 bits, so 80 inputs at 3 bits take 9 words, not ceil(240/32) = 8.
  (AutoGPTQ's 3-bit loop packs 32 values per 3 words and only handles multiples of 32.)
* ``name.qzeros`` int32 ``[n_groups, ceil(O*b/32)]``: zero codes ``z[g, o]`` packed (and padded) the same
  way along the output dim; "gptq" (v1) stores ``z - 1``, "gptq_v2" stores ``z``.
* ``name.scales`` float16 ``[n_groups, O]``; ``name.g_idx`` int32 ``[I]`` (group of each input column).
* ``W[o, i] = (q[i, o] - z[g_idx[i], o]) * scales[g_idx[i], o]``.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

# Linear layers inside decoder blocks ("model.layers.0.self_attn.q_proj", "model.decoder.layers.1.fc1").
BLOCK_LINEAR = re.compile(r"(^|\.)layers\.\d+\.")


def packed_words(n: int, bits: int) -> int:
    """Words holding ``n`` codes once padded with zero codes to fill whole words (32 values per 3 words at 3 bits)."""
    values_per_chunk = 32 // math.gcd(32, bits)  # fewest values that fill whole words: 16, 32, 8, 4
    padded = math.ceil(n / values_per_chunk) * values_per_chunk
    return padded * bits // 32


def pack_along_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit ``codes`` ``[N, M]`` along dim 0 into int32 ``[packed_words(N, bits), M]``.

    Column ``m`` is one LSB-first bitstream: value ``n`` goes to bits ``[n*bits, (n+1)*bits)``, word ``k``
    holds bits ``[32k, 32k+32)``. Rows past ``N`` are zero codes (padding).
    """
    codes = np.asarray(codes, dtype=np.uint64)
    n, m = codes.shape
    if codes.size and int(codes.max()) >= (1 << bits):
        raise ValueError(f"code {int(codes.max())} does not fit in {bits} bits")
    n_words = packed_words(n, bits)
    words = np.zeros((n_words + 1, m), dtype=np.uint64)  # one spare word for a value straddling the end
    for i in range(n):
        offset = i * bits
        word, shift = divmod(offset, 32)
        value = codes[i]
        words[word] |= (value << np.uint64(shift)) & np.uint64(0xFFFFFFFF)
        if shift + bits > 32:  # the high part of the value spills into the next word
            words[word + 1] |= value >> np.uint64(32 - shift)
    assert not words[n_words].any()
    return words[:n_words].astype(np.uint32).view(np.int32)


def pack_along_cols(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``[N, M]`` codes along dim 1 (as qzeros are packed along the output dim) into ``[N, packed_words(M)]``."""
    return np.ascontiguousarray(pack_along_rows(np.asarray(codes).T, bits).T)


def make_g_idx(in_features: int, group_size: int, desc_act: bool, generator: torch.Generator) -> torch.Tensor:
    """Group of every input column: ``i // G``, or with act-order a random permutation of that grouping."""
    g = in_features if group_size == -1 else group_size
    natural = torch.arange(in_features, dtype=torch.int64) // g
    if not desc_act:
        return natural
    perm = torch.randperm(in_features, generator=generator)
    g_idx = torch.empty(in_features, dtype=torch.int64)
    g_idx[perm] = natural  # column perm[j] belongs to group j // G
    return g_idx


def quantize_linear(weight: torch.Tensor, bits: int, g_idx: torch.Tensor, sym: bool, zero_min: int):
    """RTN-quantize ``weight`` ``[O, I]`` per (group, output row).

    Returns ``codes`` int64 ``[I, O]``, ``zeros`` int64 ``[n_groups, O]`` (the true zero points),
    ``scales`` float16 ``[n_groups, O]`` and the dequantized float32 weight ``[O, I]``.
    ``zero_min`` is the smallest allowed zero point (1 for v1 checkpoints, where ``z - 1`` is stored).
    """
    w = weight.detach().to(torch.float64)
    out_features, in_features = w.shape
    maxq = (1 << bits) - 1
    n_groups = int(g_idx.max()) + 1
    codes = torch.zeros(in_features, out_features, dtype=torch.int64)
    zeros = torch.zeros(n_groups, out_features, dtype=torch.int64)
    scales = torch.zeros(n_groups, out_features, dtype=torch.float16)
    for g in range(n_groups):
        cols = (g_idx == g).nonzero().flatten()
        wg = w[:, cols]  # [O, n_cols]
        if sym:
            scale = 2 * wg.abs().amax(dim=1) / maxq
            zero = torch.full((out_features,), (maxq + 1) // 2, dtype=torch.int64)
        else:
            lo = wg.amin(dim=1).clamp(max=0)
            hi = wg.amax(dim=1).clamp(min=0)
            scale = (hi - lo) / maxq
            zero = torch.round(-lo / torch.where(scale > 0, scale, 1.0)).to(torch.int64)
        zero = zero.clamp(zero_min, maxq)
        scale16 = torch.where(scale > 0, scale, 1e-3).to(torch.float16)
        q = torch.round(wg / scale16.to(torch.float64)[:, None]) + zero[:, None]
        codes[cols] = q.clamp(0, maxq).to(torch.int64).t()
        zeros[g] = zero
        scales[g] = scale16
    # (q - z) is an integer of at most 8 bits and the scale an fp16 number: the product is exact in float32.
    deq = (codes.t() - zeros[g_idx].t()).to(torch.float32) * scales[g_idx].t().to(torch.float32)
    return codes, zeros, scales, deq


def quantized_linear_names(model) -> list[str]:
    """Names of the nn.Linear modules inside decoder blocks (lm_head and embedding projections stay float)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and BLOCK_LINEAR.search(name) and "lm_head" not in name
    ]


def write_gptq_checkpoint(
    model,
    out_dir,
    bits: int,
    group_size: int,
    sym: bool = True,
    desc_act: bool = False,
    checkpoint_format: str | None = "gptq",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Write ``model`` (a float transformers model) as a GPTQ checkpoint in ``out_dir``.

    ``checkpoint_format``: "gptq" (v1 zeros, ``z - 1`` stored), "gptq_v2" (``z`` stored) or ``None``
    (v1 zeros and no ``checkpoint_format`` key, as older tools write). Returns ``{linear name: dequantized
    float32 weight [O, I]}``: the weights a correct loader must reproduce.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    if checkpoint_format not in ("gptq", "gptq_v2", None):
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    v2 = checkpoint_format == "gptq_v2"
    generator = torch.Generator().manual_seed(seed)
    names = quantized_linear_names(model)
    if not names:
        raise ValueError("no linear layers in decoder blocks")
    modules = dict(model.named_modules())

    tensors: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name in names:
        weight = modules[name].weight
        g_idx = make_g_idx(weight.shape[1], group_size, desc_act, generator)
        codes, zeros, scales, deq = quantize_linear(weight, bits, g_idx, sym, zero_min=0 if v2 else 1)
        stored_zeros = zeros if v2 else zeros - 1
        tensors[f"{name}.qweight"] = torch.from_numpy(pack_along_rows(codes.numpy(), bits))
        tensors[f"{name}.qzeros"] = torch.from_numpy(pack_along_cols(stored_zeros.numpy(), bits))
        tensors[f"{name}.scales"] = scales
        tensors[f"{name}.g_idx"] = g_idx.to(torch.int32)
        dequantized[name] = deq

    # Every other parameter / buffer as float, under its usual name; tied tensors are written once.
    skip = {f"{name}.weight" for name in names}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if key in skip or not value.is_floating_point():
            continue
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        tensors[key] = value.detach().to(torch.float32).contiguous().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"), {"format": "pt"})

    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]  # as save_pretrained writes it (None on a from_config model)
    config["dtype"] = "float32"
    quantization_config = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "damp_percent": 0.01,
        "true_sequential": True,
        "static_groups": False,
    }
    if checkpoint_format is not None:
        quantization_config["checkpoint_format"] = checkpoint_format
    config["quantization_config"] = quantization_config
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return dequantized


def reference_model(model, dequantized: dict[str, torch.Tensor]):
    """A float32 copy of ``model`` whose quantized linears carry the dequantized weights: the expected behaviour."""
    ref = copy.deepcopy(model).to(torch.float32).eval()
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, weight in dequantized.items():
            modules[name].weight.copy_(weight)
    return ref
