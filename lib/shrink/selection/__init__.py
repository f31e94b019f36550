"""Data selection (chapter 04-data): pools, DSIR (exact and fast), resampling, metrics and baselines.

Introduced in: notebooks/04-data/04a-offline-pools.md (pools), notebooks/04-data/04b-dsir-kl-reduction.md
(DSIR, KL reduction). Does not import the other chapters' packages (pruning, quant, tokens).
"""

from . import features, metrics, pools, resample
from . import kmq, paser, qtuning, quality  # PASER, kMQ / iterative, Q-Tuning, IFD / response PPL
from .dsir import DSIR
from .errors import SelectionError, ShardError
from .features import Features, Featurizer, featurize, tokenize
from .metrics import composition, kl_reduction, precision
from .resample import gumbel_topk, topk

__all__ = ["DSIR", "Features", "Featurizer", "SelectionError", "ShardError", "composition", "featurize",
           "features", "gumbel_topk", "kl_reduction", "kmq", "metrics", "paser", "pools", "precision", "qtuning",
           "quality", "resample", "tokenize", "topk"]
