"""``shrink sweep`` scaling: a chapter's grid in this process against the same grid as Ray tasks, 1 and 2 in flight.

    .venv/bin/python benchmarks/bench_sweep.py [--experiment pruning-reconstruction] [--scale tiny] [--repeats 2]

Every configuration runs the whole grid from an empty results folder (``SHRINK_RESULTS`` set to a fresh
temporary folder per run, so every cell computes), one torch thread per process (``SHRINK_THREADS=1``):

* ``sequential``: ``shrink.sweep.sweep(..., ray=None)``, the cells one after the other in this process;
* ``ray-1`` / ``ray-2``: the same call on one local Ray instance with 2 CPUs, at most 1 / 2 cells in flight.

The Ray instance is started once, and every worker process is started and has imported the cell's module before
any timing (start-up is reported, not counted). The configurations are interleaved ``--repeats`` times; the
median wall time is reported with the speed-up over ``sequential``, and the records of every run are compared
with the first sequential run's (every field but the timings: ``created``, ``seconds``, ``times``, ``*seconds``): a sweep that parallelises by
computing something else would show here. Writes ``results/bench/sweep.json``; timings never go into asserts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

#: when and how long, at any depth (01b's records time their stages: ``times``, ``prune_seconds``, ...)
VOLATILE = ("created", "seconds", "times")


def _strip(v):
    if isinstance(v, dict):
        return {k: _strip(x) for k, x in v.items() if k not in VOLATILE and not k.endswith("seconds")}
    if isinstance(v, list):
        return [_strip(x) for x in v]
    return v


def records(root: Path) -> dict:
    """``{file name: record without its timing fields}`` of every JSON record under ``root``."""
    return {p.name: _strip(json.loads(p.read_text())) for p in sorted(root.rglob("*.json"))}


def _warm(module: str) -> int:
    """Task: import the cell's module (torch, transformers, the chapter) in a worker; returns its pid."""
    os.environ["SHRINK_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    importlib.import_module(module)
    time.sleep(0.5)  # hold the worker so that the next warm-up task lands on another one
    return os.getpid()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", default="pruning-reconstruction")
    ap.add_argument("--scale", default="tiny")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    a = ap.parse_args()

    os.environ["SHRINK_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from shrink import distributed, env, sweep

    sw = sweep.get(a.experiment)
    module = sw.run.split(":")[0] if isinstance(sw.run, str) else sw.run.__module__
    importlib.import_module(module)
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))

    t0 = time.time()
    ray = distributed.init_local(a.cpus)
    startup_s = time.time() - t0
    t0 = time.time()
    warm_pids = distributed.run_tasks(_warm, [(module,)] * (2 * a.cpus), ray=ray)
    warmup_s = time.time() - t0

    runs, ref = [], None
    try:
        for r in range(a.repeats):
            for name, inflight in (("sequential", None), ("ray-1", 1), ("ray-2", 2)):
                root = work / f"{name}-{r}"
                os.environ["SHRINK_RESULTS"] = str(root)
                load0 = os.getloadavg()[0]
                t = time.time()
                out = sweep.sweep(a.experiment, a.scale, ray=None if inflight is None else ray,
                                  max_in_flight=inflight)
                wall = time.time() - t
                recs = records(root)
                ref = recs if ref is None else ref
                runs.append({"config": name, "repeat": r, "wall_s": wall, "load_before": load0,
                             "load_after": os.getloadavg()[0], "computed": out["computed"], "failed": out["failed"],
                             "cell_s": sum(c.get("seconds", 0.0) for c in out["cells"]),
                             "pids": sorted({c["pid"] for c in out["cells"] if "pid" in c}),
                             "records_equal_first_sequential": recs == ref, "n_records": len(recs)})
                print(f"{name:10s} repeat {r}: {wall:7.2f} s wall, {runs[-1]['cell_s']:7.2f} s in cells, "
                      f"{out['computed']} computed, {out['failed']} failed, records equal: {recs == ref}")
    finally:
        ray.shutdown()

    names = ("sequential", "ray-1", "ray-2")
    med = {n: statistics.median(x["wall_s"] for x in runs if x["config"] == n) for n in names}
    summary = {n: {"wall_s_median": med[n], "speedup_vs_sequential": med["sequential"] / med[n],
                   "wall_s": [x["wall_s"] for x in runs if x["config"] == n]} for n in names}
    summary["ray-2_over_ray-1"] = med["ray-1"] / med["ray-2"]
    print(f"\n{a.experiment} at {a.scale}: {runs[0]['computed']} cells; median of {a.repeats}")
    print("| config | wall (s) | speed-up vs sequential |\n|---|---|---|")
    for n in names:
        print(f"| {n} | {med[n]:.2f} | {summary[n]['speedup_vs_sequential']:.2f} |")
    print(f"ray-2 / ray-1: {summary['ray-2_over_ray-1']:.2f}x; Ray start {startup_s:.1f} s, "
          f"worker warm-up {warmup_s:.1f} s (not counted)")
    rec = {"benchmark": "sweep", "experiment": a.experiment, "scale": a.scale, "repeats": a.repeats,
           "ray_cpus": a.cpus, "threads_per_process": 1, "ray_startup_s": startup_s, "ray_warmup_s": warmup_s,
           "warm_pids": sorted(set(warm_pids)), "runs": runs, "summary": summary,
           "all_records_equal": all(x["records_equal_first_sequential"] for x in runs),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu_count": os.cpu_count(),
           "load_average": list(os.getloadavg()), "versions": env.versions(),
           "kernels": getattr(env, "kernel_set", lambda: None)()}
    out = Path(env.repo_root() or ".") / "results" / "bench" / "sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
