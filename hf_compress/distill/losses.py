"""Distillation losses as pure tensor functions (no Trainer, no model).

Conventions, shared by every function here:
- ``student_logits`` / ``teacher_logits`` are ``[..., V]`` for the same token positions; a ``mask`` (bool,
  ``[...]``) selects the real tokens; every loss returns the **sum over real tokens** (``reduction="sum"``),
  their **mean** (``"mean"``, the default) or the per-token values (``"none"``). The trainer sums and divides by
  the number of real tokens in the whole accumulated batch, so gradient accumulation changes nothing.
- Distribution losses take a ``temperature`` T: both sides are softened by ``softmax(z / T)`` and the loss is
  multiplied by T², which keeps gradient magnitudes comparable across T (Hinton et al.).
- The generalized Jensen-Shannon divergence follows GKD (Agarwal et al.) and TRL: with M = β·p_T + (1 − β)·p_S,
  ``JSD_β = β·KL(p_T ‖ M) + (1 − β)·KL(p_S ‖ M)``, mixed in probability space through ``logsumexp``; β = 0 is
  the forward KL(p_T ‖ p_S) and β = 1 the reverse KL(p_S ‖ p_T), which are also the limits of JSD_β / β and
  JSD_β / (1 − β).
- Top-k (offline) teacher distributions are ``(ids, logprobs)``: the teacher's k most likely tokens and their
  log-probabilities under the full softmax at temperature T. The divergence is computed exactly on the
  partition {the k ids, everything else}: the student's and the teacher's leftover masses form a (k+1)-th
  bucket, so nothing is renormalised and the loss equals the full-vocabulary one whenever the teacher puts no
  mass outside its top k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "LOSS_TYPES",
    "attention_map_loss",
    "causal_token_mask",
    "distillation_loss",
    "forward_kl",
    "forward_kl_sum",
    "generalized_jsd",
    "hidden_state_loss",
    "log_probs",
    "logits_mse",
    "reverse_kl",
    "shared_vocab",
    "teacher_topk",
    "topk_distillation_loss",
    "topk_divergence",
]

LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "mse")
# The leftover mass of a top-k teacher is clamped to this floor: a teacher that keeps all its mass in k ids
# would otherwise make the reverse KL of any student leftover infinite.
RESIDUAL_FLOOR = 1e-10


def causal_token_mask(labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, L-1]`` bool: which of the positions ``0..L-2`` predict a real next token (the causal-LM shift).

    Position t predicts token t+1, so it counts when ``labels[:, t+1] != -100`` (labels given) or when both
    tokens t and t+1 are real (``attention_mask``)."""
    if labels is not None:
        return labels[:, 1:] != -100
    if attention_mask is None:
        raise ValueError("causal_token_mask needs labels or an attention_mask")
    am = attention_mask.bool()
    return am[:, 1:] & am[:, :-1]


def _reduce(per_token: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if mask is not None:
        per_token = per_token * mask.to(per_token.dtype)
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        n = mask.sum() if mask is not None else per_token.numel()
        return total / torch.clamp(torch.as_tensor(n, device=total.device, dtype=total.dtype), min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dim from finite log-probabilities (a zero-probability bucket must come as a
    very negative, finite log-probability, as ``log_softmax`` of finite logits gives)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / T)`` in at least float32 (no division at T = 1)."""
    z = _f32(logits)
    return F.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)


def divergence(s_logp: torch.Tensor, t_logp: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between two normalised log-distributions over the last dim."""
    if kind == "forward_kl":
        return _kl(t_logp, s_logp)
    if kind == "reverse_kl":
        return _kl(s_logp, t_logp)
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if beta == 0.0:
            return _kl(t_logp, s_logp)
        if beta == 1.0:
            return _kl(s_logp, t_logp)
        m = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log1p(-beta)]), dim=0)
        return beta * _kl(t_logp, m) + (1.0 - beta) * _kl(s_logp, m)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {LOSS_TYPES[:3]}")


def _softmax_lse(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(z), logsumexp(z))`` in one softmax pass: softmax is 1 at its largest entry's exp(max − lse), so
    lse = max(z) − log(max(softmax(z))) (exact to float rounding; ``torch.logsumexp`` costs another 3 passes)."""
    p = torch.softmax(z, dim=-1)
    return p, z.amax(-1) - p.amax(-1).log()


class _ForwardKL(torch.autograd.Function):
    """``(Σ w·T²·KL(softmax(z_T/T) ‖ softmax(z_S/T)), Σ w·CE(z_S, targets))`` with a hand-written backward.

    Per token, KL = p_T·(z_T − z_S)/T − lse(z_T/T) + lse(z_S/T), with gradient T·(p_S − p_T); at T = 1 the
    hard loss CE = lse(z_S) − z_S[target] (gradient p_S − onehot) comes from the same softmax. On CPU each
    fresh ``[N, V]`` tensor costs as much as the pass that fills it (the pages are faulted in), so this takes
    two softmaxes and works in place otherwise: about a third of the autograd version's time over the logits,
    which is most of a distillation step's non-matmul time. ``z_t`` is overwritten when ``reuse_teacher``."""

    @staticmethod
    def forward(ctx, z_s, z_t, temperature, weights, reuse_teacher, targets):
        zs = z_s if temperature == 1.0 else z_s / temperature
        zt = z_t / temperature if temperature != 1.0 else (z_t if reuse_teacher else z_t.clone())
        p_s, lse_s = _softmax_lse(zs)
        p_t, lse_t = _softmax_lse(zt)
        ce = None
        if targets is not None:  # only at T = 1 (the caller checks): CE per token from the same lse
            ce = lse_s - zs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        kl = zt.sub_(zs).mul_(p_t).sum(-1).sub_(lse_t).add_(lse_s)  # zt is ours from here on
        if weights is not None:
            kl = kl.mul_(weights)
            ce = ce.mul_(weights) if ce is not None else None
        ctx.save_for_backward(p_s, p_t, weights, targets)
        ctx.temperature = temperature
        return kl.sum() * temperature**2, (ce.sum() if ce is not None else kl.new_zeros(()))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_kl, g_ce):
        p_s, p_t, weights, targets = ctx.saved_tensors
        t = ctx.temperature
        # p_s is not needed again: its buffer becomes the gradient
        if targets is None:
            g = p_s.sub_(p_t).mul_(g_kl * t)
        else:  # T = 1: g_kl·(p_S − p_T) + g_ce·(p_S − onehot)
            g = p_s.mul_(g_kl + g_ce).sub_(p_t.mul_(g_kl))
            g.scatter_add_(-1, targets.clamp(min=0).unsqueeze(-1), (-g_ce).expand(targets.shape).unsqueeze(-1).to(g.dtype))
        if weights is not None:
            g = g.mul_(weights.unsqueeze(-1))
        return g, None, None, None, None, None


def forward_kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                   weights: torch.Tensor | None = None, *, reuse_teacher: bool = False, targets: torch.Tensor | None = None):
    """``Σ_tokens weights · T² · KL(p_T ‖ p_S)`` over ``[N, V]`` finite logits, computed by :class:`_ForwardKL`:
    the value and gradient of :func:`forward_kl` with ``reduction="sum"``, in a third of the time.
    ``reuse_teacher=True`` lets it overwrite ``teacher_logits`` (a temporary the caller drops). With
    ``targets`` (``[N]`` ids, negative = ignored through ``weights``; only at T = 1) it returns
    ``(kl_sum, ce_sum)``, the cross-entropy sharing the student's softmax."""
    _check_temperature(temperature)
    if targets is not None and temperature != 1.0:
        raise ValueError("the fused cross-entropy shares the student's softmax, so it needs temperature 1")
    teacher_logits = shared_vocab(student_logits, teacher_logits)
    z_t = _f32(teacher_logits).detach()
    reuse = reuse_teacher or z_t.data_ptr() != teacher_logits.data_ptr()  # a fresh float32 copy is ours anyway
    w = None if weights is None else weights.to(torch.float64 if student_logits.dtype == torch.float64 else torch.float32)
    kl, ce = _ForwardKL.apply(_f32(student_logits), z_t, float(temperature), w, reuse and z_t.is_contiguous(), targets)
    return kl if targets is None else (kl, ce)


def shared_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The teacher's logits on the student's ids: a teacher whose vocabulary extends the student's (same
    tokenizer, extra or padded ids at the end) is compared on the first ``V_student`` ids."""
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vt == vs:
        return teacher_logits
    if vt < vs:
        raise ValueError(
            f"the teacher's vocabulary ({vt}) is smaller than the student's ({vs}): logit distillation needs the "
            "student's ids to be the teacher's (same tokenizer); use sequence-level distillation otherwise"
        )
    return teacher_logits[..., :vs]


def forward_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0, reduction: str = "mean"):
    """T² · KL(p_T ‖ p_S) per token: the classic soft-label loss (mean-seeking)."""
    return distillation_loss(student_logits, teacher_logits, "forward_kl", mask, temperature, reduction=reduction)


def reverse_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0, reduction: str = "mean"):
    """T² · KL(p_S ‖ p_T) per token (MiniLLM; mode-seeking)."""
    return distillation_loss(student_logits, teacher_logits, "reverse_kl", mask, temperature, reduction=reduction)


def generalized_jsd(
    student_logits, teacher_logits, mask=None, temperature: float = 1.0, beta: float = 0.5, reduction: str = "mean"
):
    """T² · JSD_β(p_T, p_S) per token (see the module docstring for β)."""
    return distillation_loss(student_logits, teacher_logits, "jsd", mask, temperature, beta, reduction)


def logits_mse(student_logits, teacher_logits, mask=None, reduction: str = "mean"):
    """Mean over the vocabulary of (z_S − z_T)², per token."""
    teacher_logits = shared_vocab(student_logits, teacher_logits)
    per_token = (_f32(student_logits) - _f32(teacher_logits)).pow(2).mean(-1)
    return _reduce(per_token, mask, reduction)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_type: str = "forward_kl",
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """The soft loss named by ``loss_type`` (``forward_kl``, ``reverse_kl``, ``jsd``, ``mse``) over full logits."""
    if loss_type == "mse":
        return logits_mse(student_logits, teacher_logits, mask, reduction)
    _check_temperature(temperature)
    teacher_logits = shared_vocab(student_logits, teacher_logits)
    per_token = divergence(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature), loss_type, beta)
    return _reduce(per_token * temperature**2, mask, reduction)


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, vocab_size: int | None = None):
    """``(ids, logprobs)``: the teacher's k most likely ids and their log-probabilities under the full softmax
    at ``temperature`` (what the offline cache stores). ``vocab_size`` restricts to the student's ids first."""
    _check_temperature(temperature)
    if vocab_size is not None and teacher_logits.shape[-1] > vocab_size:
        teacher_logits = teacher_logits[..., :vocab_size]
    if not 0 < k <= teacher_logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, {teacher_logits.shape[-1]}], got {k}")
    values, ids = log_probs(teacher_logits, temperature).topk(k, dim=-1)
    return ids, values


def _with_residual(logp_support: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """Append log(1 − Σ p) over the support as a last bucket (clamped at ``floor``)."""
    lse = torch.logsumexp(logp_support, dim=-1, keepdim=True).clamp(max=0.0)
    rest = (-torch.expm1(lse)).clamp(min=max(floor, 1e-30))
    return torch.cat([logp_support, rest.log()], dim=-1)


def topk_divergence(s_logp: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, kind: str, beta: float = 0.5):
    """Per-position divergence between the student's log-probabilities ``s_logp [..., V]`` and a top-k teacher,
    on the partition {the k ids, the rest} (no T² factor)."""
    s = _with_residual(s_logp.gather(-1, teacher_ids.long()))
    t = _with_residual(_f32(teacher_logprobs), floor=RESIDUAL_FLOOR)
    return divergence(s, t, kind, beta)


def topk_distillation_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    loss_type: str = "forward_kl",
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """The soft loss against a top-k teacher (``teacher_topk`` or the offline cache): exact on the partition
    {top-k ids, the rest}; ``teacher_logprobs`` must come from the same ``temperature``."""
    if loss_type == "mse":
        raise ValueError("loss_type='mse' needs the teacher's full logits; top-k / offline teacher logits support "
                         "forward_kl, reverse_kl and jsd")
    _check_temperature(temperature)
    per_token = topk_divergence(log_probs(student_logits, temperature), teacher_ids, teacher_logprobs, loss_type, beta)
    return _reduce(per_token * temperature**2, mask, reduction)


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    kind: str = "mse",
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-token ``mse`` (mean over the hidden dim of (h_S − h_T)²) or ``cosine`` (1 − cos(h_S, h_T)) between
    already projected student states and teacher states of the same width."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"hidden states differ in shape: student {tuple(student_hidden.shape)} vs teacher "
            f"{tuple(teacher_hidden.shape)} (project the student's states to the teacher's width first)"
        )
    s, t = _f32(student_hidden), _f32(teacher_hidden)
    if kind == "mse":
        per_token = (s - t).pow(2).mean(-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"hidden loss kind must be 'mse' or 'cosine', got {kind!r}")
    return _reduce(per_token, mask, reduction)


def attention_map_loss(
    student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """KL(teacher ‖ student) between head-averaged attention distributions ``[B, H, Lq, Lk]`` per query token
    (head counts may differ: each side is averaged over its heads first)."""
    s = _f32(student_attn).mean(1).clamp(min=1e-12).log()  # clamped: causal maps hold exact zeros
    t = _f32(teacher_attn).mean(1).clamp(min=1e-12).log()
    if s.shape != t.shape:
        raise ValueError(f"attention maps differ in shape: {tuple(s.shape)} vs {tuple(t.shape)}")
    return _reduce(_kl(t, s), mask, reduction)
