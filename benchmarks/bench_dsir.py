"""DSIR speed: the official ``data-selection`` 1.0.3 package vs ``shrink.selection`` exact and fast modes on
the same pool, the same process count (1), in one run.

    SHRINK_DATA=../shared/data .venv/bin/python benchmarks/bench_dsir.py [--repeats 3] [--k 500] [--max-per-domain N]

Pool: the offline pool without WikiText (``shrink.selection.pools.build_pool``), written once as JSON lines;
target: WikiText-2 validation (even articles) chunks. Every implementation reads the same JSON-lines files,
fits on all raw n-grams, scores every chunk and selects ``k`` (deterministic top-k and Gumbel top-k, seed 0).
Each run happens in a fresh spawned process (so peak RSS is per implementation); the three implementations
are interleaved ``--repeats`` times and the median **process CPU seconds** per stage is reported (CPU time,
not wall time: the machine is shared). Checks printed alongside: exact-mode log-weights vs official (max
|Δ|), identical top-k / Gumbel indices, fast-mode Spearman ρ of the weights and KL reduction of its
selections, both in the official buckets (where exact mode's selection is in-sample) and in a held-out
hash space (``heldout_featurize``) where neither mode was fitted. Writes ``results/cpu/04-data/bench-dsir-<hash>.json``; timings never go into asserts.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    """Current RSS, after resetting the peak (VmHWM) so that _peak_mb() measures this run only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    return _status_mb("VmHWM")


def run_official(raw: str, target: str, work: str, k: int) -> dict:
    import data_selection.hashed_ngram_dsir as H

    base = _rss_mb()
    t = {}
    c0 = time.process_time()
    o = H.HashedNgramDSIR([raw], [target], cache_dir=str(Path(work) / "official"), num_proc=1)
    o.fit_importance_estimator(num_tokens_to_fit="all")
    c1 = time.process_time()
    o.compute_importance_weights()
    c2 = time.process_time()
    o.resample(out_dir=str(Path(work) / "off-topk"), num_to_sample=k, cache_dir=str(Path(work) / "off-topk-c"),
               top_k=True)
    np.random.seed(0)
    o.resample(out_dir=str(Path(work) / "off-gumbel"), num_to_sample=k, cache_dir=str(Path(work) / "off-gumbel-c"),
               top_k=False)
    c3 = time.process_time()
    t = {"fit": c1 - c0, "weights": c2 - c1, "resample": c3 - c2, "total": c3 - c0}
    lw = np.load(Path(work) / "official" / "log_importance_weights" / "0.npy")
    np.save(Path(work) / "official-lw.npy", lw)

    def ids(d):
        return sorted(json.loads(line)["id"] for f in sorted(Path(d).glob("*.jsonl")) for line in open(f))

    return {"cpu_s": t, "peak_rss_mb": _peak_mb() - base, "topk": ids(Path(work) / "off-topk"),
            "gumbel": ids(Path(work) / "off-gumbel")}


def run_ours(mode: str, raw: str, target: str, work: str, k: int) -> dict:
    from shrink.selection import DSIR
    from shrink.selection.pools import iter_shard

    base = _rss_mb()
    c0 = time.process_time()
    recs = [(r["id"], r["text"]) for r in iter_shard(raw, "text")]
    d = DSIR(mode=mode)
    feats = d.featurize(t for _, t in recs)
    tfeat = d.featurize(r["text"] for r in iter_shard(target, "text"))
    d.fit(feats, tfeat)
    c1 = time.process_time()
    lw = d.log_weights()
    c2 = time.process_time()
    top = d.select(k, top_k=True)
    gum = d.select(k, seed=0)
    c3 = time.process_time()
    np.save(Path(work) / f"{mode}-lw.npy", lw)
    return {"cpu_s": {"fit": c1 - c0, "weights": c2 - c1, "resample": c3 - c2, "total": c3 - c0},
            "peak_rss_mb": _peak_mb() - base, "topk": sorted(recs[i][0] for i in top),
            "gumbel": sorted(recs[i][0] for i in gum)}


def _spawn(fn, *args):
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=500)
    p.add_argument("--max-per-domain", type=int, default=None)
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--in-process", action="store_true",
                   help="run the implementations in this process (quick checks; peak RSS is then not per implementation)")
    a = p.parse_args(argv)
    spawn = (lambda fn, *args: fn(*args)) if a.in_process else _spawn

    from scipy.stats import spearmanr

    from shrink import results
    from shrink.selection import featurize, metrics, pools
    from shrink.selection.features import heldout_featurize

    pool = pools.build_pool(max_per_domain=a.max_per_domain)
    target = pools.target_chunks()
    n = len(pool)
    mb = sum(len(c["text"].encode()) for c in pool) / 2**20
    work = tempfile.mkdtemp(prefix="bench-dsir-")
    raw_path, tgt_path = str(Path(work) / "raw.jsonl"), str(Path(work) / "target.jsonl")
    for path, recs in ((raw_path, pool), (tgt_path, target)):
        with open(path, "w") as f:
            for r in recs:
                f.write(json.dumps({"id": r["id"], "text": r["text"]}) + "\n")
    print(f"pool: {n} chunks, {mb:.1f} MB of text; target {len(target)} chunks; k={a.k}; {a.repeats} repeats",
          flush=True)
    impls = {"official": lambda w: spawn(run_official, raw_path, tgt_path, w, a.k),
             "exact": lambda w: spawn(run_ours, "exact", raw_path, tgt_path, w, a.k),
             "fast": lambda w: spawn(run_ours, "fast", raw_path, tgt_path, w, a.k)}
    runs: dict[str, list[dict]] = {m: [] for m in impls}
    for r in range(a.repeats):
        for m, fn in impls.items():
            w = tempfile.mkdtemp(dir=work)
            runs[m].append(fn(w))
            runs[m][-1]["work"] = w
            print(f"  repeat {r} {m:8s} total {runs[m][-1]['cpu_s']['total']:.2f} CPU-s", flush=True)

    med = {m: {s: statistics.median(x["cpu_s"][s] for x in rs) for s in ("fit", "weights", "resample", "total")}
           for m, rs in runs.items()}
    rss = {m: max(x["peak_rss_mb"] for x in rs) for m, rs in runs.items()}
    off = np.load(Path(runs["official"][0]["work"]) / "official-lw.npy")
    ex = np.load(Path(runs["exact"][0]["work"]) / "exact-lw.npy")
    fa = np.load(Path(runs["fast"][0]["work"]) / "fast-lw.npy")
    # KL reduction of each selection on the exact (official) features
    ids = [c["id"] for c in pool]
    pos = {i: j for j, i in enumerate(ids)}
    spaces = {}
    for space, fz in (("official", featurize), ("heldout", heldout_featurize)):
        pf = fz([c["text"] for c in pool])
        spaces[space] = (pf, fz([c["text"] for c in target]).counts(), pf.counts())

    def klred(sel_ids, space):
        pf, tc, q = spaces[space]
        mask = np.zeros(n, bool)
        mask[[pos[i] for i in sel_ids]] = True
        return metrics.kl_reduction(tc, q, pf.counts(mask))

    chunks_per_cpu_s = {m: n / med[m]["total"] for m in med}
    out = {
        "pool_chunks": n, "pool_mb": mb, "k": a.k, "repeats": a.repeats, "processes": 1,
        "cpu_s_median": med, "peak_rss_mb": rss, "chunks_per_cpu_s": chunks_per_cpu_s,
        "mb_per_cpu_s": {m: mb / med[m]["total"] for m in med},
        "speedup_vs_official": {m: chunks_per_cpu_s[m] / chunks_per_cpu_s["official"] for m in ("exact", "fast")},
        "exact_max_abs_dlogw": float(np.max(np.abs(ex - off))),
        "exact_topk_identical": runs["exact"][0]["topk"] == runs["official"][0]["topk"],
        "exact_gumbel_identical": runs["exact"][0]["gumbel"] == runs["official"][0]["gumbel"],
        "fast_spearman_rho": float(spearmanr(fa, off).statistic),
        "fast_topk_overlap": len(set(runs["fast"][0]["topk"]) & set(runs["official"][0]["topk"])) / a.k,
        # KL reduction in the official buckets (in-sample for official/exact) and in the held-out hash space
        "kl_reduction": {sp: {f"{m}-{s}": klred(runs[m][0][s], sp) for m in impls for s in ("topk", "gumbel")}
                         for sp in spaces},
    }
    print(json.dumps({k: v for k, v in out.items()}, indent=1))
    print(f"ratios (chunks per CPU-second vs official, same pool, 1 process): exact {out['speedup_vs_official']['exact']:.2f}x, "
          f"fast {out['speedup_vs_official']['fast']:.2f}x")
    if not a.no_record:
        cfg = {"bench": "dsir", "pool": pools.pool_hash(pool), "k": a.k, "repeats": a.repeats, "processes": 1,
               "max_per_domain": a.max_per_domain}
        path = results.save("bench-dsir", cfg, out, scale="cpu", chapter="04-data")
        print(f"record: {path}")
    return out


if __name__ == "__main__":
    main()
