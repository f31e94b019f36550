"""DSIR over a sharded pool, one task per shard (Ray or in this process), resumable, merged exactly.

The in-process path (:class:`~shrink.selection.dsir.DSIR`) holds the whole pool's features in memory. Here
the pool stays in its shards (``pools.write_shards``: global index = line number across the shards in name
order) and every shard is a task, in two stages, as in the official package's fit/score split:

1. **fit** (per shard): featurise, write ``fit/<shard>-<key>.npz`` = the shard's summed count vector
   ``c_s = sum_{i in s} z_i`` (int64 ``[m]``), ``sum(z_i)`` per example (int64 ``[n_s]``, the length filter)
   and the record ids. The raw counts of the pool are the exact integer sum ``sum_s c_s`` (the
   ``num_tokens_to_fit="all"`` model); the target counts come from the target texts, featurised in the driver.
   Then ``log_diff = log(γ_target + 1e-8) - log(γ_raw + 1e-8)`` (:meth:`DSIR.fit_counts`).
2. **score** (per shard): featurise again and write ``score/<shard>-<key>.npy`` = ``z_i · log_diff``
   (float64 ``[n_s]``). Each example's sum runs over its own n-grams in the same order as in-process
   (unigrams, then bigrams), so the log-weights are **bit-identical** to :meth:`DSIR.log_weights`.
3. **merge** (driver, streaming over shards in order, memory ``O(k + shard)``): the eligible examples
   (official length filter) get the official Gumbel stream ``RandomState(seed).gumbel`` drawn shard by shard
   (the legacy generator's draws do not depend on how the request is split), and a running top-k keeps the
   ``k`` largest ``log w + G`` (or ``log w`` for ``top_k=True``), ties broken by the lower global index. With
   no tie at the ``k``-th value this is the in-process selection; a tie there is reported
   (``boundary_tie``), because ``np.argpartition`` in the in-process path breaks ties in no fixed order.

**Resumable.** Output names carry a key made from configs only (``shrink.results.config_key``): the shard's
resolved path, size and mtime (as Make does), the featuriser settings, and for scores the keys of every
shard and of the target (the fit that ``log_diff`` came from). A finished output is never recomputed; a
missing or unreadable one (deleted, truncated) is recomputed for that shard only. Outputs are written
atomically (:mod:`shrink.distributed`), so a killed run leaves whole files or none.

Introduced in: notebooks/04-data/04l-selection-speed.md
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .. import distributed
from ..results import config_key
from .dsir import DSIR
from .errors import SelectionError, ShardError
from .features import Featurizer
from .pools import iter_shard, shard_paths


def shard_identity(path: str | Path) -> dict:
    """What names a shard's content without reading it: resolved path, size, mtime (ns)."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def target_key(texts: Sequence[str]) -> str:
    """sha256 (16 hex) over the target texts, in order."""
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def _featurizer(params: dict) -> Featurizer:
    return Featurizer(params["mode"], params["ngrams"], params["num_buckets"], engine=params["engine"])


def _read(path: str) -> tuple[list, Iterable[str]]:
    ids: list = []

    def texts():
        for r in iter_shard(path, "text"):
            ids.append(r.get("id"))
            yield r["text"]

    return ids, texts()


def fit_shard(path: str, out: str, params: dict) -> dict:
    """Task: featurise one shard, write its counts, per-example n-gram totals and ids (``out``, .npz)."""
    s = distributed.stamp(reset_peak=True)
    ids, texts = _read(path)
    feats = _featurizer(params)(texts)
    distributed.atomic_save_npz(out, counts=feats.counts(), totals=feats.ngram_totals(),
                                ids=np.array(json.dumps(ids)))
    e = distributed.stamp()
    return {"stage": "fit", "shard": path, "n": len(feats), "cpu_s": e["cpu"] - s["cpu"],
            "wall_s": e["wall"] - s["wall"], "pid": s["pid"], "host": s["host"], "peak_rss_mb": e["peak_rss_mb"] - s["peak_rss_mb"]}


def score_shard(path: str, out: str, params: dict, log_diff: np.ndarray) -> dict:
    """Task: featurise one shard again and write ``z_i · log_diff`` (float64 ``[n_s]``, ``out``, .npy)."""
    s = distributed.stamp(reset_peak=True)
    ids, texts = _read(path)
    feats = _featurizer(params)(texts)
    distributed.atomic_save_npy(out, feats.score(np.asarray(log_diff, np.float64)))
    e = distributed.stamp()
    return {"stage": "score", "shard": path, "n": len(feats), "cpu_s": e["cpu"] - s["cpu"],
            "wall_s": e["wall"] - s["wall"], "pid": s["pid"], "host": s["host"], "peak_rss_mb": e["peak_rss_mb"] - s["peak_rss_mb"]}


class _TopK:
    """Running top-k of (value, global index) pairs, larger value first, ties to the lower index; keeps
    ``k + 1`` to tell whether the ``k``-th value is tied with the next one."""

    def __init__(self, k: int):
        self.k = k
        self.val = np.zeros(0, np.float64)
        self.idx = np.zeros(0, np.int64)

    def add(self, val: np.ndarray, idx: np.ndarray) -> None:
        v, i = np.concatenate([self.val, val]), np.concatenate([self.idx, idx])
        if v.size > self.k + 1:
            keep = np.argpartition(-v, self.k)[: self.k + 1]
            # argpartition may cut inside a tie: take every pair tied with the (k+1)-th value, then order
            cut = v[keep].min()
            keep = np.flatnonzero(v >= cut)
            v, i = v[keep], i[keep]
        order = np.lexsort((i, -v))[: self.k + 1]
        self.val, self.idx = v[order], i[order]

    def result(self) -> tuple[np.ndarray, bool]:
        tie = self.val.size > self.k and self.k > 0 and self.val[self.k - 1] == self.val[self.k]
        return np.sort(self.idx[: self.k]), bool(tie)


def _run_stage(fn, jobs: list[tuple], ray, max_in_flight, stage: str) -> list[dict]:
    res = distributed.run_tasks(fn, jobs, ray=ray, max_in_flight=max_in_flight)
    failed = [r for r in res if isinstance(r, distributed.TaskFailure)]
    if failed:
        lines = "; ".join(f"{jobs[f.index][0]}: {f.error}: {f.message}" for f in failed[:5])
        raise ShardError(f"{len(failed)} of {len(jobs)} {stage} tasks failed ({lines}). The finished shards are "
                         "kept; fix or regenerate the failing shards and rerun the same command: only those are "
                         "recomputed.")
    return res


def select_sharded(pool: str | Sequence[str], target: Sequence[str], k: int, *, out_dir: str | Path,
                   seed: int = 0, top_k: bool = False, mode: str = "exact", ngrams: int = 2,
                   num_buckets: int = 10000, min_example_length: int = 100, engine: str = "regex", ray=None,
                   max_in_flight: int | None = None, with_ids: bool = False) -> dict:
    """DSIR selection of ``k`` examples of a sharded pool (module docstring).

    Args:
        pool: glob of JSON-lines shards (name order = global order) or a list of paths.
        target: target texts.
        k, seed, top_k, mode, ngrams, num_buckets, min_example_length, engine: as :class:`DSIR`.
        out_dir: folder of the per-shard outputs (``fit/``, ``score/``); reuse it to resume.
        ray: the ``ray`` module of a :func:`shrink.distributed.session`, or None (tasks run in this process).
        max_in_flight: at most this many shard tasks at once (the number of workers used).
        with_ids: also return the selected records' ids.

    Returns:
        dict: ``indices`` (sorted global indices, list of int), ``pool_chunks``, ``eligible``,
        ``boundary_tie``, ``log_weight_range``, per-stage ``computed`` / ``reused`` shard counts, summed task
        CPU seconds and wall seconds per stage, the worker pids, the largest peak RSS of a task above its
        start (MiB, ``task_peak_rss_mb``), and ``ids`` when asked.
    """
    paths = [str(p) for p in shard_paths(pool)]
    target = list(target)
    if not target:
        raise SelectionError("the target is empty: give at least one target text (e.g. WikiText-2 validation "
                             "chunks from shrink.selection.pools.target_chunks()).")
    DSIR(mode=mode, ngrams=ngrams, num_buckets=num_buckets, engine=engine).featurizer()  # validates settings
    params = {"mode": mode, "ngrams": ngrams, "num_buckets": num_buckets, "engine": engine}
    out_dir = Path(out_dir)
    keys = [config_key({"shard": shard_identity(p), **params}) for p in paths]
    fit_out = [out_dir / "fit" / f"{Path(p).name}-{key}.npz" for p, key in zip(paths, keys)]
    tkey = target_key(target)
    fit_id = config_key({"shards": keys, "target": tkey, **params})
    score_out = [out_dir / "score" / f"{Path(p).name}-{config_key({'shard': key, 'fit': fit_id})}.npy"
                 for p, key in zip(paths, keys)]
    stats: dict = {"fit": {}, "score": {}, "merge": {}}

    # 1. fit: counts per shard (missing or unreadable outputs only)
    t0 = time.time()
    FIT_KEYS = ("counts", "totals", "ids")
    todo = [i for i, o in enumerate(fit_out) if distributed.load_npz(o, FIT_KEYS) is None]
    done = _run_stage(fit_shard, [(paths[i], str(fit_out[i]), params) for i in todo], ray, max_in_flight, "fit")
    fits = [distributed.load_npz(o, FIT_KEYS) for o in fit_out]
    if any(f is None for f in fits):
        raise ShardError(f"a fit output under {out_dir / 'fit'} could not be read back right after it was written; "
                         "check the disk (free space, permissions) and rerun.")
    stats["fit"] = {"computed": len(todo), "reused": len(paths) - len(todo), "wall_s": time.time() - t0,
                    "task_cpu_s": sum(r["cpu_s"] for r in done), "pids": sorted({r["pid"] for r in done}),
                    "task_peak_rss_mb": max((r["peak_rss_mb"] for r in done), default=None)}

    tf = _featurizer(params)(target)
    d = DSIR(mode=mode, ngrams=ngrams, num_buckets=num_buckets, min_example_length=min_example_length,
             engine=engine)
    d.fit_counts(np.sum([f["counts"] for f in fits], axis=0), tf.counts())

    # 2. score: log-weights per shard
    t0 = time.time()
    todo = [i for i, o in enumerate(score_out) if distributed.load_npy(o) is None]
    ld = d.log_diff if ray is None else ray.put(d.log_diff)
    done = _run_stage(score_shard, [(paths[i], str(score_out[i]), params, ld) for i in todo], ray, max_in_flight,
                      "score")
    stats["score"] = {"computed": len(todo), "reused": len(paths) - len(todo), "wall_s": time.time() - t0,
                      "task_cpu_s": sum(r["cpu_s"] for r in done), "pids": sorted({r["pid"] for r in done}),
                      "task_peak_rss_mb": max((r["peak_rss_mb"] for r in done), default=None)}

    # 3. merge: streaming global (Gumbel) top-k
    t0, c0 = time.time(), time.process_time()
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
        raise SelectionError(f"k={k!r} must be a non-negative integer: pass the number of examples to select, e.g. k=500.")
    nn = ngrams
    elig = [((f["totals"] + nn * (nn - 1) // 2) // nn) >= min_example_length for f in fits]
    n_total, n_elig = sum(e.size for e in elig), int(sum(e.sum() for e in elig))
    if k > n_elig:
        raise SelectionError(f"k={k} exceeds the {n_elig} eligible examples of the pool (of {n_total}); lower k, "
                             "enlarge the pool, or lower min_example_length.")
    rs = np.random.RandomState(seed)
    best = _TopK(k)
    lo, hi, offset = np.inf, -np.inf, 0
    for o, e in zip(score_out, elig):
        lw = distributed.load_npy(o)
        if lw is None or lw.shape != e.shape:
            raise ShardError(f"score output {o} is missing or does not match its shard; delete it and rerun (only "
                             "that shard is recomputed).")
        if lw.size:
            lo, hi = min(lo, float(lw.min())), max(hi, float(lw.max()))
        idx = np.flatnonzero(e)
        v = lw[idx]
        if np.isnan(v).any():
            raise SelectionError("log weights contain NaN; check the target and raw distributions (empty target?).")
        if not top_k:
            v = v + rs.gumbel(size=idx.size)
        best.add(v, idx + offset)
        offset += e.size
    indices, tie = best.result()
    stats["merge"] = {"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
    out = {"indices": indices.tolist(), "pool_chunks": n_total, "eligible": n_elig, "boundary_tie": tie,
           "log_weight_range": [lo, hi], "shards": paths, "out_dir": str(out_dir), "stages": stats}
    if with_ids:
        all_ids = [i for f in fits for i in json.loads(str(f["ids"]))]
        out["ids"] = [all_ids[i] for i in out["indices"]]
    return out
