"""hf_compress.load_gptq against GPTQ checkpoints written by an independent writer (tests/gptq_writer.py).

Expected behaviour: the loaded model computes what a float32 model with the dequantized weights
``W = (q - z) * scale`` computes (the writer returns them exactly: an integer of at most 8 bits times an fp16
scale is exact in float32). Tolerances, measured on these tiny models (max |logit| ~0.6):

* ``use_backend("reference")`` (dequantize + F.linear): the GPTQ reference dequantization (AutoGPTQ's torch
  path as well as hf_compress's) forms ``(q - z) * scale`` in fp16, the scales' dtype, rounding every weight
  by at most 2**-11 of itself; that moves the logits by <= 3.4e-4 of their max. ``REF_TOL = 1e-3`` of the
  max logit covers it, while any format mistake moves the logits by >= 3e-2 of their max (a v1/v2 zero-point
  mix-up: 3e-2 at 8 bits, > 1 at 2-4 bits; checked in ``test_v1_without_checkpoint_format_key_loads_as_v1``).
  Each layer's ``dequantize_weight()`` must equal ``W`` up to that fp16 rounding.
* the default backend (CPU int8/int4 kernels, computing in bf16): relative L2 error <= 3.9e-3 measured,
  ``FAST_TOL = 1e-2`` (bf16 unit roundoff 2**-8 = 3.9e-3).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as t
from conftest import token_batch
from gptq_writer import (
    pack_along_cols,
    pack_along_rows,
    packed_words,
    quantized_linear_names,
    reference_model,
    write_gptq_checkpoint,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_compress
from hf_compress.kernels import use_backend

REF_TOL = 1e-3  # exact (reference) backend: max |difference| / max |logit|
FAST_TOL = 1e-2  # default backend (bf16 CPU kernels): ||difference|| / ||logits||
FP16_EPS = 2.0**-11  # unit roundoff of fp16


def tiny_model(arch: str = "llama", intermediate: int = 96):
    torch.manual_seed(0)
    common = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, max_position_embeddings=128
    )
    if arch == "llama":
        config = t.LlamaConfig(intermediate_size=intermediate, num_key_value_heads=2, **common)
    elif arch == "qwen2":
        config = t.Qwen2Config(intermediate_size=intermediate, num_key_value_heads=2, **common)
    elif arch == "opt":
        config = t.OPTConfig(ffn_dim=intermediate, word_embed_proj_dim=64, **common)
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(config).eval()
    # Edge rows so asymmetric zero points reach both ends of the range: a row >= 0 has z = 0 (v2; clamped to
    # 1 in v1, whose stored z - 1 cannot hold -1) and a row <= 0 has z = 2**bits - 1.
    first = dict(model.named_modules())[quantized_linear_names(model)[0]]
    with torch.no_grad():
        first.weight[0].abs_()
        first.weight[1] = -first.weight[1].abs()
    return model


def logits(model, ids=None):
    ids = token_batch() if ids is None else ids
    with torch.inference_mode():
        return model(ids).logits.float()


def assert_matches(model, want):
    """``model``'s logits match ``want``: tightly on the exact backend, to bf16 precision on the default one."""
    with use_backend("reference"):
        got = logits(model)
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=REF_TOL * scale)
    rel = ((logits(model) - want).norm() / want.norm()).item()
    assert rel < FAST_TOL, f"default backend: relative error {rel:.2e}"


def assert_weight_matches(layer, want, name):
    """The layer's dequantized weight is ``want`` up to rounding the product ``(q - z) * scale`` to fp16."""
    got = layer.dequantize_weight().float()
    bad = (got - want).abs() > FP16_EPS * want.abs() + 1e-8
    assert not bad.any(), f"{name}: {int(bad.sum())} weights differ, max {(got - want).abs().max().item():.2e}"


def load_gptq(path):
    return hf_compress.load_gptq(str(path)).eval()


# --------------------------------------------------------------------------------------------------------
# The fixture itself: packing and the written tensors, checked bit by bit (no hf_compress involved).
# --------------------------------------------------------------------------------------------------------


def n_words(n: int, bits: int) -> int:
    """Words for ``n`` codes padded with zero codes to whole words: at 3 bits, 32 values per 3 words."""
    per_word = {2: 16, 4: 8, 8: 4}
    return -(-n // 32) * 3 if bits == 3 else -(-n // per_word[bits])


def bitwise_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Brute force: per column, write every bit of every value into a list, then read 32-bit words from it."""
    n, m = codes.shape
    n_words_ = n_words(n, bits)
    out = np.zeros((n_words_, m), dtype=np.uint32)
    for col in range(m):
        stream = [0] * (32 * n_words_)
        for i in range(n):
            for b in range(bits):
                stream[i * bits + b] = (int(codes[i, col]) >> b) & 1
        for k in range(n_words_):
            out[k, col] = sum(stream[32 * k + j] << j for j in range(32))
    return out.view(np.int32)


def bitwise_unpack(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Brute force inverse of ``bitwise_pack`` along dim 0: ``[n_words, m]`` int32 -> ``[n, m]`` codes.

    Spells out every bit of every word as its own row of a bitstream, then reads value ``i`` from rows
    ``i*bits .. i*bits + bits - 1``.
    """
    words = np.asarray(words).view(np.uint32).astype(np.int64)
    stream = ((words[:, None, :] >> np.arange(32)[None, :, None]) & 1).reshape(-1, words.shape[1])  # bit j of word k
    assert not stream[n * bits :].any(), "padding bits must be zero"
    rows = np.arange(n)[:, None] * bits + np.arange(bits)[None, :]  # [n, bits]
    return (stream[rows] << np.arange(bits)[None, :, None]).sum(axis=1)


def autogptq_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's QuantLinear.pack loop (rows a multiple of 32), transcribed."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 10 values, then one straddling two words, three words per 32 values
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_writer_packing_matches_bit_by_bit(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(37, 5))  # 37 rows: the last word is partly padding
    codes[0] = 2**bits - 1  # all-ones codes reach the sign bit and, for 3 bits, straddle words
    packed = pack_along_rows(codes, bits)
    assert packed.dtype == np.int32 and packed.shape == (n_words(37, bits), 5)
    np.testing.assert_array_equal(packed, bitwise_pack(codes, bits))
    np.testing.assert_array_equal(bitwise_unpack(packed, bits, 37), codes)
    np.testing.assert_array_equal(pack_along_cols(codes.T, bits), bitwise_pack(codes, bits).T)


def test_padded_word_counts():
    # 80 inputs at 3 bits: padded to 96 codes = 9 words (a bare ceil(80*3/32) = 8 would end mid-code).
    assert [n_words(80, b) for b in (2, 3, 4, 8)] == [5, 9, 10, 20]
    assert n_words(704, 3) == 66 and n_words(100, 4) == 13 and n_words(37, 2) == 3
    assert all(packed_words(n, b) == n_words(n, b) for n in range(1, 200) for b in (2, 3, 4, 8))


@pytest.mark.parametrize("bits", [3, 4])
def test_writer_packing_matches_autogptq_loop(bits):
    codes = np.random.default_rng(0).integers(0, 2**bits, size=(64, 7))
    codes[:, 0] = 2**bits - 1
    np.testing.assert_array_equal(pack_along_rows(codes, bits), autogptq_pack(codes, bits))


@pytest.mark.parametrize(
    "bits,group_size,sym,desc_act,fmt",
    [
        (3, 32, False, True, "gptq"),
        (3, 32, False, True, "gptq_v2"),
        (2, -1, True, False, None),
        (8, 32, False, False, "gptq"),
    ],
)
def test_written_checkpoint_decodes_to_returned_weights(bits, group_size, sym, desc_act, fmt, tmp_path):
    model = tiny_model(intermediate=80)  # 80 inputs to down_proj with G=32: a short last group, padded words
    deq = write_gptq_checkpoint(model, tmp_path, bits, group_size, sym=sym, desc_act=desc_act, checkpoint_format=fmt)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    qconfig = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "gptq" and qconfig["bits"] == bits and qconfig["group_size"] == group_size
    assert qconfig["sym"] is sym and qconfig["desc_act"] is desc_act
    assert qconfig.get("checkpoint_format") == fmt
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    modules = dict(model.named_modules())
    assert set(deq) == set(quantized_linear_names(model)) and len(deq) == 14
    maxq = 2**bits - 1
    all_zeros = []
    for name, want in deq.items():
        out_f, in_f = modules[name].weight.shape
        n_groups = 1 if group_size == -1 else -(-in_f // group_size)
        assert f"{name}.weight" not in tensors
        qweight, qzeros = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"]
        scales, g_idx = tensors[f"{name}.scales"], tensors[f"{name}.g_idx"]
        assert qweight.dtype == qzeros.dtype == g_idx.dtype == torch.int32
        g_idx = g_idx.long()
        assert qweight.shape == (n_words(in_f, bits), out_f) and qzeros.shape == (n_groups, n_words(out_f, bits))
        assert scales.dtype == torch.float16 and scales.shape == (n_groups, out_f) and g_idx.shape == (in_f,)
        natural = torch.arange(in_f) // (in_f if group_size == -1 else group_size)
        if desc_act and group_size != -1:
            assert not torch.equal(g_idx, natural) and torch.equal(g_idx.sort().values, natural)
        else:
            assert torch.equal(g_idx, natural)
        q = torch.from_numpy(bitwise_unpack(qweight.numpy(), bits, in_f))  # [I, O]
        z = torch.from_numpy(bitwise_unpack(qzeros.numpy().T, bits, out_f)).T  # [n_groups, O]
        if fmt != "gptq_v2":
            z = z + 1
            assert z.min() >= 1
        all_zeros.append(z)
        w = (q - z[g_idx]).t().float() * scales[g_idx].t().float()
        assert torch.equal(w, want), name
        # Quantization really approximates the float weight (the fixture is not degenerate).
        err = (want - modules[name].weight).abs().max() / modules[name].weight.abs().max()
        assert err < (0.02 if bits == 8 else 1.0)
    zs = torch.cat([z.flatten() for z in all_zeros])
    if sym:
        assert torch.all(zs == 2 ** (bits - 1))
    else:
        assert zs.max() == maxq and zs.min() == (0 if fmt == "gptq_v2" else 1)
    for key, value in model.state_dict().items():  # everything else is stored as is
        if not key.endswith(".weight") or key.removesuffix(".weight") not in deq:
            assert torch.equal(tensors[key], value), key


# --------------------------------------------------------------------------------------------------------
# load_gptq
# --------------------------------------------------------------------------------------------------------

# (arch, intermediate, bits, group_size, sym, desc_act, checkpoint_format): every bit width with both group
# sizes, sym and asym, act-order on and off, v1 and v2 zeros; intermediate 80 gives a 32-group layer whose
# input width (80) is not a multiple of the group size nor, for 3 bits, of 32 (padded words).
CASES = [
    ("llama", 96, 4, 32, True, False, "gptq"),
    ("llama", 96, 4, -1, False, False, "gptq_v2"),
    ("llama", 96, 4, 32, False, True, "gptq"),
    ("llama", 80, 3, 32, False, False, "gptq"),
    ("llama", 80, 3, -1, True, False, "gptq_v2"),
    ("llama", 96, 3, 32, True, True, "gptq_v2"),
    ("llama", 96, 2, 32, False, False, "gptq_v2"),
    ("llama", 80, 2, -1, True, False, "gptq"),
    ("llama", 80, 2, 32, False, True, "gptq"),
    ("llama", 96, 8, -1, False, False, "gptq"),
    ("llama", 80, 8, 32, True, True, "gptq_v2"),
    ("llama", 128, 8, 32, False, False, "gptq_v2"),
    ("opt", 96, 4, 32, False, False, "gptq"),
    ("qwen2", 80, 4, 32, True, True, "gptq_v2"),
]


@pytest.mark.parametrize(
    "arch,intermediate,bits,group_size,sym,desc_act,fmt", CASES, ids=["-".join(map(str, c)) for c in CASES]
)
def test_load_gptq_matches_dequantized_reference(arch, intermediate, bits, group_size, sym, desc_act, fmt, tmp_path):
    model = tiny_model(arch, intermediate)
    deq = write_gptq_checkpoint(model, tmp_path, bits, group_size, sym=sym, desc_act=desc_act, checkpoint_format=fmt)
    want = logits(reference_model(model, deq))

    loaded = load_gptq(tmp_path)
    modules = dict(loaded.named_modules())
    for name, weight in deq.items():
        layer = modules[name]
        assert isinstance(layer, hf_compress.QuantLinear), f"{name} is {type(layer).__name__}"
        if hasattr(layer, "dequantize_weight"):
            assert_weight_matches(layer, weight, name)
    assert not isinstance(loaded.get_output_embeddings(), hf_compress.QuantLinear)
    assert_matches(loaded, want)


def test_v1_without_checkpoint_format_key_loads_as_v1(tmp_path):
    model = tiny_model(intermediate=80)
    deq = write_gptq_checkpoint(model, tmp_path, 4, 32, sym=False, desc_act=True, checkpoint_format=None)
    assert "checkpoint_format" not in json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    want = logits(reference_model(model, deq))

    # What a loader reading the stored zeros as v2 would compute: every zero one lower, W + scale.
    tensors = load_file(str(tmp_path / "model.safetensors"))
    misread = {
        name: w + tensors[f"{name}.scales"][tensors[f"{name}.g_idx"].long()].t().float() for name, w in deq.items()
    }
    wrong = logits(reference_model(model, misread))
    assert (wrong - want).abs().max() > 10 * REF_TOL * want.abs().max()  # the tolerance tells v1 from v2
    assert (wrong - want).norm() > 10 * FAST_TOL * want.norm()

    loaded = load_gptq(tmp_path)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, hf_compress.QuantLinear)
    assert_matches(loaded, want)


def _rewrite(path, tensors=None, config=None):
    if tensors is not None:
        save_file(tensors, str(path / "model.safetensors"), {"format": "pt"})
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))


def test_missing_g_idx_raises(tmp_path):
    write_gptq_checkpoint(tiny_model(), tmp_path, 4, 32, sym=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.g_idx"]
    _rewrite(tmp_path, tensors=tensors)
    with pytest.raises(ValueError, match="g_idx"):
        load_gptq(tmp_path)


@pytest.mark.parametrize("tamper", ["config_bits", "qweight_rows"])
def test_qweight_shape_contradicting_bits_raises(tamper, tmp_path):
    write_gptq_checkpoint(tiny_model(), tmp_path, 4, 32, sym=True)
    if tamper == "config_bits":  # every tensor is 4-bit packed, the config says 8
        config = json.loads((tmp_path / "config.json").read_text())
        config["quantization_config"]["bits"] = 8
        _rewrite(tmp_path, config=config)
    else:  # one qweight one word short: [7, 64] where 64 inputs at 4 bits need [8, 64]
        tensors = load_file(str(tmp_path / "model.safetensors"))
        key = "model.layers.0.self_attn.o_proj.qweight"
        tensors[key] = tensors[key][:-1].contiguous()
        _rewrite(tmp_path, tensors=tensors)
    with pytest.raises(ValueError, match=r"(?i)shape|bits"):
        load_gptq(tmp_path)


@pytest.mark.parametrize("kind", ["float", "other_method"])
def test_folder_without_gptq_config_raises(kind, tmp_path):
    tiny_model().save_pretrained(tmp_path)
    if kind == "other_method":
        config = json.loads((tmp_path / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}
        _rewrite(tmp_path, config=config)
    with pytest.raises(ValueError, match=r"(?i)gptq"):
        load_gptq(tmp_path)


def test_from_pretrained_with_our_gptq_config_points_to_load_gptq(tmp_path):
    write_gptq_checkpoint(tiny_model(), tmp_path, 4, 32, sym=True)
    with pytest.raises(ValueError, match="load_gptq"):
        AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=hf_compress.GPTQConfig(bits=4, dataset=["x"])
        )


def test_save_pretrained_then_from_pretrained_gives_identical_logits(tmp_path):
    model = tiny_model(intermediate=80)
    deq = write_gptq_checkpoint(model, tmp_path / "gptq", 3, 32, sym=False, desc_act=True, checkpoint_format="gptq")
    loaded = load_gptq(tmp_path / "gptq")
    assert_matches(loaded, logits(reference_model(model, deq)))
    got = logits(loaded)

    loaded.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert torch.equal(logits(reloaded), got)
