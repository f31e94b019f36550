"""DSIR: data selection with importance resampling on hashed n-grams (Xie et al., NeurIPS 2023).

Model (``data_selection/hashed_ngram_dsir.py`` of the official package 1.0.3):

.. math::
    \\hat\\gamma_\\text{raw} = \\frac{\\sum_{i \\in \\text{fit}} z_i}{\\|\\cdot\\|_1},\\quad
    \\hat\\gamma_\\text{target} = \\frac{\\sum_{j \\in \\text{target}} z_j}{\\|\\cdot\\|_1},\\quad
    \\log w_i = z_i \\cdot \\big(\\log(\\hat\\gamma_\\text{target} + 10^{-8}) - \\log(\\hat\\gamma_\\text{raw} + 10^{-8})\\big)

then examples shorter than ``min_example_length`` WordPunct tokens (official metadata
``(sum(z) + n(n-1)/2) // n``) are excluded and ``k`` are drawn by Gumbel top-k (or deterministic top-k),
see :mod:`shrink.selection.resample`.

``mode="exact"`` reproduces the official bucket ids, log-weights (to float rounding, ~1e-13) and selections;
``mode="fast"`` uses the vectorised hash of :mod:`shrink.selection.features`. One pass featurises the pool
(the official code featurises it twice: once to fit, once to score). ``num_tokens_to_fit`` follows the
official semantics: ``"all"``, ``"auto"`` (``100_000 * num_buckets`` n-grams) or an integer budget, fitted on
the prefix of each of ``virtual_shards`` interleaved shards (example ``i`` in shard ``i % virtual_shards``;
the official package uses ``num_proc`` shards per file), which only matters when the budget binds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from .errors import SelectionError
from .features import Features, Featurizer
from .resample import gumbel_topk, topk


def fit_counts(feats: Features, num_tokens_to_fit: str | int = "all", virtual_shards: int = 1) -> np.ndarray:
    """Raw n-gram counts over the fitting prefix (official ``_fit_bow`` semantics): int64 ``[m]``."""
    if num_tokens_to_fit == "all" or num_tokens_to_fit is None:
        return feats.counts()
    budget = 100_000 * feats.num_buckets if num_tokens_to_fit == "auto" else int(num_tokens_to_fit)
    totals = feats.ngram_totals()
    mask = np.zeros(len(feats), bool)
    per_shard = budget // virtual_shards
    for s in range(virtual_shards):
        idx = np.arange(s, len(feats), virtual_shards)
        over = np.flatnonzero(np.cumsum(totals[idx]) > per_shard)
        mask[idx[: over[0] + 1] if over.size else idx] = True
    return feats.counts(mask)


@dataclass
class DSIR:
    """Hashed n-gram DSIR.

    Args:
        mode: ``"exact"`` | ``"fast"`` (features).
        ngrams: 1 or 2 (official default 2).
        num_buckets: official default 10,000.
        min_example_length: official default 100 WordPunct tokens (``0`` disables the filter).
        num_tokens_to_fit: ``"all"`` | ``"auto"`` | int (see the module docstring).
        virtual_shards: the official ``num_proc`` (only used when the fitting budget binds).
        engine: tokenizer regex engine, ``"regex"`` (nltk >= 3.9.3) or ``"re"`` (older nltk).
    """

    mode: str = "exact"
    ngrams: int = 2
    num_buckets: int = 10000
    min_example_length: int = 100
    num_tokens_to_fit: str | int = "all"
    virtual_shards: int = 1
    engine: str = "regex"
    raw_probs: np.ndarray | None = field(default=None, repr=False)
    target_probs: np.ndarray | None = field(default=None, repr=False)
    log_diff: np.ndarray | None = field(default=None, repr=False)
    raw_features: Features | None = field(default=None, repr=False)

    def featurizer(self) -> Featurizer:
        return Featurizer(self.mode, self.ngrams, self.num_buckets, engine=self.engine)

    def featurize(self, texts: Iterable[str] | Features) -> Features:
        return texts if isinstance(texts, Features) else self.featurizer()(texts)

    def fit_counts(self, raw_counts: np.ndarray, target_counts: np.ndarray) -> "DSIR":
        """Fit from summed count vectors (what the sharded path merges)."""
        raw_counts, target_counts = np.asarray(raw_counts), np.asarray(target_counts)
        if target_counts.sum() == 0:
            raise SelectionError("the target has no n-grams (empty target texts); give at least one target "
                                 "example with words.")
        if raw_counts.sum() == 0:
            raise SelectionError("the raw pool has no n-grams (empty pool); build or point at a non-empty pool.")
        self.raw_probs = raw_counts / raw_counts.sum()
        self.target_probs = target_counts / target_counts.sum()
        self.log_diff = np.log(self.target_probs + 1e-8) - np.log(self.raw_probs + 1e-8)
        return self

    def fit(self, raw: Iterable[str] | Features, target: Iterable[str] | Features) -> "DSIR":
        """Featurise the raw pool (kept in ``raw_features``) and the target, and fit the two bags of n-grams."""
        fz = self.featurizer()
        self.raw_features = raw if isinstance(raw, Features) else fz(raw)
        tf = target if isinstance(target, Features) else fz(target)
        if len(tf) == 0:
            raise SelectionError("the target is empty: give at least one target text (e.g. WikiText-2 "
                                 "validation chunks from shrink.selection.pools.target_chunks()).")
        return self.fit_counts(fit_counts(self.raw_features, self.num_tokens_to_fit, self.virtual_shards),
                               tf.counts())

    def _feats(self, feats: Features | None) -> Features:
        if self.log_diff is None:
            raise SelectionError("DSIR is not fitted: call fit(raw, target) first.")
        f = self.raw_features if feats is None else feats
        if f is None:
            raise SelectionError("no raw features: call fit(raw, target) or pass features.")
        return f

    def log_weights(self, feats: Features | None = None) -> np.ndarray:
        """``z_i · log_diff`` for every raw example: float64 ``[n]``."""
        return self._feats(feats).score(self.log_diff)

    def eligible(self, feats: Features | None = None) -> np.ndarray:
        """The official length filter: bool ``[n]``, ``(sum(z) + n(n-1)/2) // n >= min_example_length``."""
        f = self._feats(feats)
        length = (f.ngram_totals() + self.ngrams * (self.ngrams - 1) // 2) // self.ngrams
        return length >= self.min_example_length

    def select(self, k: int, *, seed: int = 0, top_k: bool = False, feats: Features | None = None) -> np.ndarray:
        """Sorted int64 indices of ``k`` raw examples (Gumbel top-k with the official seed stream, or top-k)."""
        lw, mask = self.log_weights(feats), self.eligible(feats)
        return topk(lw, k, mask) if top_k else gumbel_topk(lw, k, seed, mask)
