"""Distillation losses against float64 references and their defining properties."""

from __future__ import annotations

import math

import pytest
import torch

from hf_compress.distill import losses as L


def logits(seed: int, shape=(3, 5, 11), scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def kl_ref(p_logits, q_logits, T=1.0):
    """KL(p ‖ q) per position in float64."""
    p = torch.softmax(p_logits.double() / T, -1)
    q = torch.softmax(q_logits.double() / T, -1)
    return (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd", "mse"])
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_zero_for_identical_distributions(loss_type, T):
    z = logits(0)
    assert L.distillation_loss(z, z.clone(), loss_type, temperature=T).item() == pytest.approx(0.0, abs=1e-6)
    if loss_type != "mse":
        ids, lp = L.teacher_topk(z, 4, T)
        assert L.topk_distillation_loss(z, ids, lp, loss_type, temperature=T).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_kls_match_float64_reference(T):
    s, t = logits(1), logits(2)
    assert torch.allclose(L.forward_kl(s, t, temperature=T, reduction="none").double(), T**2 * kl_ref(t, s, T), atol=1e-5)
    assert torch.allclose(L.reverse_kl(s, t, temperature=T, reduction="none").double(), T**2 * kl_ref(s, t, T), atol=1e-5)


def test_jsd_matches_probability_space_mixture():
    s, t, beta = logits(3), logits(4), 0.3
    p_s, p_t = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    m = beta * p_t + (1 - beta) * p_s
    ref = beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    got = L.generalized_jsd(s, t, beta=beta, reduction="none").double()
    assert torch.allclose(got, ref, atol=1e-6)
    # Symmetric at beta = 0.5: swapping student and teacher gives the same divergence.
    assert torch.allclose(L.generalized_jsd(s, t, beta=0.5), L.generalized_jsd(t, s, beta=0.5), atol=1e-6)


def test_jsd_beta_limits_are_the_two_kls():
    s, t = logits(5), logits(6)
    fwd, rev = L.forward_kl(s, t), L.reverse_kl(s, t)
    fwd64, rev64 = L.forward_kl(s.double(), t.double()), L.reverse_kl(s.double(), t.double())
    assert L.generalized_jsd(s, t, beta=0.0).item() == pytest.approx(fwd.item(), rel=1e-6)
    assert L.generalized_jsd(s, t, beta=1.0).item() == pytest.approx(rev.item(), rel=1e-6)
    eps = 1e-6  # and as limits: JSD_b / b -> KL(p_T || p_S), JSD_b / (1 - b) -> KL(p_S || p_T)
    s64, t64 = s.double(), t.double()
    assert (L.generalized_jsd(s64, t64, beta=eps) / eps).item() == pytest.approx(fwd64.item(), rel=1e-4)
    assert (L.generalized_jsd(s64, t64, beta=1 - eps) / eps).item() == pytest.approx(rev64.item(), rel=1e-4)


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd"])
def test_temperature_squared_keeps_gradient_magnitude(loss_type):
    s0, t = logits(7, scale=1.0), logits(8, scale=1.0)

    def grad_norm(T, scaled=True):
        s = s0.clone().requires_grad_(True)
        loss = L.distillation_loss(s, t, loss_type, temperature=T)
        (loss if scaled else loss / T**2).backward()
        return s.grad.norm().item()

    scaled = [grad_norm(T) for T in (2.0, 4.0, 8.0, 16.0)]
    raw = [grad_norm(T, scaled=False) for T in (2.0, 4.0, 8.0, 16.0)]
    assert max(scaled) / min(scaled) < 1.5  # T^2 keeps the magnitude comparable...
    assert max(raw) / min(raw) > 20  # ...where the unscaled loss's gradient falls off as 1/T^2


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd", "mse"])
def test_masked_tokens_change_nothing(loss_type):
    s, t = logits(9), logits(10)
    mask = torch.rand(s.shape[:-1], generator=torch.Generator().manual_seed(0)) > 0.4
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 100 * torch.randn_like(s2[~mask])
    t2[~mask] = -50.0
    a = L.distillation_loss(s, t, loss_type, mask=mask, temperature=2.0, reduction="sum")
    b = L.distillation_loss(s2, t2, loss_type, mask=mask, temperature=2.0, reduction="sum")
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    # the sum over the mask is the sum over the selected tokens; the mean divides by the real tokens only
    sel = L.distillation_loss(s[mask], t[mask], loss_type, temperature=2.0, reduction="sum")
    assert a.item() == pytest.approx(sel.item(), rel=1e-5)
    mean = L.distillation_loss(s, t, loss_type, mask=mask, temperature=2.0)
    assert mean.item() == pytest.approx(a.item() / mask.sum().item(), rel=1e-6)
    # and gradients reach only the real tokens
    g = s.clone().requires_grad_(True)
    L.distillation_loss(g, t, loss_type, mask=mask).backward()
    assert g.grad[~mask].abs().max().item() == 0.0 and g.grad[mask].abs().max().item() > 0


def test_causal_token_mask_shifts_labels():
    labels = torch.tensor([[5, 6, -100, 7], [-100, 1, 2, -100]])
    assert L.causal_token_mask(labels).tolist() == [[True, False, True], [True, True, False]]
    am = torch.tensor([[1, 1, 1, 0]])
    assert L.causal_token_mask(attention_mask=am).tolist() == [[True, True, False]]


def test_teacher_vocabulary_extending_the_students():
    s, t = logits(11, (2, 3, 8)), logits(12, (2, 3, 10))
    assert L.forward_kl(s, t).item() == pytest.approx(L.forward_kl(s, t[..., :8]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="smaller than the student's"):
        L.forward_kl(t, s)


@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_is_exact_when_the_teacher_keeps_its_mass_in_k(loss_type):
    s, t = logits(13), logits(14)
    full = L.distillation_loss(s, t, loss_type, temperature=1.5)
    ids, lp = L.teacher_topk(t, t.shape[-1], 1.5)  # k = V: nothing left over
    assert L.topk_distillation_loss(s, ids, lp, loss_type, temperature=1.5).item() == pytest.approx(full.item(), rel=1e-5)
    if loss_type == "reverse_kl":
        return  # KL(p_S || p_T) against an e^-6666 leftover is ~1e4: top-k floors the leftover at RESIDUAL_FLOOR
    peaked = t.clone()
    peaked[..., 4:] = -1e4  # all the teacher's mass on 4 ids
    ids, lp = L.teacher_topk(peaked, 4, 1.5)
    want = L.distillation_loss(s, peaked, loss_type, temperature=1.5)
    assert L.topk_distillation_loss(s, ids, lp, loss_type, temperature=1.5).item() == pytest.approx(want.item(), rel=1e-4)


def test_topk_forward_kl_is_the_kl_of_the_coarsened_distributions():
    s, t, k = logits(15), logits(16), 3
    ids, lp = L.teacher_topk(t, k)
    got = L.topk_distillation_loss(s, ids, lp, reduction="none").double()
    p_t, p_s = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    keep_t, keep_s = p_t.gather(-1, ids), p_s.gather(-1, ids)
    bt = torch.cat([keep_t, 1 - keep_t.sum(-1, keepdim=True)], -1)
    bs = torch.cat([keep_s, 1 - keep_s.sum(-1, keepdim=True)], -1)
    ref = (bt * (bt / bs).log()).sum(-1)
    assert torch.allclose(got, ref, atol=1e-5)
    assert (got <= L.forward_kl(s, t, reduction="none").double() + 1e-6).all()  # coarsening never increases KL


def test_mse_and_hidden_and_attention_losses():
    s, t = logits(17), logits(18)
    assert L.logits_mse(s, t).item() == pytest.approx((s - t).pow(2).mean().item(), rel=1e-6)
    h_s, h_t = logits(19, (2, 4, 6)), logits(20, (2, 4, 6))
    assert L.hidden_state_loss(h_s, h_t).item() == pytest.approx((h_s - h_t).pow(2).mean().item(), rel=1e-6)
    cos = torch.nn.functional.cosine_similarity(h_s, h_t, dim=-1)
    assert L.hidden_state_loss(h_s, h_t, kind="cosine").item() == pytest.approx((1 - cos).mean().item(), rel=1e-6)
    assert L.hidden_state_loss(h_s, 3 * h_s, kind="cosine").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="project the student"):
        L.hidden_state_loss(h_s, h_t[..., :4])
    a = torch.softmax(logits(21, (2, 4, 5, 5)), -1)
    assert L.attention_map_loss(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)
    b = torch.softmax(logits(22, (2, 2, 5, 5)), -1)  # other head count: compared head-averaged
    ref = kl_ref(b.mean(1).log(), a.mean(1).log()).mean()
    assert L.attention_map_loss(a, b).item() == pytest.approx(ref.item(), rel=1e-4)


def test_bad_arguments():
    s = logits(23)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        L.forward_kl(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="beta must be in"):
        L.generalized_jsd(s, s, beta=1.5)
    with pytest.raises(ValueError, match="top_k must be in"):
        L.teacher_topk(s, 0)
    ids, lp = L.teacher_topk(s, 2)
    with pytest.raises(ValueError, match="full logits"):
        L.topk_distillation_loss(s, ids, lp, "mse")
    assert math.isfinite(L.topk_distillation_loss(s, ids, lp, "reverse_kl").item())


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_fused_forward_kl_equals_autograd_version(T):
    s0, t = logits(30, (40, 50)), logits(31, (40, 50))
    w = (torch.rand(40, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    a = s0.clone().requires_grad_(True)
    ref = L.forward_kl(a, t, mask=w.bool(), temperature=T, reduction="sum")
    ref.backward()
    b = s0.clone().requires_grad_(True)
    got = L.forward_kl_sum(b, t, temperature=T, weights=w)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    # the hand-written gradient against a central finite difference along a random direction, in float64
    z, v, eps = s0.double(), torch.randn(40, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), 1e-6
    c = z.clone().requires_grad_(True)
    L.forward_kl_sum(c, t.double(), T, w.double()).backward()
    f = lambda x: L.forward_kl_sum(x, t.double(), T, w.double()).item()  # noqa: E731
    assert (c.grad * v).sum().item() == pytest.approx((f(z + eps * v) - f(z - eps * v)) / (2 * eps), rel=1e-6)
    # its saved softmax becomes the gradient, so a second backward through the same graph is refused
    d = s0.clone().requires_grad_(True)
    out = L.forward_kl_sum(d, t, T, w)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_fused_forward_kl_with_cross_entropy():
    s0, t = logits(32, (30, 20)), logits(33, (30, 20))
    targets = torch.randint(0, 20, (30,), generator=torch.Generator().manual_seed(3))
    w = (torch.rand(30, generator=torch.Generator().manual_seed(4)) > 0.3).float()
    targets[w == 0] = -100  # ignored tokens carry weight 0
    a = s0.clone().requires_grad_(True)
    kl_ref = L.forward_kl(a, t, mask=w.bool(), reduction="sum")
    ce_ref = torch.nn.functional.cross_entropy(a, targets, reduction="sum")
    (0.3 * kl_ref + 0.7 * ce_ref).backward()
    b = s0.clone().requires_grad_(True)
    kl, ce = L.forward_kl_sum(b, t, 1.0, w, targets=targets)
    (0.3 * kl + 0.7 * ce).backward()
    assert (kl.item(), ce.item()) == (pytest.approx(kl_ref.item(), rel=1e-5), pytest.approx(ce_ref.item(), rel=1e-5))
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    with pytest.raises(ValueError, match="needs temperature 1"):
        L.forward_kl_sum(s0, t, 2.0, w, targets=targets)
