"""The kernels (hf_compress.kernels) against the reference dequantize + matmul, on CPU.

Layers are built here from random codes with ``pack_layout`` (no dependency on the nn layer): a tiny module
with the attributes ``quant_linear`` reads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_compress import kernels
from hf_compress.kernels import backend_for, quant_linear, reference_linear, unpack, use_backend
from hf_compress.kernels import cpu as kcpu
from hf_compress.kernels.cpu import lowbit as cpu_lowbit
from hf_compress.quant.layout import default_g_idx, dequantize_layout, num_groups, pack_layout, unpack_qweight


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Layer(torch.nn.Module):
    """The attributes the nn layer exposes to ``quant_linear``."""

    def __init__(self, packed: dict, in_features: int, out_features: int, bits: int, group_size: int, bias):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            self.register_buffer(name, packed[name])
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self._kernel_cache: dict = {}

    def forward(self, x):
        return quant_linear(x, self)

    def weight(self) -> torch.Tensor:
        return dequantize_layout(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.in_features)

    def ref(self, x):
        return reference_linear(
            x, self.qweight, self.qzeros, self.scales, self.g_idx, self.bias, self.bits, self.in_features
        )


def make_layer(
    k: int,
    n: int,
    bits: int,
    group_size: int = -1,
    *,
    act_order: bool = False,
    sym: bool = False,
    bias: bool = True,
    dtype=torch.float32,
    seed: int = 0,
) -> Layer:
    g = torch.Generator().manual_seed(seed)
    groups = num_groups(k, group_size)
    q = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.int32)
    if sym:
        z = torch.full((n, groups), 1 << (bits - 1), dtype=torch.int32)
    else:
        z = torch.randint(0, 1 << bits, (n, groups), generator=g, dtype=torch.int32)
    s = (torch.rand(n, groups, generator=g) * 0.02 + 0.002).to(dtype)
    g_idx = default_g_idx(k, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    b = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    return Layer(pack_layout(q, z, s, g_idx, bits), k, n, bits, group_size, b)


def assert_close_bf16(y: torch.Tensor, ref: torch.Tensor, rel: float = 1.2e-2):
    """bf16-level agreement: max error relative to the output's scale."""
    assert y.shape == ref.shape and y.dtype == ref.dtype
    scale = ref.float().abs().max().clamp_min(1e-6)
    err = (y.float() - ref.float()).abs().max() / scale
    assert err < rel, f"max error {err:.3e} (relative to output scale) exceeds {rel}"


# ------------------------------------------------------------------------------------------- unpacking
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "k,n,group_size,act_order",
    [
        (100, 37, 32, False),
        (704, 40, 128, False),
        (64, 33, -1, False),
        (96, 40, 24, True),
        (100, 8, 99, False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["c++", "torch"])
def test_dequantize_bit_identical_to_layout(bits, k, n, group_size, act_order, dtype, path, monkeypatch):
    if path == "c++":
        assert cpu_lowbit.available(), cpu_lowbit.unavailable_reason()
    else:
        monkeypatch.setattr(unpack, "_cpu_kernel", lambda: False)
    layer = make_layer(k, n, bits, group_size, act_order=act_order, dtype=dtype)
    assert torch.equal(unpack.unpack_qweight(layer.qweight, bits, k), unpack_qweight(layer.qweight, bits, k))
    w = unpack.dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, k)
    assert w.dtype == dtype and w.is_contiguous()
    assert torch.equal(w, layer.weight())
    wt = unpack.dequantize_t(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, bits, k)
    assert wt.shape == (k, n) and torch.equal(wt, layer.weight().t())


def test_dequantize_kernel_rejects_bad_groups():
    layer = make_layer(64, 16, 4, 32)
    z = unpack.unpack_qzeros(layer.qzeros, 4, 16)
    bad = layer.g_idx.clone()
    bad[5] = 2  # only groups 0 and 1 exist
    with pytest.raises(RuntimeError, match=r"g_idx\[5\] = 2 is not a group"):
        cpu_lowbit.dequantize_gptq_cpu(layer.qweight, z, layer.scales, bad, 4, 64)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, -1)])
def test_training_batches_run_dequantize_plus_gemm(bits, group_size):
    """With gradients on and 32+ rows the int kernels give way to dequantize + GEMM in x's dtype (exact against the
    reference); the backward's grad_x is grad @ W either way; fewer rows or no gradients keep the int kernel."""
    layer = make_layer(64, 48, bits, group_size)
    fast = "cpu-int8" if bits == 8 else "cpu-int4"
    x = torch.randn(2, 16, 64, requires_grad=True)
    y = layer(x)
    expected = F.linear(x.detach(), layer.weight(), layer.bias)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)  # fp32 exact, not bf16 kernel precision
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ layer.weight(), rtol=1e-5, atol=1e-5)
    assert ("state", fast) not in layer._kernel_cache  # the int kernel's tensors were never built
    with torch.no_grad():
        y_fast = layer(x)
    assert ("state", fast) in layer._kernel_cache
    assert_close_bf16(y_fast, expected)
    assert not torch.equal(y_fast, y)  # bf16 kernel precision: a different path ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_linear_is_dequantize_plus_linear(dtype):
    layer = make_layer(100, 37, 4, 32, act_order=True)
    x = torch.randn(2, 3, 100).to(dtype)
    expected = F.linear(x, layer.weight().to(dtype), layer.bias.to(dtype))
    y = layer.ref(x)
    # The same weight values (dequantize is bit-exact, tested above); the reference multiplies by the transposed
    # copy, so the GEMM may sum in another order: equal to the dtype's rounding.
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected, rtol=1e-5 if dtype == torch.float32 else 1.6e-2, atol=1e-5)


# ------------------------------------------------------------------------------------------ fast paths
FAST_CASES = [
    # bits, group_size, k, n, act_order, sym, backend
    (8, -1, 128, 64, False, True, "cpu-int8"),
    (8, -1, 128, 64, False, False, "cpu-int8"),
    (8, -1, 100, 37, False, False, "cpu-int8"),  # K % 16 != 0 (padded), odd N
    (4, -1, 128, 48, False, False, "cpu-int4"),
    (4, 32, 128, 64, False, False, "cpu-int4"),
    (4, 64, 256, 40, False, False, "cpu-int4"),
    (4, 128, 256, 37, False, False, "cpu-int4"),  # N % 16 != 0 (padded)
    (4, 128, 704, 48, False, False, "cpu-int4"),  # non-dividing group: 5x128 + 64 -> kernel groups of 64
    (4, 32, 100, 33, False, False, "cpu-int4"),  # non-dividing group, K padded to 128
    (4, 32, 128, 48, True, False, "cpu-int4"),  # act-order g_idx
    (4, 128, 704, 32, True, False, "cpu-int4"),  # act-order + short last group
    (3, -1, 96, 40, False, False, "cpu-int4"),
    (3, 32, 100, 37, True, False, "cpu-int4"),
    (3, 128, 704, 48, False, False, "cpu-int4"),
    (2, 64, 128, 48, False, False, "cpu-int4"),
    (2, 32, 100, 33, True, False, "cpu-int4"),
    (2, -1, 64, 16, False, True, "cpu-int4"),
]


@pytest.mark.parametrize("bits,group_size,k,n,act_order,sym,backend", FAST_CASES)
def test_fast_path_matches_reference(bits, group_size, k, n, act_order, sym, backend):
    layer = make_layer(k, n, bits, group_size, act_order=act_order, sym=sym)
    assert backend_for(layer) == backend
    for shape in [(1, k), (7, k), (2, 3, k)]:
        x = torch.randn(*shape)
        y = layer(x)
        assert_close_bf16(y, layer.ref(x))
    layer.bias = None  # cached kernel tensors do not include the bias
    x = torch.randn(7, k)
    assert_close_bf16(layer(x), layer.ref(x))


@pytest.mark.parametrize(
    "bits,group_size,k,n,act_order", [(8, -1, 100, 37, False), (4, 128, 704, 48, True), (3, 32, 96, 40, False)]
)
def test_fast_path_bf16_model(bits, group_size, k, n, act_order):
    layer = make_layer(k, n, bits, group_size, act_order=act_order, dtype=torch.bfloat16)
    x = torch.randn(5, k).bfloat16()
    assert backend_for(layer, x) == backend_for(layer) != "reference"
    assert_close_bf16(layer(x), layer.ref(x))


def test_int8_prefill_path_matches_reference():
    layer = make_layer(96, 40, 8, -1)
    x = torch.randn(kcpu.INT8_DEQUANT_MIN_ROWS + 3, 96)  # dequantize-to-bf16 + GEMM branch
    assert_close_bf16(layer(x), layer.ref(x))


def test_int8_symmetric_needs_no_correction():
    sym, asym = make_layer(64, 32, 8, sym=True), make_layer(64, 32, 8)
    sym(torch.randn(1, 64)), asym(torch.randn(1, 64))
    # prepared op arguments: (w_int8, scale_bf16, zero_corr, pad_k)
    assert sym._kernel_cache[("state", "cpu-int8")][2] is None
    assert asym._kernel_cache[("state", "cpu-int8")][2] is not None


def test_int4_regrouping_plans():
    def plan(k, group_size, act_order=False):
        layer = make_layer(k, 16, 4, group_size, act_order=act_order)
        return kcpu.plan_int4_groups(layer.g_idx, layer.scales.shape[0], k)

    p = plan(704, 128)  # pydoc-llama down_proj: 5 groups of 128 + one of 64
    assert (p["group_k"], p["k_padded"], p["perm"]) == (64, 704, None)
    assert p["block_group"].tolist() == [i // 2 for i in range(11)]
    p = plan(100, 32)
    assert (p["group_k"], p["k_padded"]) == (32, 128)
    p = plan(2048, -1)
    assert (p["group_k"], p["k_padded"]) == (256, 2048)
    p = plan(256, 128, act_order=True)
    assert p["group_k"] == 128 and p["perm"] is not None
    assert isinstance(plan(96, 48), str)  # 48 is not a whole number of 32-column blocks
    assert isinstance(plan(96, 16), str)


# ---------------------------------------------------------------------------------------- the fallback
@pytest.mark.parametrize(
    "bits,group_size,k,n,dtype,why",
    [
        (8, 32, 128, 48, torch.float32, "groups"),  # per-group int8
        (8, 100, 128, 48, torch.float32, "groups"),
        (4, 48, 96, 32, torch.float32, "32-column"),  # group not a multiple of 32
        (3, 16, 64, 32, torch.float32, "32-column"),
        (4, 32, 64, 32, torch.float16, "float16"),  # fp16 activations on CPU
        (8, -1, 64, 32, torch.float16, "float16"),
    ],
)
def test_fallback_is_reference(bits, group_size, k, n, dtype, why):
    layer = make_layer(k, n, bits, group_size, dtype=dtype)
    assert backend_for(layer) == "reference"
    for name in ("cpu-int8", "cpu-int4"):
        assert kernels.unsupported_reason(layer, name) is not None
    assert why in (kernels.unsupported_reason(layer, "cpu-int8" if bits == 8 else "cpu-int4") or "")
    x = torch.randn(3, k).to(dtype)
    assert torch.equal(layer(x), layer.ref(x))
    assert not any(isinstance(key, tuple) and key[0] == "state" for key in layer._kernel_cache)  # nothing cached


def test_use_backend_reference_is_exact():
    layer = make_layer(128, 48, 4, 32)
    x = torch.randn(2, 5, 128)
    assert backend_for(layer) == "cpu-int4"
    with use_backend("reference"):
        assert backend_for(layer) == "reference"
        y = layer(x)
    assert torch.equal(y, layer.ref(x))
    assert backend_for(layer) == "cpu-int4"  # restored


def test_use_backend_forces_and_rejects():
    layer = make_layer(128, 48, 4, 32)
    with use_backend("cpu-int4"):
        assert backend_for(layer) == "cpu-int4"
    with use_backend("cpu-int8"), pytest.raises(ValueError, match="cpu-int8.*bits=8"):
        layer(torch.randn(1, 128))
    with use_backend("triton"), pytest.raises(ValueError, match="CUDA"):
        backend_for(layer)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        with use_backend("int3-magic"):
            pass


def test_cache_follows_buffer_changes():
    layer = make_layer(128, 48, 4, 32)
    x = torch.randn(3, 128)
    y0 = layer(x)
    packed = layer._kernel_cache[("state", "cpu-int4")][0]
    layer(x)
    assert layer._kernel_cache[("state", "cpu-int4")][0] is packed  # prepared once
    with torch.no_grad():
        layer.scales.mul_(2)  # in-place change (e.g. load_state_dict) invalidates the cache
    assert_close_bf16(layer(x), layer.ref(x))
    assert not torch.allclose(layer(x), y0)
    other = make_layer(128, 48, 4, 32, seed=1)
    layer.qweight = other.qweight  # replaced buffer
    assert_close_bf16(layer(x), layer.ref(x))


def test_empty_batch():
    layer = make_layer(64, 32, 4, 32)
    assert layer(torch.randn(0, 64)).shape == (0, 32)


# ---------------------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize(
    "bits,group_size,act_order,backend",
    [
        (4, 32, True, "cpu-int4"),
        (8, -1, False, "cpu-int8"),
        (3, 24, True, "reference"),
        (4, 32, False, "reference"),
    ],
)
def test_grad_x_matches_autograd_through_float_weight(bits, group_size, act_order, backend):
    layer = make_layer(96, 40, bits, group_size, act_order=act_order)
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 3, 96, requires_grad=True)
    grad_out = torch.randn(2, 3, 40)
    with use_backend(backend):
        layer(x).backward(grad_out)
    gx, gb = x.grad.clone(), layer.bias.grad.clone()
    x.grad = None
    layer.bias.grad = None
    w = layer.weight().requires_grad_(False)
    F.linear(x, w, layer.bias).backward(grad_out)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, layer.bias.grad)
    assert layer.qweight.grad is None and layer.scales.grad is None


def test_grad_bf16_activations():
    layer = make_layer(64, 32, 4, 32, dtype=torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    expected = torch.ones(4, 32, dtype=torch.bfloat16) @ layer.weight()
    torch.testing.assert_close(x.grad, expected)


def _op_args(layer: Layer, x: torch.Tensor, name: str) -> tuple:
    base = (x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bias, layer.bits, layer.in_features)
    if name == "reference":
        return base
    return (*base, *kernels._prepare(layer, name, layer._kernel_cache))


@pytest.mark.parametrize(
    "name,op,bits,group_size,act_order",
    [
        ("reference", "quant_linear_ref", 3, 32, True),
        ("cpu-int8", "quant_linear_int8_cpu", 8, -1, False),
        ("cpu-int4", "quant_linear_int4_cpu", 4, 32, True),
    ],
)
def test_opcheck(name, op, bits, group_size, act_order):
    """Schema, fake (meta) implementation and autograd registration of every custom op."""
    layer = make_layer(96, 32, bits, group_size, act_order=act_order)
    x = torch.randn(3, 96, requires_grad=True)
    args = _op_args(layer, x, name)
    torch.library.opcheck(getattr(torch.ops.hf_compress, op).default, args, atol=0.05, rtol=0.05)
    torch.library.opcheck(torch.ops.hf_compress.dequantize_t.default, args[1:5] + args[6:8])


# ----------------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, True), (8, -1, False), (8, 32, False)])
def test_torch_compile(bits, group_size, act_order):
    torch._dynamo.reset()
    layer = make_layer(96, 32, bits, group_size, act_order=act_order)
    compiled = torch.compile(layer, fullgraph=False)
    for m in (3, 5):
        x = torch.randn(m, 96)
        torch.testing.assert_close(compiled(x), layer(x))
    x = torch.randn(3, 96, requires_grad=True)
    compiled(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 32) @ layer.weight(), rtol=1e-5, atol=1e-5)


def test_compiled_steady_state_has_no_graph_break():
    torch._dynamo.reset()
    layer = make_layer(96, 32, 4, 32, act_order=True)
    x = torch.randn(2, 96)
    expected = layer(x)  # fills the kernel cache eagerly
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected)


# -------------------------------------------------------------------------------------------- generate
def test_generate_through_quant_linear():
    """A tiny Llama whose linears are swapped for quantized layers generates, and its logits follow the
    reference backend's."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    for name, mod in list(model.model.named_modules()):
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight.detach()
            k = w.shape[1]
            wg = w.view(w.shape[0], k // 32, 32)
            lo, hi = wg.amin(-1), wg.amax(-1)
            s = ((hi - lo) / 15).clamp_min(1e-8)
            z = (-lo / s).round().clamp(0, 15).to(torch.int32)
            q = (wg / s.unsqueeze(-1) + z.unsqueeze(-1)).round().clamp(0, 15).to(torch.int32).view_as(w)
            packed = pack_layout(q, z, s, default_g_idx(k, 32), 4)
            parent, _, child = name.rpartition(".")
            setattr(model.model.get_submodule(parent), child, Layer(packed, k, w.shape[0], 4, 32, None))
    ids = torch.randint(3, 128, (1, 6))
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 11)
    layers = [m for m in model.modules() if isinstance(m, Layer)]
    assert layers and all(backend_for(m) == "cpu-int4" for m in layers)
    with torch.no_grad():
        fast = model(out).logits
        with use_backend("reference"):
            ref = model(out).logits
    assert_close_bf16(fast, ref, rel=3e-2)
