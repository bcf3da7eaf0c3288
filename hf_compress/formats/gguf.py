"""GGUF, llama.cpp's file format, both ways: :func:`export_gguf` writes one straight from a model in memory (float
or compressed by us) and :func:`load_gguf` reads one into our packed layers without dequantizing it.

Export: the container through the ``gguf`` package's ``GGUFWriter``; the block bytes by
:mod:`hf_compress.quant.gguf_blocks`; llama.cpp's tensor names (``gguf.get_tensor_name_map``), Q/K rows permuted
for the ``llama`` architecture as llama.cpp's conversion does (not for ``qwen2``); tied output embeddings written
as no ``output.weight``; the mixes (``Q4_K_M``, ``Q5_K_M``, ``Q3_K_S/M/L``, ``Q2_K``...) choose types per tensor
as ``llama-quantize`` does.

Load: Q8_0, Q4_0, Q4_K and TQ1_0 / TQ2_0 weights become ``QuantLinear`` layers holding the same codes (Q8_0 →
8-bit groups of 32 with zero code 128; Q4_0 → 4-bit groups of 32, zero 8; Q4_K → 4-bit groups of 32 with scale
d·sc and a float min dmin·m; TQ → 2-bit groups of 256, zero 1), so they run on our kernels; other block types stay
as their bytes in ``GGUFLinear``; the token embedding stays as its bytes in ``GGUFEmbedding``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..integrations.modules import set_submodule
from ..nn.gguf_linear import GGUFEmbedding, GGUFLinear
from ..nn.quant_linear import QuantLinear
from ..quant import gguf_blocks as blocks
from ..quant.layout import QuantizedWeight

logger = logging.get_logger(__name__)

__all__ = ["MIXES", "compute_imatrix", "export_gguf", "load_gguf", "tensor_types"]

# model_type -> GGUF architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# qtype -> (base type of the linears, the llama-quantize file type id)
MIXES = {
    "F32": ("F32", 0), "F16": ("F16", 1), "Q4_0": ("Q4_0", 2), "Q8_0": ("Q8_0", 7), "Q5_0": ("Q5_0", 8),
    "Q5_1": ("Q5_1", 9), "Q2_K": ("Q2_K", 10), "Q3_K_S": ("Q3_K", 11), "Q3_K_M": ("Q3_K", 12), "Q3_K_L": ("Q3_K", 13),
    "Q4_K_S": ("Q4_K", 14), "Q4_K_M": ("Q4_K", 15), "Q5_K_S": ("Q5_K", 16),
    "Q5_K_M": ("Q5_K", 17), "Q6_K": ("Q6_K", 18), "TQ1_0": ("TQ1_0", 36), "TQ2_0": ("TQ2_0", 37),
}
TERNARY = ("TQ1_0", "TQ2_0")
# Byte-level BPE pre-tokenizers llama.cpp knows, by the Split regex they use (transformers' GGUF loader knows
# the same names). GPT-2's own regex lives in its ByteLevel pre-tokenizer (use_regex=True): "gpt-2".
PRE_NAMES = ("llama-bpe", "qwen2", "tekken", "gpt-4o", "qwen35")


# ------------------------------------------------------------------------------------------------ choices
def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _attn_v_type(qtype: str, layer: int, n_layers: int, n_gqa: int) -> str | None:
    """llama.cpp's type for a block's ``attn_v`` under the mix ``qtype`` (None: the mix's base type)."""
    if qtype == "Q2_K":
        return "Q4_K" if n_gqa >= 4 else "Q3_K"
    if qtype == "Q3_K_M":
        return "Q5_K" if layer < 2 else "Q4_K"
    if qtype == "Q3_K_L":
        return "Q5_K"
    if qtype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, n_layers):
        return "Q6_K"
    if qtype == "Q4_K_S" and layer < 4:
        return "Q5_K"
    return None


def _ffn_down_type(qtype: str, layer: int, n_layers: int) -> str | None:
    """llama.cpp's type for a block's ``ffn_down`` under the mix ``qtype`` (not Falcon's rules: not exported)."""
    if qtype == "Q2_K":
        return "Q3_K"
    if qtype == "Q3_K_M":
        return "Q5_K" if layer < n_layers // 16 else "Q4_K"
    if qtype == "Q3_K_L":
        return "Q5_K"
    if qtype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, n_layers):
        return "Q6_K"
    if qtype == "Q4_K_S" and layer < n_layers // 8:
        return "Q5_K"
    return None


def tensor_types(names_shapes: list[tuple[str, tuple[int, ...]]], qtype: str, tied: bool = False, n_gqa: int = 1) -> dict[str, str]:
    """The type of each GGUF tensor under ``qtype`` (llama.cpp's ``llama_tensor_get_type`` for our mixes; ``n_gqa``:
    query heads per key/value head, which Q2_K's choice for ``attn_v`` depends on), with the per-tensor fallback for
    widths the type's blocks do not divide (logged)."""
    if qtype not in MIXES:
        raise ValueError(f"unknown GGUF qtype {qtype!r}: supported {', '.join(MIXES)}")
    base = MIXES[qtype][0]
    n_layers = sum(1 for n, _ in names_shapes if n.endswith("attn_v.weight"))
    chosen = {}
    for name, shape in names_shapes:
        if len(shape) < 2 or not name.endswith(".weight"):
            chosen[name] = "F32"
            continue
        t = base
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        if base in TERNARY and not name.startswith("blk."):
            t = "F16"  # a b1.58 model keeps its embeddings and head in float
        elif name == "output.weight" or (tied and name == "token_embd.weight"):
            t = base if base in ("F32", "F16", "Q8_0") else ("Q6_K" if shape[-1] % 256 == 0 else "Q8_0")
        elif name.endswith("attn_v.weight"):
            t = _attn_v_type(qtype, layer, n_layers, n_gqa) or t
        elif name.endswith("ffn_down.weight"):
            t = _ffn_down_type(qtype, layer, n_layers) or t
        elif name.endswith("attn_output.weight"):
            t = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(qtype, t)
        if t not in ("F32", "F16") and not blocks.fits(t, shape[-1]):
            fb = blocks.FALLBACK.get(t, "F16")
            if not blocks.fits(fb, shape[-1]):
                fb = "F16"
            logger.warning(f"{name}: {shape[-1]} columns are not a multiple of {blocks.block_size(t)} (needed by {t}): written as {fb}")
            t = fb
        chosen[name] = t
    return chosen


# ------------------------------------------------------------------------------------------------ weights
def _is_ternary_layer(module) -> bool:
    from ..nn.bitlinear import BitLinear, PackedBitLinear

    return isinstance(module, (BitLinear, PackedBitLinear))


def _check_expressible(module) -> None:
    """A BitNet layer with its own norm (SubLN, OneBit's output LayerNorm) has no place in llama.cpp's layouts."""
    if getattr(module, "norm", None) is not None or getattr(module, "post_norm", False) or bool(getattr(module, "layernorm", False)):
        raise ValueError(
            "this BitNet layer normalises its input (SubLN) or output (OneBit's LayerNorm): llama.cpp's llama layout "
            "has no place for that norm, so the file would compute another function. Convert without it "
            "(BitLinearConfig(sub_ln=False)) to export to GGUF"
        )


def _ternary_blocks(module, qtype: str) -> torch.Tensor:
    """The TQ blocks of a b1.58 layer from its own codes and scale (lossless up to the fp16 scale)."""
    from ..nn.bitlinear import BitLinear, PackedBitLinear

    if isinstance(module, BitLinear):
        module = module.pack()
    assert isinstance(module, PackedBitLinear)
    _check_expressible(module)
    if module.bits != 1.58 or module.has_in_scale:
        raise ValueError(f"{qtype} holds ternary weights; this layer is {module.bits}-bit (binary or OneBit): export it as Q8_0 or F16")
    codes = (module.codes().to(torch.int32) + 1).to(torch.uint8)  # {-1, 0, 1} -> {0, 1, 2}
    out, cols = codes.shape
    if cols % blocks.QK_K:
        raise ValueError(f"{qtype} needs widths that are multiples of 256; this layer has {cols}")
    scale = module.weight_scale.reshape(-1, 1).float().expand(out, 1)
    codes = codes.reshape(-1, blocks.QK_K)
    d = scale.repeat_interleave(cols // blocks.QK_K, 0)
    pack = blocks.pack_tq2_0 if qtype == "TQ2_0" else blocks.pack_tq1_0
    return pack(codes, d).reshape(out, -1)


def _float_weight(module) -> torch.Tensor:
    """``[out, in]`` float32 of any linear-like layer of ours or of torch's."""
    if hasattr(module, "dequantize_weight"):
        return module.dequantize_weight().float()
    if hasattr(module, "to_float"):
        return module.to_float().weight.detach().float()
    from transformers.pytorch_utils import Conv1D

    w = module.weight.detach().float()
    return w.t() if isinstance(module, Conv1D) else w


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half rows -> llama.cpp's interleaved RoPE rows (convert_hf_to_gguf's ``LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_naming(config, arch: str):
    """``(name map, heads)``: llama.cpp's tensor names for ``arch`` (``tmap.get_name(hf name)``), and
    ``heads(gguf name)``, the head count whose rows llama.cpp permutes for that tensor (Q and K of the ``llama``
    architecture), else None."""
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head

    def heads(gname: str) -> int | None:
        if arch != "llama":
            return None
        if gname.endswith(("attn_q.weight", "attn_q.bias")):
            return n_head
        return n_kv if gname.endswith(("attn_k.weight", "attn_k.bias")) else None

    return tmap, heads


# ---------------------------------------------------------------------------------------------- imatrix
def _linear_modules(model):
    return [(n, m) for n, m in model.named_modules()
            if n and (isinstance(m, nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features")))]


@torch.no_grad()
def _calibrate(model, windows: torch.Tensor, hessians: bool, names: set[str] | None = None):
    """One pass of the calibration ``windows`` through ``model`` with a hook on every linear (or on those in
    ``names``): per linear the sum of x² per input column and the token count, or a ``GPTQ`` object holding the
    Hessian of its inputs."""
    from ..methods.gptq import GPTQ

    stats: dict = {}
    hooks = []
    for name, module in _linear_modules(model):
        if names is not None and name not in names:
            continue
        def hook(mod, args, name=name):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            if hessians:
                if name not in stats:  # (not setdefault: that would build a Hessian on every call)
                    stats[name] = GPTQ(x.shape[-1], device=x.device)
                stats[name].add_batch(x)
            else:
                s, n = stats.get(name, (0, 0))
                stats[name] = (s + (x * x).sum(0), n + x.shape[0])
        hooks.append(module.register_forward_pre_hook(hook))
    if not hooks:
        return stats  # no linear to observe: no pass
    device = next(model.parameters()).device
    try:
        for row in tqdm(windows, desc="calibration", leave=False):
            model(row.unsqueeze(0).to(device))
    finally:
        for h in hooks:
            h.remove()
    return stats


def _windows(model, tokenizer, data, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    from ..integrations.calibration import calibration_windows

    return calibration_windows(data, tokenizer, n_samples, seqlen, seed=seed, config=model.config)


def compute_imatrix(model, tokenizer, data, n_samples: int = 64, seqlen: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """llama.cpp's importance matrix: for every linear, the mean over calibration tokens of x² per input column
    (``{module name: float32 [in]}``). ``data``: a text file, a list of strings, a Dataset or token windows."""
    stats = _calibrate(model, _windows(model, tokenizer, data, n_samples, seqlen, seed), hessians=False)
    return {k: (s / n).cpu() for k, (s, n) in stats.items()}


def _imatrix_of(gptq) -> torch.Tensor:
    """llama.cpp's imatrix (the mean x² per input column) from a GPTQ Hessian: H = 2/n XᵀX."""
    return gptq.H.diagonal().float().cpu() / 2


def _gptq_blocks(gptq, w: torch.Tensor, qtype: str, imatrix: torch.Tensor | None, refine: bool = True) -> tuple[torch.Tensor, float]:
    """``w`` quantized to ``qtype`` blocks by GPTQ: each block's scales (and mins) chosen as llama.cpp would from
    the error-updated weights when GPTQ reaches it, then every code rounded with the error of the earlier columns
    fed back. Returns ``(blocks [out, row_bytes], relative output error)``."""
    span = blocks.block_size(qtype)
    starts = iter(range(0, w.shape[1], span))

    def make_grid(w_span):
        c = next(starts)
        data = blocks.quantize(w_span, qtype, None if imatrix is None else imatrix[c : c + span], refine)
        scale, offset, qmax = blocks.grid(data, qtype)
        out = w_span.shape[0]
        return scale.reshape(out, span), offset.reshape(out, span), qmax, data

    codes, states, rel = gptq.quantize_on_grid(w, span, make_grid)
    parts = [blocks.with_codes(st, qtype, codes[:, k * span : (k + 1) * span]) for k, st in enumerate(states)]
    return torch.cat(parts, 1), rel


def _gptq_in_blocks(model, windows: torch.Tensor, targets: dict, refine: bool) -> dict[str, torch.Tensor]:
    """GPTQ onto the GGUF grids for the float linears inside the model's blocks, one block at a time, each block's
    linears on the inputs that the already-quantized blocks and linears before them give (the layer-wise driver,
    ``true_sequential``: one Hessian per group of linears sharing an input, held only while that group is quantized).
    ``targets``: ``{module name: (gguf name of its weight, qtype, permute heads or None)}``. Returns
    ``{gguf name: blocks}``.

    The driver needs each linear to run quantized for the ones after it, so its weight holds the dequantized blocks
    while its block is calibrated; every weight gets its float values back as soon as its block is done (and on
    error): the model is as it came."""
    from ..integrations.layerwise import block_index, compress_layerwise, find_blocks
    from ..methods.gptq import GPTQ

    out: dict[str, torch.Tensor] = {}
    prefix, _ = find_blocks(model)
    saved: list[tuple[nn.Module, torch.Tensor]] = []  # (linear, its float weight) of the block in progress
    current = None  # that block's index

    def restore():
        for linear, values in saved:  # through the module: the driver moves the block back to its own device
            linear.weight.data.copy_(values)
        saved.clear()

    def make_observer(linears):
        return GPTQ(linears[0].in_features, uses=len(linears))

    def compress(name, linear, gptq):
        nonlocal current
        if (block := block_index(prefix, name)) != current:
            restore()  # the previous block is done: its outputs have gone to this one
            current = block
        if name not in targets:
            return linear
        gname, qtype, heads = targets[name]
        weight = linear.weight.data
        w = weight.float()
        if heads is not None:
            w = _permute_qk(w, heads)
        data, rel = _gptq_blocks(gptq, w, qtype, _imatrix_of(gptq), refine)
        logger.debug(f"{name} {qtype} GPTQ: relative output error {rel:.4g}")
        out[gname] = data.cpu()
        dq = blocks.dequantize(data, qtype, w.shape[1]).reshape(w.shape)
        if heads is not None:
            dq = _unpermute_qk(dq, heads)
        saved.append((linear, weight.clone()))
        weight.copy_(dq.to(weight.dtype))
        return linear

    try:
        compress_layerwise(model, windows, make_observer=make_observer, compress=compress, desc="GGUF GPTQ",
                           reuse_stable=True)
    finally:
        restore()
    return out


# ------------------------------------------------------------------------------------------------- export
def _architecture(config) -> str:
    arch = ARCHITECTURES.get(getattr(config, "model_type", None))
    if arch is None:
        raise ValueError(
            f"GGUF export maps the architectures {', '.join(sorted(ARCHITECTURES))}; this model is "
            f"{getattr(config, 'model_type', None)!r}"
        )
    return arch


def _tokenizer_json(tokenizer) -> dict:
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("GGUF export needs a fast (tokenizers) tokenizer: load it with AutoTokenizer.from_pretrained(...)")
    return json.loads(backend.to_str())


def pre_tokenizer_name(tok: dict) -> str:
    """The ``tokenizer.ggml.pre`` name for a byte-level BPE tokenizer's pre-tokenizer (it decides the splits
    before the merges, so a wrong name changes the token ids)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [p["pattern"]["Regex"] for p in parts if p.get("type") == "Split" and "Regex" in p.get("pattern", {})]
    levels = [p for p in parts if p.get("type") == "ByteLevel"]
    if not levels:
        raise ValueError("GGUF export writes byte-level BPE tokenizers (model gpt2); this tokenizer has no ByteLevel pre-tokenizer")
    if not regexes and levels[0].get("use_regex", True):
        return "gpt-2"
    if len(regexes) == 1:
        for name in PRE_NAMES:
            if GGUF_PRE_TOKENIZER_SPLITS.get(name) == regexes[0]:
                return name
    raise ValueError(
        f"this tokenizer's pre-tokenizer split {regexes} is not one llama.cpp knows by name "
        f"({', '.join(('gpt-2',) + PRE_NAMES)}): llama.cpp would split text differently and get other token ids"
    )


def _add_tokenizer(writer, tokenizer, config) -> None:
    import gguf

    tok = _tokenizer_json(tokenizer)
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')!r}")
    pre = pre_tokenizer_name(tok)
    vocab = model["vocab"]
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    n = max(config.vocab_size, len(vocab), max(added, default=-1) + 1)
    by_id = {i: s for s, i in vocab.items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    tokens, types = [], []
    for i in range(n):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unk_token_id"), ("pad", "pad_token_id")):
        tid = getattr(tokenizer, attr, None)
        if tid is None:
            tid = getattr(config, attr, None)
        if isinstance(tid, int):
            getattr(writer, f"add_{key}_token_id")(tid)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    writer.add_add_bos_token(bool(ids) and bos is not None and ids[0] == bos)
    writer.add_add_eos_token(bool(ids) and eos is not None and ids[-1] == eos)


def _add_hparams(writer, config, arch: str) -> None:
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"GGUF export writes default RoPE; this model uses rope_type {rope.get('rope_type')!r}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)


def _check_output_path(path) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder {str(path.parent)!r} does not exist: create it first (nothing was written)")
    if path.suffix != ".gguf":
        raise ValueError(f"the output file must end in .gguf, got {str(path)!r}")
    return path


def _source_tensors(model, arch: str):
    """``[(gguf name, hf module or tensor, permute heads or None)]`` in the model's order."""
    config = model.config
    tmap, heads = _tensor_naming(config, arch)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    modules = dict(model.named_modules())
    packed = {name for name, m in modules.items() if name and not isinstance(m, (nn.Linear, nn.Embedding)) and (
        hasattr(m, "dequantize_weight") or hasattr(m, "to_float") or hasattr(m, "pack"))}
    for name in [n for n in packed if any(n.startswith(q + ".") for q in packed)]:
        packed.discard(name)  # the outermost packed layer speaks for its children
    out, seen = [], set()
    for pname, p in list(model.named_parameters()) + list(model.named_buffers()):
        mod_name, _, leaf = pname.rpartition(".")
        if tied and mod_name.endswith("lm_head"):
            continue
        owner = next((q for q in packed if mod_name == q or mod_name.startswith(q + ".")), None)
        if owner is not None and not (leaf == "bias" and mod_name == owner):
            key, source, mod_name = f"{owner}.weight", modules[owner], owner  # the packed layer, not its buffers
        elif leaf in ("weight", "bias"):
            key, source = pname, p
        else:
            continue  # rotary inv_freq and the like
        if key in seen:
            continue
        seen.add(key)
        gname = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"{key}: no llama.cpp tensor name for it in the {arch} architecture")
        out.append((gname, source, heads(gname), mod_name))
    return out, tied


def export_gguf(model, tokenizer, path, qtype: str = "Q4_K_M", imatrix=None, gptq: bool = False, n_samples: int = 64,
                seqlen: int = 256, refine: bool = True) -> Path:
    """Write ``model`` (float, or compressed by hf_compress) and its tokenizer as a GGUF v3 file at ``path``.

    ``qtype``: one of :data:`MIXES` (Q8_0, Q6_K, Q5_K_M, Q4_K_M, ..., TQ1_0 / TQ2_0 for b1.58 models, written from
    their own ternary codes). ``imatrix``: ``{module name: [in] importance}`` from :func:`compute_imatrix`, or
    calibration data (a text file, a list of strings, a Dataset) to compute it from. ``gptq=True`` (needs
    calibration data as ``imatrix``): every block type with a scale grid is filled by GPTQ instead of rounding
    each weight alone -- the scales are still chosen as llama.cpp chooses them, so the file is an ordinary GGUF.
    It runs block by block as :class:`~hf_compress.GPTQConfig` does (each linear calibrated on the inputs the
    quantized layers before it give, one Hessian held at a time); the model is left as it came.
    ``refine=False``: K-type blocks exactly as llama.cpp's search leaves them, without the refinement that lowers
    each block's squared error (:func:`hf_compress.quant.gguf_blocks.quantize`). The file appears only when
    complete (written beside it, then renamed)."""
    import gguf

    path = _check_output_path(path)
    if qtype not in MIXES:
        raise ValueError(f"unknown GGUF qtype {qtype!r}: supported {', '.join(MIXES)}")
    config = model.config
    arch = _architecture(config)
    if gptq and (imatrix is None or isinstance(imatrix, dict)):
        raise ValueError("gptq=True needs calibration data: pass imatrix=<a text file, a list of strings or a Dataset>")
    sources, tied = _source_tensors(model, arch)
    shapes = []
    for gname, src, _, _ in sources:
        if isinstance(src, torch.Tensor):
            shapes.append((gname, tuple(src.shape)))
        else:
            w_shape = (src.out_features, src.in_features) if hasattr(src, "out_features") else (src.rows, src.cols)
            shapes.append((gname, w_shape))
    n_heads = getattr(config, "num_attention_heads", 1)
    types = tensor_types(shapes, qtype, tied, n_gqa=n_heads // (getattr(config, "num_key_value_heads", None) or n_heads))
    for _, src, _, _ in sources:
        if not isinstance(src, torch.Tensor):
            _check_expressible(src)
    if qtype in TERNARY:
        floats = [g for g, s, _, _ in sources if g.startswith("blk.") and types[g] in TERNARY and not _is_ternary_layer(s)]
        if floats:
            raise ValueError(
                f"{qtype} holds ternary weights only; {floats[0]} (and {len(floats) - 1} more) is not ternary: convert the "
                "model with BitLinearConfig first, or export it as Q4_K_M / Q8_0"
            )

    hessians, by_gptq = {}, {}
    if gptq:
        windows = _windows(model, tokenizer, imatrix, n_samples, seqlen)
        gridded = {g: mod for g, _, _, mod in sources if types[g] not in ("F16", "F32", *TERNARY)}
        modules = dict(model.named_modules())
        in_blocks = {mod: (g, types[g], heads) for g, src, heads, mod in sources
                     if g in gridded and isinstance(modules[mod], nn.Linear) and src is modules[mod].weight}
        by_gptq = _gptq_in_blocks(model, windows, in_blocks, refine)
        # the rest (the output head, layers hf_compress packed): Hessians of the float model's inputs
        rest = {mod for g, mod in gridded.items() if g not in by_gptq}
        hessians = _calibrate(model, windows, hessians=True, names=rest)
        imatrix = {k: _imatrix_of(g) for k, g in hessians.items()}
    elif imatrix is not None and not isinstance(imatrix, dict):
        imatrix = compute_imatrix(model, tokenizer, imatrix, n_samples=n_samples, seqlen=seqlen)

    writer_path = None  # set once the file is in place
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(getattr(config, "_name_or_path", "") or "model")
        writer.add_file_type(MIXES[qtype][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(writer, config, arch)
        _add_tokenizer(writer, tokenizer, config)
        for gname, src, heads, mod_name in tqdm(sources, desc=f"GGUF {qtype}", leave=False):
            t = types[gname]
            if gname in by_gptq:
                data = by_gptq.pop(gname)
            elif t in TERNARY:
                data = _ternary_blocks(src, t)
                if heads is not None:
                    data = _permute_qk(data, heads)
            else:
                w = src.detach().float() if isinstance(src, torch.Tensor) else _float_weight(src)
                if heads is not None:
                    w = _permute_qk(w, heads)
                if t == "F32" or w.dim() == 1:
                    writer.add_tensor(gname, w.cpu().numpy().astype("float32"))
                    continue
                im = imatrix.get(mod_name) if imatrix is not None and t not in ("Q8_0", "F16") else None
                if mod_name in hessians and t != "F16":
                    data, rel = _gptq_blocks(hessians.pop(mod_name), w, t, im, refine)
                    logger.debug(f"{gname} {t} GPTQ: relative output error {rel:.4g}")
                else:
                    data = blocks.quantize(w, t, im, refine, embedding=gname == "token_embd.weight")
            if t == "F16":
                writer.add_tensor(gname, data.view(torch.float16).numpy() if data.dtype == torch.uint8 else data.numpy())
            else:
                writer.add_tensor(gname, data.cpu().numpy(), raw_dtype=gguf.GGMLQuantizationType[t])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the file is meant to be shared
        os.replace(tmp, path)
        writer_path = path
    finally:
        if writer_path is None and os.path.exists(tmp):
            os.unlink(tmp)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    logger.info(f"wrote {path} ({qtype}: " + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) + ")")
    return path


# --------------------------------------------------------------------------------------------------- load
def _quant_linear(data: torch.Tensor, qtype: str, out_f: int, in_f: int, bias) -> QuantLinear | None:
    """A ``QuantLinear`` holding ``data`` exactly, for the types our packed layout expresses; else ``None``."""
    b = data.reshape(-1, blocks.TYPES[qtype][2])
    if qtype == "Q8_0":
        bits, gs = 8, 32
        scales = blocks.fp16_values(b[:, :2]).reshape(out_f, -1)
        codes = (b[:, 2:].contiguous().view(torch.int8).to(torch.int32) + 128).reshape(out_f, in_f)
        zero, mins = 128, None
    elif qtype == "Q4_0":
        bits, gs = 4, 32
        scales = blocks.fp16_values(b[:, :2]).reshape(out_f, -1)
        codes = blocks.q4_codes(b[:, 2:]).reshape(out_f, in_f)
        zero, mins = 8, None
    elif qtype == "Q4_K":
        bits, gs = 4, 32
        s, m = blocks.k_scales_mins(b)
        scales, mins = s.reshape(out_f, -1), m.reshape(out_f, -1)
        codes = blocks.q4_k_codes(b).reshape(out_f, in_f)
        zero = 0
    elif qtype in TERNARY:
        bits, gs = 2, blocks.QK_K
        codes, d = blocks.tq_codes(b, qtype)
        codes, scales = codes.reshape(out_f, in_f), d.reshape(out_f, -1)
        zero, mins = 1, None
    else:
        return None
    layer = QuantLinear(in_f, out_f, bits, gs, bias=bias is not None)
    g_idx = torch.arange(in_f, dtype=torch.int32) // gs
    zeros = torch.full_like(scales, zero, dtype=torch.int32)
    layer.load_quantized(QuantizedWeight(codes, scales, zeros, g_idx, bits, gs), bias)
    if mins is not None:
        layer.set_mins(mins.t())
    return layer


def _reader_tensors(path: Path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        qtype = gguf.GGMLQuantizationType(t.tensor_type).name
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ggml lists the row width first
        out[t.name] = (qtype, shape, torch.from_numpy(t.data.copy()).reshape(-1).view(torch.uint8))
    return out


def load_gguf(path, tokenizer=None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a GGUF file, its Q8_0 / Q4_0 / Q4_K / TQ weights packed in ``QuantLinear``
    (the other block types as their bytes in ``GGUFLinear``, the token embedding in ``GGUFEmbedding``), so the
    model takes about the file's size in memory. The config and tokenizer come from transformers' GGUF reader."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    arch = _architecture(config)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tensors = _reader_tensors(path)
    config.tie_word_embeddings = "output.weight" not in tensors
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmap, qk_heads = _tensor_naming(config, arch)
    modules = dict(model.named_modules())
    used, dequantized = set(), {}

    def vector(gname: str) -> torch.Tensor:
        """A 1-D tensor (a bias, a norm) decoded to float, in HF's row order."""
        qtype, shape, data = tensors[gname]
        used.add(gname)
        t = blocks.dequantize(data.reshape(1, -1), qtype, shape[-1]).reshape(shape)
        heads = qk_heads(gname)
        return t if heads is None else _unpermute_qk(t, heads)

    for pname, _ in list(model.named_parameters()):
        mod_name, _, leaf = pname.rpartition(".")
        gname = tmap.get_name(pname, try_suffixes=(".weight", ".bias"))
        if gname is None or gname not in tensors:
            if config.tie_word_embeddings and mod_name.endswith("lm_head"):
                continue
            raise ValueError(f"the GGUF file has no tensor for {pname} (looked for {gname!r}): it does not match a {arch} model")
        qtype, shape, data = tensors[gname]
        module = modules[mod_name]
        if leaf == "bias" or len(shape) == 1:
            setattr(module, leaf, nn.Parameter(vector(gname).to(dtype), requires_grad=False))
            continue
        used.add(gname)
        rows, cols = shape
        data = data.reshape(rows, -1)
        heads = qk_heads(gname)
        if heads is not None:
            data = _unpermute_qk(data, heads)  # rows are whole blocks: the permutation moves bytes exactly
        if qtype in ("F32", "F16"):
            setattr(module, leaf, nn.Parameter(blocks.dequantize(data, qtype, cols).to(dtype), requires_grad=False))
            continue
        if isinstance(module, nn.Embedding):
            new = GGUFEmbedding(rows, cols, qtype, module.padding_idx)
            new.load_blocks(data)
            new.compute_dtype = dtype
        elif isinstance(module, nn.Linear):
            bias = None
            if module.bias is not None:
                bias = vector(tmap.get_name(f"{mod_name}.bias", try_suffixes=(".bias",)))
            new = _quant_linear(data, qtype, rows, cols, bias)
            if new is None:
                new = GGUFLinear(cols, rows, qtype, bias=bias is not None)
                new.load_blocks(data)
                if bias is not None:
                    new.bias = nn.Parameter(bias.float(), requires_grad=False)
                dequantized[qtype] = dequantized.get(qtype, 0) + 1
        else:
            raise ValueError(f"{pname}: a {type(module).__name__} weight, which load_gguf does not map")
        set_submodule(model, mod_name, new)
    unused = sorted(set(tensors) - used)
    if unused:
        logger.warning(f"the GGUF file holds tensors this {arch} model has no place for, ignored: {', '.join(unused[:5])}")
    if dequantized:
        logger.info("kept as GGUF blocks, decoded per call (no packed layout of ours holds them exactly): "
                    + ", ".join(f"{n} {t}" for t, n in dequantized.items()))
    emb = model.get_input_embeddings()
    if config.tie_word_embeddings and not isinstance(emb, GGUFEmbedding):
        model.lm_head.weight = emb.weight
    elif config.tie_word_embeddings:
        head = GGUFLinear(emb.cols, emb.rows, emb.qtype)
        head.blocks = emb.blocks  # shared, as in the file
        model.lm_head = head
    for name, buf in list(model.named_buffers()):
        if buf.device.type == "meta":  # rotary inv_freq: recompute on CPU
            mod_name, _, leaf = name.rpartition(".")
            mod = modules[mod_name]
            if hasattr(mod, "rope_init_fn"):
                inv, scaling = mod.rope_init_fn(mod.config, "cpu")
                mod.register_buffer("inv_freq", inv, persistent=False)
                mod.original_inv_freq = inv
                mod.attention_scaling = scaling
            else:
                raise ValueError(f"{name}: a buffer load_gguf cannot rebuild")
    model.eval()
    return model, tokenizer
