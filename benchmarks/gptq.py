"""GPTQ benchmark: what GPTQ recovers over RTN on pydoc-llama-6m, and how it compares with llm-compressor.

For fp32 and each of 4-bit g128, 4-bit per-channel, 3-bit g128, 2-bit g64 (symmetric): RTN, GPTQ, GPTQ with
act-order. Calibration: ``--n-samples`` random windows of ``--seqlen`` tokens from pydoc-calib.txt (seed 0);
perplexity on the first ``--max-tokens`` tokens of pydoc-heldout.txt (non-overlapping 256-token windows; the
project's 20,000-token convention) and, as a check on its noise, on the first ``--wide-tokens`` (120,000).
Per row: perplexity, ratio to fp32, the share of RTN's loss GPTQ removes, quantization seconds (the
``from_pretrained`` call, calibration included) and peak extra resident memory while quantizing. GPTQ runs with
its defaults (``observer="mse"``); RTN is plain min/max.

Side by side (unless ``--no-llmcompressor``): llm-compressor's GPTQModifier on the same model, the same
calibration windows (written to a JSON file both read) and the same settings, run in its own venv
(``bash benchmarks/llmcompressor/setup.sh``; see benchmarks/llmcompressor/README.md), alternating with ours
setting by setting so both see the same machine load, once per ``--llmc-observers`` entry (its default
``minmax`` and its ``mse`` grid search). Time and perplexity are compared as ratios.

    python benchmarks/gptq.py                 # full grid (~15 min on 2 cores, ~35 with llm-compressor)
    python benchmarks/gptq.py --quick         # 4-bit and 3-bit g128 only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Idle OpenMP threads sleep instead of spinning: with spinning, any other busy process on a 2-core machine
# makes these multi-minute runs (ours and llm-compressor's) several times slower and their timing meaningless.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import common  # noqa: E402

CALIB = common.SHARED / "data" / "pydoc-calib.txt"
LLMC_DIR = Path(__file__).resolve().parent / "llmcompressor"
LLMC_PY = LLMC_DIR / ".venv" / "bin" / "python"
SETTINGS_FULL = [(4, 128), (4, -1), (3, 128), (2, 64)]
SETTINGS_QUICK = [(4, 128), (3, 128)]


def label(bits, group_size) -> str:
    return f"int{bits} {'per-channel' if group_size == -1 else f'g{group_size}'}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(common.PYDOC_MODEL))
    p.add_argument("--calib", default=str(CALIB), help="calibration text (never the evaluation text)")
    p.add_argument("--text", default=str(common.HELDOUT), help="evaluation text")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=20000)
    p.add_argument("--wide-tokens", type=int, default=120000,
                   help="also report perplexity on this many heldout tokens (0: off): differences of ~0.2%% on the "
                        "20,000-token convention are within its noise")
    p.add_argument("--llmc-observers", default="minmax,mse",
                   help="llm-compressor weight observers to run, comma-separated (its default is minmax)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-llmcompressor", action="store_true", help="skip the llm-compressor side-by-side rows")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(common.default_out("gptq")))
    return p.parse_args(argv)


def run_llmcompressor(args, calib_file, eval_file, wide_file, bits, group_size, act_order, observer, workdir) -> dict | None:
    out = Path(workdir) / f"llmc-{bits}-{group_size}-{int(act_order)}-{observer}.json"
    cmd = [str(LLMC_PY), str(LLMC_DIR / "run_gptq.py"), "--model", args.model, "--calib-tokens", str(calib_file),
           "--eval-tokens", str(eval_file), "--bits", str(bits), "--group-size", str(group_size), "--sym",
           "--observer", observer, "--out", str(out)]
    if wide_file is not None:
        cmd += ["--wide-eval-tokens", str(wide_file)]
    if act_order:
        cmd.append("--act-order")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return common.run_json_script(cmd, out)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress import GPTQConfig, RTNConfig
    from hf_compress.eval import load_text, perplexity
    from hf_compress.eval.perplexity import tokenize_windows
    from hf_compress.integrations.calibration import calibration_windows

    if Path(args.calib).resolve() == Path(args.text).resolve():
        raise SystemExit("refusing to calibrate on the evaluation text")
    tok = AutoTokenizer.from_pretrained(args.model)
    text = load_text(args.text)
    windows = calibration_windows(args.calib, tok, args.n_samples, args.seqlen, seed=0)
    eval_ids = tokenize_windows(tok, text, seqlen=256, max_tokens=args.max_tokens)

    def ppl(model) -> float:
        return perplexity(model, tok, text, seqlen=256, max_tokens=args.max_tokens)

    def ppl_wide(model) -> float | None:
        return perplexity(model, tok, text, seqlen=256, max_tokens=args.wide_tokens) if args.wide_tokens else None

    def timed_load(config):
        with common.PeakMemory() as mem:
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=config)
            seconds = time.perf_counter() - start
        return model.eval(), seconds, mem.extra_mb

    use_llmc = not args.no_llmcompressor and LLMC_PY.is_file()
    if not args.no_llmcompressor and not use_llmc:
        print(f"llm-compressor venv not found ({LLMC_PY}): run `bash benchmarks/llmcompressor/setup.sh`; skipping it")
    workdir = Path(tempfile.mkdtemp(prefix="hfc-gptq-bench-"))
    calib_file, eval_file = workdir / "calib.json", workdir / "eval.json"
    calib_file.write_text(json.dumps(windows.tolist()))
    eval_file.write_text(json.dumps(eval_ids.reshape(-1).tolist()))
    wide_file = None
    if args.wide_tokens:
        wide_file = workdir / "wide.json"
        wide_file.write_text(json.dumps(tokenize_windows(tok, text, seqlen=256, max_tokens=args.wide_tokens).reshape(-1).tolist()))
    llmc_observers = [o for o in args.llmc_observers.split(",") if o]

    fp32_model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    fp32, fp32_wide = ppl(fp32_model), ppl_wide(fp32_model)
    del fp32_model
    rows = [{"setting": "fp32", "method": "float", "perplexity": fp32, "vs_fp32": 1.0, "wide_perplexity": fp32_wide}]
    llmc_rows, floors = [], []
    by_key: dict = {}
    for bits, gs in SETTINGS_QUICK if args.quick else SETTINGS_FULL:
        rtn_model, rtn_s, rtn_mb = timed_load(RTNConfig(bits=bits, group_size=gs))
        rtn_ppl, rtn_wide = ppl(rtn_model), ppl_wide(rtn_model)
        del rtn_model
        rows.append({"setting": label(bits, gs), "method": "RTN", "perplexity": rtn_ppl, "vs_fp32": rtn_ppl / fp32,
                     "wide_perplexity": rtn_wide, "quant_s": rtn_s, "peak_extra_mb": rtn_mb})
        for act in (False, True):
            cfg = GPTQConfig(bits=bits, group_size=gs, desc_act=act, dataset=windows, n_samples=args.n_samples,
                             seqlen=args.seqlen)
            model, seconds, mb = timed_load(cfg)
            value, wide = ppl(model), ppl_wide(model)
            del model
            recovered = (rtn_ppl - value) / (rtn_ppl - fp32) if rtn_ppl > fp32 else None
            recovered_wide = (rtn_wide - wide) / (rtn_wide - fp32_wide) if wide is not None and rtn_wide > fp32_wide else None
            name = "GPTQ act-order" if act else "GPTQ"
            row = {"setting": label(bits, gs), "method": name, "perplexity": value, "vs_fp32": value / fp32,
                   "rtn_loss_removed": recovered, "wide_perplexity": wide, "wide_rtn_loss_removed": recovered_wide,
                   "quant_s": seconds, "peak_extra_mb": mb}
            rows.append(row)
            by_key[(bits, gs, act)] = row
            print(common.markdown_table([row], list(row)), flush=True)
            for observer in llmc_observers if use_llmc else []:
                theirs = run_llmcompressor(args, calib_file, eval_file, wide_file, bits, gs, act, observer, workdir)
                if theirs:
                    their_wide = theirs.get("ppl_quant_wide")
                    llmc_rows.append({
                        "setting": label(bits, gs), "act_order": act, "llmc_observer": observer,
                        "llmc_perplexity": theirs["ppl_quant"], "ours_perplexity": value,
                        "ppl_ours_over_llmc": value / theirs["ppl_quant"],
                        "wide_ppl_ours_over_llmc": wide / their_wide if wide is not None and their_wide else None,
                        "llmc_quant_s": theirs["quant_seconds"], "ours_quant_s": seconds,
                        "time_ours_over_llmc": seconds / theirs["quant_seconds"],
                        "llmc_fp32_perplexity": theirs["ppl_fp32"], "llmc_peak_rss_mb": theirs.get("peak_rss_mb"),
                    })
                    print(common.markdown_table(llmc_rows[-1:], list(llmc_rows[-1])), flush=True)
        if (bits, gs) == (4, 128):
            g4 = by_key[(4, 128, False)]["perplexity"]
            floors.append(common.floor_row("GPTQ int4 g128 ppl / RTN int4 g128 ppl", g4 / rtn_ppl, "<=", 1.0))
            floors.append(common.floor_row("GPTQ int4 g128 ppl / fp32 ppl", g4 / fp32, "<=", 1.03))
            floors.append(common.floor_row(f"GPTQ quantization seconds ({args.n_samples} x {args.seqlen} tokens)",
                                           by_key[(4, 128, False)]["quant_s"], "<=", 60.0, " s"))
        if (bits, gs) == (3, 128):
            floors.append(common.floor_row("GPTQ int3 g128: share of RTN's loss removed",
                                           by_key[(3, 128, False)]["rtn_loss_removed"], ">=", 0.6))
            if args.wide_tokens:
                floors.append(common.floor_row(f"GPTQ int3 g128: share of RTN's loss removed ({args.wide_tokens} tokens)",
                                               by_key[(3, 128, False)]["wide_rtn_loss_removed"], ">=", 0.6))
    for r in llmc_rows:
        tag = f"{r['setting']}{' act-order' if r['act_order'] else ''}, llmc {r['llmc_observer']}"
        floors.append(common.floor_row(f"ppl ours / llm-compressor, {tag}", r["ppl_ours_over_llmc"], "<=", 1.0))
        if r["wide_ppl_ours_over_llmc"] is not None:
            floors.append(common.floor_row(f"ppl ({args.wide_tokens} tokens) ours / llm-compressor, {tag}",
                                           r["wide_ppl_ours_over_llmc"], "<=", 1.0))
        floors.append(common.floor_row(f"time ours / llm-compressor, {tag}", r["time_ours_over_llmc"], "<=", 0.5))

    print("\n## Perplexity on pydoc-heldout.txt (pydoc-llama-6m)\n")
    print(common.markdown_table(rows, ["setting", "method", "perplexity", "vs_fp32", "rtn_loss_removed", "wide_perplexity",
                                       "wide_rtn_loss_removed", "quant_s", "peak_extra_mb"]))
    if llmc_rows:
        print("\n## Side by side with llm-compressor (same windows, same settings, alternating runs)\n")
        print(common.markdown_table(llmc_rows, ["setting", "act_order", "llmc_observer", "ours_perplexity", "llmc_perplexity",
                                                "ppl_ours_over_llmc", "wide_ppl_ours_over_llmc", "ours_quant_s", "llmc_quant_s",
                                                "time_ours_over_llmc", "llmc_fp32_perplexity"]))
    print("\n## Floors\n")
    print(common.floors_table(floors))
    path = common.write_json(args.out, {"environment": common.environment(), "args": vars(args), "rows": rows,
                                        "llmcompressor": llmc_rows, "floors": floors})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
