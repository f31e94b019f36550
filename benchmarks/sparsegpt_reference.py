"""A faithful per-linear SparseGPT (Frantar & Alistarh 2023, Algorithm 1), written plainly for benchmarks.

One linear at a time (no grouping of linears that share an input), the inverse-Hessian Cholesky factor as
``torch.linalg.cholesky`` returns it, lazy batch updates per block of 128 columns, masks by a stable sort of
the OBS saliency ``w^2 / [H^-1]_ii`` (ties by index, exact count) — the same definition as
``shrink.pruning.sparsegpt``, so masks must be identical and only the time may differ.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sparsegpt_per_linear(W: torch.Tensor, H: torch.Tensor, sparsity: float | None = 0.5, n: int | None = None,
                         m: int | None = None, blocksize: int = 128, percdamp: float = 0.01):
    """Prune ``W [rows, d]`` (fp32) with Hessian ``H [d, d]``; returns ``(new W, keep mask)``."""
    W = W.clone().float()
    H = H.clone().float()
    d = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(d)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, d, blocksize):
        i2 = min(i1 + blocksize, d)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        k1 = torch.ones_like(W1, dtype=torch.bool)
        if n is None:
            sal = (W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2).flatten()
            order = torch.sort(sal, stable=True).indices[: int(sal.numel() * sparsity)]
            k1.view(-1)[order] = False
        for i in range(i2 - i1):
            if n is not None and i % m == 0:
                sal = W1[:, i:i + m] ** 2 / torch.diag(Hinv1)[i:i + m].reshape(1, -1) ** 2
                k1[:, i:i + m].scatter_(1, torch.sort(sal, dim=1, stable=True).indices[:, :n], False)
            w, dd = W1[:, i], Hinv1[i, i]
            q = torch.where(k1[:, i], w, torch.zeros_like(w))
            err = (w - q) / dd
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        keep[:, i1:i2] = k1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, keep
