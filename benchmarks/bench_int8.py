"""Real INT8 W8A8 against fp32 on SmolLM2-135M: prefill and decode time, weight memory (issue 14 §3).

    .venv/bin/python benchmarks/bench_int8.py [--repeats 3] [--prefill 512] [--decode 32] [--threads 1]

The measurement is :func:`shrink.quant.int8_speed.compare` (its docstring says what is timed and compared):
fp32, fake-quant W8A8 (what the bits chapter measures with) and real W8A8 (int8 weights, per-token dynamic
int8 activations, int32 accumulation through ``shrink.ops``), per-channel symmetric INT8 weights, in one
process, interleaved repeats, median. It also reports how far real W8A8 departs from fake W8A8 (logits, greedy
tokens) against the band a 1e-6 range perturbation moves fake W8A8 by. Notebook 02l renders the same function's
record at its scale. Writes ``results/bench/int8.json``; lm_head and the embeddings stay fp32 (as in the bits
chapter), so the memory column counts decoder linears.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shrink import data, env, models, scales
from shrink.quant.int8_speed import compare


def main(argv=None) -> dict:
    cfg = scales.get("int8-speed", "cpu")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=cfg.repeats)
    ap.add_argument("--prefill", type=int, default=cfg.prefill)
    ap.add_argument("--decode", type=int, default=cfg.decode)
    ap.add_argument("--threads", type=int, default=cfg.threads)
    ap.add_argument("--ppl-windows", type=int, default=cfg.ppl_windows,
                    help=f"WikiText-2 test windows of {cfg.ppl_seqlen} for the real-vs-fake perplexity check (0: skip)")
    a = ap.parse_args(argv)
    cfg = cfg.with_(repeats=a.repeats, prefill=a.prefill, decode=a.decode, threads=a.threads, ppl_windows=a.ppl_windows)
    model, tok = models.load(cfg.model)
    rec = compare(model, data.eval_tokens(tok), cfg)
    print(f"{cfg.model}, prefill {cfg.prefill} tokens, decode {cfg.decode} tokens, {cfg.threads} thread(s), "
          f"median of {cfg.repeats}; int8 backend: {rec['int8_backend']}")
    for r in rec["rows"]:
        print(f"  {r['variant']:<18} prefill {r['prefill_s']:.3f} s ({r['prefill_speedup_vs_fp32']:.2f}x)   decode "
              f"{r['decode_ms_per_token']:.1f} ms/token ({r['decode_speedup_vs_fp32']:.2f}x)   window ppl "
              f"{r['prefill_window_ppl']:.3f}")
    mem = rec["memory"]
    print(f"  decoder-linear weights: fp32 {mem['fp32_bytes'] / 2**20:.1f} MiB -> int8 {mem['int8_bytes'] / 2**20:.1f} MiB;"
          f" real vs fake logits max rel diff {rec['logits_max_rel_diff_real_vs_fake']:.2e}; same greedy tokens: "
          f"{rec['same_greedy_tokens']}")
    band = rec["perplexity_band"]
    if band:
        print(f"  perplexity ({band['windows']} x {band['seqlen']}): real {band['real']:.3f}, fake {band['fake']:.3f}, "
              f"fake under {band['eps']:g} range perturbations {[round(v, 3) for v in band['fake_perturbed']]}: "
              f"real inside the band: {band['inside_band']}")
    rec = {"benchmark": "int8-w8a8", "model": cfg.model, **rec, "versions": env.versions(), "kernels": env.kernel_set()}
    out = Path(env.repo_root() or ".") / "results" / "bench" / "int8.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    return rec


if __name__ == "__main__":
    main()
