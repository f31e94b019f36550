"""Speed of the sharded DSIR path: in-process vs shard tasks without Ray vs Ray with 1, 2, ... workers.

:func:`ray_scaling` writes a pool as shards, then runs, interleaved ``repeats`` times on fresh output folders
(nothing reused): the in-process :class:`~shrink.selection.dsir.DSIR` (one featurisation), the sharded path
with tasks in this process (``ray=None``), and the sharded path on one local Ray instance with at most ``w``
shard tasks in flight for each ``w`` in ``workers``. Per run it reports wall seconds per stage, the summed
process-CPU seconds of the shard tasks (per-core throughput does not depend on how busy the machine is; wall
clock does, so the load average is recorded before and after each run), the worker pids, and whether the
indices (Gumbel and deterministic top-k) equal the in-process ones. Timings go to records, never into asserts.

:func:`pile_estimate` turns a per-core throughput into hours for a corpus of a given size on ``cores`` cores,
assuming linear scaling (measured here only from 1 to 2 workers) and no I/O limit.

Introduced in: notebooks/04-data/04l-selection-speed.md
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from dataclasses import dataclass

from .. import distributed
from ..scales import Preset, PresetError, register
from .dsir import DSIR
from .pools import write_shards
from .scaleout import select_sharded


@dataclass(frozen=True)
class SpeedPreset(Preset):
    """Notebook 04l: the pool (``max_per_domain``: None = the whole offline pool), shards, k, workers,
    repetitions of the Ray comparison, and the pool of the official-package comparison (``bench_*``,
    ``benchmarks/bench_dsir.py``; at cpu its committed record)."""

    max_per_domain: int | None = None
    target_max_chunks: int | None = None
    n_shards: int = 8
    k: int = 500
    workers: tuple = (1, 2)
    repeats: int = 2
    bench_max_per_domain: int | None = None
    bench_repeats: int = 3

    def check(self) -> None:
        if self.n_shards < 1 or self.k < 1 or self.repeats < 1 or not self.workers or min(self.workers) < 1:
            raise PresetError("SpeedPreset: n_shards, k, repeats and every workers entry must be >= 1")


register("dsir-speed", {
    "tiny": SpeedPreset(model="tiny-llama", max_per_domain=20, target_max_chunks=100, n_shards=4, k=20, repeats=1,
                        bench_max_per_domain=15, bench_repeats=1),
    "cpu": SpeedPreset(model="smollm2-135m"),
    "paper": SpeedPreset(model="smollm2-135m"),
})


def _load() -> float:
    return os.getloadavg()[0]


def ray_scaling(pool: list[dict], target: list[str], *, k: int, n_shards: int, workers=(1, 2), repeats: int = 2,
                mode: str = "exact", seed: int = 0, ray_cpus: int | None = None) -> dict:
    """Run the comparison (module docstring); returns a JSON-able dict (``runs``, ``summary``, equality flags).

    Args:
        pool: chunk records (``id``, ``text``), written as ``n_shards`` JSON-lines shards (zstd).
        target: target texts.
        k: examples selected (Gumbel top-k with ``seed`` and deterministic top-k).
        workers: shard tasks in flight on the local Ray instance, one configuration each.
        repeats: interleaved repetitions of every configuration.
        ray_cpus: CPUs of the local Ray instance (default ``max(workers)``).
    """
    work = Path(tempfile.mkdtemp(prefix="dsir-ray-scaling-"))
    paths = write_shards(pool, work / "pool", n_shards)
    glob = str(work / "pool" / "*.jsonl.zst")
    mb = sum(len(c["text"].encode()) for c in pool) / 2**20
    n = len(pool)

    def in_process() -> dict:
        l0, t0, c0 = _load(), time.time(), time.process_time()
        d = DSIR(mode=mode).fit([c["text"] for c in pool], target)
        gum, top = d.select(k, seed=seed), d.select(k, top_k=True)
        return {"config": "in-process", "wall_s": time.time() - t0, "task_cpu_s": time.process_time() - c0,
                "load_before": l0, "load_after": _load(), "gumbel": gum.tolist(), "topk": top.tolist(), "pids": [os.getpid()]}

    def sharded(name, ray, w, r) -> dict:
        out = work / f"out-{name}-{r}"
        l0, t0 = _load(), time.time()
        g = select_sharded(glob, target, k, seed=seed, mode=mode, out_dir=out, ray=ray, max_in_flight=w)
        t = select_sharded(glob, target, k, top_k=True, mode=mode, out_dir=out, ray=ray, max_in_flight=w)
        assert t["stages"]["fit"]["computed"] == 0 and t["stages"]["score"]["computed"] == 0  # resumed, not redone
        st = g["stages"]
        return {"config": name, "wall_s": st["fit"]["wall_s"] + st["score"]["wall_s"] + st["merge"]["wall_s"],
                "wall_fit_s": st["fit"]["wall_s"], "wall_score_s": st["score"]["wall_s"],
                "wall_merge_s": st["merge"]["wall_s"], "task_cpu_s": st["fit"]["task_cpu_s"] + st["score"]["task_cpu_s"],
                "load_before": l0, "load_after": _load(), "gumbel": g["indices"], "topk": t["indices"],
                "pids": sorted(set(st["fit"]["pids"]) | set(st["score"]["pids"])), "wall_total_s": time.time() - t0,
                "task_peak_rss_mb": max(st["fit"]["task_peak_rss_mb"], st["score"]["task_peak_rss_mb"])}

    runs: list[dict] = []
    t_start = time.time()
    ray = distributed.init_local(ray_cpus or max(workers))
    startup_s = time.time() - t_start
    # start every worker process (and its imports) before timing: worker start-up is not shard work
    t_warm = time.time()
    distributed.run_tasks(_warm, [(1.0,)] * (2 * (ray_cpus or max(workers))), ray=ray)
    warmup_s = time.time() - t_warm
    try:
        for r in range(repeats):
            runs.append(in_process() | {"repeat": r})
            runs.append(sharded("sharded-no-ray", None, None, r) | {"repeat": r})
            for w in workers:
                runs.append(sharded(f"ray-{w}", ray, w, r) | {"repeat": r, "workers": w})
    finally:
        ray.shutdown()
    ref = runs[0]
    names = ["in-process", "sharded-no-ray"] + [f"ray-{w}" for w in workers]
    summary = {}
    for name in names:
        rs = [x for x in runs if x["config"] == name]
        wall = statistics.median(x["wall_s"] for x in rs)
        cpu = statistics.median(x["task_cpu_s"] for x in rs)
        summary[name] = {"wall_s": wall, "task_cpu_s": cpu, "chunks_per_wall_s": n / wall,
                         "chunks_per_task_cpu_s": n / cpu, "mb_per_task_cpu_s": mb / cpu,
                         "wall_s_all": [x["wall_s"] for x in rs],
                         "load": [[x["load_before"], x["load_after"]] for x in rs],
                         "workers_seen": max(len(x["pids"]) for x in rs),
                         # peak RSS of one shard task above its start (None in-process: not per task)
                         "task_peak_rss_mb": max((x["task_peak_rss_mb"] for x in rs if x.get("task_peak_rss_mb")
                                                  is not None), default=None)}
    w1, wmax = f"ray-{min(workers)}", f"ray-{max(workers)}"
    return {"pool_chunks": n, "pool_mb": mb, "n_shards": len(paths), "k": k, "mode": mode, "repeats": repeats,
            "workers": list(workers), "ray_cpus": ray_cpus or max(workers), "ray_startup_s": startup_s, "ray_warmup_s": warmup_s,
            "cpu_count": os.cpu_count(), "summary": summary,
            "speedup_wall": summary[w1]["wall_s"] / summary[wmax]["wall_s"],
            "ray_overhead_wall": summary[w1]["wall_s"] / summary["sharded-no-ray"]["wall_s"],
            "indices_equal": {x["config"] + f"#{x['repeat']}": x["gumbel"] == ref["gumbel"] and x["topk"] == ref["topk"]
                              for x in runs},
            "runs": [{k2: v for k2, v in x.items() if k2 not in ("gumbel", "topk")} for x in runs]}


def _warm(seconds: float) -> int:
    """Warm-up task: import the shard code, hold the worker ``seconds`` (so that tasks spread over workers)."""
    from . import scaleout  # noqa: F401

    time.sleep(seconds)
    return os.getpid()


def pile_estimate(mb_per_cpu_s: float, *, corpus_gib: float, cores: int) -> float:
    """Hours to featurise and score ``corpus_gib`` GiB of text on ``cores`` cores at ``mb_per_cpu_s`` MiB
    per CPU-second per core (linear scaling, no I/O limit)."""
    return corpus_gib * 1024 / (mb_per_cpu_s * cores) / 3600
