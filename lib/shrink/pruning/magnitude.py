"""Magnitude pruning (the data-free baseline of Wanda/SparseGPT/"Rethinking" Tables 1 and 3).

Score ``|W_ij|``, one comparison group per weight matrix (as ``locuslab/wanda``'s ``prune_magnitude``
and SparseGPT's ``--gmp``); N:M per row and group of M columns.
"""

from __future__ import annotations

import torch

from .masks import Pattern, score_mask


def magnitude_mask(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep-mask of magnitude pruning.

    Args:
        weight: float ``[out, in]``.
        pattern: unstructured (per-matrix threshold, exact count) or N:M.
    Returns:
        bool ``[out, in]`` (``True`` = kept).
    """
    return score_mask(weight.detach().abs().float(), pattern, group="matrix")
