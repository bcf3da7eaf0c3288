"""Speed benchmark: batch-1 decode and prefill throughput of a 1B-shaped Llama on CPU.

A seeded, randomly initialised ``LlamaForCausalLM`` (hidden 2048, ``--layers`` 16, MLP 5632, vocabulary
32000, 32 attention heads, ``--kv-heads`` 4 key/value heads by default, untied output head) is saved once
to a temporary folder in float32 and in bfloat16; every configuration loads from there:

- ``fp32``, ``bf16``: the float models;
- ``hfc int8`` (RTN per-channel) and ``hfc int4 g128`` (RTN, plus ``--int4-groups``): hf_compress
  quantize-on-load, from the float32 checkpoint (``fp32 act``) and from the bfloat16 one (``bf16 act``);
- peers, applied to the bfloat16 model with the output head left in float as ours is: torchao weight-only
  int8 and int4 (g128) and optimum-quanto qint8 / qint4 (``quantize`` + ``freeze``).

All models stay loaded and are measured alternately, ``--rounds`` rounds in one process (the order rotates
every round); throughputs are medians over rounds and ratios are medians of the per-round ratios. Decode
tokens/s = ``(new_tokens - 1) / (t(generate new_tokens) - t(generate 1))`` with greedy, fixed-length
``generate`` (``min_new_tokens = max_new_tokens``, KV cache) from a ``--prompt-len`` prompt; prefill tokens/s
= ``--prefill-len`` / time of one forward (last position's logits only, as in generation).

Bandwidth bound: bytes read per decoded token (every weight the forward touches, as stored or as the
kernel prepared it, plus one embedding row; the KV cache is left out) divided by the memory bandwidth
measured with a 1 GiB ``dst.copy_(src)`` (read + write bytes), as a tokens/s ceiling and the fraction
achieved.

    python benchmarks/speed.py --quick      # 4 layers, short runs: a smoke test
    python benchmarks/speed.py              # the full 1B shape (about 9 minutes on 2 idle cores)
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FLOORS = {"int8_vs_bf16": 1.6, "int4_vs_bf16": 2.6, "vs_peer": 0.95}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 16; 4 with --quick)")
    p.add_argument(
        "--kv-heads", type=int, default=4, help="key/value heads: 4 (grouped-query, default) or 32 (multi-head)"
    )
    p.add_argument("--prompt-len", type=int, default=32, help="decode prompt length (default: %(default)s)")
    p.add_argument(
        "--new-tokens", type=int, default=None, help="decoded tokens per generate (default 64; 16 with --quick)"
    )
    p.add_argument("--prefill-len", type=int, default=None, help="prefill length (default 512; 128 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="measurement rounds (default 3; 2 with --quick)")
    p.add_argument(
        "--int4-groups", default="128", help="comma-separated int4 group sizes for hf_compress (default: %(default)s)"
    )
    p.add_argument(
        "--hf-dtypes",
        default="fp32,bf16",
        help="checkpoints hf_compress quantizes from, i.e. its activation dtype: fp32, bf16 or both (default: %(default)s)",
    )
    p.add_argument("--no-peers", action="store_true", help="skip torchao and optimum-quanto")
    p.add_argument(
        "--low-memory",
        action="store_true",
        help="keep only the model being measured in memory (reloads every model every round: slower)",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke test: 4 layers, 16 new tokens, 128-token prefill, 2 rounds"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument(
        "--out",
        default=None,
        help="JSON output (default: benchmarks/results/speed.json, speed-quick.json with --quick)",
    )
    p.add_argument("--strict", action="store_true", help="exit with status 1 if a floor FAILs")
    args = p.parse_args(argv)
    q = args.quick
    args.layers = args.layers or (4 if q else 16)
    args.new_tokens = args.new_tokens or (16 if q else 64)
    args.prefill_len = args.prefill_len or (128 if q else 512)
    args.rounds = args.rounds or (2 if q else 3)
    args.int4_groups = [int(g) for g in str(args.int4_groups).split(",") if g.strip()]
    args.hf_dtypes = [d.strip() for d in args.hf_dtypes.split(",") if d.strip()]
    bad = [d for d in args.hf_dtypes if d not in ("fp32", "bf16")]
    if bad:
        p.error(f"--hf-dtypes takes fp32 and/or bf16, got {bad}")
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode time is t(new_tokens) - t(1))")
    args.out = args.out or str(common.default_out("speed-quick" if q else "speed"))
    return args


# -- the model ------------------------------------------------------------------------------------------
def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )


def save_float_checkpoints(args, root: Path) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(llama_config(args)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    dirs = {"fp32": root / "fp32", "bf16": root / "bf16"}
    model.save_pretrained(dirs["fp32"])
    model.to(torch.bfloat16).save_pretrained(dirs["bf16"])
    del model
    import gc

    gc.collect()
    return {**dirs, "n_params": n_params}


# -- configurations -------------------------------------------------------------------------------------
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _load_float(dirs, src):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(dirs[src], dtype=getattr(torch, DTYPES[src])).eval()


def _load_hfc(dirs, src, bits, group_size):
    import torch
    from transformers import AutoModelForCausalLM

    import hf_compress

    cfg = hf_compress.RTNConfig(bits=bits, group_size=group_size)
    return AutoModelForCausalLM.from_pretrained(
        dirs[src], dtype=getattr(torch, DTYPES[src]), quantization_config=cfg
    ).eval()


def _skip_head(module, fqn: str) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) and fqn != "lm_head" and not fqn.endswith(".lm_head")


def _torchao(dirs, bits):
    with common.silence_fds():
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    model = _load_float(dirs, "bf16")
    if bits == 8:
        quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=_skip_head)
        return model, "Int8WeightOnlyConfig() (Int8Tensor, eager)"
    # int4 on CPU: torchao 0.18's Int4WeightOnlyConfig formats need CUDA/mslk ("plain": mslk, "plain_int32":
    # no CPU, "tile_packed_to_4d": CUDA); its CPU path is the prototype Int4OpaqueTensor
    # (aten._weight_int4pack_mm_for_cpu). Try the stable config with an "opaque" format first (newer torchao).
    errors = []
    try:
        from torchao.quantization import Int4WeightOnlyConfig

        cfg = Int4WeightOnlyConfig(group_size=128, int4_packing_format="opaque", set_inductor_config=False)
        quantize_(model, cfg, filter_fn=_skip_head)
        return model, 'Int4WeightOnlyConfig(group_size=128, int4_packing_format="opaque")'
    except Exception as e:  # noqa: BLE001
        errors.append(f"opaque: {type(e).__name__}: {e}")
    with common.silence_fds():
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=128, set_inductor_config=False), filter_fn=_skip_head)
    return model, "prototype PrototypeInt4WeightOnlyConfig(group_size=128) (Int4OpaqueTensor)"


def _quanto(dirs, bits):
    with common.silence_fds():
        from optimum.quanto import freeze, qint4, qint8, quantize
    model = _load_float(dirs, "bf16")
    quantize(model, weights=qint8 if bits == 8 else qint4, exclude=["lm_head"])
    freeze(model)
    return model, f"quantize(weights=qint{bits}, exclude=lm_head); freeze"


def configurations(args) -> list[dict]:
    cfgs = [
        {
            "name": "fp32",
            "kind": "float",
            "bits": 32,
            "dtype": "fp32",
            "load": lambda d: (_load_float(d, "fp32"), "float32"),
        },
        {
            "name": "bf16",
            "kind": "float",
            "bits": 16,
            "dtype": "bf16",
            "load": lambda d: (_load_float(d, "bf16"), "bfloat16"),
        },
    ]
    for src in args.hf_dtypes:
        cfgs.append(
            {
                "name": f"hfc int8 ({src} act)",
                "kind": "hfc",
                "bits": 8,
                "dtype": src,
                "load": lambda d, s=src: (_load_hfc(d, s, 8, -1), "RTNConfig(bits=8) per-channel"),
            }
        )
        for g in args.int4_groups:
            cfgs.append(
                {
                    "name": f"hfc int4 g{g} ({src} act)",
                    "kind": "hfc",
                    "bits": 4,
                    "dtype": src,
                    "group_size": g,
                    "load": lambda d, s=src, g=g: (_load_hfc(d, s, 4, g), f"RTNConfig(bits=4, group_size={g})"),
                }
            )
    if not args.no_peers:
        for bits in (8, 4):
            cfgs.append(
                {
                    "name": f"torchao int{bits}" + (" g128" if bits == 4 else ""),
                    "kind": "torchao",
                    "bits": bits,
                    "dtype": "bf16",
                    "load": lambda d, b=bits: _torchao(d, b),
                }
            )
        for bits in (8, 4):
            cfgs.append(
                {
                    "name": f"quanto int{bits}" + (" g128" if bits == 4 else ""),
                    "kind": "quanto",
                    "bits": bits,
                    "dtype": "bf16",
                    "load": lambda d, b=bits: _quanto(d, b),
                }
            )
    return cfgs


def _tensors_in(obj, out: dict) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        out[id(obj)] = obj
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors_in(v, out)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _tensors_in(v, out)


def kernel_tensors(layer) -> list:
    """Tensors a ``QuantLinear``'s kernel prepared (``_kernel_cache`` entries keyed ``("state", backend)``);
    empty when its backend reads the packed layout directly."""
    found: dict = {}
    for k, v in getattr(layer, "_kernel_cache", {}).items():
        if isinstance(k, tuple) and k and k[0] == "state":
            _tensors_in(v, found)
    return list(found.values())


# -- bytes per decoded token ----------------------------------------------------------------------------
def bytes_per_token(model) -> dict:
    """Bytes the forward of one decoded token reads: every parameter/buffer except the input embedding table
    (one row of it instead); for hf_compress layers the tensors their kernel prepared (what it reads) when
    present, else the packed layout."""
    from hf_compress.nn.quant_linear import QuantLinear

    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_bytes = sum(common.tensor_nbytes(t) for _, t in common.named_tensors(head)) if head is not None else 0
    total = kernel_state = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            tensors = kernel_tensors(module)
            if tensors:
                b = sum(common.tensor_nbytes(t) for t in tensors)
                kernel_state += b
            else:
                b = module.packed_weight_bytes()
            total += b + common.tensor_nbytes(module.bias)
    quant_ids = {
        id(t)
        for m in model.modules()
        if isinstance(m, QuantLinear)
        for t in (*m.buffers(recurse=False), *m.parameters(recurse=False))
    }
    for _, t in common.named_tensors(model):
        if id(t) in quant_ids:
            continue
        if t is emb:
            total += emb.shape[1] * emb.element_size()
            continue
        total += common.tensor_nbytes(t)
    return {
        "bytes_per_token": total,
        "head_bytes": head_bytes,
        "kernel_state_bytes": kernel_state,
        "resident_bytes": common.model_nbytes(model) + kernel_state,
    }


def quantized_fraction(model) -> str:
    """How many linear layers are quantized (hf_compress, torchao, quanto) vs left in float."""
    import torch

    from hf_compress.nn.quant_linear import QuantLinear

    q = f = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            q += 1
        elif isinstance(m, torch.nn.Linear):
            w = m.weight
            if type(w) is torch.nn.Parameter and type(w.data) is torch.Tensor and "QLinear" not in type(m).__name__:
                f += 1
            else:
                q += 1
    return f"{q}/{q + f}"


# -- measuring ------------------------------------------------------------------------------------------
def measure(model, args, warm: bool = False) -> dict:
    from hf_compress.eval import tokens_per_second

    return tokens_per_second(
        model,
        None,
        prompt_len=args.prompt_len,
        new_tokens=2 if warm else args.new_tokens,
        prefill_len=args.prefill_len,
        repeats=1,
        warmup=0,
        seed=args.seed,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    faulthandler.enable()  # a crash inside a native kernel still names the Python frame
    threads = common.setup(args.threads)
    import gc

    from tqdm.auto import tqdm

    kinfo = common.ensure_kernels()
    t_start = time.perf_counter()
    cfgs = configurations(args)
    bw = [common.memcopy_bandwidth()]
    rows: dict[str, dict] = {
        c["name"]: {"config": c["name"], "kind": c["kind"], "bits": c["bits"], "act": c["dtype"]} for c in cfgs
    }
    per_round: dict[str, list[dict]] = {c["name"]: [] for c in cfgs}
    models: dict[str, object] = {}
    peak_rss = common.anon_rss_bytes()

    with (
        tempfile.TemporaryDirectory(prefix="hfc-speed-") as tmp,
        tqdm(total=1 + len(cfgs) * (args.rounds + 1), desc="speed", unit="step", leave=False, file=sys.stderr) as bar,
    ):
        bar.set_postfix_str("building the float model")
        dirs = save_float_checkpoints(args, Path(tmp))
        bar.update(1)

        def load(c):
            t0 = time.perf_counter()
            with common.silence_fds() if c["kind"] in ("torchao", "quanto") else contextlib.nullcontext():
                model, how = c["load"](dirs)
            row = rows[c["name"]]
            row["how"] = how
            row["load_s"] = time.perf_counter() - t0
            measure(model, args, warm=True)  # warm-up: fills kernel caches, first-call allocations
            if "bytes_per_token" not in row:
                row.update(bytes_per_token(model))
                row["quantized_linears"] = quantized_fraction(model)
                if c["kind"] == "hfc":
                    row["backends"] = common.kernel_backends(model)
            return model

        # load (and warm up) everything once; a failing peer becomes a row with its error
        for c in cfgs:
            bar.set_postfix_str(f"load {c['name']}")
            try:
                m = load(c)
                if args.low_memory:
                    del m
                else:
                    models[c["name"]] = m
            except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                if c["kind"] not in ("torchao", "quanto"):
                    raise
                rows[c["name"]]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows[c["name"]]["traceback"] = traceback.format_exc()
            gc.collect()
            peak_rss = max(peak_rss, common.anon_rss_bytes())
            bar.update(1)

        live = [c for c in cfgs if "error" not in rows[c["name"]]]
        for r in range(args.rounds):
            order = live[r % len(live) :] + live[: r % len(live)]  # rotate so no config always runs first
            for c in order:
                bar.set_postfix_str(f"round {r + 1}/{args.rounds}: {c['name']}")
                model = models[c["name"]] if c["name"] in models else load(c)
                per_round[c["name"]].append(measure(model, args))
                if args.low_memory:
                    del model
                    gc.collect()
                peak_rss = max(peak_rss, common.anon_rss_bytes())
                bar.update(1)
            bar.update(len(cfgs) - len(live))
            bw.append(common.memcopy_bandwidth())  # sampled every round: the best one bounds the machine
        models.clear()
        gc.collect()
    bw.append(common.memcopy_bandwidth())
    bandwidth = max(bw)

    # -- aggregate ----------------------------------------------------------------------------------------
    def ratio(name, ref, key):
        if not per_round.get(name) or not per_round.get(ref):
            return None
        return common.median(
            [a[key] / b[key] for a, b in zip(per_round[name], per_round[ref], strict=False) if a[key] and b[key]]
        )

    for c in cfgs:
        row = rows[c["name"]]
        res = per_round[c["name"]]
        if not res:
            continue
        row["decode_tok_s"] = common.median([x["decode_tok_s"] for x in res])
        row["prefill_tok_s"] = common.median([x["prefill_tok_s"] for x in res])
        row["decode_tok_s_rounds"] = [x["decode_tok_s"] for x in res]
        row["prefill_tok_s_rounds"] = [x["prefill_tok_s"] for x in res]
        for ref in ("fp32", "bf16"):
            row[f"decode_x_{ref}"] = ratio(c["name"], ref, "decode_tok_s")
            row[f"prefill_x_{ref}"] = ratio(c["name"], ref, "prefill_tok_s")
        row["MB_per_token"] = row["bytes_per_token"] / 1e6
        row["head_pct"] = 100.0 * row["head_bytes"] / row["bytes_per_token"]
        row["bound_tok_s"] = bandwidth / row["bytes_per_token"]
        row["pct_of_bound"] = 100.0 * row["decode_tok_s"] / row["bound_tok_s"]

    # peers vs hf_compress same bits (the bf16-act row: same model dtype as the peers; else the first one)
    def hfc_same_bits(bits, act=None):
        cands = [
            c
            for c in cfgs
            if c["kind"] == "hfc" and c["bits"] == bits and c.get("group_size", 128) == 128 and per_round[c["name"]]
        ]
        if act is not None:
            cands = [c for c in cands if c["dtype"] == act]
        bf = [c for c in cands if c["dtype"] == "bf16"]
        return (bf or cands or [None])[0]

    for c in cfgs:
        if c["kind"] in ("torchao", "quanto") and per_round[c["name"]]:
            h = hfc_same_bits(c["bits"])
            if h is not None:
                rows[c["name"]]["hfc_row"] = h["name"]
                rows[c["name"]]["hfc_over_peer_decode"] = ratio(h["name"], c["name"], "decode_tok_s")
                rows[c["name"]]["hfc_over_peer_prefill"] = ratio(h["name"], c["name"], "prefill_tok_s")

    floor_rows = []
    for c in cfgs:
        if c["kind"] != "hfc" or not per_round[c["name"]]:
            continue
        if c["bits"] == 8 or c.get("group_size") == 128:
            key = "int8_vs_bf16" if c["bits"] == 8 else "int4_vs_bf16"
            scope = "same dtype" if c["dtype"] == "bf16" else "fp32 act vs bf16 (info)"
            fr = common.floor_row(
                f"{c['name']} decode / bf16", rows[c["name"]].get("decode_x_bf16"), ">=", FLOORS[key], "x"
            )
            floor_rows.append({**fr, "scope": scope})
            for p in cfgs:
                if p["kind"] in ("torchao", "quanto") and p["bits"] == c["bits"]:
                    value = ratio(c["name"], p["name"], "decode_tok_s") if per_round[p["name"]] else None
                    fr = common.floor_row(f"{c['name']} decode / {p['name']}", value, ">=", FLOORS["vs_peer"], "x")
                    if value is None and rows[p["name"]].get("error"):
                        fr["status"] = f"n/a ({p['name']} failed)"
                    floor_rows.append({**fr, "scope": scope})

    # -- print ---------------------------------------------------------------------------------------------
    table_rows = [rows[c["name"]] for c in cfgs]
    for r in table_rows:
        if r.get("error"):
            r["note"] = "FAILED: " + r["error"]
        else:
            r["note"] = r.get("how", "") + (f"; kernels: {r['backends']}" if r.get("backends") else "")
    n_layers = args.layers
    print(
        f"## Decode and prefill throughput: random Llama, hidden 2048, {n_layers} layers, MLP 5632, vocab 32000, "
        f"32 heads / {args.kv_heads} kv heads ({dirs['n_params'] / 1e9:.3f} B parameters), batch 1, {threads} threads\n"
    )
    print(
        f"decode: {args.prompt_len}-token prompt, {args.new_tokens} greedy tokens (min_new_tokens = max_new_tokens, KV cache); "
        f"prefill: {args.prefill_len} tokens; medians over {args.rounds} alternating rounds; ratios = median of per-round ratios.\n"
    )
    print(
        common.markdown_table(
            table_rows,
            [
                "config",
                "decode_tok_s",
                "decode_x_fp32",
                "decode_x_bf16",
                "prefill_tok_s",
                "prefill_x_fp32",
                "prefill_x_bf16",
                "quantized_linears",
                "MB_per_token",
                "head_pct",
                "bound_tok_s",
                "pct_of_bound",
            ],
        )
    )
    peers = [rows[c["name"]] for c in cfgs if c["kind"] in ("torchao", "quanto")]
    if peers:
        print("\n## Peers vs hf_compress at the same bits (hfc / peer; > 1: hf_compress faster)\n")
        print(
            common.markdown_table(peers, ["config", "hfc_row", "hfc_over_peer_decode", "hfc_over_peer_prefill", "note"])
        )
    print("\n## How each row was built\n")
    print(common.markdown_table(table_rows, ["config", "load_s", "resident_bytes", "note"]))
    print("\n## Floors\n")
    print(common.markdown_table(floor_rows, ["floor", "measured", "required", "status", "scope"]))
    head = rows["fp32"]
    elapsed = time.perf_counter() - t_start
    print(
        f"\nmemory-copy bandwidth {bandwidth / 1e9:.1f} GB/s (1 GiB dst.copy_(src), read + write; runs: "
        + ", ".join(f"{b / 1e9:.1f}" for b in bw)
        + "); "
        f"lm_head ({head['head_bytes'] / 1e6:.0f} MB in fp32) stays float in every row (hf_compress's default skip of "
        "the output embeddings; peers skip it the same way); KV-cache reads are not counted in MB_per_token. "
        f"Peak anonymous RSS {peak_rss / 2**30:.1f} GiB (memory-mapped float weights not counted); {elapsed / 60:.1f} min."
        + (f" QuantLinear forward: {kinfo['kernels']}." if kinfo["fallback"] else "")
    )
    n_fail = sum(r["status"] == "FAIL" for r in floor_rows if r["scope"] == "same dtype")
    same = [r for r in floor_rows if r["scope"] == "same dtype"]
    info = [r for r in floor_rows if r["scope"] != "same dtype"]
    print(
        f"{sum(r['status'] == 'PASS' for r in same)}/{len(same)} floors pass (hf_compress bf16-act rows, the dtype of the "
        f"bf16 baseline and the peers)"
        + (f"; fp32-act rows, informational: {sum(r['status'] == 'PASS' for r in info)}/{len(info)}" if info else "")
    )

    for r in table_rows:
        r.pop("note", None)
    payload = {
        "benchmark": "speed",
        "args": vars(args),
        "environment": common.environment(),
        "kernels": kinfo,
        "model": {
            "hidden": 2048,
            "layers": n_layers,
            "intermediate": 5632,
            "vocab": 32000,
            "heads": 32,
            "kv_heads": args.kv_heads,
            "n_params": dirs["n_params"],
            "seed": args.seed,
            "random_init": True,
        },
        "bandwidth_bytes_per_s": bandwidth,
        "bandwidth_runs": bw,
        "rows": table_rows,
        "rounds": per_round,
        "floors": floor_rows,
        "peak_anon_rss_bytes": peak_rss,
        "seconds": elapsed,
    }
    out = common.write_json(args.out, payload)
    print(f"wrote {out}")
    return 1 if (args.strict and n_fail) else 0


if __name__ == "__main__":
    sys.exit(main())
