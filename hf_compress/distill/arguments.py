"""``DistillationArguments``: ``TrainingArguments`` plus the knobs of knowledge distillation."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .losses import LOSS_TYPES

__all__ = ["DistillationArguments"]


@dataclass
class DistillationArguments(TrainingArguments):
    """Training arguments for :class:`~hf_compress.DistillationTrainer`.

    The loss of a batch is ``(1 − alpha)·CE + alpha·soft + hidden_loss_weight·hidden +
    attention_loss_weight·attention``, every term summed over real tokens and divided by the number of real
    tokens in the whole accumulated batch. On on-policy batches (a share ``on_policy_fraction`` of the
    batches, whose continuations the student samples itself, as in GKD) the CE term is dropped: the labels
    there are the student's own tokens.
    """

    alpha: float = field(default=0.5, metadata={"help": "weight of the soft loss; 1 − alpha weighs the hard CE loss. In [0, 1]."})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature T of the soft loss (> 0); the loss is scaled by T²"})
    loss_type: str = field(default="forward_kl", metadata={"help": "soft loss: forward_kl, reverse_kl, jsd or mse (on logits)"})
    beta: float = field(default=0.5, metadata={"help": "JSD interpolation β in [0, 1]: 0 = forward KL, 1 = reverse KL"})
    hidden_loss_weight: float = field(default=0.0, metadata={"help": "weight of the hidden-state loss (0 = off)"})
    hidden_loss_type: str = field(default="mse", metadata={"help": "hidden-state loss: mse or cosine"})
    layer_map: list | None = field(
        default=None,
        metadata={
            "help": "pairs [student_layer, teacher_layer] indexing hidden_states (0 = embedding output, i = output "
            "of block i); default: uniform, student block i -> teacher block round(i * L_teacher / L_student)"
        },
    )
    attention_loss_weight: float = field(default=0.0, metadata={"help": "weight of the attention-map KL on the mapped blocks (0 = off; needs eager attention)"})
    on_policy_fraction: float = field(default=0.0, metadata={"help": "λ: share of batches on sequences the student generates (GKD), in [0, 1]"})
    on_policy_prompt_length: int | None = field(
        default=None, metadata={"help": "tokens of each training sequence kept as the prompt for on-policy generation (default: half)"}
    )
    max_new_tokens: int | None = field(default=None, metadata={"help": "tokens the student generates per on-policy sequence (default: the rest of the sequence)"})
    generation_temperature: float = field(default=1.0, metadata={"help": "sampling temperature of on-policy generation (0 = greedy)"})
    generation_top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of on-policy generation"})
    top_k: int | None = field(default=None, metadata={"help": "compare with the teacher's top-k tokens only (plus the leftover mass); None = the full vocabulary"})
    offline_logits: str | None = field(
        default=None, metadata={"help": "folder written by precompute_teacher_logits: train on cached teacher top-k logits, no teacher in memory"}
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (loss = (1 - alpha) * CE + alpha * soft), got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.beta}")
        for name in ("hidden_loss_weight", "attention_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.hidden_loss_type not in ("mse", "cosine"):
            raise ValueError(f"hidden_loss_type must be 'mse' or 'cosine', got {self.hidden_loss_type!r}")
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise ValueError(f"on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be a positive number of tokens (or None for the full vocabulary), got {self.top_k}")
        if self.generation_temperature < 0:
            raise ValueError(f"generation_temperature must be >= 0, got {self.generation_temperature}")
        if self.layer_map is not None:
            pairs = [tuple(p) for p in self.layer_map]
            if not pairs or any(len(p) != 2 or not all(isinstance(i, int) for i in p) for p in pairs):
                raise ValueError(f"layer_map must be a non-empty list of [student_layer, teacher_layer] integer pairs, got {self.layer_map}")
            self.layer_map = [list(p) for p in pairs]
        if self.offline_logits is not None and self.on_policy_fraction > 0:
            raise ValueError("on-policy distillation needs a live teacher to score the student's samples: "
                             "use on_policy_fraction=0 with offline_logits")
        if self.offline_logits is not None and (self.hidden_loss_weight > 0 or self.attention_loss_weight > 0):
            raise ValueError("offline teacher logits hold no hidden states or attention maps: set "
                             "hidden_loss_weight=0 and attention_loss_weight=0, or train with the teacher online")
        if (self.offline_logits is not None or self.top_k is not None) and self.loss_type == "mse":
            raise ValueError("loss_type='mse' compares full logits; with top_k or offline_logits use forward_kl, reverse_kl or jsd")
