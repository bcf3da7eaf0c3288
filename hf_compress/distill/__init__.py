"""Knowledge distillation on transformers' Trainer: losses, the trainer and its arguments, offline teacher
logits, sequence-level (teacher-generation) datasets, and students made from a teacher's blocks."""

from .arguments import DistillationArguments
from .data import DistillationCollator, text_chunks
from .generation import format_prompt, generate_distillation_dataset, tokenize_generations
from .offline import load_teacher_logits, precompute_teacher_logits
from .student import student_from_teacher
from .trainer import DistillationTrainer

__all__ = [
    "DistillationArguments",
    "DistillationCollator",
    "DistillationTrainer",
    "format_prompt",
    "generate_distillation_dataset",
    "load_teacher_logits",
    "precompute_teacher_logits",
    "student_from_teacher",
    "text_chunks",
    "tokenize_generations",
]
