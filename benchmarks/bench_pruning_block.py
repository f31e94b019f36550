"""Whole-block Wanda and SparseGPT on SmolLM2-135M block 3: shrink's path vs a faithful per-linear reference.

    .venv/bin/python benchmarks/bench_pruning_block.py [--repeats 3] [--nsamples 16 --seqlen 256]

"Whole block" = calibration statistics (forward hooks over the block's calibration forward) + mask selection
(+ the OBS solve for SparseGPT), 50 % unstructured. Shrink collects one statistic per *shared input*
(q/k/v, gate/up) and solves SparseGPT once per group (``shrink.pruning.stats``, ``sparsegpt_prune``); the
reference, as the official Wanda / SparseGPT code does, hooks every linear separately (its own norm or
Hessian) and prunes each linear
alone (``sparsegpt_reference.py``; Wanda by a stable per-row sort); both forward one calibration sequence at a
time, as the official code does. Same inputs, one process, one thread,
median of ``--repeats``; masks must be identical. Also timed: the bare calibration forward (no hooks), which
both paths must run: ``amdahl_bound`` = reference / forward is the largest ratio any implementation of the same
statistics can reach, and ``ratio_beyond_forward`` compares the two paths on what follows the forward
(statistics, mask selection, the OBS solve). Writes ``results/bench/pruning-block.json``.
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

from shrink import data, env, models  # noqa: E402
from shrink.models import BlockRunner  # noqa: E402
from shrink.pruning import StatsCollector, parse_pattern, sparsegpt_prune, wanda_mask  # noqa: E402
from shrink.pruning.sequential import select_linears  # noqa: E402


class PerLinearStats:
    """The official codes' per-linear statistics: one hook and one accumulator per linear."""

    def __init__(self, linears, hessian):
        self.linears, self.hessian, self.n, self.acc, self.h = linears, hessian, {}, {}, []

    def __enter__(self):
        for name, mod in self.linears.items():
            d = mod.in_features
            self.n[name] = 0
            self.acc[name] = torch.zeros(d, d) if self.hessian else torch.zeros(d)

            def hook(_m, args, _o, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                b, n = x.shape[0], self.n[name]
                if self.hessian:  # summed, scaled by 2/n at the end (as shrink; the official running
                    self.acc[name] += x.T @ x  # average differs in the last bits and can flip tied masks)
                else:
                    self.acc[name] += (x * x).sum(0)
                self.n[name] = n + b
            self.h.append(mod.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.h:
            h.remove()
        if self.hessian:
            for name in self.acc:
                self.acc[name] *= 2.0 / max(self.n[name], 1)


def wanda_per_linear(w, sq_norm, sparsity):
    s = w.abs().float() * sq_norm.sqrt().unsqueeze(0)
    idx = torch.sort(s, dim=1, stable=True).indices[:, : int(w.shape[1] * sparsity)]
    return torch.ones_like(s, dtype=torch.bool).scatter_(1, idx, False)


def run(block, runner, x, pruner, pat, per_linear):
    lin = select_linears(block)
    weights = {n: m.weight.detach().clone() for n, m in lin.items()}
    t0 = time.perf_counter()
    if per_linear:
        with PerLinearStats(lin, pruner == "sparsegpt") as st:
            for b in range(x.shape[0]):
                runner.run_block(3, x[b:b + 1], block)
        masks = {n: (sparsegpt_per_linear(weights[n], st.acc[n], pat.sparsity)[1] if pruner == "sparsegpt"
                     else wanda_per_linear(weights[n], st.acc[n], pat.sparsity)) for n in lin}
    else:
        with StatsCollector(lin, hessian=pruner == "sparsegpt") as sc:
            for b in range(x.shape[0]):  # one sequence per forward like the reference: batching changes the
                runner.run_block(3, x[b:b + 1], block)  # Hessian's last bits, and then tied masks
                sc.end_batch()
        if pruner == "wanda":
            masks = {n: wanda_mask(weights[n], sc.stats[n].sq_norm, pat) for n in lin}
        else:
            masks = {}
            for g in sc.groups:
                for n, (_, m) in zip(g, sparsegpt_prune([weights[n] for n in g], sc.stats[g[0]].hessian(), pat)):
                    masks[n] = m
    return time.perf_counter() - t0, masks


def forward_only(block, runner, x):
    """The calibration forward both paths share, with no hook: the Amdahl floor of either path's time."""
    t0 = time.perf_counter()
    for b in range(x.shape[0]):
        runner.run_block(3, x[b:b + 1], block)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = models.load("smollm2-135m")
    ids = data.calibration_set(tok, "wikitext2", "validation", nsamples=a.nsamples, seqlen=a.seqlen, seed=0)
    runner = BlockRunner(model)
    with torch.no_grad():
        x = torch.cat([runner.embed(ids[b:b + 1]) for b in range(ids.shape[0])])
        for i in range(3):
            x = torch.cat([runner.run_block(i, x[b:b + 1]) for b in range(x.shape[0])])
    block = runner.blocks[3]
    pat = parse_pattern("unstructured", 0.5)
    rows = []
    for pruner in ("wanda", "sparsegpt"):
        t_s, t_r, t_f = [], [], []
        with torch.no_grad():
            for _ in range(a.repeats):  # interleaved, so drifting machine load hits both alike
                t, m_s = run(block, runner, x, pruner, pat, per_linear=False)
                t_s.append(t)
                t, m_r = run(block, runner, x, pruner, pat, per_linear=True)
                t_r.append(t)
                t_f.append(forward_only(block, runner, x))
        same = all(torch.equal(m_s[n], m_r[n]) for n in m_s)
        f, s_, r_ = (statistics.median(v) for v in (t_f, t_s, t_r))
        # Amdahl: both paths run the same calibration forward; shrink can only shorten what comes after it, so
        # reference / forward is the largest ratio any implementation of the same statistics could reach
        rows.append({"pruner": pruner, "shrink_s": round(s_, 4), "per_linear_reference_s": round(r_, 4),
                     "forward_only_s": round(f, 4), "ratio": round(r_ / s_, 3),
                     "amdahl_bound": round(r_ / f, 3),
                     "ratio_beyond_forward": round((r_ - f) / max(s_ - f, 1e-9), 3), "masks_identical": same})
    rec = {"bench": "pruning-block", "model": "smollm2-135m", "block": 3, "calib": [a.nsamples, a.seqlen],
           "repeats": a.repeats, "threads": 1, "rows": rows, "versions": env.versions(),
           "kernels": getattr(env, "kernel_set", lambda: None)()}
    out = Path(env.repo_root() or ".") / "results" / "bench" / "pruning-block.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    print(f"{'pruner':10s} {'shrink s':>9s} {'reference s':>12s} {'forward s':>10s} {'ratio':>6s} {'bound':>6s} "
          f"{'beyond fwd':>10s}  masks")
    for r in rows:
        print(f"{r['pruner']:10s} {r['shrink_s']:9.3f} {r['per_linear_reference_s']:12.3f} {r['forward_only_s']:10.3f} "
              f"{r['ratio']:6.2f} {r['amdahl_bound']:6.2f} {r['ratio_beyond_forward']:10.2f}  "
              f"{'identical' if r['masks_identical'] else 'DIFFER'}")
    if not all(r["masks_identical"] for r in rows):
        sys.exit("masks differ between shrink and the per-linear reference")


if __name__ == "__main__":
    main()
