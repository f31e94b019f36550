"""Resampling: Gumbel top-k (k draws without replacement, probability proportional to the weight) and
deterministic top-k.

DSIR (``data_selection/base.py``, ``DSIR.resample``) perturbs the log importance weights of the eligible
examples with i.i.d. standard Gumbel noise and keeps the ``k`` largest:

.. math::  S = \\operatorname{top-}k_i\\,(\\log w_i + G_i),\\quad G_i \\sim \\mathrm{Gumbel}(0, 1),

which draws ``k`` examples without replacement with probabilities proportional to ``w`` (the Gumbel-max
trick applied sequentially). The noise here is the official package's stream: ``np.random.seed(seed)``
followed by ``np.random.gumbel(size=n_eligible)``, i.e. ``RandomState(seed).gumbel``, drawn over the eligible
examples in pool order, so a seed selects what the official ``resample`` selects after ``np.random.seed``.
Unlike the official ``np.argpartition(-x, k)`` (which fails for ``k`` = number of eligible examples), ``k``
may equal the number of eligible examples. Indices are returned sorted (int64).
"""

from __future__ import annotations

import numpy as np

from .errors import SelectionError


def _check(log_w: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    log_w = np.asarray(log_w, np.float64)
    if log_w.ndim != 1:
        raise SelectionError(f"log weights must be 1-D [n], got shape {log_w.shape}.")
    eligible = np.arange(log_w.size) if mask is None else np.flatnonzero(np.asarray(mask, bool))
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
        raise SelectionError(f"k={k!r} must be a non-negative integer: pass the number of examples to select, e.g. k=500.")
    if k > eligible.size:
        raise SelectionError(f"k={k} exceeds the {eligible.size} eligible examples of the pool (of {log_w.size}); "
                             "lower k, enlarge the pool, or lower min_example_length.")
    if np.isnan(log_w[eligible]).any():
        raise SelectionError("log weights contain NaN; check the target and raw distributions (empty target?).")
    return log_w, eligible


def topk(log_w: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """The ``k`` eligible examples with the largest ``log_w`` (``top_k=True`` of the official package)."""
    log_w, eligible = _check(log_w, k, mask)
    if k == eligible.size:
        return eligible.astype(np.int64)
    chosen = np.argpartition(-log_w[eligible], k)[:k]
    return np.sort(eligible[chosen]).astype(np.int64)


def gumbel_noise(n: int, seed: int) -> np.ndarray:
    """The official package's Gumbel stream for ``n`` eligible examples after ``np.random.seed(seed)``."""
    return np.random.RandomState(seed).gumbel(size=n)


def gumbel_topk(log_w: np.ndarray, k: int, seed: int, mask: np.ndarray | None = None) -> np.ndarray:
    """``k`` eligible examples drawn without replacement with probability proportional to ``exp(log_w)``."""
    log_w, eligible = _check(log_w, k, mask)
    noisy = log_w[eligible] + gumbel_noise(eligible.size, seed)
    if k == eligible.size:
        return eligible.astype(np.int64)
    chosen = np.argpartition(-noisy, k)[:k]
    return np.sort(eligible[chosen]).astype(np.int64)
