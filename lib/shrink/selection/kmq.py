"""kMQ and its iterative refinement — Yu, Chen, Ahmadian, Fadaee, "Diversify and Conquer: Diversity-Centric
Data Selection with Iterative Refinement" (arXiv 2409.11378).

**kMQ (static)** (paper §3, official ``selection/methods/deita/kmeansrandom.py``):

1. k-means of the embeddings into ``K`` clusters (:func:`shrink.selection.baselines.kmeans`, scikit-learn;
   the official code uses faiss with K = 1024); ``K`` chosen by the silhouette score (cosine) over a
   candidate set when ``k=None`` (:func:`choose_k`; the paper selects K with the silhouette score);
2. per-cluster quota ``budget / K`` capped at the cluster size — here with the excess redistributed and
   largest-remainder rounding (:func:`shrink.selection.paser.allocate` with equal weights), so the budget is
   met exactly (the official code caps without redistributing, falling short of the budget);
3. within each cluster, sampling without replacement with probability ``∝ softmax(quality / temperature)``:
   Gumbel top-k on ``quality / temperature`` (:func:`shrink.selection.resample.gumbel_topk`).
   The official code casts the (reward-model) scores to int64 first; we keep floats.

**Iterative refinement** (paper Alg. 1; official ``selection/iter.py``, its perplexity variant
``--reward_model ppl``): the budget is spent over ``rounds``; after each round a callback (the notebook's:
train on the current subset, score it) returns a per-example score of the selected examples, larger meaning
"the model still gets these wrong" (official: reward(gold) - reward(generated); perplexity variant: the
trained model's response perplexity). The next round's clusters are weighted by
``softmax_c(mean score of c's selected examples / temperature)`` (clusters with no selected example get the
mean over clusters) and its budget is allocated ``∝`` these weights over the *unseen* examples (our
:func:`~shrink.selection.paser.allocate`; the official code draws cluster ids from these probabilities and
computes the per-round count as ``len(dataset) * portion / K / round``, which the notes flag as a probable
bug: here each round gets ``budget // rounds`` (the last one the remainder), so the total is exactly
``budget``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .errors import SelectionError
from .paser import allocate
from .resample import gumbel_topk

DEFAULT_KS = (8, 16, 32, 64)


def _unit(emb) -> np.ndarray:
    x = np.asarray(emb, np.float64)
    if x.ndim != 2 or x.shape[0] < 3 or not np.isfinite(x).all():
        raise SelectionError(f"embeddings must be a finite [N >= 3, d] array, got shape {x.shape}; pass "
                             "shrink.selection.baselines.embed(...) output.")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def choose_k(emb: np.ndarray, ks: Sequence[int] = DEFAULT_KS, *, seed: int = 0,
             sample_size: int | None = 5000) -> tuple[int, dict]:
    """K with the largest silhouette score (cosine) of k-means over ``ks``: ``(K, {K: silhouette})``.

    Candidates ``>= N`` are skipped; ``sample_size`` bounds the silhouette's O(N^2) cost (scikit-learn's
    seeded subsample; ``None``: all points).
    """
    from sklearn.metrics import silhouette_score

    from .baselines import kmeans

    x = _unit(emb)
    cand = sorted({int(k) for k in ks if 2 <= int(k) < len(x)})
    if not cand:
        raise SelectionError(f"no candidate K in {list(ks)} fits N={len(x)} (need 2 <= K < N); pass smaller ks.")
    scores = {}
    for k in cand:
        labels, _ = kmeans(x, k, seed)
        if len(np.unique(labels)) < 2:
            scores[k] = -1.0
            continue
        ss = None if sample_size is None or sample_size >= len(x) else int(sample_size)
        scores[k] = float(silhouette_score(x, labels, metric="cosine", sample_size=ss, random_state=seed))
    best = max(cand, key=lambda k: (scores[k], -k))
    return best, scores


def _draw(labels: np.ndarray, quotas: np.ndarray, quality: np.ndarray, temperature: float, seed: int,
          eligible: np.ndarray) -> np.ndarray:
    chosen = []
    for c, q in enumerate(quotas):
        if q == 0:
            continue
        idx = np.flatnonzero((labels == c) & eligible)
        pick = gumbel_topk(quality[idx] / temperature, int(q), seed * 7919 + c)
        chosen.extend(idx[pick].tolist())
    return np.sort(np.array(chosen, np.int64))


def _check_common(x, quality, budget, temperature):
    n = len(x)
    q = np.asarray(quality, np.float64)
    if q.shape != (n,) or not np.isfinite(q).all():
        raise SelectionError(f"quality must be a finite [N]={n} array (larger = better, e.g. -IFD), got shape "
                             f"{q.shape}.")
    if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool) or not 1 <= budget <= n:
        raise SelectionError(f"budget={budget!r} must be an integer in [1, {n}] (the pool size).")
    if not temperature > 0:
        raise SelectionError(f"temperature={temperature!r} must be > 0 (1.0: softmax of the raw scores).")
    return q


def select(emb: np.ndarray, quality: np.ndarray, budget: int, *, k: int | None = None, ks: Sequence[int] = DEFAULT_KS,
           seed: int = 0, temperature: float = 1.0) -> tuple[np.ndarray, dict]:
    """kMQ: ``(indices [budget] sorted int64, info {"k", "silhouette", "labels", "quotas"})``.

    Args:
        emb: ``[N, d]`` float embeddings. quality: ``[N]`` float, larger = better (e.g. ``-ifd``).
        budget: number of examples. k: clusters (``None``: :func:`choose_k` over ``ks``).
        temperature: of the within-cluster softmax over quality.
    """
    from .baselines import kmeans

    x = _unit(emb)
    q = _check_common(x, quality, budget, temperature)
    sil = None
    if k is None:
        k, sil = choose_k(x, ks, seed=seed)
    labels, _ = kmeans(x, int(k), seed)
    sizes = np.bincount(labels, minlength=int(k))
    quotas = allocate(np.ones(int(k)), sizes, int(budget))
    idx = _draw(labels, quotas, q, temperature, seed, np.ones(len(x), bool))
    return idx, {"k": int(k), "silhouette": sil, "labels": labels, "quotas": quotas}


def iterative(emb: np.ndarray, quality: np.ndarray, budget: int,
              score_fn: Callable[[np.ndarray, int], np.ndarray], *, rounds: int = 3, k: int | None = None,
              ks: Sequence[int] = DEFAULT_KS, seed: int = 0, temperature: float = 1.0,
              cluster_temperature: float = 1.0) -> tuple[np.ndarray, dict]:
    """Iterative kMQ: ``rounds`` selections of ``budget // rounds`` (the last takes the remainder).

    Args:
        score_fn: ``(selected indices so far [m] int64, round r) -> scores [m]`` (the notebook trains on the
            selection and scores it; larger = more to learn, e.g. the trained model's response perplexity).
            Called after every round but the last.
        cluster_temperature: of the softmax over per-cluster mean scores.

    Returns:
        ``(indices [budget] sorted int64, info {"k", "labels", "rounds": [{"selected", "weights"}]})``.
    """
    from .baselines import kmeans

    x = _unit(emb)
    q = _check_common(x, quality, budget, temperature)
    if not isinstance(rounds, (int, np.integer)) or not 1 <= rounds <= budget:
        raise SelectionError(f"rounds={rounds!r} must be an integer in [1, budget={budget}] (official: 3).")
    if not cluster_temperature > 0:
        raise SelectionError(f"cluster_temperature={cluster_temperature!r} must be > 0.")
    sil = None
    if k is None:
        k, sil = choose_k(x, ks, seed=seed)
    k = int(k)
    labels, _ = kmeans(x, k, seed)
    per = [budget // rounds] * rounds
    per[-1] += budget - sum(per)
    seen = np.zeros(len(x), bool)
    weights = np.ones(k) / k
    log = []
    for r in range(rounds):
        left = np.bincount(labels[~seen], minlength=k)
        quotas = allocate(weights, left, per[r])
        if quotas.sum() < per[r]:  # clusters with weight ~0 are full: top up uniformly over what is left
            quotas += allocate(np.ones(k), left - quotas, per[r] - int(quotas.sum()))
        new = _draw(labels, quotas, q, temperature, seed + 1000 * r, ~seen)
        seen[new] = True
        log.append({"selected": new, "weights": weights.copy(), "quotas": quotas})
        if r + 1 < rounds:
            sel = np.flatnonzero(seen)
            s = np.asarray(score_fn(sel, r), np.float64)
            if s.shape != sel.shape or not np.isfinite(s).all():
                raise SelectionError(f"score_fn must return finite scores [m]={sel.size} for the selected examples, "
                                     f"got shape {s.shape}.")
            mean = np.full(k, np.nan)
            for c in range(k):
                m = labels[sel] == c
                if m.any():
                    mean[c] = s[m].mean()
            mean = np.where(np.isnan(mean), np.nanmean(mean), mean)
            z = mean / cluster_temperature
            weights = np.exp(z - z.max())
            weights /= weights.sum()
    return np.flatnonzero(seen).astype(np.int64), {"k": k, "silhouette": sil, "labels": labels, "rounds": log}
