"""Structured pruning that shrinks the model: MLP channels, key/value head groups (with their query heads) and
whole decoder blocks, ranked on calibration activations, uniformly per layer.

The result is a standard model of the same architecture with a smaller ``intermediate_size`` /
``num_key_value_heads`` / ``num_attention_heads`` / ``num_hidden_layers`` and an explicit ``head_dim``: stock
transformers loads it without hf_compress. Recover its quality with the DistillationTrainer, the unpruned model
as teacher (``examples/prune_structured.py``, ``configs/prune-structured-distill.yaml``).

Scoring runs the whole model on the calibration windows once (a Taylor score needs the loss gradient anyway);
the surgery then slices each layer's weights in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..methods.structured import IMPORTANCE, ChannelStats, blocks_to_drop, group_scores, keep_top
from .layerwise import execution_device, find_blocks

logger = logging.get_logger(__name__)

__all__ = ["StructuredPruneConfig", "prune_structured"]


@dataclass
class StructuredPruneConfig:
    """What :func:`prune_structured` removes.

    Args:
        mlp_ratio: fraction of each MLP's intermediate channels kept, in (0, 1] (1 keeps the MLP whole).
        kv_heads: key/value heads kept per layer (each with its group of query heads); None keeps all.
        drop_blocks: whole decoder blocks removed (those whose output is most similar to their input).
        importance: channel and head score, ``"activation"`` (L2 norm of the activation) or ``"taylor"``
            (``|sum h * dL/dh|``, needs a backward pass per calibration batch).
        compensate: add the mean contribution of the removed channels/heads to the output projection's bias
            (the config then has ``mlp_bias`` / ``attention_bias``, which stock transformers reads).
        n_samples, seqlen, seed, dataset, tokenizer: the calibration windows, as :class:`~hf_compress.GPTQConfig`.
    """

    mlp_ratio: float = 1.0
    kv_heads: int | None = None
    drop_blocks: int = 0
    importance: str = "activation"
    compensate: bool = False
    n_samples: int = 128
    seqlen: int | None = None
    seed: int = 0
    dataset: Any = None
    tokenizer: Any = None

    def __post_init__(self):
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or not 0 < self.mlp_ratio <= 1:
            raise ValueError(f"mlp_ratio is the fraction of MLP channels kept and must be in (0, 1], got {self.mlp_ratio!r}")
        if self.kv_heads is not None and (isinstance(self.kv_heads, bool) or not isinstance(self.kv_heads, int) or self.kv_heads < 1):
            raise ValueError(f"kv_heads is the number of key/value heads kept and must be an integer >= 1, got {self.kv_heads!r}")
        if isinstance(self.drop_blocks, bool) or not isinstance(self.drop_blocks, int) or self.drop_blocks < 0:
            raise ValueError(f"drop_blocks must be an integer >= 0, got {self.drop_blocks!r}")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {list(IMPORTANCE)}, got {self.importance!r}")


def _parts(block: nn.Module):
    """``(mlp, attention)`` of a Llama-style block, or an error naming what is supported."""
    mlp, attn = getattr(block, "mlp", None), getattr(block, "self_attn", None)
    need = {"mlp": ("gate_proj", "up_proj", "down_proj"), "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj")}
    ok = all(isinstance(getattr(m, n, None), nn.Linear) for m, names in ((mlp, need["mlp"]), (attn, need["self_attn"])) for n in names)
    if not ok:
        raise ValueError(
            f"structured pruning handles Llama-style blocks (mlp.gate/up/down_proj and self_attn.q/k/v/o_proj as float "
            f"nn.Linear: Llama, Mistral, Qwen2 and the like); {type(block).__name__} is not one (or is already compressed)"
        )
    return mlp, attn


def _plan(config, cfg: StructuredPruneConfig) -> dict:
    """What survives, checked against the model before any work."""
    layers = config.num_hidden_layers
    if cfg.drop_blocks >= layers:
        raise ValueError(f"drop_blocks={cfg.drop_blocks} would remove every one of the {layers} blocks: keep at least one")
    inter = config.intermediate_size
    keep_mlp = round(cfg.mlp_ratio * inter)
    if keep_mlp < 1:
        raise ValueError(f"mlp_ratio={cfg.mlp_ratio} keeps no channel of the {inter}-wide MLP: raise it")
    kv = config.num_key_value_heads or config.num_attention_heads
    keep_kv = kv if cfg.kv_heads is None else cfg.kv_heads
    if keep_kv > kv:
        raise ValueError(f"kv_heads={cfg.kv_heads} is more than the model's {kv} key/value heads: pass 1..{kv}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"keep_mlp": keep_mlp, "kv": kv, "keep_kv": keep_kv, "group": config.num_attention_heads // kv, "head_dim": head_dim}


def _slice_linear(linear: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    """Keep rows (dim 0: output features) or columns (dim 1: input features) ``idx`` of ``linear`` in place."""
    idx = idx.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(dim, idx).contiguous(), requires_grad=linear.weight.requires_grad)
    if dim == 0:
        linear.out_features = idx.numel()
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, idx).contiguous(), requires_grad=linear.bias.requires_grad)
    else:
        linear.in_features = idx.numel()


def _compensate(linear: nn.Linear, removed: torch.Tensor, mean_input: torch.Tensor) -> None:
    """Fold the removed inputs' mean contribution into ``linear``'s bias (creating it)."""
    w = linear.weight.data
    delta = (w[:, removed.to(w.device)].double() @ mean_input[removed].to(w.device)).to(w.dtype)
    bias = linear.bias.data if linear.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    linear.bias = nn.Parameter(bias + delta, requires_grad=False)


def _ensure_bias(linear: nn.Linear) -> None:
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device), requires_grad=False)


@torch.no_grad()
def _collect(model, blocks, windows, cfg, device) -> tuple[list, list, torch.Tensor]:
    """One pass over the calibration windows: MLP and attention channel stats, and block cosines."""
    mlp_stats, attn_stats = [], []
    cos_sum = torch.zeros(len(blocks), dtype=torch.float64)
    cos_count = [0]
    handles = []
    taylor = cfg.importance == "taylor"

    def record(stats):
        def hook(module, args):
            x = args[0]
            stats.add(x)
            if taylor and x.requires_grad:
                x.register_hook(lambda g, x=x: stats.add_grad(x, g))
        return hook

    def cosine(i):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            c = torch.nn.functional.cosine_similarity(h_in.detach().double(), h_out.detach().double(), dim=-1)
            cos_sum[i] += c.sum().cpu()
            if i == 0:
                cos_count[0] += c.numel()
        return hook

    for i, block in enumerate(blocks):
        mlp, attn = _parts(block)
        mlp_stats.append(ChannelStats(mlp.down_proj.in_features))
        attn_stats.append(ChannelStats(attn.o_proj.in_features))
        handles.append(mlp.down_proj.register_forward_pre_hook(record(mlp_stats[-1])))
        handles.append(attn.o_proj.register_forward_pre_hook(record(attn_stats[-1])))
        handles.append(block.register_forward_hook(cosine(i), with_kwargs=True))
    if taylor:  # activations need a graph: make the embeddings' output require grad (parameters stay frozen)
        emb = model.get_input_embeddings()
        handles.append(emb.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(windows.split(max(1, 2048 // windows.shape[1])), desc="structured scores", unit="batch"):
            ids = batch.to(device)
            if taylor:
                with torch.enable_grad():
                    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            else:
                model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        if taylor:
            model.zero_grad(set_to_none=True)
    return mlp_stats, attn_stats, cos_sum / max(1, cos_count[0])


def prune_structured(model: nn.Module, config: StructuredPruneConfig) -> dict:
    """Prune ``model`` in place as ``config`` says; returns a report (kept channels/heads, dropped blocks, parameters).

    ``model.config`` is updated so that ``save_pretrained`` writes a standard config of the same architecture."""
    from .calibration import calibration_tokens

    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise ValueError("structured pruning works on a float model: prune first, then quantize the smaller model")
    mcfg = model.config
    prefix, blocks = find_blocks(model)
    for block in blocks:
        _parts(block)
    plan = _plan(mcfg, config)
    windows = calibration_tokens(model, config)
    before = sum(p.numel() for p in model.parameters())
    device = execution_device(model)
    mlp_stats, attn_stats, similarity = _collect(model, blocks, windows, config, device)
    drop = blocks_to_drop(similarity, config.drop_blocks)

    hd, group, keep_kv = plan["head_dim"], plan["group"], plan["keep_kv"]
    for block, ms, ats in zip(blocks, mlp_stats, attn_stats, strict=True):
        mlp, attn = _parts(block)
        if plan["keep_mlp"] < ms.sq.numel():
            keep = keep_top(ms.scores(config.importance), plan["keep_mlp"])
            removed = torch.ones(ms.sq.numel(), dtype=torch.bool)
            removed[keep] = False
            if config.compensate:
                _compensate(mlp.down_proj, removed.nonzero().squeeze(1), ms.mean())
                _ensure_bias(mlp.gate_proj)
                _ensure_bias(mlp.up_proj)
            for lin, dim in ((mlp.gate_proj, 0), (mlp.up_proj, 0), (mlp.down_proj, 1)):
                _slice_linear(lin, keep, dim)
            mlp.intermediate_size = plan["keep_mlp"]
        if keep_kv < plan["kv"]:
            # one score per key/value group: the norm of its query heads' attention outputs
            groups = keep_top(group_scores(ats.scores(config.importance), plan["kv"]), keep_kv)
            q_idx = torch.cat([torch.arange(g * group * hd, (g + 1) * group * hd) for g in groups.tolist()])
            kv_idx = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups.tolist()])
            if config.compensate:
                removed = torch.ones(attn.o_proj.in_features, dtype=torch.bool)
                removed[q_idx] = False
                _compensate(attn.o_proj, removed.nonzero().squeeze(1), ats.mean())
                for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                    _ensure_bias(lin)
            _slice_linear(attn.q_proj, q_idx, 0)
            _slice_linear(attn.k_proj, kv_idx, 0)
            _slice_linear(attn.v_proj, kv_idx, 0)
            _slice_linear(attn.o_proj, q_idx, 1)
            attn.head_dim = hd
    if drop:
        kept_blocks = [b for i, b in enumerate(blocks) if i not in set(drop)]
        for new_idx, block in enumerate(kept_blocks):
            for m in block.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = new_idx
        parent = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else model
        setattr(parent, prefix.rpartition(".")[2], nn.ModuleList(kept_blocks))
        if isinstance(getattr(mcfg, "layer_types", None), list):
            mcfg.layer_types = [t for i, t in enumerate(mcfg.layer_types) if i not in set(drop)]
        mcfg.num_hidden_layers = len(kept_blocks)
    mcfg.intermediate_size = plan["keep_mlp"]
    mcfg.num_key_value_heads = keep_kv
    mcfg.num_attention_heads = keep_kv * group
    mcfg.head_dim = hd  # explicit: hidden_size // num_attention_heads no longer gives it
    if config.compensate:
        if plan["keep_mlp"] < mlp_stats[0].sq.numel():
            mcfg.mlp_bias = True
        if keep_kv < plan["kv"]:
            mcfg.attention_bias = True
    after = sum(p.numel() for p in model.parameters())
    report = {"intermediate_size": plan["keep_mlp"], "num_key_value_heads": keep_kv, "num_attention_heads": keep_kv * group,
              "dropped_blocks": drop, "block_similarity": [round(v, 4) for v in similarity.tolist()],
              "parameters_before": before, "parameters_after": after}
    logger.info("structured pruning: %s -> %s parameters (%.1f%%); MLP %d, kv heads %d, dropped blocks %s",
                f"{before:,}", f"{after:,}", 100 * after / before, plan["keep_mlp"], keep_kv, drop)
    return report
