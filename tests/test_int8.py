"""LLM.int8 and W8A8: the int8 layers against independent float64 maths, the CPU backends against the
reference, transformers integration (quantize on load, static / SmoothQuant calibration, save/reload,
dequantize), error messages, perplexity on pydoc-llama-6m and the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import CALIB, HELDOUT, PYDOC_MODEL, needs_pydoc, token_batch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from hf_compress import Int8MixedConfig, Int8MixedLinear, W8A8Config, W8A8Linear
from hf_compress.kernels import use_backend
from hf_compress.kernels.cpu.w8a8 import has_vnni, onednn_available
from hf_compress.kernels.int8 import backend_for

# oneDNN runs only where it is exact: with oneDNN's quantized linear and a CPU with VNNI (see kernels/int8.py).
ONEDNN_RUNS = onednn_available() and has_vnni()
CPU_BACKENDS = [
    pytest.param("cpu-onednn", marks=pytest.mark.skipif(not ONEDNN_RUNS, reason="no oneDNN qlinear or no VNNI")),
    "cpu-int-mm",
]
KINDS = ["llm-int8", "dynamic-per-token", "dynamic-per-tensor", "static", "smoothed"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
THRESHOLD = 6.0
STATIC_SCALE = 0.02  # 127 * 0.02 = 2.54 < max|randn|: the static path clamps some codes


# -- helpers ----------------------------------------------------------------------------------------------
def make_layer(kind: str, k: int = 100, n: int = 37, bias: bool = True, seed: int = 0):
    """``(layer, float weight [n, k], bias)``; the weight has rows of very different magnitudes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.1 + 2 * torch.rand(n, 1, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    if kind == "llm-int8":
        layer = Int8MixedLinear(k, n, threshold=THRESHOLD, bias=bias)
    elif kind == "dynamic-per-token":
        layer = W8A8Linear(k, n, bias=bias)
    elif kind == "dynamic-per-tensor":
        layer = W8A8Linear(k, n, act_granularity="per-tensor", bias=bias)
    elif kind == "static":
        layer = W8A8Linear(k, n, act_granularity="per-tensor", static=True, bias=bias)
    elif kind == "static-smoothed":
        layer = W8A8Linear(k, n, act_granularity="per-tensor", static=True, smooth=True, bias=bias)
    elif kind == "smoothed":
        layer = W8A8Linear(k, n, smooth=True, bias=bias)
    else:
        raise ValueError(kind)
    smooth = None
    if "smooth" in kind:
        smooth = 0.25 + 2 * torch.rand(k, generator=g)
        layer.smooth.copy_(smooth)
    layer.load_float_weight(w if smooth is None else w * smooth, b)
    if "static" in kind:
        layer.input_scale.fill_(STATIC_SCALE)
    return layer, w, b


def make_input(shape, k: int = 100, outliers=(7, 50), seed: int = 1) -> torch.Tensor:
    """Gaussian activations with a few outlier feature columns (about 8x, above LLM.int8's threshold 6)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, k, generator=g)
    for c in outliers:
        x[..., c] *= 8.0
        x.view(-1, k)[0, c] = 9.0  # at least one value above the threshold in the column
    return x


def bnb_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' int8 row quantization in float64: ``(round(w * 127 / absmax), absmax, near_tie)``."""
    w64 = w.double()
    absmax = w64.abs().amax(dim=1, keepdim=True)
    ratio = torch.where(absmax > 0, w64 * 127 / absmax, torch.zeros_like(w64))
    near_tie = ((ratio - ratio.floor()) - 0.5).abs() < 1e-4
    return torch.round(ratio), absmax.squeeze(1), near_tie


def dequant64(layer) -> torch.Tensor:
    """The float64 weight ``codes * SCB / 127`` (de-smoothed), from the stored state only."""
    w = layer.weight.double() * layer.SCB.double().unsqueeze(1) / 127
    smooth = layer._buffers.get("smooth")
    return w if smooth is None else w / smooth.double()


def llm_int8_fp64(x, layer) -> torch.Tensor:
    """LLM.int8's decomposition in float64, written from the paper: outlier columns (any |x| >= threshold)
    times the dequantized weight columns in float, the rest quantized per token (absmax / 127) times the
    int8 codes, rescaled by both scales."""
    x64 = x.double().reshape(-1, x.shape[-1])
    codes = layer.weight.double()
    w_scale = layer.SCB.double() / 127
    cols = (x64.abs() >= layer.threshold).any(dim=0)
    out = x64[:, cols] @ (codes[:, cols] * w_scale.unsqueeze(1)).t()
    rest = x64.clone()
    rest[:, cols] = 0
    absmax = rest.abs().amax(dim=1, keepdim=True)
    a_scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(rest / a_scale)
    out = out + (q @ codes.t()) * a_scale * w_scale
    if layer.bias is not None:
        out = out + layer.bias.double()
    return out.reshape(*x.shape[:-1], -1)


def assert_close_to_rounding(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to fp32 rounding (fp32 inputs), or to one bf16 ulp (bf16 outputs: fp32 vs fp64 before the cast)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    scale = ref.float().abs().max().item()
    if ref.dtype == torch.bfloat16:
        torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=1e-6 * scale)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * scale)


def load(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def logits(model, ids, backend=None):
    with torch.no_grad(), use_backend(backend):
        return model(ids).logits


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def calib_ids(n=8, seqlen=32, seed=1):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def w8a8(**kw):
    kw.setdefault("dataset", calib_ids())
    kw.setdefault("n_samples", 8)
    kw.setdefault("seqlen", 32)
    return W8A8Config(**kw)


def int8_state(model) -> dict[str, torch.Tensor]:
    return {
        n: t.clone()
        for n, t in model.state_dict().items()
        if n.rpartition(".")[2] in ("weight", "SCB", "input_scale", "smooth") and n.split(".")[-2] in LINEARS
    }


def q_proj_input(path, ids) -> tuple[torch.Tensor, nn.Module]:
    """The float model's input to layers[0].self_attn.q_proj (``[tokens, hidden]``) on ``ids``, and the model."""
    model = load(path)
    seen = []
    attn = model.model.layers[0].self_attn
    handle = attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return torch.cat(seen), model


# -- 1. layers --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS + ["static-smoothed"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backends_match_forward_reference(backend, kind, bias, dtype):
    layer, _, _ = make_layer(kind, bias=bias)
    for shape in [(5,), (1,), (2, 3)]:  # 2-D and 3-D inputs, one row
        x = make_input(shape).to(dtype)
        with use_backend(backend):
            assert backend_for(layer, x) == backend
            got = layer(x)
        ref = layer.forward_reference(x)
        assert got.shape == (*shape, 37) and got.dtype == dtype
        assert_close_to_rounding(got, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_auto_backend_is_a_fast_path_and_matches_reference(kind):
    layer, _, _ = make_layer(kind)
    x = make_input((4,))
    assert backend_for(layer, x) in ("cpu-onednn", "cpu-int-mm")
    assert_close_to_rounding(layer(x), layer.forward_reference(x))
    with use_backend("reference"):
        assert torch.equal(layer(x), layer.forward_reference(x))


@pytest.mark.parametrize("kind", KINDS)
def test_codes_and_scb_follow_bitsandbytes(kind):
    layer, w, b = make_layer(kind)
    with torch.no_grad():
        w_stored = w * layer.smooth if kind == "smoothed" else w  # the stored weight is W * s
        w_stored = w_stored.clone()
    w_stored[3] = 0.0  # a row of zeros: SCB 0, codes 0
    layer.load_float_weight(w_stored, b)
    codes, absmax, near_tie = bnb_codes(w_stored)
    assert layer.weight.dtype == torch.int8 and layer.SCB.dtype == torch.float32
    assert torch.equal(layer.SCB, absmax.float())  # the row absmax itself, as bitsandbytes stores it
    diff = layer.weight.long() - codes.long()
    # We divide by absmax/127 in float32, bitsandbytes multiplies by 127/absmax: the two roundings can only
    # disagree (by one code) for values within float error of a .5 tie, so those are exempt from equality.
    assert int(diff[~near_tie].abs().max()) == 0
    assert int(diff.abs().max()) <= 1
    assert torch.equal(layer.weight[3], torch.zeros(100, dtype=torch.int8)) and float(layer.SCB[3]) == 0.0
    nonzero = [r for r in range(37) if r != 3]
    assert torch.equal(layer.weight[nonzero].abs().amax(dim=1), torch.full((36,), 127, dtype=torch.int8))
    # dequantize_weight is codes * SCB / 127, de-smoothed
    torch.testing.assert_close(layer.dequantize_weight().double(), dequant64(layer), rtol=1e-6, atol=1e-7)
    assert torch.equal(layer.dequantize_weight()[3], torch.zeros(100))


def test_llm_int8_reference_matches_fp64_decomposition():
    layer, _, _ = make_layer("llm-int8")
    x = make_input((6,))  # outlier columns 7 and 50 only
    assert torch.equal((x.abs() >= THRESHOLD).any(0).nonzero().squeeze(1), torch.tensor([7, 50]))
    ref = layer.forward_reference(x)
    expected = llm_int8_fp64(x, layer)
    torch.testing.assert_close(ref.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    # The decomposition matters: without it (plain per-token int8, as W8A8) the outliers' large scales
    # wipe out the small features, and the error against the float product is much larger.
    plain = W8A8Linear(100, 37)
    plain.load_state_dict(layer.state_dict())
    exact = x.double() @ dequant64(layer).t() + layer.bias.double()
    assert rel(ref, exact) * 3 < rel(plain.forward_reference(x), exact)
    # 3-D input: the outlier columns are taken over every token of the batch
    x3 = make_input((2, 3), outliers=(11,))
    torch.testing.assert_close(layer.forward_reference(x3).double(), llm_int8_fp64(x3, layer), rtol=1e-6, atol=1e-5)


def test_llm_int8_without_outliers_is_per_token_w8a8():
    layer, _, _ = make_layer("llm-int8")
    x = make_input((6,), outliers=())
    assert float(x.abs().max()) < THRESHOLD
    plain = W8A8Linear(100, 37)
    plain.load_state_dict(layer.state_dict())
    ref = layer.forward_reference(x)
    assert torch.equal(ref, plain.forward_reference(x))
    expected = llm_int8_fp64(x, layer)
    torch.testing.assert_close(ref.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    for backend in ("cpu-int-mm", "cpu-onednn") if ONEDNN_RUNS else ("cpu-int-mm",):
        with use_backend(backend):
            assert torch.equal(layer(x), plain(x))


def test_llm_int8_every_column_an_outlier_is_the_float_product():
    layer, _, _ = make_layer("llm-int8")
    x = make_input((5,), outliers=()) * 0.1
    x[0] = THRESHOLD * torch.sign(x[0])  # every column has one |x| >= threshold
    exact = x.double() @ dequant64(layer).t() + layer.bias.double()
    ref = layer.forward_reference(x)
    torch.testing.assert_close(ref.double(), llm_int8_fp64(x, layer), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref.double(), exact, rtol=1e-6, atol=1e-6)  # no activation quantization at all
    for backend in ("cpu-int-mm", "cpu-onednn") if ONEDNN_RUNS else ("cpu-int-mm",):
        with use_backend(backend):
            torch.testing.assert_close(layer(x).double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_llm_int8_outlier_columns_change_between_calls(backend):
    """The fast paths cache the outlier weight columns: a batch with other outliers must not reuse them."""
    layer, _, _ = make_layer("llm-int8")
    with use_backend(backend):
        for outliers, seed in [((7, 50), 1), ((7, 50), 2), ((11,), 3), ((), 4), ((7, 50, 99), 5), ((7, 50), 6)]:
            x = make_input((4,), outliers=outliers, seed=seed)
            assert torch.equal((x.abs() >= THRESHOLD).any(0).nonzero().squeeze(1), torch.tensor(outliers, dtype=torch.long))
            kept = x.clone()
            assert_close_to_rounding(layer(x), layer.forward_reference(x))
            assert torch.equal(x, kept)  # the caller's activations are not zeroed in place
        # new weights (same shapes) invalidate every cached tensor
        layer.load_float_weight(torch.randn(37, 100), layer.bias)
        x = make_input((4,), seed=7)
        assert_close_to_rounding(layer(x), layer.forward_reference(x))


def test_w8a8_references_match_fp64():
    """Per-tensor dynamic, static (with clamping) and smoothed references against float64 maths."""
    x = make_input((6,))
    x64 = x.double()

    def quantized_product(xs, a_scale, layer):
        q = torch.round(xs / a_scale).clamp(-127, 127)
        out = (q @ layer.weight.double().t()) * a_scale * (layer.SCB.double() / 127)
        return out + layer.bias.double()

    layer, _, _ = make_layer("dynamic-per-tensor")
    expected = quantized_product(x64, x64.abs().max() / 127, layer)
    torch.testing.assert_close(layer.forward_reference(x).double(), expected, rtol=1e-6, atol=1e-5)

    layer, _, _ = make_layer("static")
    assert float(x.abs().max()) > 127 * STATIC_SCALE  # the clamp is exercised
    expected = quantized_product(x64, torch.tensor(STATIC_SCALE, dtype=torch.float64), layer)
    torch.testing.assert_close(layer.forward_reference(x).double(), expected, rtol=1e-6, atol=1e-5)

    layer, _, _ = make_layer("smoothed")
    xs = x64 / layer.smooth.double()
    expected = quantized_product(xs, xs.abs().amax(1, keepdim=True) / 127, layer)
    torch.testing.assert_close(layer.forward_reference(x).double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("threshold", [0, 0.0, -1.0])
def test_threshold_must_be_positive(threshold):
    with pytest.raises(ValueError, match=r"threshold must be > 0 \(the outlier magnitude, 6.0 in LLM.int8\), got "):
        Int8MixedLinear(8, 4, threshold=threshold)


def test_w8a8_linear_argument_errors():
    with pytest.raises(ValueError, match="act_granularity must be one of"):
        W8A8Linear(8, 4, act_granularity="per-channel")
    with pytest.raises(ValueError, match="static activation scales are per tensor"):
        W8A8Linear(8, 4, act_granularity="per-token", static=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", [None, "reference"])
def test_backward_is_straight_through(kind, backend):
    layer, w, _ = make_layer(kind)
    layer.bias.requires_grad_(True)
    x = make_input((2, 3)).requires_grad_(True)
    with use_backend(backend):
        y = layer(x)
    torch.testing.assert_close(y.detach(), layer.forward_reference(x), rtol=1e-5, atol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    expected = (g.double() @ dequant64(layer)).float()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)
    # the straight-through weight is the quantized one, de-smoothed: close to W but not W itself
    assert not torch.allclose(x.grad, g @ w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, g.reshape(-1, 37).sum(0))
    assert all(not b.requires_grad for b in layer.buffers())


# -- 2. dtype and device moves ----------------------------------------------------------------------------
def test_to_dtype_keeps_scales_float32():
    layer, _, _ = make_layer("static-smoothed")
    before = {n: t.clone() for n, t in layer.state_dict().items()}
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16 and layer.weight.dtype == torch.int8
    for name in ("SCB", "input_scale", "smooth"):
        t = getattr(layer, name)
        assert t.dtype == torch.float32, name
        assert torch.equal(t, before[name]), name  # not rounded through bf16
    assert torch.equal(layer.weight, before["weight"])
    layer.half().double()
    assert {getattr(layer, n).dtype for n in ("SCB", "input_scale", "smooth")} == {torch.float32}
    x = make_input((3,)).to(torch.bfloat16)
    assert_close_to_rounding(layer(x), layer.forward_reference(x))
    layer.to("meta")
    assert {t.device.type for t in layer.state_dict().values()} == {"meta"}
    assert layer.SCB.dtype == layer.input_scale.dtype == layer.smooth.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda_moves_scales_keeping_float32():
    layer, _, _ = make_layer("static-smoothed")
    layer.to("cuda", torch.bfloat16)
    assert {t.device.type for t in layer.state_dict().values()} == {"cuda"}
    assert layer.SCB.dtype == layer.input_scale.dtype == layer.smooth.dtype == torch.float32
    layer.to("cpu")
    assert {t.device.type for t in layer.state_dict().values()} == {"cpu"}


def test_model_to_bfloat16_keeps_scb_float32(tiny_models):
    model = load(tiny_models("llama"), quantization_config=Int8MixedConfig())
    ids = token_batch()
    out32 = logits(model, ids)
    scb = {n: t.clone() for n, t in model.state_dict().items() if n.endswith("SCB")}
    assert len(scb) == 14
    model.to(torch.bfloat16)
    after = {n: t for n, t in model.state_dict().items() if n.endswith("SCB")}
    assert all(t.dtype == torch.float32 and torch.equal(t, scb[n]) for n, t in after.items())
    assert model.lm_head.weight.dtype == torch.bfloat16
    out16 = logits(model, ids)
    assert out16.dtype == torch.bfloat16 and rel(out16, out32) < 0.05


def test_bf16_checkpoint(tiny_models, tmp_path):
    model = load(tiny_models("llama", torch.bfloat16), quantization_config=Int8MixedConfig())
    layer = model.model.layers[0].mlp.up_proj
    assert layer.SCB.dtype == torch.float32 and layer.weight.dtype == torch.int8
    ids = token_batch()
    got = logits(model, ids)
    assert got.dtype == torch.bfloat16 and bool(torch.isfinite(got).all())
    assert rel(got, logits(load(tiny_models("llama", torch.bfloat16)), ids)) < 0.05
    model.save_pretrained(tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.SCB").dtype == torch.float32
    assert torch.equal(logits(load(tmp_path / "q"), ids), got)


# -- 3. quantize on load, save/reload, dequantize --------------------------------------------------------
ON_LOAD = [
    pytest.param(lambda: Int8MixedConfig(), Int8MixedLinear, id="llm-int8"),
    pytest.param(lambda: W8A8Config(), W8A8Linear, id="w8a8-dynamic"),
]


@pytest.mark.parametrize("make_config,layer_cls", ON_LOAD)
def test_quantize_on_load_save_reload(make_config, layer_cls, tiny_models, tmp_path):
    path = tiny_models("llama")
    ids = token_batch()
    ref = logits(load(path), ids)
    model = load(path, quantization_config=make_config())
    for block in model.model.layers:
        for name, module in block.named_modules():
            if name.rpartition(".")[2] in LINEARS:
                assert type(module) is layer_cls, name
        assert not any(isinstance(m, nn.Linear) for m in block.modules())
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    got = logits(model, ids)
    assert 0 < rel(got, ref) < 0.03
    assert_close_to_rounding(got, logits(model, ids, "reference"))

    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved == make_config().to_dict()
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        q = "model.layers.1.mlp.down_proj"
        assert f.get_tensor(f"{q}.weight").dtype == torch.int8
        assert torch.equal(f.get_tensor(f"{q}.SCB"), model.get_submodule(q).SCB)
    assert sum(k.endswith(".SCB") for k in keys) == 14
    assert not any(k.endswith(("input_scale", "smooth")) for k in keys)

    reloaded = load(tmp_path / "q")
    assert type(reloaded.model.layers[0].self_attn.q_proj) is layer_cls
    assert torch.equal(logits(reloaded, ids), got)  # bit-identical after save -> reload


def test_llm_int8_equals_per_token_w8a8_without_outliers(tiny_models):
    # the tiny random model's activations stay below 6: LLM.int8 is then exactly per-token W8A8
    path = tiny_models("llama")
    ids = token_batch()
    assert torch.equal(
        logits(load(path, quantization_config=Int8MixedConfig()), ids), logits(load(path, quantization_config=W8A8Config()), ids)
    )
    # a low threshold makes outlier columns, and the output moves toward the float model
    ref = logits(load(path), ids)
    low = logits(load(path, quantization_config=Int8MixedConfig(threshold=0.5)), ids)
    assert rel(low, ref) < 0.8 * rel(logits(load(path, quantization_config=W8A8Config()), ids), ref)


@pytest.mark.parametrize("make_config", [p.values[0] for p in ON_LOAD] + [lambda: w8a8(mode="static")], ids=["llm-int8", "w8a8-dynamic", "w8a8-static"])
def test_modules_to_not_convert(make_config, tiny_models, tmp_path):
    config = make_config()
    config.modules_to_not_convert = ["mlp.down_proj"]
    model = load(tiny_models("llama"), quantization_config=config)
    for block in model.model.layers:
        assert type(block.mlp.down_proj) is nn.Linear
        assert isinstance(block.mlp.up_proj, (Int8MixedLinear, W8A8Linear))
        assert isinstance(block.self_attn.o_proj, (Int8MixedLinear, W8A8Linear))
    model.save_pretrained(tmp_path / "q")
    reloaded = load(tmp_path / "q")
    assert type(reloaded.model.layers[1].mlp.down_proj) is nn.Linear
    ids = token_batch()
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


@pytest.mark.parametrize("make_config", [p.values[0] for p in ON_LOAD], ids=["llm-int8", "w8a8-dynamic"])
def test_dequantize_gives_float_linears(make_config, tiny_models):
    ids = token_batch()
    model = load(tiny_models("llama"), quantization_config=make_config())
    q_out = logits(model, ids, "reference")
    weights = {n: dequant64(m) for n, m in model.named_modules() if isinstance(m, (Int8MixedLinear, W8A8Linear))}
    model.dequantize()
    assert getattr(model.config, "quantization_config", None) is None
    for name, w in weights.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
        torch.testing.assert_close(layer.weight.double(), w, rtol=1e-6, atol=1e-9)
    # only the activation quantization differs now
    assert rel(logits(model, ids), q_out) < 0.03


def test_gpt2_conv1d_round_trip(tiny_models, tmp_path):
    from transformers.pytorch_utils import Conv1D

    path = tiny_models("gpt2")
    ids = token_batch()
    float_model = load(path)
    model = load(path, quantization_config=W8A8Config())
    layer = model.transformer.h[0].attn.c_attn
    assert type(layer) is W8A8Linear and layer.source_is_conv1d and layer.weight.shape == (192, 64)
    w = float_model.transformer.h[0].attn.c_attn.weight.detach().t()  # Conv1D stores [in, out]
    assert torch.equal(layer.SCB, w.abs().amax(1))
    got = logits(model, ids)
    assert rel(got, logits(float_model, ids)) < 0.03
    model.save_pretrained(tmp_path / "q")
    reloaded = load(tmp_path / "q")
    assert torch.equal(logits(reloaded, ids), got)
    expected = dequant64(layer).t()
    reloaded.dequantize()  # (not `model`: see test_dequantize_after_save_pretrained)
    c_attn = reloaded.transformer.h[0].attn.c_attn
    assert type(c_attn) is Conv1D
    torch.testing.assert_close(c_attn.weight.double(), expected, rtol=1e-6, atol=1e-9)


def test_dequantize_after_save_pretrained(tiny_models, tmp_path):
    # save_pretrained leaves config.dtype as the string "float32", which transformers passes on to _dequantize
    model = load(tiny_models("llama"), quantization_config=Int8MixedConfig())
    expected = dequant64(model.model.layers[0].self_attn.q_proj)
    model.save_pretrained(tmp_path / "q")
    model.dequantize()
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight.double(), expected, rtol=1e-6, atol=1e-9)


def test_dequantize_equals_llm_int8_when_every_column_is_an_outlier(tiny_models):
    # threshold 1e-6: every used feature runs in float, so the int8 model computes x @ W_deq exactly
    ids = token_batch()
    model = load(tiny_models("llama"), quantization_config=Int8MixedConfig(threshold=1e-6))
    q_out, q_ref = logits(model, ids), logits(model, ids, "reference")
    model.dequantize()
    f_out = logits(model, ids)
    torch.testing.assert_close(q_ref, f_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_out, f_out, rtol=1e-5, atol=1e-5)


# -- 4. static W8A8 and SmoothQuant calibration ----------------------------------------------------------
CALIBRATED = [
    pytest.param(dict(mode="static"), id="static"),
    pytest.param(dict(smooth_alpha=0.5), id="dynamic-smooth"),
    pytest.param(dict(mode="static", smooth_alpha=0.5), id="static-smooth"),
]


@pytest.mark.parametrize("kw", CALIBRATED)
def test_calibrated_state_save_reload(kw, tiny_models, tmp_path):
    path = tiny_models("llama")
    ids = token_batch()
    model = load(path, quantization_config=w8a8(**kw))
    layers = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    assert len(layers) == 14
    for layer in layers:
        if kw.get("mode") == "static":
            assert layer.input_scale.shape == () and float(layer.input_scale) > 0
        else:
            assert "input_scale" not in layer._buffers
        if "smooth_alpha" in kw:
            assert layer.smooth.shape == (layer.in_features,) and bool((layer.smooth > 0).all())
            assert not torch.equal(layer.smooth, torch.ones_like(layer.smooth))
        else:
            assert "smooth" not in layer._buffers
    attn = model.model.layers[0].self_attn
    if "smooth_alpha" in kw:  # q/k/v share an input and so one smoothing factor
        assert torch.equal(attn.q_proj.smooth, attn.k_proj.smooth) and torch.equal(attn.q_proj.smooth, attn.v_proj.smooth)
    got = logits(model, ids)
    assert rel(got, logits(load(path), ids)) < 0.03
    assert_close_to_rounding(got, logits(model, ids, "reference"))

    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["mode"] == kw.get("mode", "dynamic") and saved["smooth_alpha"] == kw.get("smooth_alpha")
    assert "dataset" not in saved and "tokenizer" not in saved
    reloaded = load(tmp_path / "q")
    state, state2 = int8_state(model), int8_state(reloaded)
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    assert torch.equal(logits(reloaded, ids), got)


def test_calibration_is_deterministic_and_seeded(tiny_models):
    path = tiny_models("llama")
    stream = torch.randint(3, 128, (1024,), generator=torch.Generator().manual_seed(3))  # windows drawn by seed
    cfg = dict(mode="static", smooth_alpha=0.5, dataset=stream, n_samples=8, seqlen=32)
    a = int8_state(load(path, quantization_config=W8A8Config(seed=0, **cfg)))
    b = int8_state(load(path, quantization_config=W8A8Config(seed=0, **cfg)))
    c = int8_state(load(path, quantization_config=W8A8Config(seed=1, **cfg)))
    assert len(a) == 14 * 4 and a.keys() == b.keys() == c.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.input_scale"], c["model.layers.0.self_attn.q_proj.input_scale"])
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.smooth"], c["model.layers.0.self_attn.q_proj.smooth"])


def test_calibration_values_match_independent_statistics(tiny_models):
    """Block 0's q/k/v input is the float model's: its minmax scale and smoothing factors are checkable."""
    path = tiny_models("llama")
    ids = calib_ids()
    x, float_model = q_proj_input(path, ids)
    attn = float_model.model.layers[0].self_attn
    w_qkv = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]

    static = load(path, quantization_config=w8a8(mode="static")).model.layers[0].self_attn
    expected = (x.double().abs().max() / 127).float()
    for layer in (static.q_proj, static.k_proj, static.v_proj):
        torch.testing.assert_close(layer.input_scale, expected, rtol=1e-6, atol=0)

    alpha = 0.75  # not 0.5, where swapping alpha and 1 - alpha would go unnoticed
    act_max = x.double().abs().amax(0)
    w_max = torch.stack([w.detach().double().abs().amax(0) for w in w_qkv]).amax(0)
    s = act_max**alpha / w_max ** (1 - alpha)
    smoothed = load(path, quantization_config=w8a8(mode="static", smooth_alpha=alpha)).model.layers[0].self_attn
    for layer, w in zip((smoothed.q_proj, smoothed.k_proj, smoothed.v_proj), w_qkv, strict=True):
        torch.testing.assert_close(layer.smooth.double(), s, rtol=1e-5, atol=0)
        # the stored codes are W * s rounded: within half a step of W * s
        err = (dequant64(layer) - w.detach().double()).abs() * layer.smooth.double()
        assert bool((err <= layer.SCB.double().unsqueeze(1) / 127 / 2 * (1 + 1e-5)).all())
        # the static observer sees the smoothed activations x / s
        xs = x * (1.0 / layer.smooth)
        torch.testing.assert_close(layer.input_scale, (xs.double().abs().max() / 127).float(), rtol=1e-6, atol=0)


def test_every_observer(tiny_models):
    path = tiny_models("llama")
    ids = token_batch()
    ref = logits(load(path), ids)
    # 32 windows of 128 tokens run as two batches of 16 with disjoint tokens (so different maxima): the
    # moving average of the batch maxima is then below the overall maximum
    data = torch.cat([calib_ids(16, 128) % 61 + 3, calib_ids(16, 128, seed=2) % 64 + 64])
    scales = {}
    for observer in ("minmax", "moving-average", "percentile", "mse", "kl"):
        cfg = W8A8Config(mode="static", observer=observer, dataset=data, n_samples=32, seqlen=128)
        model = load(path, quantization_config=cfg)
        layers = [m for m in model.modules() if isinstance(m, W8A8Linear)]
        assert len(layers) == 14 and all(torch.isfinite(m.input_scale) and m.input_scale > 0 for m in layers)
        assert rel(logits(model, ids), ref) < 0.05, observer
        scales[observer] = float(model.model.layers[0].self_attn.q_proj.input_scale)
    x, _ = q_proj_input(path, data)
    assert scales["minmax"] == pytest.approx(float(x.abs().max()) / 127, rel=1e-6)
    for observer in ("moving-average", "percentile", "mse", "kl"):  # each clips below the absolute max
        assert scales[observer] < scales["minmax"], (observer, scales)


# -- 5. errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,what", [(dict(mode="static"), "mode='static'"), (dict(smooth_alpha=0.5), "smooth_alpha=0.5")])
def test_calibrating_config_without_data(kw, what, tiny_models):
    with pytest.raises(ValueError, match=rf"W8A8Config\({what}\) needs calibration data .*pass dataset=.*--calib FILE"):
        load(tiny_models("llama"), quantization_config=W8A8Config(**kw))


def test_config_errors():
    with pytest.raises(ValueError, match=r"threshold must be > 0 \(the outlier magnitude"):
        Int8MixedConfig(threshold=0)
    with pytest.raises(ValueError, match="threshold must be > 0"):
        Int8MixedConfig(threshold=-2.5)
    with pytest.raises(ValueError, match="static activation scales are per tensor"):
        W8A8Config(mode="static", act_granularity="per-token")
    with pytest.raises(ValueError, match=r"observer must be one of \['minmax', 'moving-average', 'percentile', 'mse', 'kl'\], got 'absmax'"):
        W8A8Config(mode="static", observer="absmax")
    with pytest.raises(ValueError, match="observer must be one of"):
        W8A8Config(observer="histogram")
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"smooth_alpha must be in \[0, 1\]"):
            W8A8Config(smooth_alpha=alpha)
    with pytest.raises(ValueError, match="mode must be one of"):
        W8A8Config(mode="weights-only")
    W8A8Config(smooth_alpha=0)  # both ends of [0, 1] are valid
    W8A8Config(smooth_alpha=1)


@pytest.mark.parametrize("poison", ["layernorm-nan", "embedding-inf"])
def test_non_finite_calibration_activations(poison, tiny_models, tmp_path):
    model = load(tiny_models("llama"))
    ids = calib_ids()
    with torch.no_grad():
        if poison == "layernorm-nan":
            model.model.layers[0].input_layernorm.weight[5] = float("nan")
        else:
            model.model.embed_tokens.weight[int(ids[0, 0])] = float("inf")
    model.save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="the calibration activations contains NaN or inf"):
        load(tmp_path / "bad", quantization_config=w8a8(mode="static", dataset=ids))


@pytest.fixture
def saved_int8(tiny_models, tmp_path):
    out = tmp_path / "int8"
    load(tiny_models("llama"), quantization_config=Int8MixedConfig()).save_pretrained(out)
    return out


def _set_quant_config(folder, qc):
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = qc
    cfg_path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "qc,missing",
    [({"mode": "static"}, "input_scale"), ({"smooth_alpha": 0.5}, "smooth")],
)
def test_checkpoint_missing_tensors_the_config_expects(qc, missing, saved_int8):
    _set_quant_config(saved_int8, W8A8Config(**qc).to_dict())
    with pytest.raises(ValueError, match=rf"checkpoint has no {missing} for the quantized layer model.layers.0.self_attn.q_proj"):
        load(saved_int8)


def test_checkpoint_scb_shape_contradicts_config(saved_int8):
    f = saved_int8 / "model.safetensors"
    tensors = load_file(f)
    key = "model.layers.0.self_attn.k_proj.SCB"
    tensors[key] = tensors[key][:16].clone()
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"checkpoint tensor model.layers.0.self_attn.k_proj.SCB has shape \[16\] but quantization_config \(Int8MixedConfig, threshold=6.0\) expects \[32\]"):
        load(saved_int8)


def test_float_checkpoint_with_an_int8_config(tiny_models, tmp_path):
    folder = tmp_path / "float"
    shutil.copytree(tiny_models("llama"), folder)
    _set_quant_config(folder, Int8MixedConfig().to_dict())
    with pytest.raises(ValueError, match=r"checkpoint stores model.layers.0.self_attn.q_proj.weight in float but quantization_config says it is quantized"):
        load(folder)


def test_int8_checkpoint_with_another_config_is_refused(saved_int8):
    with pytest.raises(ValueError, match=r"already quantized \(quant_method 'hf_compress_int8'\); W8A8Config quantizes float checkpoints"):
        load(saved_int8, quantization_config=W8A8Config())


# -- 6. quality on pydoc-llama-6m ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pydoc_ppl():
    from transformers import AutoTokenizer

    from hf_compress.eval import perplexity_stats

    tok = AutoTokenizer.from_pretrained(PYDOC_MODEL)
    text = HELDOUT.read_text(encoding="utf-8")[:20000]

    def ppl(model):
        return perplexity_stats(model, tok, text, seqlen=256, max_tokens=2048, progress=False)["perplexity"]

    return ppl, ppl(load(PYDOC_MODEL))


@needs_pydoc
@pytest.mark.parametrize("make_config,layer_cls", ON_LOAD)
def test_pydoc_perplexity_within_one_percent(make_config, layer_cls, pydoc_ppl):
    ppl, fp32 = pydoc_ppl
    model = load(PYDOC_MODEL, quantization_config=make_config())
    assert sum(isinstance(m, layer_cls) for m in model.modules()) == 6 * 7
    got = ppl(model)
    assert got != fp32  # the int8 path really ran
    assert got <= 1.01 * fp32, f"{type(make_config()).__name__} perplexity {got:.3f} vs fp32 {fp32:.3f}"


# -- 7. CLI -----------------------------------------------------------------------------------------------
@needs_pydoc
def test_cli_quantize_w8a8_static_reloads(tmp_path):
    from hf_compress.cli import main

    out = tmp_path / "w8a8"
    rc = main(["quantize", str(PYDOC_MODEL), "--method", "w8a8", "--mode", "static", "--observer", "percentile",
               "--smooth", "0.5", "--calib", str(CALIB), "--n-samples", "8", "--seqlen", "64", "--output", str(out)])
    assert rc == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "mode", "act_granularity", "observer", "smooth_alpha", "n_samples", "seqlen")} == {
        "quant_method": "hf_compress_w8a8", "mode": "static", "act_granularity": "per-tensor", "observer": "percentile",
        "smooth_alpha": 0.5, "n_samples": 8, "seqlen": 64,
    }
    model = load(out)
    layers = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    assert len(layers) == 6 * 7
    assert all(float(m.input_scale) > 0 and m.smooth.shape == (m.in_features,) for m in layers)
    ids = token_batch(vocab=8192, length=32)
    assert rel(logits(model, ids), logits(load(PYDOC_MODEL), ids)) < 0.05


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "w8a8", "--mode", "static"], "--method w8a8 calibrates here: pass --calib TEXTFILE"),
        (["--method", "w8a8", "--smooth", "0.5"], "--method w8a8 calibrates here: pass --calib TEXTFILE"),
        (["--method", "llm-int8", "--threshold", "0"], "threshold must be > 0"),
        (["--method", "w8a8", "--mode", "static", "--act-granularity", "per-token", "--calib", "{calib}"], "static activation scales are per tensor"),
        (["--method", "w8a8", "--smooth", "2", "--calib", "{calib}"], r"smooth_alpha must be in [0, 1]"),
        (["--method", "llm-int8", "--mode", "static"], "--method llm-int8 does not take ['--mode']"),
    ],
)
def test_cli_errors_exit_2(args, message, tiny_models, tmp_path, capsys):
    from hf_compress.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text("def f(x):\n    return x\n" * 100)
    out = tmp_path / "never"
    args = [a.replace("{calib}", str(calib)) for a in args]
    assert main(["quantize", str(tiny_models("llama")), *args, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-compress: error: ") and message in err, err
    assert not out.exists()


def test_llm_int8_outlier_cache_overflow_matches_reference():
    # The dequantized outlier columns are cached up to max(32, K/32) columns; past that, new columns are
    # gathered per call and added to the cached part. Growing activations flag more and more columns.
    torch.manual_seed(0)
    layer = Int8MixedLinear(300, 50, threshold=2.0)
    layer.load_float_weight(torch.randn(50, 300) * 0.1, torch.randn(50))
    backend = "cpu-onednn" if ONEDNN_RUNS else "cpu-int-mm"
    for t in range(30):
        x = torch.randn(16, 300) * (0.8 + 0.05 * t)
        with use_backend(backend):
            got = layer(x)
        torch.testing.assert_close(got, layer.forward_reference(x), rtol=1e-5, atol=1e-5)
    state = layer._kernel_cache[("state", backend)]
    assert state["col_rows"].shape == (32, 50)
    assert int((state["col_slot"] >= 0).sum()) == 32


@pytest.mark.skipif(has_vnni() or not onednn_available(), reason="checks the refusal on CPUs without VNNI")
def test_onednn_is_refused_without_vnni():
    layer, _, _ = make_layer("dynamic-per-token")
    x = torch.randn(4, 100)
    assert backend_for(layer, x) == "cpu-int-mm"
    with pytest.raises(ValueError, match="no VNNI int8 dot product"), use_backend("cpu-onednn"):
        layer(x)
