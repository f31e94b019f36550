"""Pruning with reconstruction: the weights chapter (notebooks/01-weights).

Implements "Rethinking Pruning Large Language Models: Benefits and Pitfalls of Reconstruction Error
Minimization" (Shin, Park, Lee, Lee; EMNLP 2024) on top of SparseGPT (Frantar & Alistarh, 2023), Wanda
(Sun et al., 2024) and magnitude pruning:

- :mod:`~shrink.pruning.masks`       bool masks, N:M, exact sparsity checks, :class:`MaskSet`
- :mod:`~shrink.pruning.magnitude`   per-matrix magnitude pruning
- :mod:`~shrink.pruning.wanda`       Wanda scores and per-row masks
- :mod:`~shrink.pruning.sparsegpt`   SparseGPT's OBS solve (shared-Hessian groups)
- :mod:`~shrink.obs`                 (core) input statistics, inverse-Hessian factor, OBS sweep — shared with quant
- :mod:`~shrink.pruning.sequential`  the block loop with sparse and dense streams (:func:`prune_model`)
- :mod:`~shrink.pruning.reconstruct` BR / GP / CR training with fixed masks (on the core
  :mod:`shrink.reconstruction`, shared with FlexRound)
- :mod:`~shrink.blockwise`           (core) the sequential two-stream loop and the error metric (App. A)
- :mod:`~shrink.pruning.selfgen`     self-generated calibration data (App. C)
- :mod:`~shrink.pruning.compensate`  EoRA low-rank and FLAP-style bias compensation (training-free)
- :mod:`~shrink.pruning.experiment`  notebook glue: data of a preset, cached measurements
- :mod:`~shrink.pruning.presets`     tiny / cpu / paper presets of the chapter's experiments
"""

from .compensate import LowRankAdd, bias_compensation, compensate_model, eora_factors
from .magnitude import magnitude_mask
from .masks import MaskSet, Pattern, PruningError, check_mask, parse_pattern, score_mask
from ..blockwise import block_error
from .reconstruct import ReconConfig, reconstruct
from .sequential import (PRUNERS, SCHEMES, PruneResult, PruneSpec, dense_streams, memory_estimate, prune_model,
                         select_linears)
from ..obs import inverse_hessian_factor
from .sparsegpt import sparsegpt_prune
from .training import SparseUpdater  # training-time sparsity (issue 16): shrink.pruning.training
from ..obs import InputStats, StatsCollector
from .selfgen import looks_english, self_generate
from .wanda import wanda_mask, wanda_scores

__all__ = ["MaskSet", "Pattern", "PruningError", "check_mask", "parse_pattern", "score_mask", "magnitude_mask",
           "wanda_mask", "wanda_scores", "sparsegpt_prune", "inverse_hessian_factor", "InputStats",
           "StatsCollector", "ReconConfig", "reconstruct", "block_error", "PruneSpec", "PruneResult",
           "prune_model", "dense_streams", "memory_estimate", "select_linears", "PRUNERS", "SCHEMES",
           "eora_factors", "bias_compensation", "compensate_model", "LowRankAdd", "self_generate", "looks_english"]
