"""``DistillationTrainer``: transformers' ``Trainer`` with a frozen teacher and a distillation loss.

What it adds to ``Trainer`` and where:
- ``compute_loss``: the student's forward, the teacher's (frozen, eval mode, no autograd, on its own device
  and dtype, outside autocast) or the cached top-k teacher logits, and the mix of CE, soft, hidden-state and
  attention losses, summed over real tokens and divided by ``num_items_in_batch`` (the real tokens of the
  whole accumulated batch, across processes), so N accumulation steps of batch B give one step of N·B.
- ``get_batch_samples``: counts those tokens for every model (``Trainer`` does only for models that take loss
  kwargs), after replacing a share λ of the micro-batches by on-policy sequences the student samples (GKD).
- The hidden-state projections Φ (one linear per mapped layer pair, created when widths differ) are a
  ``distill_projector`` submodule of the student, so the optimizer, the device moves and DDP's gradient
  averaging all include them; ``save_pretrained`` leaves them out and ``_save`` writes them beside the student
  as ``distill_projector.safetensors`` (resumed from checkpoints).
- Loss components are logged (``ce``, ``soft``, ``hidden``, ``attention``) in training and evaluation.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.utils import logging

from ..eval._utils import eval_mode, model_device
from ..integrations.layerwise import find_blocks
from .arguments import DistillationArguments
from .data import TEACHER_COLUMNS, DistillationCollator
from .losses import (
    attention_map_loss,
    causal_token_mask,
    divergence,
    forward_kl_sum,
    hidden_state_loss,
    log_probs,
    logits_mse,
    shared_vocab,
    teacher_topk,
    topk_divergence,
)
from .offline import load_teacher_logits

logger = logging.get_logger(__name__)

__all__ = ["DistillationTrainer", "HiddenProjector", "PROJECTOR_FILE"]

PROJECTOR_FILE = "distill_projector.safetensors"
PROJECTOR_NAME = "distill_projector"


class TokenSelection:
    """The positions of a ``[B, L, ...]`` batch that predict a real next token (``mask [B, L-1]``), flattened.

    When nearly every position counts (fixed-length chunks), ``take`` returns a view of all ``B·L`` positions
    and ``sum`` weights the per-token values by the mask: a boolean gather would copy the ``[B, L, V]`` logits
    and its backward scatters them back, ~15% of a distillation step here. Sparse masks are gathered."""

    DENSE = 0.9

    def __init__(self, mask: torch.Tensor):
        flat = F.pad(mask, (0, 1)).reshape(-1)
        self.dense = flat.numel() > 0 and flat.float().mean().item() >= self.DENSE
        if self.dense:
            self.weights = flat.float()
        else:
            self.index = flat.nonzero().squeeze(1)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1, *t.shape[2:])
        return flat if self.dense else flat.index_select(0, self.index.to(flat.device))

    def sum(self, per_token: torch.Tensor) -> torch.Tensor:
        return (per_token * self.weights.to(per_token.device)).sum() if self.dense else per_token.sum()


class HiddenProjector(nn.ModuleList):
    """Φ: one bias-free linear per mapped layer pair, from the student's width to the teacher's."""

    def __init__(self, n_pairs: int, student_width: int, teacher_width: int):
        super().__init__([nn.Linear(student_width, teacher_width, bias=False) for _ in range(n_pairs)])


def _hidden_width(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return cfg.hidden_size


def _n_blocks(model) -> int:
    return len(find_blocks(model)[1])


def _supports_hidden_states(model) -> bool:
    if isinstance(model, PreTrainedModel) or hasattr(model, "get_base_model"):
        return True
    import inspect

    try:
        return "output_hidden_states" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def default_layer_map(n_student: int, n_teacher: int) -> list[list[int]]:
    """Student block i ↦ teacher block round(i·L_T/L_S), i = 1..L_S (indices into ``hidden_states``)."""
    return [[i, round(i * n_teacher / n_student)] for i in range(1, n_student + 1)]


def check_tokenizers(student_tokenizer, teacher_tokenizer) -> None:
    """Logit distillation compares distributions id by id: every student token must have the same id in the
    teacher's vocabulary (which may extend it)."""
    if student_tokenizer is None or teacher_tokenizer is None:
        return
    sv, tv = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    for token, i in sv.items():
        if tv.get(token) != i:
            raise ValueError(
                f"the teacher's and the student's tokenizers differ (token {token!r} is id {i} for the student and "
                f"{tv.get(token)} for the teacher): logit distillation needs the student's ids to mean the same "
                "tokens for the teacher. Use one tokenizer, or distil on teacher generations "
                "(hf_compress.generate_distillation_dataset), which needs no shared vocabulary"
            )


class DistillationTrainer(Trainer):
    """``Trainer`` for knowledge distillation; see :class:`DistillationArguments` for the loss.

    ``DistillationTrainer(model=student, teacher_model=teacher, args=DistillationArguments(...),
    train_dataset=..., ...)``. ``teacher_model`` may be a model or a path/Hub id, an hf_compress-quantized
    model included; it may be omitted with ``args.offline_logits`` (the cached top-k logits stand in for it,
    and the cache is the training set unless ``train_dataset`` is given). ``teacher_tokenizer``: when given,
    checked against ``processing_class`` (the student's). The student may be a PEFT model.
    """

    def __init__(self, model=None, teacher_model=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, data_collator=None, teacher_tokenizer=None, **kwargs):
        if args is None:
            args = DistillationArguments(output_dir="distill_output")
        if not isinstance(args, DistillationArguments):
            raise TypeError(f"args must be DistillationArguments, got {type(args).__name__}")
        if model is None:
            raise ValueError("pass the student as model=...")
        self.offline_meta = None
        if args.offline_logits is not None:
            cached, self.offline_meta = load_teacher_logits(args.offline_logits)
            self._check_offline(args, self.offline_meta, model)
            if train_dataset is None:
                train_dataset = cached
        if isinstance(teacher_model, (str, os.PathLike)):
            from ..integrations.loading import load_model

            teacher_model = load_model(str(teacher_model))[0]
        needs_teacher = args.offline_logits is None and (args.alpha > 0 or args.hidden_loss_weight > 0 or args.attention_loss_weight > 0 or args.on_policy_fraction > 0)
        if teacher_model is None and needs_teacher:
            raise ValueError("pass teacher_model=... (or args.offline_logits, a cache from precompute_teacher_logits)")
        check_tokenizers(processing_class, teacher_tokenizer)
        self.teacher = teacher_model
        if teacher_model is not None:
            self._check_vocab(model, teacher_model)
            teacher_model.eval()
            teacher_model.requires_grad_(False)
        self.layer_map = self._setup_hidden(model, teacher_model, args)
        if args.attention_loss_weight > 0:
            for m in (model, teacher_model):
                target = m.get_base_model() if hasattr(m, "get_base_model") else m
                if target.config._attn_implementation != "eager":
                    logger.info("attention-map loss: switching %s to eager attention (it returns the maps)", type(target).__name__)
                    target.set_attn_implementation("eager")
        if data_collator is None:
            pad = getattr(processing_class, "pad_token_id", None)
            if pad is None:
                pad = getattr(model.config, "pad_token_id", None)
            data_collator = DistillationCollator(pad if pad is not None else 0)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator, **kwargs)
        self.loss_is_scaled_for_ga = True
        self.components = [k for k, on in (("ce", args.alpha < 1), ("soft", args.alpha > 0 or args.on_policy_fraction > 0),
                                           ("hidden", args.hidden_loss_weight > 0), ("attention", args.attention_loss_weight > 0)) if on]
        self._train_sums = torch.zeros(len(self.components))
        self._train_last_step = 0
        self._eval_sums = torch.zeros(len(self.components) + 1)  # the last slot counts tokens

    # -- set-up checks ---------------------------------------------------------------------------------------
    @staticmethod
    def _check_offline(args, meta, model) -> None:
        if abs(meta["temperature"] - args.temperature) > 1e-12:
            raise ValueError(f"the teacher-logit cache was computed at temperature {meta['temperature']}, the run uses "
                             f"{args.temperature}: precompute it again with temperature={args.temperature}")
        if args.top_k is not None and args.top_k > meta["top_k"]:
            raise ValueError(f"top_k={args.top_k} exceeds the {meta['top_k']} teacher ids the cache holds")
        vocab = model.config.vocab_size
        if meta["vocab_size"] != vocab:
            raise ValueError(f"the cache was computed over {meta['vocab_size']} ids, the student has {vocab}")

    @staticmethod
    def _check_vocab(student, teacher) -> None:
        vs, vt = student.config.vocab_size, teacher.config.vocab_size
        if vt < vs:
            raise ValueError(f"the teacher's vocabulary ({vt}) is smaller than the student's ({vs}): logit distillation "
                             "needs a shared tokenizer (the teacher's may extend the student's)")
        if vt > vs:
            logger.info("teacher vocabulary %d extends the student's %d: comparing on the shared ids", vt, vs)

    def _setup_hidden(self, model, teacher, args):
        self._has_projector = False
        if args.hidden_loss_weight == 0 and args.attention_loss_weight == 0:
            return []
        if not _supports_hidden_states(teacher):
            raise ValueError(
                f"hidden-state distillation needs a teacher that returns hidden states (output_hidden_states=True); "
                f"{type(teacher).__name__}.forward does not take output_hidden_states: set hidden_loss_weight=0"
            )
        ns, nt = _n_blocks(model), _n_blocks(teacher)
        pairs = args.layer_map or default_layer_map(ns, nt)
        for i, j in pairs:
            if not (0 <= i <= ns and 0 <= j <= nt):
                raise ValueError(
                    f"layer_map pair [{i}, {j}] names a layer that does not exist: the student has hidden states "
                    f"0..{ns} and the teacher 0..{nt} (0 = embedding output, i = output of block i)"
                )
        if args.attention_loss_weight > 0 and not any(i > 0 and j > 0 for i, j in pairs):
            raise ValueError("the attention-map loss needs layer_map pairs of blocks (indices >= 1)")
        ds, dt = _hidden_width(model), _hidden_width(teacher)
        if args.hidden_loss_weight > 0 and ds != dt and not hasattr(model, PROJECTOR_NAME):
            model.add_module(PROJECTOR_NAME, HiddenProjector(len(pairs), ds, dt).to(model_device(model)))
            if isinstance(model, PreTrainedModel):  # a PeftModel saves only its adapter anyway
                model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) | {
                    k for k in model.state_dict() if k.startswith(PROJECTOR_NAME + ".")
                }
            logger.info("hidden-state loss: %d projections %d -> %d, trained with the student", len(pairs), ds, dt)
        projector = getattr(model, PROJECTOR_NAME, None)
        self._has_projector = projector is not None
        if projector is not None:
            if len(projector) != len(pairs):
                raise ValueError(f"the student already carries {len(projector)} projections from an earlier run, "
                                 f"this layer_map has {len(pairs)} pairs: use the same layer_map (or a fresh student)")
            # Φ runs inside the student's forward (a forward hook), so DDP sees its parameters used there; a
            # later trainer on the same student replaces the hook of an earlier one.
            if getattr(projector, "hook", None) is not None:
                projector.hook.remove()
            projector.hook = model.register_forward_hook(self._project_hidden)
        return [tuple(p) for p in pairs]

    def _project_hidden(self, module, args, output):
        # The projections ride at the end of the output's hidden_states: DDP (find_unused_parameters) looks for
        # the parameters the outputs depend on and would count Φ as unused if it were kept on the side, and it
        # rebuilds the output dataclass, so no new field can be added.
        if getattr(self, "_capture_hidden", False) and getattr(output, "hidden_states", None) is not None:
            projector = getattr(module, PROJECTOR_NAME)
            projected = tuple(projector[p](output.hidden_states[i]) for p, (i, _) in enumerate(self.layer_map))
            output["hidden_states"] = tuple(output.hidden_states) + projected
        return output

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, "labels", *TEACHER_COLUMNS]))

    # -- batches ---------------------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if self.args.on_policy_fraction > 0:
            for idx, batch in enumerate(batch_samples):
                draw = random.Random(f"{self.args.seed}-{self.state.global_step}-{idx}")
                if draw.random() < self.args.on_policy_fraction:
                    batch_samples[idx] = self.on_policy_batch(batch, seed=draw.randrange(2**31))
        return batch_samples, self._count_tokens(batch_samples, device)

    def _count_tokens(self, batch_samples, device):
        if not batch_samples:
            return None
        n = sum(causal_token_mask(b["labels"]).sum() for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            n = self.accelerator.gather(n).sum()
        return n

    @torch.no_grad()
    def on_policy_batch(self, batch: dict, seed: int) -> dict:
        """A batch whose continuations the student samples: each row's first ``on_policy_prompt_length`` tokens
        (default half the row) as the prompt, ``max_new_tokens`` sampled tokens (default the rest), the prompt
        and anything after an end-of-sequence token masked out of ``labels``."""
        args = self.args
        ids, am = batch["input_ids"], batch["attention_mask"]
        p = args.on_policy_prompt_length or max(1, ids.shape[1] // 2)
        n_new = args.max_new_tokens or max(1, ids.shape[1] - p)
        student = self.accelerator.unwrap_model(self.model)
        device = model_device(student)
        pad = self.data_collator.pad_token_id if hasattr(self.data_collator, "pad_token_id") else 0
        # Left-pad the prompts (rows shorter than p keep what they have) so generation continues each one.
        lengths = am.sum(1).clamp(max=p).tolist()
        width = max(lengths)
        prompt = ids.new_full((ids.shape[0], width), pad)
        prompt_mask = torch.zeros_like(prompt)
        for r, n in enumerate(lengths):
            prompt[r, width - n :] = ids[r, :n]
            prompt_mask[r, width - n :] = 1
        sample = args.generation_temperature > 0
        gen_kw = {"do_sample": sample, "max_new_tokens": n_new, "pad_token_id": pad}
        if sample:
            gen_kw.update(temperature=args.generation_temperature, top_p=args.generation_top_p, top_k=0)
        with eval_mode(student), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = student.generate(input_ids=prompt.to(device), attention_mask=prompt_mask.to(device), **gen_kw).cpu()
        new = out[:, width:]
        new_mask = torch.ones_like(new)
        eos = getattr(student.generation_config, "eos_token_id", None)
        if eos is not None:
            is_eos = torch.isin(new, torch.as_tensor(eos).reshape(-1))
            after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
            new_mask = (~after).long()
        attention_mask = torch.cat([prompt_mask, new_mask], dim=1)
        labels = torch.cat([torch.full_like(prompt, -100), new.masked_fill(new_mask == 0, -100)], dim=1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        return {"input_ids": out, "attention_mask": attention_mask, "labels": labels, "position_ids": position_ids,
                "on_policy": True}

    # -- the loss --------------------------------------------------------------------------------------------
    def _teacher_forward(self, inputs: dict, want_hidden: bool, want_attn: bool):
        device = model_device(self.teacher)
        t_in = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        kw = {}
        if want_hidden:
            kw["output_hidden_states"] = True
        if want_attn:
            kw["output_attentions"] = True
        autocast = torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            out = self.teacher(**t_in, **kw)
        if want_hidden and getattr(out, "hidden_states", None) is None:
            raise ValueError(f"the teacher ({type(self.teacher).__name__}) returned no hidden states: set hidden_loss_weight=0")
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        inputs = dict(inputs)
        on_policy = bool(inputs.pop("on_policy", False))
        labels = inputs.pop("labels")
        cached = {k: inputs.pop(k) for k in TEACHER_COLUMNS if k in inputs}
        if args.offline_logits is not None and not cached and args.alpha > 0:
            raise ValueError("offline_logits is set but the batch has no teacher_ids/teacher_logprobs: train on the "
                             "cache's dataset (train_dataset=None), or add those columns to yours")
        want_hidden = args.hidden_loss_weight > 0
        want_attn = args.attention_loss_weight > 0
        kw = {"use_cache": False}
        if want_hidden:
            kw["output_hidden_states"] = True
        if want_attn:
            kw["output_attentions"] = True
        self._capture_hidden = want_hidden
        try:
            outputs = model(**inputs, **kw)
        finally:
            self._capture_hidden = False
        mask = causal_token_mask(labels)
        n_items = num_items_in_batch if num_items_in_batch is not None else mask.sum()
        tokens = TokenSelection(mask)
        alpha = 1.0 if on_policy else args.alpha
        T = args.temperature
        s_logits = tokens.take(outputs.logits)
        # The student's log-probabilities, when a loss needs them (the full-vocabulary forward KL has its own
        # kernel, which also gives the CE at T = 1).
        full_fkl = alpha > 0 and args.loss_type == "forward_kl" and not cached and args.top_k is None
        s_logp = log_probs(s_logits, T) if alpha > 0 and args.loss_type != "mse" and not full_fkl else None
        sums = {}
        want_ce = "ce" in self.components and not on_policy  # on-policy labels are the student's own tokens: no CE
        targets = tokens.take(F.pad(labels[:, 1:], (0, 1), value=-100)) if want_ce else None
        fused_ce = want_ce and full_fkl and T == 1.0
        if want_ce and not fused_ce:
            logp = s_logp if s_logp is not None and T == 1.0 else log_probs(s_logits)
            sums["ce"] = tokens.sum(-logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1))
        t_out = None
        if alpha > 0 or want_hidden or want_attn:
            if cached:
                t_ids, t_logprobs = (tokens.take(F.pad(cached[k], (0, 0, 0, 1))) for k in TEACHER_COLUMNS)
                if args.top_k is not None and args.top_k < t_ids.shape[-1]:
                    t_ids, t_logprobs = t_ids[..., : args.top_k], t_logprobs[..., : args.top_k]
            else:
                t_out = self._teacher_forward(inputs, want_hidden, want_attn)
            if alpha > 0:
                if not cached:
                    t_logits = tokens.take(t_out.logits.to(s_logits.device))
                    t_logits = shared_vocab(s_logits, t_logits)
                if args.loss_type == "mse":
                    per_token = logits_mse(s_logits, t_logits, reduction="none")
                elif cached or args.top_k is not None:
                    if not cached:
                        t_ids, t_logprobs = teacher_topk(t_logits, args.top_k, T)
                    per_token = topk_divergence(s_logp, t_ids, t_logprobs, args.loss_type, args.beta) * T**2
                elif full_fkl:
                    per_token = None
                    weights = tokens.weights if tokens.dense else None
                    if fused_ce:
                        sums["soft"], sums["ce"] = forward_kl_sum(s_logits, t_logits, T, weights, reuse_teacher=True, targets=targets)
                    else:
                        sums["soft"] = forward_kl_sum(s_logits, t_logits, T, weights, reuse_teacher=True)
                else:
                    per_token = divergence(s_logp, log_probs(t_logits, T), args.loss_type, args.beta) * T**2
                if per_token is not None:
                    sums["soft"] = tokens.sum(per_token)
        if want_hidden:
            n = len(outputs.hidden_states) - len(self.layer_map) if self._has_projector else None
            states = outputs.hidden_states[n:] if n is not None else [outputs.hidden_states[i] for i, _ in self.layer_map]
            sums["hidden"] = self._hidden_loss(states, t_out.hidden_states, tokens)
        if want_attn:
            sums["attention"] = self._attention_loss(outputs.attentions, t_out.attentions, mask)
        weights = {"ce": 1.0 - alpha, "soft": alpha, "hidden": args.hidden_loss_weight, "attention": args.attention_loss_weight}
        scale = self.args.world_size if (args.average_tokens_across_devices and args.world_size > 1 and num_items_in_batch is not None) else 1
        loss = sum(weights[k] * v for k, v in sums.items()) * (scale / n_items)
        self._record(sums, n_items, scale, model.training)
        return (loss, outputs) if return_outputs else loss

    def _hidden_loss(self, s_states, t_states, tokens):
        """``s_states``: one student state per layer pair (projected to the teacher's width when they differ)."""
        total = 0.0
        for h_s, (_, j) in zip(s_states, self.layer_map, strict=True):
            h_t = t_states[j].to(h_s.device)
            per_token = hidden_state_loss(tokens.take(h_s), tokens.take(h_t), kind=self.args.hidden_loss_type, reduction="none")
            total = total + tokens.sum(per_token)
        return total / len(self.layer_map)

    def _attention_loss(self, s_attn, t_attn, mask):
        pairs = [(i, j) for i, j in self.layer_map if i > 0 and j > 0]
        total = 0.0
        for i, j in pairs:
            a_s, a_t = s_attn[i - 1], t_attn[j - 1].to(s_attn[i - 1].device)
            total = total + attention_map_loss(a_s[:, :, :-1], a_t[:, :, :-1], mask, reduction="sum")
        return total / len(pairs)

    # -- logging ---------------------------------------------------------------------------------------------
    def _record(self, sums: dict, n_items, scale, training: bool) -> None:
        values = torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float32).detach().cpu() for k in self.components])
        if training:
            self._train_sums += values * (scale / torch.as_tensor(n_items, dtype=torch.float32).cpu())
        else:
            self._eval_sums += torch.cat([values, torch.as_tensor(n_items, dtype=torch.float32).cpu().reshape(1)])

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs and self.components:
            steps = max(1, self.state.global_step - self._train_last_step)
            values = self._gather_mean(self._train_sums) / steps
            logs.update({f"{k}_loss": round(float(v), 6) for k, v in zip(self.components, values, strict=True)})
            self._train_sums.zero_()
            self._train_last_step = self.state.global_step
        super().log(logs, start_time)

    def _gather_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.args.world_size > 1:
            return self.accelerator.gather(t.to(self.args.device)).reshape(self.args.world_size, -1).mean(0).cpu()
        return t

    def _gather_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.args.world_size > 1:
            return self.accelerator.gather(t.to(self.args.device)).reshape(self.args.world_size, -1).sum(0).cpu()
        return t

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        self._eval_sums.zero_()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        sums = self._gather_sum(self._eval_sums)
        if sums[-1] > 0:
            for k, v in zip(self.components, sums[:-1] / sums[-1], strict=True):
                output.metrics[f"{metric_key_prefix}_{k}_loss"] = float(v)
        return output

    # -- saving ----------------------------------------------------------------------------------------------
    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        # Only safetensors and JSON on disk: the arguments as JSON instead of Trainer's pickled training_args.bin.
        bin_args = Path(output_dir) / "training_args.bin"
        if bin_args.is_file():
            bin_args.unlink()
        (Path(output_dir) / "training_args.json").write_text(self.args.to_json_string())
        projector = getattr(self.accelerator.unwrap_model(self.model), PROJECTOR_NAME, None)
        if projector is not None:
            from safetensors.torch import save_file

            state = {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
            save_file(state, os.path.join(output_dir, PROJECTOR_FILE), metadata={"layer_map": json.dumps(self.layer_map)})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        projector = getattr(target, PROJECTOR_NAME, None)
        path = Path(resume_from_checkpoint) / PROJECTOR_FILE
        if projector is not None and path.is_file():
            from safetensors.torch import load_file

            projector.load_state_dict(load_file(str(path), device=str(model_device(projector))))
