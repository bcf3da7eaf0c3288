"""TRL's two distillation trainers on the exact setup of ``benchmarks/distill.py``, for a side-by-side row.

:func:`run_trl` trains a student in place with ``trl.DistillationTrainer`` (``kind="trl-distillation"``) or
``trl.experimental.gkd.GKDTrainer`` (``kind="trl-gkd"``) off-policy, on the same fixed-length token chunks our
trainer sees, and returns the wall seconds of every optimizer step.

How the plain-text chunks are fed (the ids are never re-tokenized, and no chat template is involved):

- GKD: its own collator, ``DataCollatorForChatML``, has a pre-tokenized path: a row with ``input_ids`` and a
  ``completion_mask`` is used as is, the prompt being the tokens before the first 1 of the mask (a ``prompt``
  column must exist but is not tokenized on that path). Each chunk becomes ``input_ids`` = the chunk,
  ``completion_mask`` = ``[0, 1, ..., 1]``: token 0 is the one-token "prompt" (the collator refuses an empty
  prompt) and tokens 1..L-1 are the completion, so the loss covers positions 0..L-2, as ours does (the
  causal shift leaves the last position without a target in both). ``lmbda=0`` and ``seq_kd=False``: nothing
  is ever generated.
- Distillation: TRL 1.16's ``DistillationTrainer`` is on-policy only. It has no ``lmbda``; every step its
  ``_generate`` tokenizes the ``prompt`` column and samples the completion from the student. A subclass
  overrides ``_generate`` alone to return, instead, prompt = token 0 and completion = tokens 1..L-1 of the
  chunk (the ``prompt`` column carries the chunk's ids). Everything after it is TRL's own: the padding,
  ``completion_mask`` and token count of ``_generate_and_score_completions``, the sampler, and the loss of
  ``_compute_loss``, which runs both backbones on prompt+completion (the chunk) and projects the hidden
  states of positions 0..L-2 through each model's ``lm_head`` in ``ChunkedDivergenceFunction``.

Both trainers get the same TrainingArguments: AdamW (``adamw_torch``), the caller's schedule (constant, no warm-up by default),
fp32 on the CPU, no gradient checkpointing (TRL turns it and bf16 on by default), one micro-batch per step.
"""

from __future__ import annotations

import math
import time

KINDS = ("trl-distillation", "trl-gkd")

__all__ = ["KINDS", "make_trainer", "run_trl"]


def _step_timer_class():
    # Built on first use so that importing this module does not import transformers
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall seconds of each optimizer step: ``on_step_begin`` to ``on_step_end`` (forward, backward, clipping,
        optimizer and scheduler step; the data loader's fetch and the logging fall outside)."""

        def __init__(self):
            self.seconds: list[float] = []
            self._start = None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer


def _chunk_ids(chunks) -> list[list[int]]:
    """The chunks' token ids, checked to be what both TRL feeds assume: no padding, labels == input_ids."""
    ids = [list(map(int, r)) for r in chunks["input_ids"]]
    if len({len(r) for r in ids}) != 1 or len(ids[0]) < 2:
        raise ValueError("run_trl expects fixed-length chunks of at least 2 tokens")
    if "attention_mask" in chunks.column_names and any(0 in m for m in chunks["attention_mask"]):
        # Padding would need position ids (GKD's collator pads on the left) and is not part of our setup
        raise ValueError("run_trl expects unpadded chunks (attention_mask all ones)")
    if "labels" in chunks.column_names and [list(map(int, r)) for r in chunks["labels"]] != ids:
        raise ValueError("run_trl expects labels == input_ids: TRL's loss ignores a labels column")
    return ids


def _common_args(steps, batch_size, learning_rate, temperature, beta, seed, output_dir, schedule) -> dict:
    return {
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": learning_rate,
        "lr_scheduler_type": schedule[0],
        "warmup_steps": schedule[1],
        "optim": "adamw_torch",
        "seed": seed,
        "temperature": temperature,
        "beta": beta,
        # TRL's configs default to bf16 and gradient checkpointing; ours trains in fp32 without either
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,  # one logged loss per step, after on_step_end so outside the timed span
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }


def _off_policy_distillation_trainer():
    from trl import DistillationTrainer

    class OffPolicyDistillationTrainer(DistillationTrainer):
        """``DistillationTrainer`` whose completions are the dataset's tokens instead of student samples."""

        def _generate(self, prompts: list):
            # `prompts` is the `prompt` column: the chunk's ids. Same return as the parent's `_generate`:
            # (prompt_ids, completion_ids, tool_mask, images, tool_images); no tools, no images.
            prompt_ids = [list(p[:1]) for p in prompts]
            completion_ids = [list(p[1:]) for p in prompts]
            return prompt_ids, completion_ids, None, None, []

    return OffPolicyDistillationTrainer


def make_trainer(
    kind: str,
    teacher,
    student,
    chunks,
    tokenizer,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    temperature: float,
    beta: float,
    seed: int,
    output_dir: str,
    lr_scheduler_type: str = "constant",
    warmup_steps: int = 0,
):
    """``(trainer, timer)``: the TRL trainer of ``kind`` set up as :func:`run_trl` describes, not yet trained,
    and the step-timer callback it carries (``timer.seconds``)."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    ids = _chunk_ids(chunks)
    timer = _step_timer_class()()
    common = _common_args(steps, batch_size, learning_rate, temperature, beta, seed, output_dir, (lr_scheduler_type, warmup_steps))

    if kind == "trl-distillation":
        from trl import DistillationConfig

        args = DistillationConfig(
            **common,
            max_completion_length=len(ids[0]) - 1,  # not used: nothing is generated
            use_vllm=False,
            log_completions=False,
        )
        train = Dataset.from_dict({"prompt": ids})
        trainer_cls = _off_policy_distillation_trainer()
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(
            **common,
            lmbda=0.0,  # the student-generated share: none (training_step samples iff random.random() <= lmbda)
            seq_kd=False,  # no teacher generations either
            max_length=len(ids[0]),
        )
        n = len(ids[0])
        train = Dataset.from_dict(
            {
                "input_ids": ids,
                "attention_mask": [[1] * n] * len(ids),
                "completion_mask": [[0] + [1] * (n - 1)] * len(ids),
                # Read (as `formatted_prompt`) before the pre-tokenized branch, unused on it; a missing column would
                # send the collator to apply_chat_template on `messages`
                "prompt": [""] * len(ids),
            }
        )
        trainer_cls = GKDTrainer
    trainer = trainer_cls(model=student, teacher_model=teacher, args=args, train_dataset=train, processing_class=tokenizer,
                          callbacks=[timer])
    # With disable_tqdm, Trainer prints every log dict to stdout (PrinterCallback); the losses stay in
    # trainer.state.log_history, and the benchmark's stdout is for its tables
    trainer.remove_callback(PrinterCallback)
    return trainer, timer


def _loss_note(kind: str, temperature: float, beta: float) -> str:
    div = {0.0: "forward KL(teacher || student)", 1.0: "reverse KL(student || teacher)"}.get(
        float(beta), f"generalized JSD with beta={beta} (mixture (1-beta)*p_student + beta*p_teacher)"
    )
    if kind == "trl-distillation":
        return (
            f"TRL {div} (beta=0 forward KL, beta=1 reverse KL) at temperature {temperature} on both softmaxes, "
            "not multiplied by T^2, summed over the vocabulary and averaged over the completion tokens of the "
            "batch (positions 0..L-2 of each chunk)"
        )
    t_note = (
        ""
        if temperature == 1.0
        else (
            f"; GKDConfig.temperature={temperature} only sets the sampling temperature, so this loss is not at T={temperature}"
        )
    )
    return (
        f"TRL {div} (beta=0 forward KL, beta=1 reverse KL) at temperature 1: compute_loss calls "
        "generalized_jsd_loss without its temperature, not multiplied by T^2, summed over the vocabulary and "
        f"averaged over the labelled next-token positions (0..L-2 of each chunk){t_note}"
    )


def run_trl(kind: str, teacher, student, chunks, tokenizer, **settings) -> dict:
    """kind: "trl-distillation" (trl.trainer DistillationTrainer / DistillationConfig in trl 1.16) or
    "trl-gkd" (trl.experimental.gkd GKDTrainer / GKDConfig). Trains `student` in place, off-policy
    (lmbda=0: no student generations), on the chunks, with :func:`make_trainer`'s keyword settings; returns
    {"step_seconds": [per optimizer step wall seconds], "how_fed": "<how plain text was fed>",
    "loss_note": "<which divergence/beta/temperature TRL computed>", "losses": [the loss logged at each step]}."""
    trainer, timer = make_trainer(kind, teacher, student, chunks, tokenizer, **settings)
    steps, temperature, beta = settings["steps"], settings["temperature"], settings["beta"]
    trainer.train()
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    if len(timer.seconds) != steps:
        raise RuntimeError(f"{kind}: {len(timer.seconds)} optimizer steps ran, {steps} were asked for")
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"{kind}: TRL logged a non-finite loss: {losses}")
    if kind == "trl-distillation":
        how_fed = (
            "pre-tokenized: TRL 1.16's DistillationTrainer is on-policy only (no lmbda), so a subclass "
            "overrides _generate alone to return each chunk's token 0 as the prompt and tokens 1..L-1 as the "
            "completion instead of sampling; TRL's batching, masking, token count and chunked loss are its own"
        )
    else:
        how_fed = (
            "pre-tokenized through GKD's own DataCollatorForChatML: input_ids = the chunk, completion_mask = "
            "[0, 1, ..., 1] (token 0 is the one-token prompt), an unused empty prompt column, no chat "
            "template; lmbda=0 and seq_kd=False, so nothing is generated"
        )
    return {
        "step_seconds": timer.seconds,
        "how_fed": how_fed,
        "loss_note": _loss_note(kind, temperature, beta),
        "losses": losses,
    }
