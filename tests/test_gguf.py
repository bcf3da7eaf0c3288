"""GGUF: block formats against the gguf package, the writer against stock transformers' GGUF loader, load_gguf,
and (marked ``llamacpp``, with llama-cpp-python installed) llama.cpp itself on our files."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import transformers as t
from conftest import CALIB, HELDOUT, PYDOC_MODEL, needs_pydoc

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf import quants as gq  # noqa: E402

from hf_compress import QuantLinear, export_gguf, kernels, load_gguf  # noqa: E402
from hf_compress.formats import gguf as fmt  # noqa: E402
from hf_compress.nn.gguf_linear import GGUFEmbedding, GGUFLinear  # noqa: E402
from hf_compress.quant import gguf_blocks as B  # noqa: E402

ALL_TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0"]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
SAMPLE = 'def parse(text):\n    """Return the café\'s 12 items."""\n    return [x for x in text.split()]  # naïve\n'


def _weight(rows=48, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :256] = 0.0  # an all-zero block
    w[1, 3] = 0.9  # an outlier
    w[2] = w[2].abs()  # an all-positive row: the K-quant min clamps to 0
    return w


def _imatrix(cols=512, seed=1):
    return torch.rand(cols, generator=torch.Generator().manual_seed(seed)) * 3 + 0.05


# ------------------------------------------------------------------------------------------ block formats
@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_our_dequantization_equals_gguf_packages_on_our_bytes(qtype, with_imatrix):
    w = _weight()
    data = B.quantize(w, qtype, _imatrix() if with_imatrix else None)
    assert data.dtype == torch.uint8 and tuple(data.shape) == (48, B.row_bytes(qtype, 512))
    ours = B.dequantize(data, qtype, 512).numpy()
    theirs = gq.dequantize(data.numpy(), GT[qtype])
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("qtype", ["Q8_0", "TQ1_0", "TQ2_0", "Q4_0", "Q5_0", "Q5_1"])
def test_our_bytes_equal_gguf_packages_quantizer(qtype):
    w = _weight(seed=3)  # refine=False: ggml's rounding alone (Q4_0 / Q5_0 / Q5_1 are refined by default)
    assert np.array_equal(B.quantize(w, qtype, refine=False).numpy(), gq.quantize(w.numpy(), GT[qtype]))


@pytest.mark.parametrize("qtype,rel", [("Q8_0", 1e-4), ("Q6_K", 1e-3), ("Q5_K", 3e-3), ("Q4_K", 1e-2), ("Q5_0", 4e-3), ("Q4_0", 1.5e-2),
                                      ("Q3_K", 4e-2), ("Q2_K", 1.2e-1)])
def test_quantization_error_is_small(qtype, rel):
    w = _weight(seed=4)
    deq = B.dequantize(B.quantize(w, qtype), qtype, 512)
    assert ((deq - w) ** 2).sum() / (w**2).sum() < rel


def _k_error(x, nmax, nstep):
    wts = torch.sqrt((x * x).mean(-1, keepdim=True)) + x.abs()
    L, s, m = B.make_qkx_quants(x, nmax, wts, -1.0, 0.1, nstep)
    return ((s * L.float() - m - x) ** 2 * wts).sum().item()


def _c_make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, mad=False):
    """ggml's make_qkx2_quants transcribed line by line in numpy float32 (the reference for ours): codes."""
    f = np.float32
    x, w = x.astype(f), w.astype(f)

    def nearest(v):
        return int(np.rint(f(v)))

    mn, mx, sw, sx = x[0], x[0], w[0], f(w[0] * x[0])
    for i in range(1, len(x)):
        mn, mx, sw, sx = min(mn, x[i]), max(mx, x[i]), f(sw + w[i]), f(sx + f(w[i] * x[i]))
    mn = min(mn, f(0))
    iscale = f(f(nmax) / f(mx - mn))
    scale = f(1 / iscale)
    L = [max(0, min(nmax, nearest(f(iscale * f(x[i] - mn))))) for i in range(len(x))]
    best = f(0)
    for i in range(len(x)):
        d = f(f(f(scale * L[i]) + mn) - x[i])
        best = f(best + f(w[i] * (abs(d) if mad else f(d * d))))
    for step in range(nstep + 1):
        iscale = f(f(f(f(rmin) + f(f(rdelta) * step)) + nmax) / f(mx - mn))  # min as the loop updated it
        La = [max(0, min(nmax, nearest(f(iscale * f(x[i] - mn))))) for i in range(len(x))]
        sl = sl2 = sxl = f(0)
        for i in range(len(x)):
            wl = f(w[i] * La[i])
            sl, sl2, sxl = f(sl + wl), f(sl2 + f(wl * La[i])), f(sxl + f(wl * x[i]))
        D = f(f(sw * sl2) - f(sl * sl))
        if D > 0:
            ts, tm = f(f(f(sw * sxl) - f(sx * sl)) / D), f(f(f(sl2 * sx) - f(sl * sxl)) / D)
            if tm > 0:
                ts, tm = f(sxl / sl2), f(0)
            cur = f(0)
            for i in range(len(x)):
                d = f(f(f(ts * La[i]) + tm) - x[i])
                cur = f(cur + f(w[i] * (abs(d) if mad else f(d * d))))
            if cur < best:
                best, mn, L = cur, tm, La
    return L


@pytest.mark.parametrize("args", [(15, -1.0, 0.1, 20), (31, -0.5, 0.1, 15), (15, -0.9, 0.05, 36)])
def test_k_quant_search_follows_ggml(args):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(120, 32, generator=g) * 0.05
    wts = torch.sqrt((x * x).mean(-1, keepdim=True)) + x.abs()
    ours = B.make_qkx_quants(x, args[0], wts, *args[1:])[0]
    ref = torch.tensor([_c_make_qkx2_quants(x[r].numpy(), wts[r].numpy(), *args) for r in range(x.shape[0])])
    assert (ours.to(ref.dtype) == ref).all(-1).float().mean().item() >= 0.98


def test_q2_k_search_on_absolute_error_follows_ggml():
    # Q2_K's search: 16 weights, codes 0..3, weights |x|, candidates compared by weighted absolute error
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(13)) * 0.05
    ours = B.make_qkx_quants(x, 3, x.abs(), -0.5, 0.1, 15, mad=True)[0]
    ref = torch.tensor([_c_make_qkx2_quants(x[r].numpy(), x[r].abs().numpy(), 3, -0.5, 0.1, 15, mad=True) for r in range(200)])
    assert (ours.to(ref.dtype) == ref).all(-1).float().mean().item() >= 0.98
    squared = B.make_qkx_quants(x, 3, x.abs(), -0.5, 0.1, 15)[0]
    assert not torch.equal(squared, ours)  # the objective matters


def _c_make_q3_quants(x, nmax):
    """ggml's make_q3_quants(do_rmse=true) transcribed in numpy float32: codes shifted by nmax, and the scale."""
    f = np.float32
    x = x.astype(f)
    amax, mx = f(0), f(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < 1e-15:
        return [0] * len(x), 0.0
    iscale = f(-nmax / mx)
    L = [max(-nmax, min(nmax - 1, int(np.rint(f(iscale * v))))) for v in x]
    slx_t = sl2_t = f(0)
    for v, li in zip(x, L, strict=True):
        w = f(v * v)
        slx_t, sl2_t = f(slx_t + f(f(w * v) * li)), f(sl2_t + f(f(w * li) * li))
    for _ in range(5):
        changed = 0
        for i, v in enumerate(x):
            w = f(v * v)
            slx = f(slx_t - f(f(w * v) * L[i]))
            if slx > 0:
                sl2 = f(sl2_t - f(f(w * L[i]) * L[i]))
                new = max(-nmax, min(nmax - 1, int(np.rint(f(f(v * sl2) / slx)))))
                if new != L[i]:
                    slx, sl2 = f(slx + f(f(w * v) * new)), f(sl2 + f(f(w * new) * new))
                    if sl2 > 0 and f(f(slx * slx) * sl2_t) > f(f(slx_t * slx_t) * sl2):
                        L[i], slx_t, sl2_t = new, slx, sl2
                        changed += 1
        if not changed:
            break
    return [li + nmax for li in L], float(f(slx_t / sl2_t)) if sl2_t > 0 else 0.0


def test_q3_k_search_follows_ggml():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(14)) * 0.05
    x[0] = 0.0
    L, scale = B.make_q3_quants(x, 4)
    ref = [_c_make_q3_quants(x[r].numpy(), 4) for r in range(200)]
    same = torch.tensor([L[r].tolist() == ref[r][0] for r in range(200)]).float().mean().item()
    assert same >= 0.98, same
    torch.testing.assert_close(scale.squeeze(-1).double(), torch.tensor([r[1] for r in ref], dtype=torch.float64), rtol=1e-4, atol=1e-9)


def test_k_quant_search_beats_plain_min_max():
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(5))
    assert _k_error(x, 15, 20) < 0.9 * _k_error(x, 15, -1)  # nstep -1: the min-max start only


def test_imatrix_lowers_the_weighted_error():
    w, im = _weight(seed=6), _imatrix(seed=7) ** 4  # strongly uneven importance
    for qtype in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0"):
        plain = B.dequantize(B.quantize(w, qtype), qtype, 512)
        weighted = B.dequantize(B.quantize(w, qtype, im), qtype, 512)
        err = lambda d: (((d - w) ** 2) * im).sum().item()  # noqa: E731
        assert err(weighted) < err(plain), qtype


def _search_weights(w, qtype):
    """The weights ggml's search (no imatrix) puts on each weight: what a linear's blocks are refined on."""
    if qtype in ("Q4_K", "Q5_K"):
        x = w.reshape(-1, 32)
        return (torch.sqrt((x * x).mean(-1, keepdim=True)) + x.abs()).reshape(w.shape)
    return {"Q2_K": w.abs(), "Q3_K": w * w}.get(qtype, torch.ones_like(w))  # Q6_K, 32-blocks: plain


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0", "Q5_1", *K_TYPES])
@pytest.mark.parametrize("mode", ["embedding", "embedding+imatrix", "linear"])
def test_refinement_lowers_every_blocks_error(qtype, mode):
    w, im = _weight(rows=96, seed=8), (_imatrix(seed=9) if mode.endswith("imatrix") else None)
    embedding = mode.startswith("embedding")
    if im is not None and qtype in ("Q4_0", "Q5_0", "Q5_1"):
        assert torch.equal(B.quantize(w, qtype, im), B.quantize(w, qtype, im, refine=False))  # ggml's weighted search kept
        return
    wts = torch.ones_like(w) if embedding else _search_weights(w, qtype)

    def block_errors(refine):
        deq = B.dequantize(B.quantize(w, qtype, im, refine=refine, embedding=embedding), qtype, 512)
        return (wts * (deq - w) ** 2).reshape(-1, B.block_size(qtype)).sum(-1)

    ggml, refined = block_errors(False), block_errors(True)
    assert bool((refined <= ggml * (1 + 1e-6)).all())
    assert refined.sum() < 0.99 * ggml.sum()


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 256.*Q5_0"):
        B.quantize(torch.zeros(4, 704), "Q4_K")
    with pytest.raises(ValueError, match="NaN"):
        B.quantize(torch.full((2, 256), float("nan")), "Q8_0")
    with pytest.raises(ValueError, match="unknown GGUF type"):
        B.quantize(torch.zeros(2, 256), "Q3_X")
    with pytest.raises(ValueError, match="importance matrix has 10"):
        B.quantize(torch.zeros(2, 256), "Q4_K", torch.ones(10))


def test_tensor_types_follow_llama_quantize_mixes(caplog):
    shapes = [("token_embd.weight", (8192, 256)), ("output.weight", (8192, 256)), ("output_norm.weight", (256,))]
    for i in range(8):
        shapes += [(f"blk.{i}.attn_v.weight", (128, 256)), (f"blk.{i}.attn_q.weight", (256, 256)),
                   (f"blk.{i}.ffn_down.weight", (256, 768)), (f"blk.{i}.ffn_up.weight", (704, 256))]
    with caplog.at_level(logging.WARNING, logger="hf_compress.formats.gguf"):
        types = fmt.tensor_types(shapes, "Q4_K_M")
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K" and types["output_norm.weight"] == "F32"
    # use_more_bits(i, 8): i < 1, i >= 7, (i - 1) % 3 == 2 -> layers 0, 3, 6, 7
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(8)] == ["Q6_K" if i in (0, 3, 6, 7) else "Q4_K" for i in range(8)]
    assert types["blk.1.ffn_down.weight"] == "Q4_K" and types["blk.0.ffn_down.weight"] == "Q6_K"
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert fmt.tensor_types(shapes, "Q8_0")["output.weight"] == "Q8_0"
    assert "written as" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="hf_compress.formats.gguf"):
        narrow = fmt.tensor_types([("blk.0.attn_v.weight", (128, 704)), ("blk.1.attn_v.weight", (128, 96))], "Q4_K_M")
    # of 2 layers, layer 1 gets more bits: Q4_K -> Q5_0 and Q6_K -> Q8_0 (32-blocks fit 704 and 96)
    assert narrow == {"blk.0.attn_v.weight": "Q5_0", "blk.1.attn_v.weight": "Q8_0"}
    assert "704 columns are not a multiple of 256 (needed by Q4_K): written as Q5_0" in caplog.text
    assert "96 columns are not a multiple of 256 (needed by Q6_K): written as Q8_0" in caplog.text
    assert fmt.tensor_types([("blk.0.ffn_up.weight", (64, 96))], "Q4_K_M") == {"blk.0.ffn_up.weight": "Q5_0"}
    assert fmt.tensor_types([("blk.0.ffn_up.weight", (64, 100))], "Q4_K_M") == {"blk.0.ffn_up.weight": "F16"}
    # the 3- and 2-bit mixes (8 layers: n // 16 = 0, so Q3_K_M's ffn_down is Q4_K throughout)
    q3m = fmt.tensor_types(shapes + [("blk.0.attn_output.weight", (256, 256))], "Q3_K_M")
    assert [q3m[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert q3m["blk.0.ffn_down.weight"] == "Q4_K" and q3m["blk.0.attn_output.weight"] == "Q4_K"
    assert q3m["blk.0.attn_q.weight"] == "Q3_K" and q3m["token_embd.weight"] == "Q3_K" and q3m["output.weight"] == "Q6_K"
    q3l = fmt.tensor_types(shapes, "Q3_K_L")
    assert q3l["blk.5.attn_v.weight"] == "Q5_K" and q3l["blk.5.ffn_down.weight"] == "Q5_K" and q3l["blk.5.ffn_up.weight"] == "Q3_K"
    assert set(fmt.tensor_types(shapes, "Q3_K_S").values()) == {"Q3_K", "Q6_K", "F32"}
    for n_gqa, v in ((2, "Q3_K"), (4, "Q4_K")):
        q2 = fmt.tensor_types(shapes, "Q2_K", n_gqa=n_gqa)
        assert q2["blk.3.attn_v.weight"] == v and q2["blk.3.ffn_down.weight"] == "Q3_K" and q2["blk.3.attn_q.weight"] == "Q2_K"
    assert fmt.tensor_types([("blk.0.ffn_up.weight", (64, 96))], "Q2_K") == {"blk.0.ffn_up.weight": "Q4_0"}
    with pytest.raises(ValueError, match="unknown GGUF qtype"):
        fmt.tensor_types(shapes, "Q4_K_X")


def test_permutation_round_trips():
    w = torch.randn(8 * 32, 5)
    assert torch.equal(fmt._unpermute_qk(fmt._permute_qk(w, 8), 8), w)
    assert not torch.equal(fmt._permute_qk(w, 8), w)


# --------------------------------------------------------------------------------------------- the file
@pytest.fixture(scope="module")
def pydoc():
    if not PYDOC_MODEL.is_dir():
        pytest.skip(f"local model absent: {PYDOC_MODEL}")
    return t.AutoModelForCausalLM.from_pretrained(PYDOC_MODEL).eval(), t.AutoTokenizer.from_pretrained(PYDOC_MODEL)


@pytest.fixture(scope="module")
def files(pydoc, tmp_path_factory):
    model, tok = pydoc
    d = tmp_path_factory.mktemp("gguf")
    return {q: export_gguf(model, tok, d / f"m-{q}.gguf", q) for q in ("F32", "Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K")}


def _logits(model, ids):
    with torch.inference_mode(), kernels.use_backend("reference"):
        return model(ids).logits


@needs_pydoc
def test_stock_transformers_loads_our_file_exactly(pydoc, files):
    model, tok = pydoc
    ids = tok(SAMPLE, return_tensors="pt").input_ids
    f32 = files["F32"]
    hf = t.AutoModelForCausalLM.from_pretrained(str(f32.parent), gguf_file=f32.name)
    # F32: the permutation of q/k rows, names, norms and hyper-parameters are all right iff this is exact
    assert torch.equal(_logits(hf, ids), _logits(model, ids))
    htok = t.AutoTokenizer.from_pretrained(str(f32.parent), gguf_file=f32.name)
    assert htok(SAMPLE)["input_ids"] == tok(SAMPLE)["input_ids"]
    for q in ("Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K"):
        hf = t.AutoModelForCausalLM.from_pretrained(str(files[q].parent), gguf_file=files[q].name)
        ours, _ = load_gguf(files[q], tokenizer=tok)
        assert (_logits(hf, ids) - _logits(ours, ids)).abs().max() < 1e-4, q
    types = {x.name: GT(x.tensor_type).name for x in gguf.GGUFReader(str(files["Q2_K"])).tensors}
    # n_gqa = 2: attn_v Q3_K; ffn_down Q3_K on 704 columns falls back to Q4_0
    assert types["blk.0.attn_q.weight"] == "Q2_K" and types["blk.0.attn_v.weight"] == "Q3_K"
    assert types["blk.0.ffn_down.weight"] == "Q4_0" and types["blk.0.attn_output.weight"] == "Q3_K"


@needs_pydoc
def test_file_metadata_and_types(files, pydoc):
    reader = gguf.GGUFReader(str(files["Q4_K_M"]))
    f = reader.fields

    def val(key):
        field = f[key]
        return field.parts[field.data[0]].tolist()[0] if len(field.data) == 1 else None

    assert bytes(f["general.architecture"].parts[-1]).decode() == "llama"
    assert bytes(f["tokenizer.ggml.pre"].parts[-1]).decode() == "qwen2"  # the source's split regex
    assert bytes(f["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert val("llama.block_count") == 6 and val("llama.attention.head_count_kv") == 4 and val("llama.embedding_length") == 256
    assert val("llama.context_length") == 512 and val("tokenizer.ggml.add_bos_token") is False
    types = {x.name: GT(x.tensor_type).name for x in reader.tensors}
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q4_K"
    assert types["blk.2.ffn_down.weight"] == "Q8_0"  # Q6_K (use_more_bits: layers 2, 5) on 704 columns falls back
    assert types["blk.0.ffn_down.weight"] == "Q5_0"  # Q4_K on 704 columns falls back
    assert types["blk.0.attn_norm.weight"] == "F32"


@needs_pydoc
def test_load_gguf_keeps_weights_packed(files, pydoc):
    model, tok = pydoc
    q4 = files["Q4_K_M"]
    ours, _ = load_gguf(q4, tokenizer=tok)
    layers = dict(ours.named_modules())
    q = layers["model.layers.0.self_attn.q_proj"]
    assert isinstance(q, QuantLinear) and q.bits == 4 and q.group_size == 32 and q.mins is not None
    assert isinstance(layers["model.layers.1.mlp.down_proj"], GGUFLinear)  # Q5_0: kept as its bytes
    assert isinstance(layers["model.layers.2.mlp.down_proj"], QuantLinear) and layers["model.layers.2.mlp.down_proj"].bits == 8
    assert isinstance(ours.get_input_embeddings(), GGUFEmbedding)
    nbytes = sum(x.numel() * x.element_size() for x in list(ours.parameters()) + list(ours.buffers()))
    assert nbytes <= 1.3 * q4.stat().st_size
    # the fast kernels agree with the reference to bf16 precision
    ids = tok(SAMPLE, return_tensors="pt").input_ids
    with torch.inference_mode():
        fast = ours(ids).logits
    assert (fast - _logits(ours, ids)).abs().max() < 0.2
    # every QuantLinear's dequantized weight is the file's dequantized tensor
    reader = {x.name: x for x in gguf.GGUFReader(str(q4)).tensors}
    raw = reader["blk.2.ffn_gate.weight"]
    expect = gq.dequantize(raw.data, raw.tensor_type)
    assert np.array_equal(layers["model.layers.2.mlp.gate_proj"].dequantize_weight().numpy(), expect)


@needs_pydoc
def test_round_trip_from_gguf_packages_own_quantizer(pydoc, tmp_path, monkeypatch):
    """A file whose Q8_0 bytes come from gguf.quants.quantize loads through load_gguf with transformers' logits."""
    model, tok = pydoc
    monkeypatch.setattr(B, "quantize",
                        lambda w, q, im=None, refine=True, embedding=False: torch.from_numpy(gq.quantize(w.numpy(), GT[q])))
    path = export_gguf(model, tok, tmp_path / "gguf-pkg-Q8_0.gguf", "Q8_0")
    monkeypatch.undo()
    hf = t.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours, _ = load_gguf(path)
    ids = tok(SAMPLE, return_tensors="pt").input_ids
    assert (_logits(hf, ids) - _logits(ours, ids)).abs().max() < 1e-4


def _tiny_llama(tmp_path, quantization_config=None, layers: int = 2, tie: bool = False):
    """A seeded random Llama with 256-wide rows and the local tokenizer's vocabulary, saved and reloaded (quantized
    on load when a config is given)."""
    config = t.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, vocab_size=8192, tie_word_embeddings=tie)
    torch.manual_seed(0)
    t.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "float")
    kw = {} if quantization_config is None else {"quantization_config": quantization_config}
    return t.AutoModelForCausalLM.from_pretrained(tmp_path / "float", **kw).eval()


@needs_pydoc
@pytest.mark.parametrize("qtype", ["TQ2_0", "TQ1_0"])
def test_ternary_export_is_lossless_and_loads_packed(qtype, tmp_path, pydoc):
    _, tok = pydoc
    from hf_compress import BitLinearConfig

    model = _tiny_llama(tmp_path, BitLinearConfig())
    path = export_gguf(model, tok, tmp_path / f"b158-{qtype}.gguf", qtype)
    types = {x.name: GT(x.tensor_type).name for x in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_up.weight"] == qtype and types["output.weight"] == "F16"
    ours, _ = load_gguf(path, tokenizer=tok)
    for name, m in model.named_modules():
        if hasattr(m, "codes") and name.startswith("model.layers"):
            ql = dict(ours.named_modules())[name]
            assert isinstance(ql, QuantLinear) and ql.bits == 2 and ql.group_size == 256
            scale16 = m.weight_scale.half().float()  # the TQ block scale is fp16
            assert torch.equal(ql.dequantize_weight(), m.codes().float() * scale16)
    # the TQ2_0 bytes are what gguf's own quantizer writes for the same ternary weight
    src = model.model.layers[0].mlp.up_proj
    w = (src.codes().float() * src.weight_scale.half().float()).numpy()
    reader = {x.name: x for x in gguf.GGUFReader(str(path)).tensors}
    assert np.array_equal(np.asarray(reader["blk.0.ffn_up.weight"].data), gq.quantize(w, GT[qtype]))
    hf = t.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name)
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    assert (_logits(hf, ids) - _logits(ours, ids)).abs().max() < 1e-4


def test_qwen2_export_has_no_permutation_and_keeps_biases(tmp_path):
    if not PYDOC_MODEL.is_dir():
        pytest.skip("needs the local tokenizer")
    tok = t.AutoTokenizer.from_pretrained(PYDOC_MODEL)
    config = t.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=128, vocab_size=8192, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()  # non-zero biases, so a wrong order would show
            layer.self_attn.k_proj.bias.normal_()
    path = export_gguf(model, tok, tmp_path / "qwen2.gguf", "F32")
    names = {x.name for x in gguf.GGUFReader(str(path)).tensors}
    assert "output.weight" not in names and "blk.0.attn_q.bias" in names  # tied: no output matrix
    hf = t.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name)
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    assert torch.allclose(_logits(hf, ids), _logits(model, ids), atol=1e-5)
    ours, _ = load_gguf(path, tokenizer=tok)
    assert torch.allclose(_logits(ours, ids), _logits(model, ids), atol=1e-5)


def test_tied_llama_and_a_quantized_source(tmp_path, tiny_models):
    """An RTN model exports from its own weights; tied embeddings give no output.weight and reload tied."""
    if not PYDOC_MODEL.is_dir():
        pytest.skip("needs the local tokenizer")
    from hf_compress import RTNConfig

    tok = t.AutoTokenizer.from_pretrained(PYDOC_MODEL)
    model = _tiny_llama(tmp_path, RTNConfig(bits=4, group_size=128), tie=True)
    path = export_gguf(model, tok, tmp_path / "rtn.gguf", "Q8_0")
    names = {x.name for x in gguf.GGUFReader(str(path)).tensors}
    assert "output.weight" not in names
    ours, _ = load_gguf(path, tokenizer=tok)
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    ref = _logits(model, ids)
    assert (_logits(ours, ids) - ref).abs().max() < 0.05 * ref.abs().max()


# --------------------------------------------------------------------------------------------- errors
def _tok():
    if not PYDOC_MODEL.is_dir():
        pytest.skip("needs the local tokenizer")
    return t.AutoTokenizer.from_pretrained(PYDOC_MODEL)


def test_unmapped_architecture_is_refused(tmp_path, tiny_models):
    model = t.AutoModelForCausalLM.from_pretrained(tiny_models("gpt2"))
    with pytest.raises(ValueError, match="maps the architectures llama, mistral, qwen2; this model is 'gpt2'"):
        export_gguf(model, _tok(), tmp_path / "x.gguf", "Q8_0")
    assert list(tmp_path.iterdir()) == []


def test_missing_output_folder_writes_nothing(tmp_path, tiny_models):
    model = t.AutoModelForCausalLM.from_pretrained(tiny_models("llama"))
    with pytest.raises(FileNotFoundError, match="does not exist: create it first"):
        export_gguf(model, _tok(), tmp_path / "nope" / "x.gguf", "Q8_0")
    assert list(tmp_path.iterdir()) == []


def test_float_model_to_ternary_is_refused(tmp_path):
    tok = _tok()
    model = _tiny_llama(tmp_path, layers=1)
    with pytest.raises(ValueError, match="TQ2_0 holds ternary weights only.*BitLinearConfig"):
        export_gguf(model, tok, tmp_path / "x.gguf", "TQ2_0")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".tmp-*"))


def test_sub_ln_bitnet_is_refused(tmp_path):
    from hf_compress import BitLinearConfig

    tok = _tok()
    model = _tiny_llama(tmp_path, BitLinearConfig(sub_ln=True), layers=1)
    with pytest.raises(ValueError, match="SubLN.*sub_ln=False"):
        export_gguf(model, tok, tmp_path / "x.gguf", "TQ2_0")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".tmp-*"))


def test_narrow_widths_fall_back_per_tensor(tmp_path, tiny_models, caplog):
    """The tiny Llama's widths (64, 96) hold no 256-blocks: Q4_K_M falls back per tensor and says so."""
    model = t.AutoModelForCausalLM.from_pretrained(tiny_models("llama"))
    model.config.vocab_size = 128
    tok = _tok()
    with caplog.at_level(logging.WARNING, logger="hf_compress.formats.gguf"):
        path = export_gguf(model, tok, tmp_path / "tiny.gguf", "Q4_K_M")
    types = {x.name: GT(x.tensor_type).name for x in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q5_0" and types["output.weight"] == "Q8_0"
    assert "64 columns are not a multiple of 256 (needed by Q4_K): written as Q5_0" in caplog.text


def test_load_gguf_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_gguf(tmp_path / "absent.gguf")


def test_failed_write_keeps_the_previous_file(tmp_path, tiny_models, monkeypatch):
    model = t.AutoModelForCausalLM.from_pretrained(tiny_models("llama"))
    tok = _tok()
    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(B, "quantize", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(model, tok, target, "Q8_0")
    assert target.read_bytes() == b"previous" and not list(tmp_path.glob(".tmp-*"))


@needs_pydoc
def test_imatrix_from_calibration_text(pydoc, tmp_path):
    model, tok = pydoc
    im = fmt.compute_imatrix(model, tok, str(CALIB), n_samples=4, seqlen=128)
    assert set(im) >= {"model.layers.0.self_attn.q_proj", "lm_head"} and im["lm_head"].shape == (256,)
    assert bool((im["model.layers.0.mlp.down_proj"] > 0).all())
    with pytest.raises(ValueError, match="no calibration data"):
        fmt.compute_imatrix(model, tok, None)


# ------------------------------------------------------------------------------------------ llama.cpp
@pytest.mark.llamacpp
@needs_pydoc
def test_llama_cpp_runs_our_files(files, pydoc):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tok = pydoc
    ids = tok(SAMPLE)["input_ids"]
    from hf_compress.eval.perplexity import tokenize_windows

    windows = tokenize_windows(tok, HELDOUT.read_text(), seqlen=256, max_tokens=1024)
    for q, path in files.items():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
        assert llm.tokenize(SAMPLE.encode(), add_bos=False, special=False) == ids
        ours, _ = load_gguf(path, tokenizer=tok)
        nll_cpp = nll_ours = 0.0
        for row in windows.tolist():
            llm.reset()
            llm.eval(row)
            lc = torch.tensor(np.asarray(llm.scores[: len(row)]), dtype=torch.float64)
            lo = _logits(ours, torch.tensor([row]))[0].double()
            tgt = torch.tensor(row[1:])
            nll_cpp += torch.nn.functional.cross_entropy(lc[:-1], tgt, reduction="sum").item()
            nll_ours += torch.nn.functional.cross_entropy(lo[:-1], tgt, reduction="sum").item()
            if q == "F32":
                assert (lc - lo).abs().max() < 1e-2
        assert abs(math.exp(nll_cpp / windows[:, 1:].numel()) / math.exp(nll_ours / windows[:, 1:].numel()) - 1) < 0.005
        llm.close()


def _ggml_quantize(w: torch.Tensor, qtype: str, imatrix) -> torch.Tensor:
    """llama.cpp's own quantizer (``ggml_quantize_chunk`` in the libggml that llama-cpp-python ships)."""
    import ctypes
    from pathlib import Path

    llama_cpp = pytest.importorskip("llama_cpp")
    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"))
    if not libs:
        pytest.skip("llama-cpp-python ships no libggml-base here")
    lib = ctypes.CDLL(str(libs[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p]
    src = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    out = np.zeros((w.shape[0], B.row_bytes(qtype, w.shape[1])), np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix.numpy(), dtype=np.float32)
    lib.ggml_quantize_chunk(B.TYPES[qtype][0], src.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1],
                            None if im is None else im.ctypes.data)
    return torch.from_numpy(out)


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0", "Q5_1", *K_TYPES])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_search_alone_gives_llama_cpps_bytes(qtype, with_imatrix):
    """refine=False is ggml's search: the same bytes as llama.cpp's quantizer, but for blocks where two candidates
    tie to float rounding (ggml's compiled sums fuse multiply-adds); refine=True lowers the error below it."""
    w, im = _weight(rows=96, seed=10), (_imatrix(seed=11) if with_imatrix else None)
    theirs, ours = _ggml_quantize(w, qtype, im), B.quantize(w, qtype, im, refine=False)
    size = B.TYPES[qtype][2]
    same = (theirs.reshape(-1, size) == ours.reshape(-1, size)).all(-1).float().mean().item()
    assert same >= 0.96, same
    err = lambda d: ((B.dequantize(d, qtype, 512) - w) ** 2).sum().item()  # noqa: E731
    assert abs(err(ours) / err(theirs) - 1) < 1e-3
    if qtype != "Q8_0" and (im is None or qtype not in ("Q4_0", "Q5_0", "Q5_1")):
        assert err(B.quantize(w, qtype, im, embedding=True)) < 0.99 * err(theirs)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0", "Q5_1", *K_TYPES])
def test_grid_and_with_codes_reproduce_the_blocks(qtype):
    w = _weight(seed=8)
    data = B.quantize(w, qtype)
    scale, offset, qmax = B.grid(data, qtype)
    deq = B.dequantize(data, qtype, 512).reshape(scale.shape)
    codes = torch.round((deq + offset) / torch.where(scale == 0, torch.ones_like(scale), scale)).clamp(0, qmax)
    assert torch.equal(scale * codes - offset, deq) or (scale * codes - offset - deq).abs().max() < 1e-7
    rebuilt = B.with_codes(data, qtype, codes)
    assert torch.equal(B.dequantize(rebuilt, qtype, 512), B.dequantize(data, qtype, 512))
    nonzero = (scale != 0).all(-1)  # an all-zero block's codes are arbitrary
    assert torch.equal(rebuilt.reshape(nonzero.shape[0], -1)[nonzero], data.reshape(nonzero.shape[0], -1)[nonzero])


def test_gptq_onto_a_gguf_grid_lowers_the_output_error():
    from hf_compress.methods.gptq import GPTQ

    g = torch.Generator().manual_seed(9)
    x = torch.randn(2048, 256, generator=g) @ (torch.randn(256, 256, generator=g) * 0.2 + torch.eye(256))  # correlated inputs
    w = torch.randn(64, 256, generator=g) * 0.05
    q = GPTQ(256)
    q.add_batch(x)
    data, rel = fmt._gptq_blocks(q, w, "Q4_K", None)
    plain = B.quantize(w, "Q4_K")
    out_err = lambda d: ((x @ (B.dequantize(d, "Q4_K", 256) - w).t()) ** 2).sum().item()  # noqa: E731
    assert out_err(data) < 0.8 * out_err(plain)
    assert np.array_equal(B.dequantize(data, "Q4_K", 256).numpy(), gq.dequantize(data.numpy(), GT["Q4_K"]))
    assert 0 < rel < 0.05


@needs_pydoc
def test_gptq_export_needs_calibration_data_and_writes_a_standard_file(pydoc, tmp_path):
    model, tok = pydoc
    with pytest.raises(ValueError, match="gptq=True needs calibration data"):
        export_gguf(model, tok, tmp_path / "x.gguf", "Q4_K_M", gptq=True)
    path = export_gguf(model, tok, tmp_path / "g.gguf", "Q4_K_M", imatrix=str(CALIB), gptq=True, n_samples=4, seqlen=128)
    hf = t.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours, _ = load_gguf(path, tokenizer=tok)
    ids = tok(SAMPLE, return_tensors="pt").input_ids
    assert (_logits(hf, ids) - _logits(ours, ids)).abs().max() < 1e-4
    assert (_logits(ours, ids) - _logits(model, ids)).abs().max() < 2.0


@needs_pydoc
def test_gptq_export_holds_one_hessian_at_a_time_and_leaves_the_model_as_it_was(pydoc, tmp_path, monkeypatch):
    from hf_compress.methods import gptq as G

    model, tok = pydoc
    before = {k: v.clone() for k, v in model.state_dict().items()}
    made, live = [], []
    init = G.GPTQ.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)
        live.append(sum(g.H is not None for g in made))

    monkeypatch.setattr(G.GPTQ, "__init__", tracked)
    export_gguf(model, tok, tmp_path / "g.gguf", "Q4_K_M", imatrix=str(CALIB), gptq=True, n_samples=4, seqlen=128)
    # per block one Hessian for q/k/v, o, gate/up and down (true_sequential), then the untied output head's
    assert len(made) == 4 * model.config.num_hidden_layers + (0 if model.config.tie_word_embeddings else 1)
    assert max(live) == 1  # each freed before the next is made (was one per linear, all at once)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


@needs_pydoc
def test_cli_export_gguf(tmp_path):
    from hf_compress.cli import main

    out = tmp_path / "m.gguf"
    assert main(["export", str(PYDOC_MODEL), "--format", "gguf", "--qtype", "Q8_0", "--output", str(out)]) == 0
    types = {x.name: GT(x.tensor_type).name for x in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0"
    with pytest.raises(SystemExit, match="--format gguf only"):
        main(["export", str(PYDOC_MODEL), "--format", "gptq", "--qtype", "Q8_0", "--output", str(tmp_path / "x")])
