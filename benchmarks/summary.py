"""The ratio table of ``make bench``: every ratio the committed benchmark records hold, with issue 14's target
where it sets one and whether the record meets it. Reads records only (``results/bench/*.json``, DSIR's
``results/cpu/04-data/bench-dsir-*.json`` and the cpu records' ``seconds``); it measures nothing itself.

    .venv/bin/python benchmarks/summary.py [--markdown]
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


from shrink.results import load_bench as _bench  # noqa: E402


def _row(what, ratio, target=None, better="higher", note=""):
    if ratio is None:
        met = "not measured"
    elif target is None:
        met = "no target"
    else:
        met = "met" if (ratio >= target if better == "higher" else ratio <= target) else "not met"
    tgt = "" if target is None else (f">= {target:g}" if better == "higher" else f"<= {target:g}")
    return {"benchmark": what, "ratio": "—" if ratio is None else f"{ratio:.3f}", "target": tgt, "status": met,
            "note": note}


def rows() -> list[dict]:
    out = []
    pb = _bench("pruning-block")
    for r in (pb or {}).get("rows", []):
        out.append(_row(f"{r['pruner']} whole block vs per-linear reference (reference / shrink)", r["ratio"], 1.5,
                        note=f"Amdahl bound {r['amdahl_bound']:.2f} (the bare forward); masks identical: "
                             f"{r['masks_identical']}"))
    fw = _bench("forward")
    for r in (fw or {}).get("rows", []):
        t = r["threads"]
        out.append(_row(f"forward 2048 tokens / causal GEMM floor ({t} thread{'s' if t > 1 else ''})",
                        r["ratio_forward_over_causal_floor"], 1.2, "lower"))
        out.append(_row(f"forward 2048 tokens / peak GEMM floor ({t} thread{'s' if t > 1 else ''})",
                        r["ratio_forward_over_peak_floor"], 1.2, "lower"))
        if "ratio_perplexity_over_forward" in r:
            out.append(_row(f"perplexity function / bare forward ({t} thread{'s' if t > 1 else ''})",
                            r["ratio_perplexity_over_forward"], 1.2, "lower"))
    rc = _bench("reconstruct")
    if rc:
        out.append(_row("BR of one block: for-loop AdamW / fused AdamW", rc["ratio"],
                        note=f"largest weight change {rc['fused_vs_for_loop']['max_abs_weight_diff']:.1e} against a "
                             f"seed band of {rc['seed1_vs_seed0_for_loop']['max_abs_weight_diff']:.1e}"))
    i8 = _bench("int8")
    if i8:
        real = next(r for r in i8["rows"] if r["variant"].startswith("real"))
        load = i8.get("load_average_before", i8.get("load_average", [float("nan")]))[0]
        out.append(_row("real W8A8 prefill speed / fp32 (CPU)", real["prefill_speedup_vs_fp32"],
                        note=f"int8 backend {i8['int8_backend']}; load {load:.1f}"))
        out.append(_row("real W8A8 decode speed / fp32 (CPU)", real["decode_speedup_vs_fp32"]))
        out.append(_row("decoder weights fp32 / int8 bytes", i8["memory"]["fp32_bytes"] / i8["memory"]["int8_bytes"]))
    for p in sorted(glob.glob(str(ROOT / "results" / "cpu" / "04-data" / "bench-dsir-*.json"))):
        m = json.loads(Path(p).read_text())["metrics"]
        for mode, v in m["speedup_vs_official"].items():
            out.append(_row(f"DSIR {mode} mode / official package (chunks per CPU-s)", v))
    sw = _bench("sweep")
    if sw:
        s = sw["summary"]
        out.append(_row(f"shrink sweep {sw['experiment']} ({sw['scale']}): Ray 2 workers / sequential (wall)",
                        s["ray-2"]["speedup_vs_sequential"], note=f"Ray 2 / Ray 1: {s['ray-2_over_ray-1']:.2f}; "
                                                                  f"records equal: {sw['all_records_equal']}"))
    gpu = _bench("gpu")
    if gpu:
        for r in gpu["k2"]:
            out.append(_row(f"K2 / fp16 cuBLAS {r['shape']} M={r['M']} ({gpu['device_name']})", r["k2_speedup_vs_dense"], 1.5))
    else:
        out.append(_row("K2 / fp16 cuBLAS at LLaMA-7B shapes (GPU)", None, 1.5, note="no GPU lent: CUDA code only compiled"))
        out.append(_row("2:4 semi-structured / dense fp16 (GPU)", None, note="no GPU lent"))
    secs = [json.loads(Path(p).read_text()).get("seconds") or 0
            for p in glob.glob(str(ROOT / "results" / "cpu" / "**" / "*.json"), recursive=True)]
    out.append(_row("cpu handbook from empty records (hours, sum of record seconds)", sum(secs) / 3600, 2, "lower",
                    note="records measured on a shared, often loaded machine; nested records counted twice"))
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    rs = rows()
    cols = ["benchmark", "ratio", "target", "status", "note"]
    if a.markdown:
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in rs:
            print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    else:
        w = {c: max(len(c), *(len(str(r[c])) for r in rs)) for c in cols[:-1]}
        print("  ".join(c.ljust(w[c]) for c in cols[:-1]) + "  note")
        for r in rs:
            print("  ".join(str(r[c]).ljust(w[c]) for c in cols[:-1]) + "  " + r["note"])
    return rs


if __name__ == "__main__":
    main()
