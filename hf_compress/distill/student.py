"""Students made from a teacher: the same architecture with fewer blocks, random or initialised from the
teacher's own blocks (embeddings, final norm and head copied), a common start for distillation."""

from __future__ import annotations

import copy

import torch
from transformers.utils import logging

from ..integrations.layerwise import find_blocks

logger = logging.get_logger(__name__)

__all__ = ["student_from_teacher"]


def student_from_teacher(teacher, layers: list[int] | int, *, init: str = "teacher", seed: int = 0, **config_overrides):
    """A student of ``teacher``'s architecture with ``len(layers)`` blocks.

    ``layers``: the teacher blocks to copy, in order (an int ``n`` picks ``n`` blocks spread evenly, first
    and last included). ``init="teacher"`` copies those blocks and every weight outside the blocks;
    ``init="random"`` initialises the same shape from ``seed`` (``config_overrides``, e.g. ``hidden_size``,
    are then allowed). The student is a fresh ``PreTrainedModel`` in float32 on CPU."""
    _, teacher_blocks = find_blocks(teacher)
    n_teacher = len(teacher_blocks)
    if isinstance(layers, int):
        if not 1 <= layers <= n_teacher:
            raise ValueError(f"a student needs 1..{n_teacher} blocks (the teacher has {n_teacher}), got {layers}")
        layers = [round(i * (n_teacher - 1) / max(layers - 1, 1)) for i in range(layers)] if layers > 1 else [0]
    layers = list(layers)
    bad = [i for i in layers if not 0 <= i < n_teacher]
    if not layers or bad:
        raise ValueError(f"student layers {layers} must be teacher blocks 0..{n_teacher - 1}")
    if init not in ("teacher", "random"):
        raise ValueError(f"init must be 'teacher' or 'random', got {init!r}")
    if init == "teacher" and config_overrides:
        raise ValueError(f"config overrides {sorted(config_overrides)} change shapes: use init='random' with them")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    for k, v in config_overrides.items():
        setattr(config, k, v)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = type(teacher)(config).float()
    if init == "random":
        return student.eval()
    prefix, _ = find_blocks(student)
    teacher_state = teacher.state_dict()
    state = {}
    for key in student.state_dict():
        src = key
        if key.startswith(prefix + "."):
            idx, rest = key[len(prefix) + 1 :].split(".", 1)
            src = f"{prefix}.{layers[int(idx)]}.{rest}"
        if src not in teacher_state:
            raise ValueError(f"cannot initialise the student's {key}: the teacher has no {src} (a quantized teacher? pass a float one)")
        state[key] = teacher_state[src].detach().float().clone()
    student.load_state_dict(state, strict=True)
    logger.info("student with teacher blocks %s of %d", layers, n_teacher)
    return student.eval()


def resolve_student(spec: str, teacher, *, seed: int = 0):
    """The student a CLI/recipe names: ``teacher:0,5`` (the teacher's blocks 0 and 5), ``teacher:2`` (two
    blocks spread evenly), ``random:2`` (the teacher's architecture with 2 blocks, random weights), or a
    folder / Hub id (its weights; a folder with only ``config.json`` is initialised randomly from ``seed``)."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    kind, _, rest = spec.partition(":")
    if kind in ("teacher", "random") and rest:
        try:
            layers = [int(x) for x in rest.split(",")]
        except ValueError:
            raise ValueError(f"student spec {spec!r}: after '{kind}:' give block indices like 0,5 or a count like 2") from None
        layers = layers[0] if len(layers) == 1 else layers  # one number is a count of blocks
        return student_from_teacher(teacher, layers, init=kind, seed=seed)
    from ..integrations.loading import check_model_path

    check_model_path(spec)
    p = Path(spec)
    if p.is_dir() and not any(p.glob("*.safetensors")):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec)).float().eval()
    return AutoModelForCausalLM.from_pretrained(spec).eval()
