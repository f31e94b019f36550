"""The chapter's experiments as functions of a preset: pool setting, the DSIR KL-reduction runs.

Every run goes through :func:`shrink.results.cached` (``results/<scale>/04-data/``); the cache key is the
preset's pool/target/DSIR fields, ``with_wiki`` and the seed, never a computed number.

Metric spaces. KL reduction is reported in two hashed unigram+bigram spaces (10k buckets each):
``official`` — the official SHA-256 buckets DSIR-exact fits its weights in (the paper's choice: DSIR's own
features, so DSIR's number is in-sample); ``heldout`` — an independent hash family
(:func:`shrink.selection.features.heldout_featurize`) that no selector was fitted in, which is the fair
yardstick between exact and fast mode (each mode scores best in its own buckets).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .. import results
from . import metrics, pools
from .dsir import DSIR
from .errors import SelectionError
from .features import Features, featurize, heldout_featurize

CHAPTER = "04-data"
SPACES = ("official", "heldout")


@dataclass
class Setting:
    """A pool, its target and the metric features of both (``spaces[name] = (pool_feats, target_counts)``)."""

    pool: list[dict]
    target: list[dict]
    with_wiki: bool
    spaces: dict

    @property
    def domains(self) -> list[str]:
        return [c["domain"] for c in self.pool]

    @property
    def texts(self) -> list[str]:
        return [c["text"] for c in self.pool]

    def kl_reduction(self, indices, space: str = "official", alpha: float = 1.0) -> float:
        pf, tc = self.spaces[space]
        mask = np.zeros(len(self.pool), bool)
        mask[np.asarray(indices, np.int64)] = True
        return metrics.kl_reduction(tc, pf.counts(), pf.counts(mask), alpha)

    def kl_bound(self, space: str = "official", alpha: float = 1.0) -> float:
        """``KL(target || raw)``: the KL reduction of a selection whose n-grams are exactly the target's."""
        pf, tc = self.spaces[space]
        return metrics.kl(tc, pf.counts(), alpha)


def pool_config(cfg, with_wiki: bool) -> dict:
    return {"domains": list(cfg.domains), "words": cfg.words, "max_per_domain": cfg.max_per_domain,
            "with_wiki": bool(with_wiki), "target": "wikitext2/validation even articles",
            "target_max_chunks": cfg.target_max_chunks}


@lru_cache(maxsize=4)
def _setting(domains: tuple, words: int, max_per_domain, target_max_chunks, with_wiki: bool,
             num_buckets: int) -> Setting:
    pool = pools.build_pool(domains, with_wiki=with_wiki, words=words, max_per_domain=max_per_domain)
    target = pools.target_chunks(words, target_max_chunks)
    spaces = {}
    for name, fz in (("official", featurize), ("heldout", heldout_featurize)):
        pf: Features = fz([c["text"] for c in pool], num_buckets=num_buckets)
        spaces[name] = (pf, fz([c["text"] for c in target], num_buckets=num_buckets).counts())
    return Setting(pool, target, with_wiki, spaces)


def setting(cfg, with_wiki: bool = False) -> Setting:
    """The pool (with or without WikiText) and target of a preset, with metric features (memoised)."""
    return _setting(tuple(cfg.domains), cfg.words, cfg.max_per_domain, cfg.target_max_chunks, bool(with_wiki),
                    cfg.num_buckets)


def random_selection(n: int, k: int, seed: int) -> np.ndarray:
    """Uniform random ``k`` of ``n`` without replacement (``np.random.default_rng(seed)``), sorted."""
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)).astype(np.int64)


#: Selectors of :func:`select` (cheap ones: no embeddings, no LM scoring).
SELECT_METHODS = ("dsir-exact", "dsir-fast", "random", "heuristic-cls", "full-pool")


@lru_cache(maxsize=4)
def _dsir_fit(cfg, with_wiki: bool, mode: str) -> DSIR:
    st = setting(cfg, with_wiki)
    return DSIR(mode=mode, ngrams=cfg.ngrams, num_buckets=cfg.num_buckets,
                min_example_length=cfg.min_example_length).fit(st.texts, [c["text"] for c in st.target])


def select(cfg, method: str, seed: int, *, with_wiki: bool = False, k: int | None = None) -> np.ndarray:
    """Sorted int64 indices into ``setting(cfg, with_wiki).pool`` of one selection of ``k`` (default ``cfg.k``)
    chunks. The notebooks share their selections through this function (04b's DSIR and random draws are
    the same draws: same seeds, same calls).

    * ``dsir-exact`` / ``dsir-fast``: DSIR Gumbel top-k with the official seed stream (``seed``), fitted on
      the pool and the target (memoised per setting);
    * ``random``: :func:`random_selection`;
    * ``heuristic-cls``: :func:`~shrink.selection.baselines.heuristic_classification` (GPT-3 Pareto rule at
      budget ``k``, ``seed`` draws the negatives and the Pareto noise);
    * ``full-pool``: every chunk (no selection; ``k`` is ignored).
    """
    from .errors import SelectionError

    st = setting(cfg, with_wiki)
    k = cfg.k if k is None else k
    if method in ("dsir-exact", "dsir-fast"):
        return _dsir_fit(cfg, bool(with_wiki), method.split("-")[1]).select(k, seed=seed)
    if method == "random":
        return random_selection(len(st.pool), k, seed)
    if method == "heuristic-cls":
        from .baselines import heuristic_classification

        return heuristic_classification(st.texts, [c["text"] for c in st.target], k, seed)[0]
    if method == "full-pool":
        return np.arange(len(st.pool), dtype=np.int64)
    raise SelectionError(f"unknown selection method {method!r}; use one of {', '.join(SELECT_METHODS)} (embedding "
                         "baselines: baselines_run / shrink.selection.baselines).")


def describe(st: Setting, idx: np.ndarray, alpha: float = 1.0) -> dict:
    """KL reduction in both metric spaces, composition, WikiText precision and the selection's sha of ``idx``."""
    return _describe(st, idx, alpha)


def _describe(st: Setting, idx: np.ndarray, alpha: float, ref: np.ndarray | None = None) -> dict:
    import hashlib

    out = {f"kl_{s}": st.kl_reduction(idx, s, alpha) for s in SPACES}
    out["selection_sha"] = hashlib.sha256(np.asarray(idx, np.int64).tobytes()).hexdigest()[:12]
    if ref is not None:
        out["overlap_topk"] = len(np.intersect1d(idx, ref)) / len(ref)
    out["composition"] = metrics.composition(st.domains, idx)
    out["precision_wiki"] = metrics.precision(st.domains, idx, "wikitext2")
    return out


def dsir_kl_run(cfg, *, with_wiki: bool, seed: int, scale: str) -> dict:
    """One seed of the KL-reduction table: DSIR (exact/fast, Gumbel/top-k), random, and (with WikiText in
    the pool) the oracle = k random WikiText chunks. Cached as ``dsir-kl``."""
    config = {"pool": pool_config(cfg, with_wiki), "k": cfg.k, "seed": seed, "num_buckets": cfg.num_buckets,
              "ngrams": cfg.ngrams, "min_example_length": cfg.min_example_length, "kl_alpha": cfg.kl_alpha,
              "metric_spaces": list(SPACES), "engine": "regex"}

    def run() -> dict:
        st = setting(cfg, with_wiki)
        a = cfg.kl_alpha
        out: dict = {"pool_chunks": len(st.pool), "pool_hash": pools.pool_hash(st.pool),
                     "bound": {f"kl_{s}": st.kl_bound(s, a) for s in SPACES}, "methods": {}}
        for mode in ("exact", "fast"):
            d = DSIR(mode=mode, ngrams=cfg.ngrams, num_buckets=cfg.num_buckets,
                     min_example_length=cfg.min_example_length).fit(st.texts, [c["text"] for c in st.target])
            top = d.select(cfg.k, top_k=True)
            out["methods"][f"dsir-{mode}"] = _describe(st, d.select(cfg.k, seed=seed), a, top)
            out["methods"][f"dsir-{mode}-topk"] = _describe(st, top, a)
            if mode == "exact":
                out["eligible"] = int(d.eligible().sum())
        out["methods"]["random"] = _describe(st, random_selection(len(st.pool), cfg.k, seed), a)
        if with_wiki:
            wiki = np.flatnonzero(np.array(st.domains) == "wikitext2")
            pick = np.sort(np.random.default_rng(seed).choice(wiki, size=min(cfg.k, wiki.size), replace=False))
            out["methods"]["oracle"] = _describe(st, pick, a)
        return out

    return results.cached("dsir-kl", config, run, scale=scale, chapter=CHAPTER)


def pool_summary(cfg, *, scale: str) -> dict:
    """Pool statistics for notebook 04a (per domain, hashes, shard round trip). Cached as ``pool-summary``."""
    config = {"pool": pool_config(cfg, True)}

    def run() -> dict:
        st = setting(cfg, True)
        rows = pools.summary(st.pool)
        return {"rows": rows, "pool_hash": pools.pool_hash(st.pool),
                "pool_hash_no_wiki": pools.pool_hash([c for c in st.pool if c["domain"] != "wikitext2"]),
                "target_chunks": len(st.target), "target_hash": pools.pool_hash(st.target),
                "chunks": len(st.pool), "words": sum(r["words"] for r in rows)}

    return results.cached("pool-summary", config, run, scale=scale, chapter=CHAPTER)


@lru_cache(maxsize=4)
def _embeddings(encoder: str, texts: tuple) -> np.ndarray:
    from .. import models
    from .baselines import embed

    model, tok = models.load(encoder)
    return embed(list(texts), model, tok)


def baseline_setting(cfg, with_wiki: bool) -> Setting:
    """The baseline pool of notebook 04i: ``baseline_max_per_domain`` chunks per domain (the same chunks with
    and without WikiText: each domain's subset is seeded by its name only)."""
    return setting(cfg.with_(max_per_domain=cfg.baseline_max_per_domain), with_wiki)


def pool_nll(cfg, *, scale: str) -> dict:
    """Per-chunk mean next-token NLL (nats/token, first ``ppl_max_tokens`` tokens) of the baseline pool *with*
    WikiText (a superset of the pool without it) under ``cfg.model`` (SmolLM2-135M at cpu): the expensive
    input of perplexity filtering, computed once for every seed and both pools. Cached as ``curation-nll``;
    ``ids`` are the chunk ids, in pool order."""
    import time

    from .. import models
    from .baselines import perplexity_scores

    bcfg = cfg.with_(max_per_domain=cfg.baseline_max_per_domain)
    config = {"pool": pool_config(bcfg, True), "model": cfg.model, "max_tokens": cfg.ppl_max_tokens,
              "batch_size": 8, "nll": "mean next-token NLL of the first max_tokens tokens (nats)"}

    def run() -> dict:
        st = baseline_setting(cfg, True)
        model, tok = models.load(cfg.model)
        t0 = time.perf_counter()
        nll = perplexity_scores(st.texts, model, tok, max_tokens=cfg.ppl_max_tokens, batch_size=8)
        return {"ids": [c["id"] for c in st.pool], "nll": nll.tolist(), "pool_hash": pools.pool_hash(st.pool),
                "seconds": round(time.perf_counter() - t0, 2)}

    return results.cached("curation-nll", config, run, scale=scale, chapter=CHAPTER)


BASELINE_METHODS = ("random", "dsir-exact", "heuristic-cls", "heuristic-cls-topk", "ppl-low", "ppl-mid",
                    "nearest-centroid", "k-center", "semdedup", "dbp")
#: methods whose selection does not depend on the seed (their spread over seeds is 0 by construction)
DETERMINISTIC = ("ppl-low", "ppl-mid", "nearest-centroid")


def baselines_run(cfg, *, with_wiki: bool, seed: int, scale: str) -> dict:
    """One seed of notebook 04i: every baseline of :mod:`shrink.selection.baselines`, DSIR and random at the
    matched budget ``baseline_k`` on the baseline pool (:func:`baseline_setting`), with or without WikiText.

    ``semdedup`` is SemDeDup at ``semdedup_eps`` then ``k`` uniformly among the kept (dedup, then sample);
    ``dbp`` is SemDeDup at ``semdedup_eps`` then DBP to ``k``; ``ppl-low`` keeps the ``k`` lowest SmolLM2
    perplexities, ``ppl-mid`` the ``k`` closest to the median (a CCNet "middle" bucket). Per method: KL
    reduction in both metric spaces, WikiText precision, domain composition, the sorted indices. Cached as
    ``baselines``; the NLL comes from :func:`pool_nll` (one record for every seed)."""
    from . import baselines as B

    bcfg = cfg.with_(max_per_domain=cfg.baseline_max_per_domain)
    config = {"pool": pool_config(bcfg, with_wiki), "k": cfg.baseline_k, "seed": seed, "encoder": cfg.encoder,
              "n_clusters": cfg.n_clusters, "semdedup_eps": cfg.semdedup_eps, "dbp_tau": cfg.dbp_tau,
              "num_buckets": cfg.num_buckets, "ngrams": cfg.ngrams, "min_example_length": cfg.min_example_length,
              "kl_alpha": cfg.kl_alpha, "engine": "regex", "ppl_model": cfg.model, "ppl_max_tokens": cfg.ppl_max_tokens,
              "ppl_band": [0.25, 0.75], "methods": list(BASELINE_METHODS)}

    def run() -> dict:
        st = baseline_setting(cfg, with_wiki)
        k, a = cfg.baseline_k, cfg.kl_alpha
        tt = [c["text"] for c in st.target]
        nll_rec = pool_nll(cfg, scale=scale)
        by_id = dict(zip(nll_rec["ids"], nll_rec["nll"]))
        nll = np.array([by_id[c["id"]] for c in st.pool])
        emb = _embeddings(cfg.encoder, tuple(st.texts))
        temb = _embeddings(cfg.encoder, tuple(tt))
        labels, cents = B.kmeans(emb, cfg.n_clusters, seed)
        keep = B.semdedup(emb, cfg.semdedup_eps, n_clusters=cfg.n_clusters, seed=seed, labels=labels,
                          centroids=cents)
        kept = np.flatnonzero(keep)
        if kept.size < k:
            raise SelectionError(f"SemDeDup at eps={cfg.semdedup_eps} keeps {kept.size} < k={k} chunks; lower "
                                 "semdedup_eps or baseline_k in the preset.")
        sel = {"random": random_selection(len(st.pool), k, seed),
               "dsir-exact": DSIR(num_buckets=cfg.num_buckets, ngrams=cfg.ngrams,
                                  min_example_length=cfg.min_example_length).fit(st.texts, tt).select(k, seed=seed),
               "heuristic-cls": B.heuristic_classification(st.texts, tt, k, seed)[0],
               "heuristic-cls-topk": B.heuristic_classification(st.texts, tt, k, seed, mode="topk")[0],
               "ppl-low": B.perplexity_filter(nll, k)[0],
               "ppl-mid": B.perplexity_filter(nll, k, band=(0.25, 0.75))[0],
               "nearest-centroid": B.nearest_centroid(emb, temb, k)[0],
               "k-center": B.k_center(emb, k, seed)[0]}
        sel["semdedup"] = np.sort(kept[random_selection(kept.size, k, seed)])
        idx, _, info = B.dbp(emb[kept], k, n_clusters=cfg.n_clusters, seed=seed, tau=cfg.dbp_tau)
        sel["dbp"] = np.sort(kept[idx])
        dom = np.array(st.domains)
        out = {"pool_chunks": len(st.pool), "pool_hash": pools.pool_hash(st.pool), "semdedup_kept": int(kept.size),
               "dbp_quotas": info["quotas"].tolist(), "bound": {f"kl_{s}": st.kl_bound(s, a) for s in SPACES},
               "nll_by_domain": {d: float(nll[dom == d].mean()) for d in sorted(set(st.domains))},
               "methods": {m: {**_describe(st, i, a), "n": int(len(i)), "unique": int(len(set(i.tolist()))),
                               "indices": [int(j) for j in i]} for m, i in sel.items()}}
        return out

    return results.cached("baselines", config, run, scale=scale, chapter=CHAPTER)
