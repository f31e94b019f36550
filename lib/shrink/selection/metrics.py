"""Selection metrics: DSIR's KL reduction, domain composition, precision.

KL reduction (DSIR, Sec. 5 of Xie et al. 2023): for target feature distributions :math:`\\hat p \\in T`, the raw
distribution :math:`\\hat q` and the distribution of the selection :math:`\\hat p_S`, all over the same hashed
n-gram buckets,

.. math::  \\mathrm{KL\\text{-}red}(S) = \\frac{1}{|T|}\\sum_{\\hat p \\in T} \\mathrm{KL}(\\hat p \\,\\|\\, \\hat q) - \\mathrm{KL}(\\hat p \\,\\|\\, \\hat p_S).

Ours: every distribution is the count vector plus the same pseudo-count ``alpha`` per bucket, normalised
(``alpha = 1``, Laplace), so ``KL`` is finite when a bucket is empty; with one smoothing for all three,
selecting the whole raw pool gives exactly 0 and selecting the target's own examples gives exactly
:math:`\\mathrm{KL}(\\hat p\\|\\hat q)`. The paper does not state its smoothing [to transcribe]. Features for
the metric are always the exact (official) hashed unigram+bigram buckets, whatever the selector.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from .errors import SelectionError


def distribution(counts: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """``(counts + alpha) / sum``: float64 ``[m]``."""
    c = np.asarray(counts, np.float64) + alpha
    s = c.sum()
    if s <= 0:
        raise SelectionError("an all-zero count vector has no distribution: the target or the selection is "
                             "empty; give at least one non-empty example (or alpha > 0).")
    return c / s


def kl(p_counts: np.ndarray, q_counts: np.ndarray, alpha: float = 1.0) -> float:
    """``KL(p || q)`` in nats between smoothed count vectors."""
    p, q = distribution(p_counts, alpha), distribution(q_counts, alpha)
    nz = p > 0
    return float(np.sum(p[nz] * (np.log(p[nz]) - np.log(q[nz]))))


def kl_reduction(target_counts: np.ndarray | Sequence[np.ndarray], raw_counts: np.ndarray,
                 selected_counts: np.ndarray, alpha: float = 1.0) -> float:
    """KL reduction (nats) of a selection; ``target_counts`` may be a list of targets (averaged)."""
    targets = [target_counts] if np.ndim(target_counts) == 1 else list(target_counts)
    if not targets or any(np.asarray(t).sum() == 0 for t in targets):
        raise SelectionError("the target is empty (no n-grams): give target texts with at least one token.")
    return float(np.mean([kl(t, raw_counts, alpha) - kl(t, selected_counts, alpha) for t in targets]))


def composition(domains: Sequence[str], indices: np.ndarray) -> dict[str, float]:
    """Share of each domain among the selected indices."""
    n = Counter(domains[i] for i in np.asarray(indices).tolist())
    total = max(1, sum(n.values()))
    return {d: c / total for d, c in sorted(n.items(), key=lambda x: -x[1])}


def precision(domains: Sequence[str], indices: np.ndarray, domain: str) -> float:
    """Fraction of the selection that comes from ``domain``."""
    idx = np.asarray(indices)
    if idx.size == 0:
        raise SelectionError("precision of an empty selection is undefined; select k >= 1.")
    return float(np.mean([domains[i] == domain for i in idx.tolist()]))
