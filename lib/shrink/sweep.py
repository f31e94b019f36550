"""``shrink sweep EXPERIMENT --scale S [--ray ADDRESS] [--only KEY=VALUE ...]``: a chapter's grid as Ray tasks.

Every cell of a registered grid (:data:`SWEEPS`) is one call of the chapter's own cached measurement
function (e.g. :func:`shrink.selection.experiment.dsir_kl_run`), which writes its record through
:func:`shrink.results.cached`: atomic, keyed by the config. So

* a killed or preempted sweep resumes: rerun the same command and every cell whose record exists is
  **reused** (probed with ``SHRINK_RESULTS_MODE=load``, which never computes), only the others run;
* a cell that fails (an exception, a worker process that dies) is reported per cell (``failed`` with the
  error) and the other cells' records are kept;
* the notebooks then render from the records exactly as after ``make run`` (same function, same key).

Each cell is a Ray task with the resources its sweep declares per scale (CPUs, GPUs, memory: ``resources``
below; a cluster schedules a cell only on a node that has them). Without an address the sweep starts a
local Ray instance (``--workers`` CPUs); ``--ray none`` runs the cells one after the other in this process
(the sequential path the Ray path is tested against). The worker gets the driver's ``SHRINK_*`` settings
(results folder, data folder, cache, stale policy) with each task, and sets torch's threads from
``SHRINK_THREADS``.

Introduced in: README ("Sweeps on a Ray cluster")
"""

from __future__ import annotations

import importlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from . import distributed
from .errors import BadInputError, RecordMissingError, UnknownNameError

#: settings a worker takes from the driver (paths must be valid on the workers: a shared filesystem)
FORWARDED_ENV = ("SHRINK_RESULTS", "SHRINK_DATA", "SHRINK_CACHE", "SHRINK_STALE", "SHRINK_RECOMPUTE",
                 "SHRINK_THREADS", "SHRINK_ONLINE", "SHRINK_STANDINS", "SHRINK_REUSE_STALE")


@dataclass(frozen=True)
class Sweep:
    """A chapter's grid: ``run`` (``"module:function"`` or a function, called as ``fn(cfg, scale=scale, **cell)``) over
    ``cells(cfg)`` (a list of keyword dicts), with the preset ``scales.get(preset, scale)``."""

    chapter: str
    preset: str
    run: str | Callable
    cells: Callable
    resources: dict = field(default_factory=dict)  # scale -> ray.remote options
    notebook: str = ""


def _dsir_kl_cells(cfg) -> list[dict]:
    return [{"with_wiki": w, "seed": s} for w in (False, True) for s in cfg.seeds]


def _pruning_cells(cfg) -> list[dict]:
    from .pruning.experiment import sweep_cells

    return sweep_cells(cfg)


def _weight_only_cells(cfg) -> list[dict]:
    from .quant.weightonly import sweep_cells

    return sweep_cells(cfg)


SWEEPS: dict[str, Sweep] = {
    "dsir-kl": Sweep(chapter="04-data", preset="data", run="shrink.selection.experiment:dsir_kl_run",
                     cells=_dsir_kl_cells, notebook="notebooks/04-data/04b-dsir-kl-reduction.md",
                     # featurising the pool twice (exact + fast) plus three metric spaces: < 1 GB at cpu
                     resources={"tiny": {"num_cpus": 1, "memory": 1 * 2**30},
                                "cpu": {"num_cpus": 1, "memory": 2 * 2**30},
                                "paper": {"num_cpus": 8, "memory": 64 * 2**30}}),
    "pruning-reconstruction": Sweep(
        chapter="01-weights", preset="pruning-reconstruction", run="shrink.pruning.experiment:sweep_cell",
        cells=_pruning_cells, notebook="notebooks/01-weights/01b-reconstruction.md",
        # one BR/GP run: the model, the dense and pruned streams of the calibration set: ~3 GB at cpu
        resources={"tiny": {"num_cpus": 1, "memory": 1 * 2**30}, "cpu": {"num_cpus": 1, "memory": 4 * 2**30},
                   "paper": {"num_cpus": 8, "num_gpus": 1, "memory": 64 * 2**30}}),
    "weight-only": Sweep(chapter="02-bits", preset="weight-only", run="shrink.quant.weightonly:sweep_cell",
                         cells=_weight_only_cells, notebook="notebooks/02-bits/02g-weight-only-gptq.md",
                         # SmolLM2 fp32 copy + GPTQ statistics: ~2 GB at cpu; a 7B model in fp16 on one GPU at paper
                         resources={"tiny": {"num_cpus": 1, "memory": 1 * 2**30},
                                    "cpu": {"num_cpus": 1, "memory": 4 * 2**30},
                                    "paper": {"num_cpus": 8, "num_gpus": 1, "memory": 64 * 2**30}}),
}


def get(name: str) -> Sweep:
    if name not in SWEEPS:
        raise UnknownNameError(f"no sweep named {name!r}; sweeps: {', '.join(sorted(SWEEPS))} (add one to "
                               "shrink.sweep.SWEEPS: the chapter's cached function and its grid).")
    return SWEEPS[name]


def parse_only(items: list[str] | None) -> dict:
    """``["seed=0", "with_wiki=false"]`` -> ``{"seed": "0", "with_wiki": "false"}`` (compared as text)."""
    out = {}
    for it in items or []:
        key, sep, value = it.partition("=")
        if not sep or not key:
            raise BadInputError(f"--only {it!r} is not KEY=VALUE; use e.g. --only seed=0 --only with_wiki=false.")
        out[key] = value
    return out


def select_cells(cells: list[dict], only: dict) -> list[dict]:
    if not only:
        return cells
    keys = set().union(*(c.keys() for c in cells)) if cells else set()
    unknown = sorted(set(only) - keys)
    if unknown:
        raise BadInputError(f"--only {unknown}: not a grid dimension; the dimensions are {sorted(keys)}.")
    picked = [c for c in cells if all(str(c[k]).lower() == v.lower() for k, v in only.items())]
    if not picked:
        raise BadInputError(f"--only {only} matches no cell; the cells are {cells}.")
    return picked


@contextmanager
def _env(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_cell(sw: Sweep, scale: str, cell: dict, env: dict) -> dict:
    """Task: run one cell. Reuses its record if present (probe under ``SHRINK_RESULTS_MODE=load``), else
    computes it through the chapter's cached function. Returns ``{"cell", "status", "seconds", "pid"}``."""
    from . import scales

    if callable(sw.run):
        fn = sw.run
    else:
        mod, fn_name = sw.run.split(":")
        fn = getattr(importlib.import_module(mod), fn_name)
    with _env({k: v for k, v in env.items() if k in FORWARDED_ENV}):
        if os.environ.get("SHRINK_THREADS"):
            import torch

            torch.set_num_threads(int(os.environ["SHRINK_THREADS"]))
        cfg = scales.get(sw.preset, scale)
        t0 = time.time()
        status = "reused"
        if os.environ.get("SHRINK_RECOMPUTE") != "1":
            try:
                with _env({"SHRINK_RESULTS_MODE": "load"}):
                    fn(cfg, scale=scale, **cell)
            except RecordMissingError:
                status = "computed"
        else:
            status = "computed"
        if status == "computed":
            with _env({"SHRINK_RESULTS_MODE": "compute"}):
                fn(cfg, scale=scale, **cell)
    return {"cell": cell, "status": status, "seconds": time.time() - t0, "pid": os.getpid()}


def sweep(name: str | Sweep, scale: str, *, ray=None, only: dict | None = None, max_in_flight: int | None = None,
          max_retries: int = 1) -> dict:
    """Run the grid ``name`` at ``scale`` (module docstring); ``ray`` None = sequential, in this process.

    Returns:
        ``{"experiment", "scale", "chapter", "cells": [{"cell", "status": computed|reused|failed, ...}],
        "computed", "reused", "failed", "seconds"}``.
    """
    from . import scales

    scales.check_scale(scale)
    sw = name if isinstance(name, Sweep) else get(name)
    cells = select_cells(sw.cells(scales.get(sw.preset, scale)), only or {})
    env = {k: os.environ.get(k) for k in FORWARDED_ENV if os.environ.get(k) is not None}
    opts = dict(sw.resources.get(scale, {"num_cpus": 1}))
    if ray is not None:
        opts["max_retries"] = max_retries
    t0 = time.time()
    res = distributed.run_tasks(run_cell, [(sw, scale, c, env) for c in cells], ray=ray,
                                max_in_flight=max_in_flight, resources=opts)
    rows = []
    for c, r in zip(cells, res):
        if isinstance(r, distributed.TaskFailure):
            rows.append({"cell": c, "status": "failed", "error": r.error, "message": r.message})
        else:
            rows.append(r)
    count = {s: sum(r["status"] == s for r in rows) for s in ("computed", "reused", "failed")}
    return {"experiment": name if isinstance(name, str) else sw.run.__name__ if callable(sw.run) else sw.run,
            "scale": scale, "chapter": sw.chapter, "notebook": sw.notebook,
            "resources": opts, "cells": rows, **count, "seconds": time.time() - t0}


# --------------------------------------------------------------------------------------------------- CLI
def add_parser(sub) -> None:
    s = sub.add_parser("sweep", help="run a chapter's grid of cached measurements as Ray tasks, JSON out")
    s.add_argument("experiment", help=f"one of: {', '.join(sorted(SWEEPS))}")
    s.add_argument("--scale", required=True)
    s.add_argument("--ray", default="local", metavar="ADDRESS|local|none",
                   help="a cluster address (auto, HOST:PORT, ray://HOST:10001), local (default: a Ray instance "
                        "here) or none (sequential, in this process)")
    s.add_argument("--workers", type=int, default=None, help="CPUs of the local instance / cells in flight")
    s.add_argument("--only", action="append", metavar="KEY=VALUE", help="restrict to cells with KEY=VALUE")


def cmd_sweep(args) -> dict:
    from . import scales

    scales.check_scale(args.scale)
    get(args.experiment)
    only = parse_only(args.only)
    if args.workers is not None and args.workers < 1:
        raise BadInputError(f"--workers {args.workers} must be a positive integer, e.g. --workers 2.")
    if args.ray == "none":
        out = sweep(args.experiment, args.scale, only=only)
    else:
        with distributed.session(args.ray, args.workers) as ray:
            out = sweep(args.experiment, args.scale, ray=ray, only=only, max_in_flight=args.workers)
    if out["failed"]:
        out["hint"] = "rerun the same command: finished cells are reused, only the failed ones run again."
    return out
