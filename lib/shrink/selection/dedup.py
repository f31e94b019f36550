"""SemDeDup and DBP on the offline pool (notebook 04j): the ε curve, DBP's cluster complexities and quotas,
and the downstream value of a pruned pool (a byte-level LM trained from scratch on the kept chunks).

**Pool**: ``experiment.setting(cfg, with_wiki=False)`` of a :class:`DedupPreset` (``max_per_domain`` chunks of
128 words per domain, no WikiText: the runs are evaluated on WikiText-2 test, a domain none of the pools
holds). **Embeddings**: MiniLM (``cfg.encoder``), mean-pooled and L2-normalised
(:func:`shrink.selection.baselines.embed`). **Clusters**: scikit-learn ``KMeans`` with ``n_clusters`` and the
run's seed (the seed is the only source of spread of the curve: the embeddings are deterministic).

**SemDeDup** (Abbas et al. 2023): :func:`~shrink.selection.baselines.semdedup_scores` gives each chunk the
largest cosine similarity ``m`` to a less prototypical member of its cluster; SemDeDup at ``eps`` keeps
``m <= 1 - eps`` (the ε curve is the CDF of ``m``) and SemDeDup at a budget ``n`` keeps the ``n`` smallest
``m`` (= SemDeDup at the ε where ``n`` remain; that ε is in the record).

**DBP** (Abbas et al., ICLR 2024): SemDeDup at ``semdedup_eps`` first, then k-means on the kept chunks,
``C_j = d_inter * d_intra``, quotas from the QP (:func:`~shrink.selection.baselines.dbp_quotas`, ``dbp_tau``,
``min_ratio`` 0.5) and the hardest members of each cluster.

**Runs**: for every fraction ``f`` of ``fractions`` and seed, ``n = round(f N)`` chunks by ``random``,
``semdedup`` and ``dbp``, and the full pool; each is trained by
:func:`shrink.selection.downstream.train_on_selection` (the one loop, the same byte budget
``steps x batch_size x seqlen`` for every selection, WikiText-2 test bits per byte). Records:
``dedup-curve`` (one per seed: scores, curve, selections, DBP's per-cluster numbers) and ``downstream-run``.

Introduced in: notebooks/04-data/04j-semdedup-dbp.md
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import results
from ..scales import PresetError, register
from . import baselines as B
from . import downstream as DS
from . import experiment as E
from .errors import SelectionError
from .resample import topk

CHAPTER = "04-data"
DEDUP_METHODS = ("random", "semdedup", "dbp")


@dataclass(frozen=True)
class DedupPreset(DS.DownstreamPreset):
    """:class:`~shrink.selection.downstream.DownstreamPreset` (pool, from-scratch run) plus SemDeDup/DBP knobs:
    ``eps_grid`` (the ε curve), ``fractions`` (kept fractions of the runs), ``semdedup_eps`` (DBP's
    pre-deduplication), ``n_clusters``, ``dbp_tau``, ``dbp_min_ratio``, ``dbp_neighbors``."""

    eps_grid: tuple = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
    fractions: tuple = (0.25, 0.5)
    dbp_min_ratio: float = 0.5
    dbp_neighbors: int = 20

    def check(self) -> None:
        super().check()
        if any(not 0 < f < 1 for f in self.fractions) or not self.fractions:
            raise PresetError(f"DedupPreset.fractions={self.fractions}: give kept fractions in (0, 1)")
        if any(not 0 <= e < 1 for e in self.eps_grid):
            raise PresetError(f"DedupPreset.eps_grid={self.eps_grid}: SemDeDup's eps lie in [0, 1)")


register("data-dedup", {
    "tiny": DedupPreset(model="tiny-llama", max_per_domain=20, target_max_chunks=50, seeds=(0, 1), steps=8,
                        batch_size=4, seqlen=64, warmup=2, eval_every=0, wiki_windows=8, encoder="tiny-bert",
                        n_clusters=4, semdedup_eps=1e-4, dbp_neighbors=3, eps_grid=(0.0, 1e-4, 1e-3, 0.01)),
    # 8 domains x 150 chunks = 1,200 chunks (~77 s of MiniLM on one idle core); 3 methods x 2 fractions + the full
    # pool = 7 runs per seed x 3 seeds x 100 steps of 8 x 128 bytes (102,400 bytes, < 1 epoch of the 25 % set):
    # 21 x ~20 s ~ 7 min on one idle core (byte-llama: 191 ms per step at 8 x 128)
    "cpu": DedupPreset(model="byte-llama", max_per_domain=150, steps=100, warmup=10, eval_every=0,
                       wiki_windows=64),
    # the papers' scale (LAION / DataComp, k = 500 clusters) is not offline; the same code on the whole pool
    "paper": DedupPreset(model="byte-llama", max_per_domain=None, n_clusters=100, steps=2000, seqlen=512,
                         batch_size=32, lr=1e-3, warmup=100, eval_every=500, wiki_windows=512),
})


def curve_config(cfg, seed: int) -> dict:
    return {"pool": E.pool_config(cfg, False), "encoder": cfg.encoder, "n_clusters": cfg.n_clusters, "seed": seed,
            "eps_grid": list(cfg.eps_grid), "fractions": list(cfg.fractions), "semdedup_eps": cfg.semdedup_eps,
            "dbp": {"tau": cfg.dbp_tau, "min_ratio": cfg.dbp_min_ratio, "neighbors": cfg.dbp_neighbors},
            "methods": list(DEDUP_METHODS)}


def budget_n(n_pool: int, fraction: float) -> int:
    """Chunks kept at a fraction: ``round(fraction * n_pool)`` (at least 1)."""
    return max(1, int(round(fraction * n_pool)))


def dedup_curve(cfg, *, seed: int, scale: str) -> dict:
    """One seed of 04j's selections (cached as ``dedup-curve``): SemDeDup scores ``m`` and the kept fraction at
    every ε of ``eps_grid`` (overall and per domain), then for every fraction the ``random`` / ``semdedup`` /
    ``dbp`` selections (sorted indices), the ε SemDeDup needs for that budget, and DBP's per-cluster
    ``d_intra``, ``d_inter``, sizes and quotas."""

    def run() -> dict:
        st = E.setting(cfg, False)
        emb = E._embeddings(cfg.encoder, tuple(st.texts))
        n = len(st.pool)
        labels, cents = B.kmeans(emb, cfg.n_clusters, seed)
        m = B.semdedup_scores(emb, n_clusters=cfg.n_clusters, seed=seed, labels=labels, centroids=cents)
        dom = np.array(st.domains)
        doms = sorted(set(st.domains))
        curve = [{"eps": float(e), "kept": float(np.mean(m <= 1 - e)),
                  "by_domain": {d: float(np.mean(m[dom == d] <= 1 - e)) for d in doms}} for e in cfg.eps_grid]
        pre = np.flatnonzero(m <= 1 - cfg.semdedup_eps)
        out = {"pool_chunks": n, "pool_hash": E.pools.pool_hash(st.pool), "m": m.tolist(), "curve": curve,
               "cluster_sizes": np.bincount(labels, minlength=cfg.n_clusters).tolist(),
               "pre_kept": int(pre.size), "selections": {}, "dbp": {}}
        for f in cfg.fractions:
            k = budget_n(n, f)
            if k > pre.size:
                raise SelectionError(f"fraction {f} needs {k} chunks but SemDeDup at eps={cfg.semdedup_eps} keeps "
                                     f"{pre.size}; lower the fraction or semdedup_eps in the preset.")
            sd = topk(-m, k)
            idx, _, info = B.dbp(emb[pre], k, n_clusters=cfg.n_clusters, seed=seed, tau=cfg.dbp_tau,
                                 min_ratio=cfg.dbp_min_ratio, n_neighbors=cfg.dbp_neighbors)
            out["selections"][str(f)] = {"random": E.random_selection(n, k, seed).tolist(), "semdedup": sd.tolist(),
                                         "dbp": np.sort(pre[idx]).tolist()}
            out["dbp"][str(f)] = {"quotas": info["quotas"].tolist(), "sizes": info["sizes"].tolist(),
                                  "d_intra": [None if not np.isfinite(v) else float(v) for v in info["d_intra"]],
                                  "d_inter": info["d_inter"].tolist(),
                                  "semdedup_eps_at_budget": float(1 - np.sort(m)[k - 1])}
        return out

    return results.cached("dedup-curve", curve_config(cfg, seed), run, scale=scale, chapter=CHAPTER)


def selection(cfg, method: str, fraction: float | None, *, seed: int, scale: str) -> np.ndarray:
    """Sorted int64 indices of one 04j selection (``method="full"``: every chunk, ``fraction`` ignored)."""
    if method == "full":
        return np.arange(len(E.setting(cfg, False).pool), dtype=np.int64)
    if method not in DEDUP_METHODS:
        raise SelectionError(f"method={method!r}: use one of {DEDUP_METHODS} or 'full'.")
    sel = dedup_curve(cfg, seed=seed, scale=scale)["selections"]
    if str(fraction) not in sel:
        raise SelectionError(f"fraction {fraction!r} is not in the preset's fractions {list(cfg.fractions)}.")
    return np.asarray(sel[str(fraction)][method], np.int64)


def lm_run(cfg, method: str, fraction: float | None, *, seed: int, scale: str) -> dict:
    """Train the byte LM on one selection (:func:`shrink.selection.downstream.train_on_selection`)."""
    idx = selection(cfg, method, fraction, seed=seed, scale=scale)
    tag = "full" if method == "full" else f"{method}@{fraction}"
    return DS.train_on_selection(cfg, idx, seed=seed, scale=scale, tag=tag)


def grid(cfg) -> list[tuple[str, float | None, int]]:
    """``(method, fraction, seed)`` of every 04j run, seed by seed."""
    return [(m, f, s) for s in cfg.seeds for m, f in [("full", None)] + [(m, f) for f in cfg.fractions
                                                                         for m in DEDUP_METHODS]]
