"""SparseGPT on one SmolLM2-135M-shaped decoder block: shrink's grouped implementation vs a faithful
per-linear reference (``benchmarks/sparsegpt_reference.py``), same inputs, one process, one thread.

    .venv/bin/python benchmarks/bench_sparsegpt.py [--repeats 3] [--pattern unstructured|2:4]

Prints the median seconds of each and their ratio, checks that masks are identical, and writes a record
under ``results/bench/`` (not used by any notebook). Shapes: hidden 576, 9 query / 3 key-value heads of 64,
intermediate 1536; Hessians from random Gaussian activations with a per-channel scale (timing only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparsegpt_reference import sparsegpt_per_linear  # noqa: E402

from shrink import env  # noqa: E402
from shrink.pruning.masks import parse_pattern  # noqa: E402
from shrink.pruning.sparsegpt import sparsegpt_prune  # noqa: E402


def block(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hid, inter, kv = 576, 1536, 192

    def hess(d):
        X = torch.randn(2048, d, generator=g) * torch.rand(d, generator=g).add(0.1)
        return 2 * X.T @ X / X.shape[0]

    groups = {"qkv": ([torch.randn(o, hid, generator=g) for o in (hid, kv, kv)], hess(hid)),
              "o": ([torch.randn(hid, hid, generator=g)], hess(hid)),
              "gate_up": ([torch.randn(inter, hid, generator=g) for _ in range(2)], hess(hid)),
              "down": ([torch.randn(hid, inter, generator=g)], hess(inter))}
    return groups


def median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pattern", default="unstructured")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    pat = parse_pattern(a.pattern, 0.5)
    groups = block()
    t_ours, ours = median_time(lambda: [sparsegpt_prune(ws, H, pat) for ws, H in groups.values()], a.repeats)
    t_ref, ref = median_time(lambda: [[sparsegpt_per_linear(w, H, pat.sparsity if not pat.is_nm else None,
                                                            pat.n, pat.m) for w in ws]
                                      for ws, H in groups.values()], a.repeats)
    same = all(torch.equal(o[1], r[1]) for og, rg in zip(ours, ref) for o, r in zip(og, rg))
    maxdiff = max(float((o[0] - r[0]).abs().max()) for og, rg in zip(ours, ref) for o, r in zip(og, rg))
    rec = {"bench": "sparsegpt-block", "pattern": str(pat), "repeats": a.repeats, "threads": 1,
           "shrink_s": round(t_ours, 4), "per_linear_reference_s": round(t_ref, 4),
           "ratio_reference_over_shrink": round(t_ref / t_ours, 3), "masks_identical": same,
           "max_weight_diff": maxdiff, "kernels": getattr(env, "kernel_set", lambda: None)(),
           "versions": env.versions()}
    out = Path(env.repo_root() or ".") / "results" / "bench" / f"sparsegpt-{str(pat).replace(':', 'of')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    print(json.dumps(rec, indent=1, default=str))
    if not same:
        sys.exit("masks differ between shrink and the per-linear reference")


if __name__ == "__main__":
    main()
