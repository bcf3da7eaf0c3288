"""Outlier features: an exact reparametrisation of a Llama-style causal LM whose linear inputs carry outliers.

Large LLMs have a few hidden dimensions whose activations are 20-100x larger than the rest, in every layer
(they persist through the residual stream); that is what makes LLM.int8 / W8A8 activation quantization hard.
A small model trained from scratch has none. :func:`add_outlier_features` puts them in without changing the
float function: in every decoder layer it multiplies ``n_channels`` entries of ``input_layernorm.weight``
by a factor ``f`` (so the normed activations entering ``self_attn.{q,k,v}_proj`` are ``f`` times larger in
those channels) and divides the matching input columns of ``q/k/v_proj.weight`` by ``f``; likewise
``post_attention_layernorm.weight`` and ``mlp.{gate,up}_proj.weight``. The residual stream itself is not
touched. Up to float rounding (one rounding per changed weight) logits and perplexity are unchanged.

    python benchmarks/outliers.py --output DIR   # writes the outlier variant of pydoc-llama-6m to DIR

prints a markdown table (fp32 perplexity of both models on pydoc-heldout.txt, largest |activation| entering
layer 0's q_proj in the outlier channels and the others) and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent

# (norm, linears fed by that norm's output), attribute paths relative to a decoder layer
_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
_REQUIRED = tuple(p for norm, linears in _GROUPS for p in (norm, *linears))


def _get(module: nn.Module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, ModuleList)`` of the decoder layers: the first ``nn.ModuleList`` (in module order)
    with ``config.num_hidden_layers`` entries, each having ``input_layernorm``, ``self_attn.{q,k,v}_proj``,
    ``post_attention_layernorm`` and ``mlp.{gate,up}_proj`` (Llama, Qwen2, Mistral...). ValueError naming what
    is missing otherwise."""
    arch = type(model).__name__
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n_layers is not None:
        lists = [(n, m) for n, m in lists if len(m) == n_layers] or lists
    if not lists:
        raise ValueError(f"add_outlier_features: no decoder layer list (nn.ModuleList) found in {arch}")
    closest = None
    for name, layers in lists:
        missing = [p for p in _REQUIRED if _get(layers[0], p) is None]
        if not missing:
            bad = [f"{name}.{i}" for i, layer in enumerate(layers) if any(_get(layer, p) is None for p in _REQUIRED)]
            if bad:
                raise ValueError(f"add_outlier_features: decoder layers {bad} of {arch} lack the Llama-style modules")
            return name, layers
        if closest is None:
            closest = (name, type(layers[0]).__name__, missing)
    name, layer_type, missing = closest
    raise ValueError(
        f"add_outlier_features supports Llama-style decoders (Llama, Qwen2, Mistral): {arch}'s layers "
        f"({name}.*, {layer_type}) have no {', '.join(missing)}; needed per layer: {', '.join(_REQUIRED)}"
    )


def _check_weights(layers: nn.ModuleList, name: str, hidden: int) -> None:
    for i, layer in enumerate(layers):
        for norm_path, linear_paths in _GROUPS:
            w = getattr(_get(layer, norm_path), "weight", None)
            if not isinstance(w, torch.Tensor) or w.shape != (hidden,) or not w.is_floating_point() or w.is_meta:
                raise ValueError(
                    f"add_outlier_features: {name}.{i}.{norm_path}.weight must be a float tensor of shape ({hidden},), "
                    f"got {None if w is None else (tuple(w.shape), w.dtype, w.device)}"
                )
            for p in linear_paths:
                w = getattr(_get(layer, p), "weight", None)
                if (
                    not isinstance(w, torch.Tensor)
                    or w.dim() != 2
                    or w.shape[1] != hidden
                    or not w.is_floating_point()
                    or w.is_meta
                ):
                    raise ValueError(
                        f"add_outlier_features: {name}.{i}.{p}.weight must be a float [out, {hidden}] tensor "
                        f"(an unquantized nn.Linear), got {None if w is None else (tuple(w.shape), w.dtype, w.device)}"
                    )


def _scale_(t: torch.Tensor, index, factors: torch.Tensor, dim: int, divide: bool) -> None:
    """``t[..., index] *= factors`` (or ``/=``) along ``dim``, computed in float64 and rounded once to t's dtype."""
    sub = t.index_select(dim, index).double()
    shape = [1] * t.dim()
    shape[dim] = -1
    f = factors.view(shape)
    t.index_copy_(dim, index, (sub / f if divide else sub * f).to(t.dtype))


def _norm_is_weight_times_normed(norm: nn.Module, hidden: int) -> bool:
    """Probe: does scaling ``norm.weight`` (and ``norm.bias``) channels scale the output channels the same way?
    False for norms of the form ``x * (1 + weight)`` (Gemma) or that mix channels after the weight."""
    w = norm.weight
    g = torch.Generator().manual_seed(1234)
    probe = torch.randn(3, hidden, generator=g, dtype=torch.float64).to(device=w.device, dtype=w.dtype)
    scale = torch.full((hidden,), 1.0, dtype=torch.float64)
    scale[0] = 2.0  # powers of two: exact in any float dtype
    scale[-1] = 0.5
    idx = torch.tensor([0, hidden - 1], device=w.device)
    saved = [(t, t.detach().clone()) for t in (w, getattr(norm, "bias", None)) if isinstance(t, torch.Tensor)]
    try:
        with torch.no_grad():
            ref = norm(probe).double()
            for t, _ in saved:
                _scale_(t.data, idx, scale[[0, -1]].to(w.device), 0, divide=False)
            out = norm(probe).double()
    finally:
        with torch.no_grad():
            for t, orig in saved:
                t.data.copy_(orig)
    expected = ref * scale.to(ref.device)
    return bool(torch.allclose(out, expected, rtol=1e-2, atol=1e-3 * float(ref.abs().max()) + 1e-6))


@torch.no_grad()
def add_outlier_features(model, n_channels: int = 4, low: float = 20.0, high: float = 60.0, seed: int = 0) -> dict:
    """Give a Llama-style causal LM (Llama, Qwen2, Mistral) outlier features in place, keeping its function.

    ``n_channels`` hidden channels (``torch.randperm`` with a generator seeded by ``seed``; the same channels
    in every layer) each get a factor drawn uniformly from ``[low, high]`` (rounded to a float32 value, so
    the returned numbers are exactly the ones applied). In every decoder layer those entries of
    ``input_layernorm.weight`` (and its bias, if any) are multiplied by the factor and the matching input
    columns of ``self_attn.{q,k,v}_proj.weight`` divided by it; likewise ``post_attention_layernorm`` and
    ``mlp.{gate,up}_proj``. Each changed weight is computed in float64 and rounded once to its own dtype, so
    the model is the same function up to float rounding (fp32 perplexity agrees to ~1e-6 relative; a bf16
    model picks up one bf16 rounding per changed weight).

    Returns ``{"channels": [int], "factors": [float], "layers": int}`` (channels sorted ascending, factors
    in the same order). ValueError for an unsupported architecture (naming the missing modules), an
    invalid argument, or a quantized/meta weight.
    """
    if not isinstance(n_channels, int) or n_channels < 1:
        raise ValueError(f"n_channels must be a positive int, got {n_channels!r}")
    if not (0 < low <= high):
        raise ValueError(f"need 0 < low <= high, got low={low}, high={high}")
    name, layers = find_decoder_layers(model)
    norm_w = getattr(_get(layers[0], "input_layernorm"), "weight", None)
    if not isinstance(norm_w, torch.Tensor) or norm_w.dim() != 1:
        raise ValueError(f"add_outlier_features: {name}.0.input_layernorm has no 1-d weight to scale")
    hidden = norm_w.shape[0]
    if n_channels > hidden:
        raise ValueError(f"n_channels={n_channels} exceeds the hidden size {hidden}")
    _check_weights(layers, name, hidden)
    for norm_path, _ in _GROUPS:
        norm = _get(layers[0], norm_path)
        if not _norm_is_weight_times_normed(norm, hidden):
            raise ValueError(
                f"add_outlier_features: {name}.0.{norm_path} ({type(norm).__name__}) is not of the form "
                "weight * normalized(x): scaling its weight would change the model"
            )

    g = torch.Generator().manual_seed(seed)
    channels = torch.randperm(hidden, generator=g)[:n_channels].sort().values
    factors = (low + (high - low) * torch.rand(n_channels, generator=g, dtype=torch.float64)).float().double()

    for layer in layers:
        for norm_path, linear_paths in _GROUPS:
            norm = _get(layer, norm_path)
            for t in (norm.weight, getattr(norm, "bias", None)):
                if isinstance(t, torch.Tensor):
                    _scale_(t.data, channels.to(t.device), factors.to(t.device), 0, divide=False)
            for p in linear_paths:
                w = _get(layer, p).weight
                _scale_(w.data, channels.to(w.device), factors.to(w.device), 1, divide=True)
    return {"channels": channels.tolist(), "factors": factors.tolist(), "layers": len(layers)}


# -- benchmark --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    import common

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output", default=None, help="folder to write the outlier model + tokenizer to (default: none)")
    p.add_argument(
        "--model", default=str(common.PYDOC_MODEL), help="Llama-style causal LM folder (default: %(default)s)"
    )
    p.add_argument("--text", default=str(common.HELDOUT), help="evaluation text (default: %(default)s)")
    p.add_argument(
        "--max-tokens", type=int, default=20000, help="perplexity over the first N tokens (default: %(default)s)"
    )
    p.add_argument("--seqlen", type=int, default=256, help="perplexity window length (default: %(default)s)")
    p.add_argument("--n-channels", type=int, default=4, help="outlier channels (default: %(default)s)")
    p.add_argument("--low", type=float, default=20.0, help="smallest factor (default: %(default)s)")
    p.add_argument("--high", type=float, default=60.0, help="largest factor (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="channel/factor seed (default: %(default)s)")
    p.add_argument("--out", default=str(common.default_out("outliers")), help="JSON output (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    return p.parse_args(argv)


class ChannelMax:
    """Forward pre-hook on a linear: running per-channel max of |input| over every call."""

    def __init__(self, module: nn.Module):
        self.amax = None
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        a = args[0].detach().abs().float().flatten(0, -2).amax(0)
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)

    def remove(self):
        self.handle.remove()


def measure(model, tok, text, channels: list[int], args) -> dict:
    """fp32 perplexity and the largest |input| of layer 0's q_proj (all, outlier channels, the others),
    captured during the perplexity pass."""
    from hf_compress.eval import perplexity_stats

    _, layers = find_decoder_layers(model)
    hook = ChannelMax(layers[0].self_attn.q_proj)
    try:
        st = perplexity_stats(model, tok, text, seqlen=args.seqlen, max_tokens=args.max_tokens, progress=False)
    finally:
        hook.remove()
    amax = hook.amax
    mask = torch.zeros_like(amax, dtype=torch.bool)
    mask[channels] = True
    return {
        "perplexity": st["perplexity"],
        "n_windows": st["n_windows"],
        "n_tokens": st["n_tokens"],
        "x_max_all": amax.max().item(),
        "x_max_outlier_ch": amax[mask].max().item(),
        "x_min_outlier_ch": amax[mask].min().item(),
        "x_max_other_ch": amax[~mask].max().item(),
    }


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE))
    import common

    args = parse_args(argv)
    common.setup(args.threads)
    from hf_compress.eval.perplexity import tokenize_windows
    from hf_compress.integrations.loading import load_model

    t_start = time.perf_counter()
    text = Path(args.text).read_text(encoding="utf-8")
    model, tok = load_model(args.model)
    model.float()
    info = add_outlier_features(model, n_channels=args.n_channels, low=args.low, high=args.high, seed=args.seed)
    orig, _ = load_model(args.model)
    orig.float()

    rows = [{"model": "original", **measure(orig, tok, text, info["channels"], args)}]
    ids = tokenize_windows(tok, text, seqlen=args.seqlen, max_tokens=args.max_tokens)[:4]
    with torch.inference_mode():
        logits_diff = orig(input_ids=ids, use_cache=False).logits - model(input_ids=ids, use_cache=False).logits
    logits_diff = logits_diff.abs().max().item()
    del orig
    rows.append({"model": "outliers", **measure(model, tok, text, info["channels"], args)})
    if args.output:
        out_dir = Path(args.output)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        reloaded, rtok = load_model(str(out_dir))
        rows.append(
            {"model": f"outliers, reloaded from {out_dir}", **measure(reloaded, rtok, text, info["channels"], args)}
        )
        del reloaded
    ref_ppl = rows[0]["perplexity"]
    for r in rows:
        r["ppl_rel_diff"] = r["perplexity"] / ref_ppl - 1.0

    print(
        f"## Outlier features: {Path(args.model).name}, {args.n_channels} channels x U[{args.low:g}, {args.high:g}] "
        f"(seed {args.seed}), {info['layers']} layers; fp32 perplexity on {Path(args.text).name} "
        f"(first {args.max_tokens:,} tokens, {args.seqlen}-token windows)\n"
    )
    print(
        "x = the input of layer 0's q_proj (the input_layernorm output) over all perplexity windows; x_max_all /\n"
        "x_max_outlier_ch / x_max_other_ch: largest |x| over all channels / the outlier channels / the others;\n"
        "x_min_outlier_ch: the smallest per-channel max |x| among the outlier channels.\n"
    )
    print(
        common.markdown_table(
            rows,
            [
                "model",
                "perplexity",
                "ppl_rel_diff",
                "x_max_all",
                "x_max_outlier_ch",
                "x_min_outlier_ch",
                "x_max_other_ch",
            ],
        )
    )
    print(
        "\n"
        + common.markdown_table(
            [{"channel": c, "factor": f} for c, f in zip(info["channels"], info["factors"], strict=True)],
            ["channel", "factor"],
        )
    )
    elapsed = time.perf_counter() - t_start
    saved = f"saved to {args.output}" if args.output else "not saved (pass --output DIR)"
    print(
        f"\nlargest |logit difference| outliers vs original on 4 windows: {logits_diff:.3g}; {saved}; {elapsed:.0f} s"
    )
    payload = {
        "benchmark": "outliers",
        "args": vars(args),
        "environment": common.environment(),
        "outliers": info,
        "logits_max_abs_diff": logits_diff,
        "rows": rows,
        "seconds": elapsed,
    }
    out = common.write_json(args.out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
