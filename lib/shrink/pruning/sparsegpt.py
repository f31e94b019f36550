"""SparseGPT (Frantar & Alistarh, ICML 2023): one-shot pruning with OBS weight reconstruction.

Layer-wise problem (SparseGPT Eq. 1): ``min ||W X - (M . W') X||^2`` given the Hessian ``H = 2 X^T X / n``.
Algorithm 1 of the paper, as in ``IST-DASLab/sparsegpt`` ``fasterprune``:

1. fp32 Hessian; dead inputs (``H_ii = 0``) get ``H_ii = 1`` and their weight column is zeroed;
2. damping ``H += percdamp * mean(diag H) * I`` (``percdamp = 0.01``);
3. ``U = chol(H^-1)`` upper: row ``i`` of ``U`` scaled by ``1/U_ii`` is row ``i`` of the inverse Hessian of the
   not-yet-processed columns, and ``U_ii^2`` its diagonal (the OBS quantities, Eq. 3);
4. columns processed in blocks of ``blocksize = 128``; in each block the mask is chosen **adaptively** from the
   OBS saliency ``w^2 / U_ii^2`` of the current (already updated) weights — unstructured: the lowest
   ``int(rows * width * sparsity)`` of the ``rows x width`` block (exact count, ties by index; the official
   code uses ``<= sorted[k]``, which prunes ``k+1`` or more); N:M: at every ``M``-th column, the ``N``
   lowest of the next ``M`` columns of each row;
5. column by column inside the block: ``err = (w - q) / U_ii``; ``W[:, i:] -= err U[i, i:]`` (OBS update,
   vectorised over all rows); after the block the deferred ("lazy batch") update
   ``W[:, end:] -= Err U[block, end:]`` is one matrix product.

The column sweep and the inverse-Hessian factor are the core :mod:`shrink.obs` (shared with GPTQ).

Linears that share an input (q/k/v; gate/up) share ``H``: :func:`sparsegpt_prune` stacks their rows and runs
one column loop for the group, with mask thresholds chosen **per matrix** (identical to pruning each
matrix alone, one Cholesky and one loop instead of three).
"""

from __future__ import annotations

import torch

from ..obs import inverse_hessian_factor, obs_sweep
from .masks import Pattern, PruningError, lowest_k_mask


def _nm_keep(sal: torch.Tensor, n: int) -> torch.Tensor:
    """Keep-mask pruning the ``n`` lowest of each row of ``sal [rows, m]`` (ties by index): the first ``n``
    of a stable ascending sort — the same mask as :func:`lowest_k_mask`, cheaper for the small ``m`` of N:M."""
    idx = torch.sort(sal, dim=1, stable=True).indices[:, :n]
    return torch.ones_like(sal, dtype=torch.bool).scatter_(1, idx, False)


@torch.no_grad()
def sparsegpt_prune(weights: list[torch.Tensor], H: torch.Tensor, pattern: Pattern, *, blocksize: int = 128,
                    percdamp: float = 0.01, dtype: torch.dtype = torch.float32
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prune one or more weight matrices that share the input Hessian ``H`` (SparseGPT Algorithm 1).

    Args:
        weights: list of float ``[rows_k, d]`` (not modified).
        H: float ``[d, d]`` input Hessian (``2 X^T X / n``).
        pattern: unstructured or N:M (``blocksize`` must then be a multiple of ``m``).
        blocksize: lazy-batch / adaptive-mask block width (paper: 128).
        percdamp: relative damping.
        dtype: compute dtype (fp32 as the paper; fp64 for reference tests).
    Returns:
        list of ``(new_weight [rows_k, d] in the input dtype, keep mask bool [rows_k, d])``.
    """
    d = H.shape[0]
    if any(w.dim() != 2 or w.shape[1] != d for w in weights):
        raise PruningError(f"every weight must be [rows, {d}] to match H {tuple(H.shape)}; got "
                           f"{[tuple(w.shape) for w in weights]}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise PruningError(f"blocksize must be a positive integer, got {blocksize!r} (SparseGPT uses 128)")
    if pattern.is_nm and (blocksize % pattern.m or d % pattern.m):
        raise PruningError(f"{pattern}: blocksize ({blocksize}) and input width ({d}) must be multiples of "
                           f"{pattern.m}")
    rows = [w.shape[0] for w in weights]
    bounds = torch.tensor([0, *rows]).cumsum(0).tolist()
    W = torch.cat([w.detach().to(dtype) for w in weights], 0)
    U, dead = inverse_hessian_factor(H.to(dtype), percdamp)
    W[:, dead] = 0
    keep = torch.ones_like(W, dtype=torch.bool)

    def on_block(i1, i2, W1, diag):  # adaptive mask from the block's current weights (unstructured)
        if not pattern.is_nm:
            sal = W1 ** 2 / diag.unsqueeze(0) ** 2
            for a, b in zip(bounds[:-1], bounds[1:]):  # per-matrix threshold inside the stacked group
                seg = sal[a:b].reshape(1, -1)
                keep[a:b, i1:i2] = lowest_k_mask(seg, int(seg.numel() * pattern.sparsity)).reshape(b - a, i2 - i1)
        state["diag"] = diag

    def target(j, W1, i):  # pruned entries go to 0, kept ones stay
        if pattern.is_nm and i % pattern.m == 0:
            sal = W1[:, i:i + pattern.m] ** 2 / state["diag"][i:i + pattern.m].unsqueeze(0) ** 2
            keep[:, j:j + pattern.m] = _nm_keep(sal, pattern.n)
        return torch.where(keep[:, j], W1[:, i], torch.zeros_like(W1[:, i]))

    state: dict = {}
    obs_sweep(W, U, target, blocksize=blocksize, on_block=on_block)
    out = []
    for w, a, b in zip(weights, bounds[:-1], bounds[1:]):
        out.append((W[a:b].to(w.dtype), keep[a:b].clone()))
    return out
