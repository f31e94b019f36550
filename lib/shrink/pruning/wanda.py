"""Wanda: pruning by weights and activations (Sun, Liu, Bair, Kolter, ICLR 2024).

Score (Wanda Eq. 1): ``S_ij = |W_ij| * ||X_j||_2`` where ``||X_j||_2`` is the L2 norm of input feature ``j``
over all calibration tokens. Comparison group = each output row (Wanda Sec. 3): the lowest
``int(in * sparsity)`` scores of every row are pruned (stable sort, exact count). N:M: the N lowest of every
M consecutive inputs of a row. No weight update.
"""

from __future__ import annotations

import torch

from .masks import Pattern, PruningError, score_mask


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * sqrt(sq_norm)`` broadcast over rows.

    Args:
        weight: float ``[out, in]``.
        sq_norm: float ``[in]``, ``sum_t x_tj^2`` (any positive scale: the ranking per row is scale-free).
    Returns:
        float32 ``[out, in]``.
    """
    if sq_norm.shape != weight.shape[1:]:
        raise PruningError(f"sq_norm must have shape [{weight.shape[1]}] (one entry per input feature), "
                           f"got {tuple(sq_norm.shape)}")
    return weight.detach().abs().float() * sq_norm.float().clamp_min(0).sqrt().unsqueeze(0)


def wanda_mask(weight: torch.Tensor, sq_norm: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Wanda keep-mask (per-output-row comparison group; N:M per row).

    Args:
        weight: float ``[out, in]``.
        sq_norm: float ``[in]``, squared input-feature norms from the calibration tokens.
        pattern: unstructured or N:M.
    Returns:
        bool ``[out, in]``.
    """
    return score_mask(wanda_scores(weight, sq_norm), pattern, group="row")
