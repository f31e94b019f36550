"""Curation baselines at a matched budget: every selector returns ``(indices, scores)`` (sorted int64
indices of the ``k`` chosen pool examples, float64 scores of *all* examples, larger = more wanted) and is
seeded where it is random.

* :func:`random_select` — uniform without replacement.
* :func:`heuristic_classification` — GPT-3 / The Pile style: a logistic regression on hashed unigram +
  bigram counts (scikit-learn ``HashingVectorizer``), target vs. pool, then GPT-3's Pareto rule
  ``keep if pareto(alpha=9) > 1 - p(target|x)`` (DSIR's ``heuristic_cls_pipeline.py``). At a matched
  budget the rule's threshold 0 is replaced by the k-th largest ``pareto - (1 - p)`` (``mode="pareto"``),
  or examples are ranked by ``p`` (``mode="topk"``).
* :func:`perplexity_scores` / :func:`perplexity_filter` — CCNet-style filtering with a reference LM
  (SmolLM2): keep the lowest perplexity (or a band).
* :func:`nearest_centroid` — cosine similarity of MiniLM embeddings to the target's mean embedding.
* :func:`k_center` — greedy k-center coreset (Sener & Savarese 2018) on embeddings.
* :func:`semdedup` — SemDeDup (Abbas et al. 2023): k-means, then within each cluster drop an example whose
  cosine similarity to a kept, less prototypical one exceeds ``1 - eps``.
* :func:`dbp` — Density-Based Pruning (Abbas et al., ICLR 2024): per-cluster complexity
  ``C_j = d_inter * d_intra``, ``P = softmax(C / tau)``, quotas from the QP
  ``min 1/2 |x|^2 - (P N)^T x  s.t.  sum x = N, lo <= x_j <= |cluster_j|`` (:func:`dbp_quotas`), then the
  hardest (farthest from the centroid) examples of each cluster.

k-means and nearest neighbours are scikit-learn's (``KMeans``, ``NearestNeighbors``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import SelectionError
from .resample import topk


def _check_k(n: int, k: int) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 < k <= n:
        raise SelectionError(f"k={k!r} must be an integer in [1, {n}] (the pool size); lower k or enlarge the pool.")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise SelectionError(f"embeddings must be a non-empty [n, d] array, got shape {x.shape}; pass "
                             "embed(texts) output.")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def random_select(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    _check_k(n, k)
    rng = np.random.default_rng(seed)
    scores = rng.random(n)
    return topk(scores, k), scores


# ------------------------------------------------------------------------------------------- n-gram classifier
def heuristic_classification(pool: Sequence[str], target: Sequence[str], k: int, seed: int, *,
                             mode: str = "pareto", alpha: float = 9.0, n_features: int = 2**18,
                             C: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression target-vs-pool on hashed uni+bigram counts; returns (indices, p(target|x)).

    Negatives are ``len(target)`` pool examples drawn with ``seed`` (at most the pool); the classifier is
    ``LogisticRegression(C, solver="liblinear")`` (a sparse coordinate solver). ``mode``: ``"pareto"`` (GPT-3 rule at budget k) | ``"topk"``.
    """
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import LogisticRegression

    from .features import TOKEN_PATTERN

    n = len(pool)
    _check_k(n, k)
    if not target:
        raise SelectionError("heuristic classification needs target examples; pass the target texts.")
    if mode not in ("pareto", "topk"):
        raise SelectionError(f"mode={mode!r}: use 'pareto' (GPT-3's rule) or 'topk'.")
    rng = np.random.default_rng(seed)
    hv = HashingVectorizer(n_features=n_features, ngram_range=(1, 2), alternate_sign=False, lowercase=True,
                           token_pattern=TOKEN_PATTERN, norm="l2")
    neg = rng.choice(n, size=min(n, len(target)), replace=False)
    X = hv.transform(list(target) + [pool[i] for i in neg])
    y = np.r_[np.ones(len(target)), np.zeros(len(neg))]
    clf = LogisticRegression(C=C, solver="liblinear", max_iter=1000).fit(X, y)  # L-BFGS: ~0.2 s per iteration on 2^18 dims
    p = clf.predict_proba(hv.transform(pool))[:, 1]
    if mode == "topk":
        return topk(p, k), p
    key = rng.pareto(alpha, size=n) - (1.0 - p)
    return topk(key, k), p


# ------------------------------------------------------------------------------------------- perplexity
def perplexity_scores(texts: Sequence[str], model, tokenizer, *, max_tokens: int = 128, batch_size: int = 8) -> np.ndarray:
    """Mean next-token NLL (nats) of each text under ``model`` (first ``max_tokens`` tokens): float64 [n]."""
    import torch
    import torch.nn.functional as F

    out = np.empty(len(texts))
    ids = [tokenizer.encode(t, add_special_tokens=False)[:max_tokens] for t in texts]
    if any(len(x) < 2 for x in ids):
        raise SelectionError("a text has fewer than 2 tokens: perplexity is undefined; drop empty texts first.")
    dev = next(model.parameters()).device
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            chunk = ids[s:s + batch_size]
            L = max(map(len, chunk))
            x = torch.zeros(len(chunk), L, dtype=torch.long)
            m = torch.zeros(len(chunk), L, dtype=torch.bool)
            for j, c in enumerate(chunk):
                x[j, :len(c)] = torch.tensor(c)
                m[j, :len(c)] = True
            logits = model(input_ids=x.to(dev), attention_mask=m.to(dev).long()).logits.float()
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:].to(dev), reduction="none")
            w = m[:, 1:].to(dev).float()
            out[s:s + len(chunk)] = ((nll * w).sum(1) / w.sum(1)).cpu().numpy()
    return out


def perplexity_filter(nll: np.ndarray, k: int, *, band: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``k`` lowest-perplexity examples (``band=(lo, hi)`` quantiles: the k closest to the band's
    middle quantile instead, as "keep the middle" variants). Scores are ``-nll``."""
    nll = np.asarray(nll, np.float64)
    _check_k(nll.size, k)
    if band is None:
        return topk(-nll, k), -nll
    lo, hi = band
    if not 0 <= lo < hi <= 1:
        raise SelectionError(f"band={band}: use quantiles 0 <= lo < hi <= 1, e.g. (0.25, 0.75).")
    mid = np.quantile(nll, (lo + hi) / 2)
    return topk(-np.abs(nll - mid), k), -nll


# ------------------------------------------------------------------------------------------- embeddings
def embed(texts: Sequence[str], model, tokenizer, *, max_length: int = 128, batch_size: int = 32) -> np.ndarray:
    """Sentence embeddings: mean of the last hidden states over real tokens, L2-normalised (the
    all-MiniLM-L6-v2 convention): float32 ``[n, d]``. ``model``/``tokenizer`` from
    ``shrink.models.load("minilm")`` (``"tiny-bert"`` at tiny scale)."""
    import torch

    if not len(texts):
        raise SelectionError("no texts to embed; pass at least one text.")
    out = []
    dev = next(model.parameters()).device
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            ids = [tokenizer.encode(t)[:max_length] for t in texts[s:s + batch_size]]
            L = max(1, max(map(len, ids)))
            pad = getattr(tokenizer, "pad_token_id", None) or 0
            x = torch.full((len(ids), L), pad, dtype=torch.long)
            mask = torch.zeros(len(ids), L, dtype=torch.long)
            for j, c in enumerate(ids):
                x[j, :len(c)] = torch.tensor(c, dtype=torch.long)
                mask[j, :len(c)] = 1
            enc = {"input_ids": x.to(dev), "attention_mask": mask.to(dev)}
            out_ = model(**enc)
            h = out_.last_hidden_state if hasattr(out_, "last_hidden_state") else out_[0]
            m = enc["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(e, dim=-1).float().cpu().numpy())
    return np.concatenate(out)


def nearest_centroid(pool_emb: np.ndarray, target_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity to the normalised mean target embedding; top-k."""
    pe, te = _unit(pool_emb), _unit(target_emb)
    _check_k(len(pe), k)
    c = te.mean(0)
    c /= max(np.linalg.norm(c), 1e-12)
    s = pe @ c
    return topk(s, k), s


def k_center(emb: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-center: start from a seeded random point, repeatedly add the point farthest (cosine distance)
    from the chosen set. Scores: the distance at which each chosen point was added (others: -inf)."""
    from sklearn.metrics import pairwise_distances

    x = _unit(emb)
    n = len(x)
    _check_k(n, k)
    first = int(np.random.default_rng(seed).integers(n))
    chosen = [first]
    dist = pairwise_distances(x, x[[first]], metric="cosine")[:, 0]
    scores = np.full(n, -np.inf)
    scores[first] = np.inf
    for _ in range(k - 1):
        j = int(np.argmax(dist))
        scores[j] = dist[j]
        chosen.append(j)
        dist = np.minimum(dist, pairwise_distances(x, x[[j]], metric="cosine")[:, 0])
    return np.sort(np.array(chosen, np.int64)), scores


# ------------------------------------------------------------------------------------------- clusters
def kmeans(emb: np.ndarray, n_clusters: int, seed: int):
    """Spherical-ish k-means (scikit-learn ``KMeans`` on unit vectors): (labels [n], unit centroids [c, d])."""
    from sklearn.cluster import KMeans

    x = _unit(emb)
    if not 1 <= n_clusters <= len(x):
        raise SelectionError(f"n_clusters={n_clusters} must be in [1, {len(x)}] (the pool size); lower it.")
    km = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed).fit(x)
    return km.labels_.astype(np.int64), _unit(km.cluster_centers_)


def semdedup_scores(emb: np.ndarray, *, n_clusters: int, seed: int, labels=None, centroids=None) -> np.ndarray:
    """SemDeDup's per-example redundancy score ``m`` (float64 [n], in [-1, 1]): within its k-means cluster,
    members are ordered from the least to the most prototypical (farthest from the centroid first, the
    official ``keep_hard``) and ``m_i`` is the largest cosine similarity of member ``i`` to any member before it
    (``M = triu(X X^T, 1); m = M.max(0)`` in the official ``semdedup.py``; -1 for the first member of a cluster).
    SemDeDup at ``eps`` keeps ``m <= 1 - eps``, so the kept fraction at every ``eps`` is the empirical CDF of
    ``m`` and SemDeDup at a budget ``n`` keeps the ``n`` smallest ``m``."""
    x = _unit(emb)
    if labels is None:
        labels, centroids = kmeans(x, n_clusters, seed)
    m = np.full(len(x), -1.0)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        order = idx[np.argsort(x[idx] @ centroids[c], kind="stable")]  # least prototypical first
        if len(order) > 1:
            sim = np.triu(x[order] @ x[order].T, k=1)  # sim[a, b] for a before b
            sim[np.tril_indices(len(order))] = -1.0
            m[order] = sim.max(axis=0)
    return m


def semdedup(emb: np.ndarray, eps: float, *, n_clusters: int, seed: int, labels=None, centroids=None) -> np.ndarray:
    """SemDeDup keep mask (bool [n]). Within each k-means cluster, members are ordered from the least to the
    most prototypical (farthest from the centroid first, the official ``keep_hard``); a member is dropped
    when its cosine similarity to any member before it exceeds ``1 - eps`` (:func:`semdedup_scores`)."""
    if not 0 <= eps < 1:
        raise SelectionError(f"eps={eps}: use 0 <= eps < 1 (SemDeDup's thresholds are 1 - eps, e.g. eps=0.05).")
    return semdedup_scores(emb, n_clusters=n_clusters, seed=seed, labels=labels, centroids=centroids) <= 1 - eps


def dbp_quotas(complexity: np.ndarray, sizes: np.ndarray, n_target: int, *, tau: float = 0.5,
               min_ratio: float = 0.5) -> np.ndarray:
    """Per-cluster integer quotas (int64 [c]) of DBP.

    Solves ``min 1/2 |x|^2 - (P N)^T x  s.t.  sum x = N, lo <= x <= |cluster|`` with ``P = softmax(C/tau)``
    and ``lo = min(|cluster|, ceil(N / c * min_ratio))``: the solution is ``clip(P N - lam, lo, hi)`` with
    ``lam`` found by bisection (the QP's KKT conditions); then the integer repair floors and hands the
    remainder to the largest fractional parts that have room. ``sum == N`` exactly and the bounds hold.
    """
    C = np.asarray(complexity, np.float64)
    hi = np.asarray(sizes, np.float64)
    if C.shape != hi.shape or C.ndim != 1 or C.size == 0:
        raise SelectionError("complexity and sizes must be 1-D arrays of the same length (one per cluster).")
    if tau <= 0:
        raise SelectionError(f"tau={tau} must be > 0 (DBP's prune.py uses 0.5).")
    if not 0 < n_target <= hi.sum():
        raise SelectionError(f"n_target={n_target} must be in [1, {int(hi.sum())}] (the pool size); lower it.")
    C = np.where(np.isnan(C), np.nanmean(C) if np.isfinite(C).any() else 0.0, C)
    z = C / tau
    P = np.exp(z - z.max())
    P /= P.sum()
    lo = np.minimum(hi, np.ceil(n_target / C.size * min_ratio))
    if lo.sum() > n_target:
        raise SelectionError(f"the lower bounds sum to {int(lo.sum())} > n_target={n_target}: lower min_ratio "
                             f"(now {min_ratio}) or use fewer clusters.")
    b = P * n_target
    a, z_ = b.min() - hi.max() - 1, b.max() + 1  # sum(clip(b - lam)) is decreasing in lam
    for _ in range(200):
        lam = (a + z_) / 2
        if np.clip(b - lam, lo, hi).sum() > n_target:
            a = lam
        else:
            z_ = lam
    x = np.clip(b - z_, lo, hi)
    q = np.floor(x + 1e-9).astype(np.int64)
    q = np.maximum(q, lo.astype(np.int64))
    rest = n_target - int(q.sum())
    frac = x - q
    while rest != 0:  # hand out (or take back) one at a time, respecting the bounds
        room = (q < hi) if rest > 0 else (q > lo)
        cand = np.flatnonzero(room)
        j = cand[np.argmax(frac[cand])] if rest > 0 else cand[np.argmin(frac[cand])]
        q[j] += 1 if rest > 0 else -1
        frac[j] = -np.inf if rest > 0 else np.inf
        rest += -1 if rest > 0 else 1
    return q


def cluster_complexity(emb: np.ndarray, labels: np.ndarray, centroids: np.ndarray, *, n_neighbors: int = 20):
    """DBP's per-cluster ``(d_intra, d_inter)``: mean cosine distance of members to their centroid, and mean
    ``1 - cos`` of the centroid to its ``n_neighbors`` nearest other centroids (scikit-learn
    ``NearestNeighbors``). Clusters of one member get NaN d_intra (replaced by the mean in the quotas)."""
    from sklearn.neighbors import NearestNeighbors

    x = _unit(emb)
    c = len(centroids)
    d_intra = np.array([np.mean(1 - x[labels == j] @ centroids[j]) if (labels == j).sum() > 1 else np.nan
                        for j in range(c)])
    nn = min(n_neighbors, c - 1)
    if nn == 0:
        return d_intra, np.zeros(c)
    dist, _ = NearestNeighbors(n_neighbors=nn + 1, metric="cosine").fit(centroids).kneighbors(centroids)
    return d_intra, dist[:, 1:].mean(1)


def dbp(emb: np.ndarray, k: int, *, n_clusters: int, seed: int, tau: float = 0.5, min_ratio: float = 0.5,
        n_neighbors: int = 20, labels=None, centroids=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """DBP at budget k: (indices, scores = distance to the own centroid, info with quotas / d_intra / d_inter)."""
    x = _unit(emb)
    _check_k(len(x), k)
    if labels is None:
        labels, centroids = kmeans(x, n_clusters, seed)
    d_intra, d_inter = cluster_complexity(x, labels, centroids, n_neighbors=n_neighbors)
    sizes = np.bincount(labels, minlength=len(centroids))
    q = dbp_quotas(d_intra * d_inter, sizes, k, tau=tau, min_ratio=min_ratio)
    dist = 1 - np.einsum("nd,nd->n", x, centroids[labels])
    chosen = []
    for j in range(len(centroids)):
        idx = np.flatnonzero(labels == j)
        chosen.extend(idx[np.argsort(-dist[idx], kind="stable")[: q[j]]].tolist())
    return np.sort(np.array(chosen, np.int64)), dist, {"quotas": q, "d_intra": d_intra, "d_inter": d_inter,
                                                       "sizes": sizes}
