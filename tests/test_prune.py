"""Pruning: masks and the compressed layout, magnitude / Wanda / SparseGPT against plain references, the
transformers integration (prune on load, calibrate after load, save -> reload), LoRA on a pruned base, CLI, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CALIB, HELDOUT, PYDOC_MODEL, needs_pydoc, token_batch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM

import hf_compress
from hf_compress import MagnitudePruneConfig, QuantLinear, SparseGPTConfig, SparseLinear, WandaConfig
from hf_compress.methods.gptq import relative_output_error
from hf_compress.methods.magnitude import magnitude_mask
from hf_compress.methods.sparsegpt import SparseGPT
from hf_compress.methods.wanda import WandaStats, wanda_mask
from hf_compress.quant import sparse
from hf_compress.quant.layout import unpack_qzeros


def calib_ids(n=8, seqlen=32, seed=1):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def calibrated(cls, **kw):
    kw.setdefault("dataset", calib_ids())
    kw.setdefault("n_samples", 8)
    kw.setdefault("seqlen", 32)
    return cls(**kw)


def correlated_inputs(n_in=64, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)
    return (torch.randn(tokens, n_in, generator=g) @ mix) * (torch.rand(n_in, generator=g) * 4 + 0.1)


# -- masks and the layout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [1, 7, 8, 13, 64])
def test_bitmask_round_trips_any_width(width):
    mask = torch.rand(5, width, generator=torch.Generator().manual_seed(width)) > 0.5
    packed = sparse.pack_bitmask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-width // 8))
    assert torch.equal(sparse.unpack_bitmask(packed, width), mask)


def test_bitmask_bit_order_is_low_bit_first():
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, [0, 3, 9]] = True
    assert sparse.pack_bitmask(mask).tolist() == [[0b00001001, 0b00000010]]


def test_row_mask_removes_the_lowest_scores_of_each_row():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0], [0.0, 9.0, 8.0, 7.0, 6.0]])
    keep = sparse.row_mask(scores, 0.4)  # int(5 * 0.4) = 2 removed per row
    assert keep.tolist() == [[True, False, True, False, True], [False, True, True, True, False]]


def test_nm_mask_keeps_the_n_largest_of_every_m():
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0, 7.0, 6.0, 5.0]])
    assert sparse.nm_mask(scores, 2, 4).tolist() == [[False, True, False, True, True, True, False, False]]
    keep = sparse.nm_mask(torch.rand(16, 64), 4, 8)
    assert torch.equal(keep.reshape(16, 8, 8).sum(-1), torch.full((16, 8), 4))


def test_compress_and_densify_are_inverse():
    w = torch.randn(6, 20)
    keep = sparse.row_mask(w.abs(), 0.5)
    values, bitmask = sparse.compress(w, keep)
    assert values.numel() == 6 * 10
    assert torch.equal(sparse.densify(values, bitmask, 20), w * keep)
    with pytest.raises(ValueError, match="the bitmask keeps 60 weights but 59 values are stored"):
        sparse.densify(values[:-1], bitmask, 20)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, True, "half"])
def test_sparsity_outside_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"sparsity is the fraction of weights removed and must be in \[0, 1\)"):
        MagnitudePruneConfig(sparsity=bad)


@pytest.mark.parametrize("bad", ["4:4", "5:4", "0:4", "2-4", "a:b", (2,)])
def test_bad_pattern_is_refused(bad):
    with pytest.raises(ValueError, match="N:M|pattern must be"):
        WandaConfig(pattern=bad)


def test_pattern_sets_the_sparsity():
    cfg = MagnitudePruneConfig(pattern="4:8")
    assert (cfg.pattern, cfg.nm, cfg.sparsity) == ("4:8", (4, 8), 0.5)
    assert MagnitudePruneConfig.from_dict(cfg.to_dict()) == cfg


# -- the methods against references ------------------------------------------------------------------------
def test_magnitude_mask_is_the_row_wise_smallest_absolute_values():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    keep = magnitude_mask(w, 0.25)
    for row, k in zip(w.abs(), keep, strict=True):
        assert torch.equal(k, row >= row.sort().values[8])


def test_wanda_mask_matches_the_score_definition():
    x = correlated_inputs(32)
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    stats = WandaStats(32)
    for chunk in x.split(500):
        stats.add_batch(chunk)
    score = w.abs() * x.double().norm(dim=0).float()
    expected = torch.stack([s >= s.sort().values[16] for s in score])
    assert torch.equal(wanda_mask(w, stats, 0.5), expected)
    with pytest.raises(ValueError, match="no calibration data"):
        WandaStats(4).norms()


def sparsegpt_reference(W, H, sparsity, prunen, prunem, blocksize, percdamp=0.01):
    """IST-DASLab's sparsegpt.py ``fasterprune`` in its own [out, in] layout (no quantizer), to compare against."""
    W = W.clone().float()
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H[range(H.shape[0]), range(H.shape[0])] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            k = int(tmp.numel() * sparsity)
            # sparsegpt.py: tmp <= the k-th smallest; here exactly k, ties broken by column-major index as ours
            mask1_t = torch.zeros(count, W1.shape[0], dtype=torch.bool)
            mask1_t.view(-1)[torch.sort(tmp.t().flatten(), stable=True).indices[:k]] = True
            mask1 = mask1_t.t()
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, ~mask


@pytest.mark.parametrize("target", ["0.5", "2:4", "0.7"])
def test_sparsegpt_matches_the_reference_implementation(target):
    x = correlated_inputs(64).double()
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    g = SparseGPT(64, hessian_dtype=torch.float64)
    g.add_batch(x)
    if ":" in target:
        r = g.prune(w, pattern=(2, 4), block_size=16)
        ref_w, ref_keep = sparsegpt_reference(w, g.H.float(), 0, 2, 4, 16)  # prune 2 of every 4 = keep 2
    else:
        r = g.prune(w, float(target), block_size=16)
        ref_w, ref_keep = sparsegpt_reference(w, g.H.float(), float(target), 0, 0, 16)
    assert torch.equal(r.mask, ref_keep)
    torch.testing.assert_close(r.weight, ref_w, atol=2e-4, rtol=1e-4)
    assert (r.weight[~r.mask] == 0).all()
    if ":" in target:
        assert torch.equal(r.mask.reshape(24, 16, 4).sum(-1), torch.full((24, 16), 2))
    else:
        assert r.mask.sum().item() == w.numel() - int(16 * 24 * float(target)) * 4  # exact per block


def test_sparsegpt_has_lower_output_error_than_wanda_and_magnitude():
    x = correlated_inputs(64)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    g, stats = SparseGPT(64), WandaStats(64)
    g.add_batch(x)
    stats.add_batch(x)
    for pattern in (None, (2, 4)):
        err = {
            "sparsegpt": g.prune(w, 0.5, pattern).relative_error,
            "wanda": relative_output_error(w, w * wanda_mask(w, stats, 0.5, pattern), g.H),
            "magnitude": relative_output_error(w, w * magnitude_mask(w, 0.5, pattern), g.H),
        }
        assert err["sparsegpt"] < 0.9 * err["wanda"] and err["wanda"] < 0.8 * err["magnitude"], err


def test_sparsegpt_joint_quantization_keeps_pruned_weights_at_exact_zero():
    x = correlated_inputs(64)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    g = SparseGPT(64)
    g.add_batch(x)
    r = g.prune(w, 0.5, bits=4, group_size=32, sym=False)
    q = r.quantized
    assert q is not None and q.bits == 4
    assert torch.equal(r.weight, q.dequantize())
    assert (r.weight[~r.mask] == 0).all()
    zero_codes = q.zeros[:, q.g_idx.long()]
    assert torch.equal(q.codes[~r.mask], zero_codes[~r.mask])
    assert r.relative_error < 1.3 * g.prune(w, 0.5).relative_error  # 4-bit adds little to 50% pruning


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_refit_reaches_the_least_squares_fit_for_its_mask(pattern):
    x = correlated_inputs(64).double()
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(5))
    g = SparseGPT(64, hessian_dtype=torch.float64)
    g.add_batch(x)
    plain = g.prune(w, 0.5, pattern)
    refit = g.prune(w, 0.5, pattern, refit_steps=64)  # CG is exact within n steps (64 inputs), up to rounding
    assert torch.equal(refit.mask, plain.mask) and (refit.weight[~refit.mask] == 0).all()
    H = g.H.double()
    H = H + plain.damp * torch.eye(64, dtype=torch.float64)
    for r in range(12):  # the fit the refit must reach: w'_S = H_SS^-1 H_S: w, zero elsewhere
        S = refit.mask[r]
        best = torch.zeros(64, dtype=torch.float64)
        best[S] = torch.linalg.solve(H[S][:, S], H[S] @ w[r].double())
        torch.testing.assert_close(refit.weight[r].double(), best, rtol=1e-3, atol=1e-4)
    assert refit.relative_error < 0.9 * plain.relative_error, (refit.relative_error, plain.relative_error)
    few = g.prune(w, 0.5, pattern, refit_steps=3)
    assert refit.relative_error <= few.relative_error < plain.relative_error  # every step lowers the error
    with pytest.raises(ValueError, match="refit_steps must be a non-negative integer, got -1"):
        g.prune(w, 0.5, refit_steps=-1)
    quantized = g.prune(w, 0.5, bits=4, refit_steps=20)  # weights on the grid: the refit does not apply
    assert torch.equal(quantized.weight, g.prune(w, 0.5, bits=4).weight)
    with pytest.raises(ValueError, match=r"refit_steps must be a non-negative integer \(0 turns the refit off\), got -2"):
        SparseGPTConfig(sparsity=0.5, refit_steps=-2)
    assert SparseGPTConfig(sparsity=0.5).refit_steps == 5


def test_sparsegpt_is_deterministic():
    x = correlated_inputs(64)
    w = torch.randn(16, 64)
    results = []
    for _ in range(2):
        g = SparseGPT(64)
        g.add_batch(x)
        results.append(g.prune(w, 0.5))
    assert torch.equal(results[0].weight, results[1].weight) and torch.equal(results[0].mask, results[1].mask)


def test_sparsegpt_errors():
    g = SparseGPT(8)
    with pytest.raises(ValueError, match="no calibration data"):
        g.prune(torch.randn(4, 8), 0.5)
    g.add_batch(torch.randn(32, 8))
    with pytest.raises(ValueError, match="not a multiple of M=3"):
        g.prune(torch.randn(4, 8), pattern=(1, 3))
    with pytest.raises(ValueError, match="block_size .* must be multiples of M=8"):
        g.prune(torch.randn(4, 8), pattern=(4, 8), block_size=4)
    bad = torch.randn(4, 8)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        g.prune(bad, 0.5)


# -- through transformers ----------------------------------------------------------------------------------
def load(path, arch, **kw):
    auto = AutoModel if arch == "bert" else AutoModelForCausalLM
    return auto.from_pretrained(path, **kw).eval()


def output(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def dense_linear_bytes(model) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear)
               or type(m).__name__ == "Conv1D")


CONFIGS = {
    "magnitude": lambda: MagnitudePruneConfig(sparsity=0.5),
    "wanda": lambda: calibrated(WandaConfig, sparsity=0.5),
    "sparsegpt": lambda: calibrated(SparseGPTConfig, sparsity=0.5),
    "sparsegpt-2:4": lambda: calibrated(SparseGPTConfig, pattern="2:4", block_size=32),
}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_pruned_model_saves_compressed_and_reloads_identically(arch, method, tiny_models, tmp_path):
    path = tiny_models(arch)
    model = load(path, arch, quantization_config=CONFIGS[method]())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert len(layers) >= 8
    for m in layers.values():
        keep = m.mask()
        if method.endswith("2:4"):
            assert torch.equal(keep.reshape(m.out_features, -1, 4).sum(-1), torch.full((m.out_features, m.in_features // 4), 2))
        elif method != "sparsegpt":  # per row; SparseGPT chooses per block of columns
            assert torch.equal(keep.sum(1), torch.full((m.out_features,), m.in_features - m.in_features // 2))
        else:
            assert abs(keep.float().mean().item() - 0.5) < 0.02
    ids = token_batch()
    out = output(model, ids)
    # the forward equals the reference forward (the dense weight with zeros)
    name, layer = next(iter(layers.items()))
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), layer.forward_reference(x))
    model.save_pretrained(tmp_path / "pruned")
    cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == CONFIGS[method]().quant_method
    with safe_open(str(tmp_path / "pruned" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys if k.endswith((".values", ".bitmask")))
    assert not any(k.endswith(".weight") and k.rpartition(".")[0] in {n.removeprefix(f"{model.base_model_prefix}.") for n in layers} | set(layers) for k in keys)
    dense = sum(m.in_features * m.out_features * 4 for m in layers.values())
    assert stored <= 0.6 * dense, stored / dense
    reloaded = load(tmp_path / "pruned", arch)
    assert isinstance(reloaded.get_submodule(name), SparseLinear)
    assert torch.equal(output(reloaded, ids), out)
    # dequantize: plain float layers with the same outputs
    plain = reloaded.dequantize()
    assert not any(isinstance(m, SparseLinear) for m in plain.modules())
    torch.testing.assert_close(output(plain, ids), out, atol=1e-5, rtol=1e-5)


def test_pruned_forward_equals_the_float_model_with_the_mask_applied(tiny_models):
    path = tiny_models("llama")
    ref = load(path, "llama")
    model = load(path, "llama", quantization_config=MagnitudePruneConfig(pattern="2:4"))
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            w = ref.get_submodule(name).weight.data
            keep = magnitude_mask(w, pattern=(2, 4))
            assert torch.equal(m.dequantize_weight(), w * keep)
            ref.get_submodule(name).weight.data = w * keep
    ids = token_batch()
    torch.testing.assert_close(output(model, ids), output(ref, ids))


def test_sparsegpt_with_bits_writes_the_gptq_layout_and_reloads(tiny_models, tmp_path):
    path = tiny_models("llama")
    model = load(path, "llama", quantization_config=calibrated(SparseGPTConfig, sparsity=0.5, bits=4, group_size=32, sym=False))
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.bits == 4
    w = layer.dequantize_weight()
    assert abs((w == 0).float().mean().item() - 0.5) < 0.05
    ids = token_batch()
    out = output(model, ids)
    model.save_pretrained(tmp_path / "joint")
    reloaded = load(tmp_path / "joint", "llama")
    zeros = unpack_qzeros(reloaded.model.layers[0].mlp.down_proj.qzeros, 4, layer.out_features)
    assert torch.equal(zeros, unpack_qzeros(layer.qzeros, 4, layer.out_features))  # exact zero codes on disk
    assert torch.equal(output(reloaded, ids), out)


def test_pruning_is_deterministic(tiny_models):
    path = tiny_models("llama")
    a = load(path, "llama", quantization_config=calibrated(SparseGPTConfig, sparsity=0.5))
    b = load(path, "llama", quantization_config=calibrated(SparseGPTConfig, sparsity=0.5))
    for (n, t), (_, u) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(t, u), n


def test_width_that_m_does_not_divide_is_refused_before_loading(tiny_models, tmp_path):
    # intermediate 96 is a multiple of 8 but not of 64 (5:64? no: use 3:5, which divides neither 64 nor 96)
    path = tiny_models("llama")
    with pytest.raises(ValueError, match="not a multiple of M=5"):
        load(path, "llama", quantization_config=MagnitudePruneConfig(pattern="3:5"))
    with pytest.raises(ValueError, match="not a multiple of M=5"):
        load(path, "llama", quantization_config=calibrated(WandaConfig, pattern="3:5"))


def test_calibrated_pruning_without_data_is_refused(tiny_models):
    with pytest.raises(ValueError, match="no calibration data"):
        load(tiny_models("llama"), "llama", quantization_config=WandaConfig(sparsity=0.5))


def test_checkpoint_that_contradicts_the_config_is_refused(tiny_models, tmp_path):
    path = tiny_models("llama")
    model = load(path, "llama", quantization_config=MagnitudePruneConfig(sparsity=0.5))
    model.save_pretrained(tmp_path / "p")
    cfg_file = tmp_path / "p" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["quant_method"] = "hf_compress_rtn"
    cfg["quantization_config"].update(bits=4, group_size=-1, sym=True, checkpoint_format="gptq")
    for k in ("sparsity", "pattern"):
        cfg["quantization_config"].pop(k)
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="checkpoint has no qweight"):
        load(tmp_path / "p", "llama")
    # a float checkpoint loaded as if it were pruned
    float_cfg = json.loads((path / "config.json").read_text())
    float_cfg["quantization_config"] = MagnitudePruneConfig().to_dict()
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "config.json").write_text(json.dumps(float_cfg))
    (tmp_path / "f" / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(ValueError, match="stores .*weight in float but quantization_config says it is quantized"):
        load(tmp_path / "f", "llama")


def test_lora_on_a_pruned_base_trains_and_merges_keeping_the_mask(tiny_models):
    from peft import get_peft_model

    model = load(tiny_models("llama"), "llama", quantization_config=MagnitudePruneConfig(sparsity=0.5))
    model = get_peft_model(model, hf_compress.lora_config(model, r=4, target_modules="all-linear", init_lora_weights=False))
    ids = token_batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    base = model.base_model.model.model.layers[0].mlp.down_proj.base_layer
    mask_before = base.mask()
    merged = model.merge_and_unload()
    layer = merged.model.layers[0].mlp.down_proj
    assert isinstance(layer, SparseLinear) and torch.equal(layer.mask(), mask_before)
    report = hf_compress.merge_report(merged)
    assert report and all(0 < r["update_kept"] < 1 for r in report.values())


# -- OWL schedule ----------------------------------------------------------------------------------------------
from hf_compress.methods.owl import outlier_ratio, owl_sparsities  # noqa: E402


def test_outlier_ratio_counts_scores_above_m_times_their_mean():
    # mean of all 6 scores is 3; above 2 x 3 = 6: only the 12
    assert outlier_ratio([torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([2.0, 12.0])], 2.0) == 1 / 6
    assert outlier_ratio([torch.ones(5)], 1.0) == 0.0


def test_owl_sparsities_keep_the_mean_and_favour_outlier_blocks():
    s = owl_sparsities([0.01, 0.03, 0.02], 0.5, 0.08)
    # ratios rescaled to t = 0, 1, 0.5; densities 2 * 0.08 * t shifted to mean 0.5
    torch.testing.assert_close(torch.tensor(s, dtype=torch.float64), torch.tensor([0.58, 0.42, 0.50], dtype=torch.float64))
    assert owl_sparsities([0.02, 0.02], 0.6, 0.08) == pytest.approx([0.6, 0.6])
    with pytest.raises(ValueError, match="outside \\[0, 1\\): lower owl_lambda"):
        owl_sparsities([0.0, 1.0], 0.05, 0.08)


def dense_owl_schedule(path, ids, sparsity, lam, m):
    """OWL's schedule by hand: each block's Wanda scores on the unpruned model, then :func:`owl_sparsities`."""
    model = load(path, "llama")
    sq: dict[str, torch.Tensor] = {}
    linears = {n: mod for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and n.startswith("model.layers.")}
    hooks = [mod.register_forward_pre_hook(lambda mod, a, n=n: sq.__setitem__(n, sq.get(n, 0) + a[0].double().square().reshape(-1, a[0].shape[-1]).sum(0)))
             for n, mod in linears.items()]
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None])
    for h in hooks:
        h.remove()
    ratios = []
    for i in range(len(model.model.layers)):
        scores = [mod.weight.abs() * sq[n].sqrt().float() for n, mod in linears.items() if n.startswith(f"model.layers.{i}.")]
        ratios.append(outlier_ratio(scores, m))
    return owl_sparsities(ratios, sparsity, lam)


@pytest.mark.parametrize("cls", [WandaConfig, SparseGPTConfig])
def test_owl_prunes_each_block_at_its_outlier_weighted_sparsity_and_reloads(cls, tiny_models, tmp_path):
    path = tiny_models("llama")
    ids = calib_ids()
    schedule = dense_owl_schedule(path, ids, 0.5, 0.1, 2.0)
    assert max(schedule) - min(schedule) == pytest.approx(0.2)  # the blocks' ratios differ: the span is 2 x owl_lambda
    model = load(path, "llama", quantization_config=calibrated(cls, sparsity=0.5, schedule="owl", owl_lambda=0.1, owl_m=2.0))
    for i, block in enumerate(model.model.layers):
        layers = [m for m in block.modules() if isinstance(m, SparseLinear)]
        kept = sum(int(m.mask().sum()) for m in layers) / sum(m.in_features * m.out_features for m in layers)
        if cls is WandaConfig:  # per row: in - int(in * s) kept
            assert all(torch.equal(m.mask().sum(1), torch.full((m.out_features,), m.in_features - int(m.in_features * schedule[i])))
                       for m in layers)
        assert abs(kept - (1 - schedule[i])) < 0.02, (i, kept, schedule[i])
    ids = token_batch()
    out = output(model, ids)
    model.save_pretrained(tmp_path / "owl")
    assert json.loads((tmp_path / "owl" / "config.json").read_text())["quantization_config"]["schedule"] == "owl"
    assert torch.equal(output(load(tmp_path / "owl", "llama"), ids), out)


def test_owl_config_errors():
    with pytest.raises(ValueError, match="which the N:M pattern 2:4 fixes"):
        WandaConfig(pattern="2:4", schedule="owl")
    with pytest.raises(ValueError, match="schedule must be one of \\['uniform', 'owl'\\]"):
        SparseGPTConfig(schedule="layerwise")
    with pytest.raises(ValueError, match="owl_lambda is half the span of the block sparsities"):
        WandaConfig(schedule="owl", owl_lambda=0.6)
    with pytest.raises(ValueError, match="may lie up to 0.16 from 0.9, outside \\[0, 1\\): lower owl_lambda"):
        WandaConfig(sparsity=0.9, schedule="owl")
    with pytest.raises(ValueError, match="owl_m .* must be positive"):
        WandaConfig(schedule="owl", owl_m=0)


# -- CLI -----------------------------------------------------------------------------------------------------
def test_cli_prune(tiny_models, tmp_path, capsys):
    from hf_compress.cli import main

    path = tiny_models("llama")
    calib = tmp_path / "calib.txt"
    calib.write_text("unused: the tiny model has no tokenizer")
    assert main(["prune", str(path), "--method", "magnitude", "--pattern", "2:4", "--output", str(tmp_path / "m")]) == 0
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(m.model.layers[0].self_attn.q_proj, SparseLinear)
    assert main(["prune", str(path), "--method", "wanda", "--sparsity", "0.5", "--output", str(tmp_path / "w")]) == 2
    assert "--method wanda calibrates: pass --calib TEXTFILE" in capsys.readouterr().err
    assert main(["prune", str(path), "--method", "magnitude", "--sparsity", "1.2", "--output", str(tmp_path / "x")]) == 2
    assert "sparsity is the fraction of weights removed" in capsys.readouterr().err
    assert main(["prune", str(path), "--method", "wanda", "--bits", "4", "--sparsity", "0.5", "--calib", str(calib),
                 "--output", str(tmp_path / "y")]) == 2
    assert "only --method sparsegpt does" in capsys.readouterr().err
    assert main(["prune", str(path), "--method", "magnitude", "--sparsity", "0.5", "--schedule", "owl",
                 "--output", str(tmp_path / "z")]) == 2
    assert "which --method magnitude does not use" in capsys.readouterr().err
    assert main(["prune", str(path), "--method", "wanda", "--sparsity", "0.5", "--owl-lambda", "0.1", "--calib", str(calib),
                 "--output", str(tmp_path / "z")]) == 2
    assert "--owl-lambda and --owl-m set the OWL schedule: add --schedule owl" in capsys.readouterr().err
    assert main(["prune", str(path), "--method", "wanda", "--sparsity", "0.5", "--refit-steps", "5", "--calib", str(calib),
                 "--output", str(tmp_path / "z")]) == 2
    assert "--refit-steps refits SparseGPT's kept weights, which only --method sparsegpt does (got wanda)" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "wxyz")


# -- the real model ------------------------------------------------------------------------------------------
@needs_pydoc
def test_sparsegpt_beats_magnitude_on_the_real_model():
    from transformers import AutoTokenizer

    from hf_compress.eval import perplexity

    tok = AutoTokenizer.from_pretrained(PYDOC_MODEL)
    text = HELDOUT.read_text()[:40000]
    ppl = {}
    for name, cfg in {"dense": None, "magnitude": MagnitudePruneConfig(pattern="2:4"),
                      "sparsegpt": SparseGPTConfig(pattern="2:4", dataset=str(CALIB), n_samples=16, seqlen=256)}.items():
        model = AutoModelForCausalLM.from_pretrained(PYDOC_MODEL, **({"quantization_config": cfg} if cfg else {}))
        ppl[name] = perplexity(model.eval(), tok, text, progress=False)
    # measured: dense 37.9, magnitude 2:4 ~44, SparseGPT 2:4 ~40.6 on this slice
    assert ppl["sparsegpt"] - ppl["dense"] < 0.6 * (ppl["magnitude"] - ppl["dense"]), ppl


# -- low-rank ------------------------------------------------------------------------------------------------
from hf_compress import LowRankConfig, LowRankLinear  # noqa: E402
from hf_compress.methods.gptq import GPTQ  # noqa: E402
from hf_compress.methods.lowrank import factorize, rank_for_ratio  # noqa: E402


def test_rank_for_ratio_keeps_at_most_the_ratio():
    for m, n, ratio in ((64, 96, 0.8), (256, 704, 0.6), (7, 5, 1.0), (4, 4, 0.01)):
        r = rank_for_ratio(n, m, ratio)
        assert r >= 1 and (r * (m + n) <= ratio * m * n or r == 1) and (r + 1) * (m + n) > ratio * m * n


def test_svd_factors_are_the_best_rank_r_approximation():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(5))
    up, down = factorize(w, 6, "svd")
    s = torch.linalg.svdvals(w.double())
    # Eckart-Young: the error is the energy of the dropped singular values
    torch.testing.assert_close((w.double() - (up @ down).double()).norm() ** 2, s[6:].square().sum(), rtol=1e-4, atol=1e-4)


def test_whitened_truncation_error_equals_the_output_error_and_beats_svd_and_asvd():
    x = correlated_inputs(64)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(6))
    g = GPTQ(64, hessian_dtype=torch.float64)
    g.add_batch(x)
    err = {m: relative_output_error(w, torch.matmul(*factorize(w, 16, m, g.H, damp_percent=0.0)), g.H) for m in ("svd", "asvd", "whiten")}
    assert err["whiten"] < err["asvd"] < err["svd"], err
    # whitened: the output error is the dropped singular values of W L (L L^T = H)
    L = torch.linalg.cholesky(g.H)
    s = torch.linalg.svdvals(w.double() @ L)
    torch.testing.assert_close(err["whiten"], (s[16:].square().sum() / s.square().sum()).item(), rtol=1e-3, atol=1e-6)


def test_bad_rank_and_ratio_are_refused(tiny_models):
    with pytest.raises(ValueError, match=r"param_ratio is the fraction .* must be in \(0, 1\]"):
        LowRankConfig(param_ratio=1.5)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LowRankConfig(rank=0)
    with pytest.raises(ValueError, match="give exactly one of param_ratio"):
        LowRankConfig()
    with pytest.raises(ValueError, match=r"rank 65 is not possible for a 64->64 linear"):
        load(tiny_models("llama"), "llama", quantization_config=LowRankConfig(rank=65))
    with pytest.raises(ValueError, match="needs calibration statistics"):
        factorize(torch.randn(4, 4), 2, "whiten")


LOWRANK = {
    "svd": lambda: LowRankConfig(method="svd", param_ratio=0.6),
    "asvd": lambda: calibrated(LowRankConfig, method="asvd", param_ratio=0.6),
    "whiten": lambda: calibrated(LowRankConfig, method="whiten", param_ratio=0.6),
    "whiten-int4": lambda: calibrated(LowRankConfig, method="whiten", param_ratio=0.6, bits=4, group_size=16, sym=False),
}


def ref_output(model, ids):
    with hf_compress.kernels.use_backend("reference"):  # packed factors: exact float32 maths, not bf16 kernels
        return output(model, ids)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(LOWRANK))
def test_low_rank_model_saves_and_reloads_identically(arch, method, tiny_models, tmp_path):
    path = tiny_models(arch)
    ref = load(path, arch)
    model = load(path, arch, quantization_config=LOWRANK[method]())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(layers) >= 8
    for name, m in layers.items():
        assert m.rank == rank_for_ratio(m.in_features, m.out_features, 0.6)
        x = torch.randn(3, m.in_features)
        with hf_compress.kernels.use_backend("reference"):  # packed factors: exact float32 maths, not bf16 kernels
            torch.testing.assert_close(m(x), m.forward_reference(x), atol=1e-5, rtol=1e-5)
        if method == "svd":  # on load: exactly the truncated SVD of the float weight
            from hf_compress.integrations.modules import float_weight

            up, down = factorize(float_weight(ref.get_submodule(name)).detach(), m.rank, "svd")
            torch.testing.assert_close(m.dequantize_weight(), up @ down, atol=1e-5, rtol=1e-5)
    ids = token_batch()
    out = ref_output(model, ids)
    model.save_pretrained(tmp_path / "lr")
    with safe_open(str(tmp_path / "lr" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    suffix = ".down.qweight" if method.endswith("int4") else ".down.weight"
    assert sum(k.endswith(suffix) for k in keys) == len(layers)
    reloaded = load(tmp_path / "lr", arch)
    assert torch.equal(ref_output(reloaded, ids), out)
    plain = reloaded.dequantize()
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    torch.testing.assert_close(ref_output(plain, ids), out, atol=1e-4, rtol=1e-4)


# -- rank allocation -----------------------------------------------------------------------------------------
from itertools import product  # noqa: E402

from hf_compress.methods.lowrank import allocate_ranks, truncation_spectrum  # noqa: E402


def test_truncation_spectrum_gives_each_ranks_error():
    x = correlated_inputs(24)
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(3))
    g = GPTQ(24)
    g.add_batch(x)
    for method in ("svd", "asvd", "whiten"):
        s = truncation_spectrum(w, method, g.H)
        assert torch.all(s[:-1] >= s[1:])
        for r in (2, 7):
            up, down = factorize(w, r, method, g.H)
            err = (w.double() - (up @ down).double())
            if method == "whiten":  # the output error under the (damped) Gram matrix whitening used
                H = g.H.double() + 0.01 * g.H.double().diagonal().mean() * torch.eye(24, dtype=torch.float64)
                measured = (err @ H @ err.T).trace()
            elif method == "svd":
                measured = err.square().sum()
            else:
                continue  # asvd's error is in the scaled space; its ordering is what matters
            torch.testing.assert_close(measured, s[r:].sum(), rtol=2e-3, atol=1e-6)


def test_allocate_ranks_is_the_best_split_of_the_budget():
    g = torch.Generator().manual_seed(0)
    # three 12x12 layers (the same cost per rank), spectra of different decay
    spectra = {f"l{i}": ((torch.rand(12, generator=g) * 10 ** -torch.arange(12.0) * d).sort(descending=True).values, 12, 12)
               for i, d in enumerate((1.0, 0.3, 3.0))}
    for ratio in (0.3, 0.5, 0.8):
        ranks = allocate_ranks(spectra, ratio)
        budget = ratio * 3 * 144
        assert sum(r * 24 for r in ranks.values()) <= budget

        def kept(rs):
            return sum(float(s[:r].sum() / s.sum()) for (s, _, _), r in zip(spectra.values(), rs, strict=True))

        best = max((rs for rs in product(range(1, 7), repeat=3) if sum(rs) * 24 <= budget), key=kept)
        assert kept(list(ranks.values())) == pytest.approx(kept(best)), (ranks, best)
    with pytest.raises(ValueError, match="leaves less than rank 1 per layer"):
        allocate_ranks(spectra, 0.05)


def test_sensitivity_allocation_keeps_the_budget_and_reloads(tiny_models, tmp_path):
    path = tiny_models("llama")
    for method, kw in (("whiten", {"dataset": calib_ids(), "n_samples": 8, "seqlen": 32}), ("svd", {})):
        cfg = LowRankConfig(method=method, param_ratio=0.5, rank_allocation="sensitivity", **kw)
        model = load(path, "llama", quantization_config=cfg)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
        assert len(layers) >= 8
        saved = model.config.quantization_config.ranks
        assert saved == {n.removeprefix("model."): m.rank for n, m in layers.items()}
        assert len(set(saved.values())) > 1  # not uniform
        assert sum(m.rank * (m.in_features + m.out_features) for m in layers.values()) <= 0.5 * sum(
            m.in_features * m.out_features for m in layers.values())
        ids = token_batch()
        out = ref_output(model, ids)
        model.save_pretrained(tmp_path / method)
        stored = json.loads((tmp_path / method / "config.json").read_text())["quantization_config"]
        assert stored["ranks"] == saved and stored["rank_allocation"] == "sensitivity"
        assert torch.equal(ref_output(load(tmp_path / method, "llama"), ids), out)


def test_svd_rank_allocation_of_an_offloaded_model_is_refused(tiny_models, tmp_path):
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    with pytest.raises(ValueError, match="its weight is offloaded .* use method='whiten'"):
        load(tiny_models("llama"), "llama", quantization_config=LowRankConfig(param_ratio=0.5, rank_allocation="sensitivity"),
             device_map=device_map, offload_folder=str(tmp_path / "off"))


def test_rank_allocation_config_errors():
    with pytest.raises(ValueError, match="shares a parameter budget across layers: give param_ratio, not rank"):
        LowRankConfig(rank=4, rank_allocation="sensitivity")
    with pytest.raises(ValueError, match="rank_allocation must be one of"):
        LowRankConfig(param_ratio=0.5, rank_allocation="greedy")
    with pytest.raises(ValueError, match="ranks must be a dict of linear name -> positive integer rank"):
        LowRankConfig(param_ratio=0.5, ranks={"layers.0.mlp.up_proj": 0})


# -- structured pruning --------------------------------------------------------------------------------------
from hf_compress import StructuredPruneConfig, prune_structured  # noqa: E402
from hf_compress.methods.structured import blocks_to_drop  # noqa: E402


def structured(**kw):
    kw.setdefault("dataset", calib_ids())
    kw.setdefault("n_samples", 8)
    kw.setdefault("seqlen", 32)
    return StructuredPruneConfig(**kw)


def masked_reference(ref, pruned_cfg_model, keep_mlp: dict, keep_heads: dict):
    """``ref`` with the removed MLP channels and query heads zeroed where they enter down_proj / o_proj."""
    for i, layer in enumerate(ref.model.layers):
        w = layer.mlp.down_proj.weight.data
        drop = torch.ones(w.shape[1], dtype=torch.bool)
        drop[keep_mlp[i]] = False
        w[:, drop] = 0
        o = layer.self_attn.o_proj.weight.data
        drop = torch.ones(o.shape[1], dtype=torch.bool)
        drop[keep_heads[i]] = False
        o[:, drop] = 0
    return ref


def test_structured_pruning_equals_the_model_with_those_channels_and_heads_zeroed(tiny_models, tmp_path):
    import subprocess
    import sys

    path = tiny_models("llama")
    ref = load(path, "llama")
    model = load(path, "llama")
    w_gate = {i: layer.mlp.gate_proj.weight.data.clone() for i, layer in enumerate(model.model.layers)}
    w_q = {i: layer.self_attn.q_proj.weight.data.clone() for i, layer in enumerate(model.model.layers)}
    report = prune_structured(model, structured(mlp_ratio=0.5, kv_heads=1))
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim) == (48, 1, 2, 16)
    assert report["parameters_after"] == sum(p.numel() for p in model.parameters()) < report["parameters_before"]
    keep_mlp, keep_heads = {}, {}
    for i, layer in enumerate(model.model.layers):
        # which rows survived: match the pruned gate rows to the original ones
        keep_mlp[i] = [int((w_gate[i] == row).all(1).nonzero()[0]) for row in layer.mlp.gate_proj.weight.data]
        keep_heads[i] = [int((w_q[i] == row).all(1).nonzero()[0]) for row in layer.self_attn.q_proj.weight.data]
        assert keep_mlp[i] == sorted(keep_mlp[i]) and len(keep_mlp[i]) == 48
        assert len(keep_heads[i]) == 32 and keep_heads[i] in (list(range(0, 32)), list(range(32, 64)))  # one whole kv group
    ids = token_batch()
    torch.testing.assert_close(output(model, ids), output(masked_reference(ref, model, keep_mlp, keep_heads), ids), atol=1e-5, rtol=1e-5)
    # a standard checkpoint: stock transformers loads it without hf_compress
    model.save_pretrained(tmp_path / "small")
    expected = output(model, ids)
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained(r'{tmp_path / 'small'}').eval(); "
            f"out = m(input_ids=torch.load(r'{tmp_path / 'ids.pt'}')).logits; "
            "assert 'hf_compress' not in sys.modules; "
            f"torch.save(out, r'{tmp_path / 'out.pt'}')")
    subprocess.run([sys.executable, "-c", code], check=True)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected)
    assert "quantization_config" not in json.loads((tmp_path / "small" / "config.json").read_text())


def test_taylor_importance_keeps_the_channels_with_the_largest_first_order_effect(tiny_models):
    path = tiny_models("llama")
    ref = load(path, "llama")
    ids = calib_ids()
    captured = {}

    def hook(module, args):
        args[0].retain_grad()
        captured["h"] = args[0]

    handle = ref.model.layers[1].mlp.down_proj.register_forward_pre_hook(hook)
    emb = ref.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    taylor = torch.zeros(96, dtype=torch.float64)
    for batch in ids.split(64):
        ref(input_ids=batch, labels=batch).loss.backward()
        h = captured["h"]
        taylor += (h.detach().double() * h.grad.double()).reshape(-1, 96).sum(0)
    handle.remove()
    emb.remove()
    expected = sorted(torch.sort(taylor.abs(), descending=True, stable=True).indices[:24].tolist())
    model = load(path, "llama")
    w_gate = model.model.layers[1].mlp.gate_proj.weight.data.clone()
    prune_structured(model, structured(mlp_ratio=0.25, importance="taylor"))
    kept = [int((w_gate == row).all(1).nonzero()[0]) for row in model.model.layers[1].mlp.gate_proj.weight.data]
    assert kept == expected


def test_dropping_blocks_renumbers_them_and_generates(tiny_models, tmp_path):
    path = tiny_models("llama")
    model = load(path, "llama")
    originals = [layer.mlp.up_proj.weight.data.clone() for layer in model.model.layers]
    report = prune_structured(model, structured(drop_blocks=1))
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    (dropped,) = report["dropped_blocks"]
    kept = 1 - dropped
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight.data, originals[kept])
    assert model.model.layers[0].self_attn.layer_idx == 0
    # the dropped block is the one whose output is most like its input
    assert report["block_similarity"][dropped] >= report["block_similarity"][kept]
    out = model.generate(token_batch(batch=1, length=4), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)
    assert blocks_to_drop(torch.tensor([0.2, 0.9, 0.5, 0.95]), 2) == [1, 3]


def test_compensation_sets_biases_that_stock_transformers_reads(tiny_models, tmp_path):
    path = tiny_models("llama")
    model = load(path, "llama")
    prune_structured(model, structured(mlp_ratio=0.5, kv_heads=1, compensate=True))
    assert model.config.mlp_bias and model.config.attention_bias
    assert model.model.layers[0].mlp.down_proj.bias.abs().sum() > 0
    ids = token_batch()
    out = output(model, ids)
    model.save_pretrained(tmp_path / "c")
    assert torch.equal(output(load(tmp_path / "c", "llama"), ids), out)


@pytest.mark.parametrize(("kw", "message"), [
    (dict(drop_blocks=2), "would remove every one of the 2 blocks"),
    (dict(mlp_ratio=0.001), "keeps no channel of the 96-wide MLP"),
    (dict(kv_heads=3), "more than the model's 2 key/value heads"),
])
def test_structured_ratios_that_leave_nothing_are_refused(kw, message, tiny_models):
    model = load(tiny_models("llama"), "llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        prune_structured(model, structured(**kw))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # nothing changed


def test_structured_config_and_model_errors(tiny_models):
    for kw, message in ((dict(mlp_ratio=0), "mlp_ratio is the fraction of MLP channels kept"),
                        (dict(mlp_ratio=1.5), "mlp_ratio is the fraction"), (dict(kv_heads=0), "kv_heads is the number"),
                        (dict(drop_blocks=-1), "drop_blocks must be"), (dict(importance="random"), "importance must be")):
        with pytest.raises(ValueError, match=message):
            StructuredPruneConfig(**kw)
    with pytest.raises(ValueError, match="handles Llama-style blocks"):
        prune_structured(load(tiny_models("gpt2"), "gpt2"), structured(mlp_ratio=0.5))
    quantized = load(tiny_models("llama"), "llama", quantization_config=hf_compress.RTNConfig(bits=4))
    with pytest.raises(ValueError, match="works on a float model"):
        prune_structured(quantized, structured(mlp_ratio=0.5))


def test_cli_structured_and_lowrank(tmp_path, capsys):
    from hf_compress.cli import main

    if not PYDOC_MODEL.is_dir():
        pytest.skip("local model absent")
    out = tmp_path / "s"
    assert main(["prune", str(PYDOC_MODEL), "--structured", "--mlp-ratio", "0.5", "--kv-heads", "2", "--drop-blocks", "1",
                 "--calib", str(CALIB), "--n-samples", "4", "--seqlen", "128", "--output", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_key_value_heads"], cfg["num_attention_heads"], cfg["num_hidden_layers"]) == (352, 2, 4, 5)
    assert main(["prune", str(PYDOC_MODEL), "--structured", "--mlp-ratio", "0.5", "--output", str(tmp_path / "n")]) == 2
    assert "pass --calib TEXTFILE" in capsys.readouterr().err
    assert main(["prune", str(PYDOC_MODEL), "--mlp-ratio", "0.5", "--method", "magnitude", "--output", str(tmp_path / "n")]) == 2
    assert "add --structured" in capsys.readouterr().err
    assert main(["prune", str(PYDOC_MODEL), "--structured", "--drop-blocks", "6", "--calib", str(CALIB), "--output", str(tmp_path / "n")]) == 2
    assert "would remove every one of the 6 blocks" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()
    assert main(["lowrank", str(PYDOC_MODEL), "--method", "svd", "--param-ratio", "0.8", "--output", str(tmp_path / "l")]) == 0
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "l")
    assert isinstance(m.model.layers[0].mlp.up_proj, LowRankLinear) and m.model.layers[0].mlp.up_proj.rank == 150
    assert main(["lowrank", str(PYDOC_MODEL), "--method", "whiten", "--param-ratio", "0.8", "--output", str(tmp_path / "n")]) == 2
    assert "--method whiten calibrates: pass --calib TEXTFILE" in capsys.readouterr().err
    assert main(["lowrank", str(PYDOC_MODEL), "--rank", "300", "--output", str(tmp_path / "n")]) == 2
    assert "rank 300 is not possible for a 256->256 linear" in capsys.readouterr().err
    assert main(["lowrank", str(PYDOC_MODEL), "--rank", "8", "--rank-allocation", "sensitivity", "--output", str(tmp_path / "n")]) == 2
    assert "give param_ratio, not rank" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()
    assert main(["lowrank", str(PYDOC_MODEL), "--param-ratio", "0.8", "--rank-allocation", "sensitivity",
                 "--output", str(tmp_path / "s")]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    ranks = {n.removeprefix("model."): x.rank for n, x in reloaded.named_modules() if isinstance(x, LowRankLinear)}
    assert len(set(ranks.values())) > 1 and ranks == reloaded.config.quantization_config.ranks


def test_structured_recipe_builds_both_configs(tmp_path):
    import yaml

    from hf_compress.distill import DistillationArguments

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "prune-structured-distill.yaml").read_text())
    prune = StructuredPruneConfig(**recipe["prune"])
    assert (prune.mlp_ratio, prune.kv_heads, prune.drop_blocks) == (0.5, None, 0)
    distill = dict(recipe["distill"])
    assert distill.pop("seq_len") == 256
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], **distill)
    assert (args.alpha, args.hidden_loss_weight, args.max_steps) == (1.0, 1.0, 300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_2_4_layer_runs_on_the_semi_structured_sparse_matmul_and_matches_the_reference():
    from torch.sparse import SparseSemiStructuredTensor

    torch.manual_seed(0)
    w = torch.randn(256, 512, dtype=torch.float16, device="cuda")
    layer = SparseLinear(512, 256, 256 * 256, bias=True, dtype=torch.float16, device="cuda", pattern=(2, 4))
    layer.load_sparse(w, magnitude_mask(w.float(), pattern=(2, 4)), bias=torch.randn(256, device="cuda"))
    for rows in (1, 7, 64):
        x = torch.randn(rows, 512, dtype=torch.float16, device="cuda")
        torch.testing.assert_close(layer(x), layer.forward_reference(x), atol=2e-2, rtol=2e-2)
    assert isinstance(layer._compute_weight(x), SparseSemiStructuredTensor)
