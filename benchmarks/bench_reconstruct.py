"""Block reconstruction (BR) on SmolLM2-135M block 3: where the time goes, and fused vs for-loop AdamW.

    .venv/bin/python benchmarks/bench_reconstruct.py [--repeats 3] [--epochs 1] [--nsamples 16 --seqlen 256]

BR (Shin et al., EMNLP 2024, Eq. 2) of one pruned block, 50 % per-row magnitude masks, through the library's
own path (``shrink.pruning.reconstruct`` -> ``shrink.reconstruction.fit_unit``) at 01b's cpu budget (16 x 256
calibration windows, batch 2, lr 2e-4; ``--epochs 1`` = 8 Adam steps). In one process, one thread:

* a ``torch.profiler`` breakdown of one run: GEMMs (``aten::mm``), attention (SDPA forward and backward), the
  optimizer step, the rest;
* ``fused=True`` (the library's default since this benchmark) against ``fused=False`` (torch's for-loop AdamW,
  the implementation of the older records), interleaved repeats, median;
* what the change does to the result, against the noise band of the method: the largest weight difference
  and the final-loss difference between the two implementations, next to the same quantities between two
  batch-order seeds of the same implementation.

Writes ``results/bench/reconstruct.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from shrink import data, env, models
from shrink.models import BlockRunner
from shrink.pruning import MaskSet
from shrink.pruning.sequential import select_linears
from shrink.reconstruction import FitConfig, fit_unit


def setup(nsamples: int, seqlen: int):
    model, tok = models.load("smollm2-135m")
    ids = data.calibration_set(tok, "wikitext2", "validation", nsamples=nsamples, seqlen=seqlen, seed=0)
    runner = BlockRunner(model)
    with torch.no_grad():
        x = runner.embed(ids)
        for i in range(3):
            x = runner.run_block(i, x)
        block = runner.blocks[3]
        y = runner.run_block(3, x)               # BR's target: the dense block on the sparse stream
    prefix = {id(m): n for n, m in model.named_modules()}[id(block)]
    masks = MaskSet(model)
    for name, lin in select_linears(block).items():
        w = lin.weight.detach().abs()
        keep = w >= w.median(dim=1, keepdim=True).values      # 50 % per output row
        with torch.no_grad():
            lin.weight.mul_(keep)
        masks.add(f"{prefix}.{name}.weight", keep)
    return runner, block, masks, x, y


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    runner, block, masks, x, y = setup(a.nsamples, a.seqlen)
    params = list(block.parameters())
    state = copy.deepcopy(block.state_dict())
    steps = a.epochs * -(-x.shape[0] // 2)

    def unit(h):
        return runner.run_block(3, h)

    def run(fused: bool, seed: int = 0):
        block.load_state_dict(state)
        cfg = FitConfig(steps=steps, batch_size=2, lr=2e-4, betas=(0.9, 0.95), schedule="linear", seed=seed,
                        fused=fused)
        t0 = time.perf_counter()
        out = fit_unit(unit, params, x, y, cfg, hooks=masks.hook_gradients, after_step=masks.apply)
        dt = time.perf_counter() - t0
        masks.verify()
        return dt, {k: v.clone() for k, v in block.state_dict().items()}, out["losses"][-1]

    # profile one run of the default path
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(True)
    ev = {e.key: e for e in prof.key_averages()}
    total = sum(e.self_cpu_time_total for e in ev.values())

    def self_ms(pred):
        return sum(e.self_cpu_time_total for k, e in ev.items() if pred(k)) / 1e3

    opt_ms = next((e.cpu_time_total / 1e3 for k, e in ev.items() if k.startswith("Optimizer.step")), 0.0)
    breakdown = {"gemm_ms": self_ms(lambda k: k in ("aten::mm", "aten::addmm", "aten::bmm")),
                 "attention_ms": self_ms(lambda k: "scaled_dot_product" in k),
                 "optimizer_step_ms": opt_ms, "total_ms": total / 1e3}
    breakdown["other_ms"] = breakdown["total_ms"] - breakdown["gemm_ms"] - breakdown["attention_ms"] - opt_ms

    t = {True: [], False: []}
    res = {}
    for _ in range(a.repeats):          # interleaved, so drifting machine load hits both alike
        for fused in (True, False):
            dt, w, loss = run(fused)
            t[fused].append(dt)
            res[fused] = (w, loss)
    _, w_seed1, loss_seed1 = run(False, seed=1)

    def max_diff(wa, wb):
        return max(float((wa[k] - wb[k]).abs().max()) for k in wa)

    rec = {"bench": "reconstruct", "model": "smollm2-135m", "block": 3, "calib": [a.nsamples, a.seqlen],
           "batch_size": 2, "steps": steps, "repeats": a.repeats, "threads": 1,
           "profile_fused": {k: round(v, 1) for k, v in breakdown.items()},
           "fused_s": round(statistics.median(t[True]), 4), "for_loop_s": round(statistics.median(t[False]), 4),
           "ratio": round(statistics.median(t[False]) / statistics.median(t[True]), 3),
           "times_fused": [round(v, 3) for v in t[True]], "times_for_loop": [round(v, 3) for v in t[False]],
           "fused_vs_for_loop": {"max_abs_weight_diff": max_diff(res[True][0], res[False][0]),
                                 "final_loss_diff": abs(res[True][1] - res[False][1])},
           "seed1_vs_seed0_for_loop": {"max_abs_weight_diff": max_diff(w_seed1, res[False][0]),
                                       "final_loss_diff": abs(loss_seed1 - res[False][1])},
           "load_average": list(__import__("os").getloadavg()),
           "versions": env.versions(), "kernels": getattr(env, "kernel_set", lambda: None)()}
    out = Path(env.repo_root() or ".") / "results" / "bench" / "reconstruct.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    b = rec["profile_fused"]
    print(f"BR, block 3, {steps} steps of 2 x {a.seqlen}: fused {rec['fused_s']:.2f} s, for-loop "
          f"{rec['for_loop_s']:.2f} s, ratio {rec['ratio']:.2f}")
    print(f"  profile (fused): GEMM {b['gemm_ms'] / b['total_ms']:.0%}, attention {b['attention_ms'] / b['total_ms']:.0%}"
          f", optimizer {b['optimizer_step_ms'] / b['total_ms']:.0%}, other {b['other_ms'] / b['total_ms']:.0%}")
    f, s = rec["fused_vs_for_loop"], rec["seed1_vs_seed0_for_loop"]
    print(f"  fused vs for-loop: max |dW| {f['max_abs_weight_diff']:.2g}, |d loss| {f['final_loss_diff']:.2g}; "
          f"seed 1 vs seed 0: max |dW| {s['max_abs_weight_diff']:.2g}, |d loss| {s['final_loss_diff']:.2g}")


if __name__ == "__main__":
    main()
