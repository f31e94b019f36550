"""Reconstruction-error metrics of "Rethinking Pruning LLMs" (Shin et al., EMNLP 2024, App. A) and extras.

The paper's normalised error after block ``i`` (App. A)::

    err_i = 1/(N H T) * || g_i(w_bar_i; x_bar_i) - g_i(m_i . w_i; x_i) ||_2^2

= element-wise mean squared difference between the dense model's hidden state (dense stream ``x_bar``)
and the pruned model's hidden state (sparse stream ``x``) after block ``i``; tables report it at the
final block. On SmolLM2 one token (position 0, the attention sink, ``|h| ~ 2.5e4`` in one channel from
block index 11 on) dominates this metric, so :func:`block_error` also returns the relative error and the
share of the squared error that sits on position 0.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def block_error(sparse: torch.Tensor, dense: torch.Tensor, chunk: int = 8) -> dict:
    """Error between the sparse and the dense stream after one block.

    Args:
        sparse: float ``[N, T, H]`` (pruned model's hidden states).
        dense: float ``[N, T, H]`` (dense model's hidden states, same inputs ids).
        chunk: sequences per step (bounds memory).
    Returns:
        dict: ``err`` (paper App. A: mean over N, T, H), ``rel`` (``||d||^2 / ||h_dense||^2``), ``tok0_share``
        (fraction of ``||d||^2`` at position 0), ``err_no_tok0`` (App. A metric without position 0).
    """
    if sparse.shape != dense.shape:
        raise ValueError(f"shapes differ: sparse {tuple(sparse.shape)} vs dense {tuple(dense.shape)}")
    n, t, h = dense.shape
    per_pos = torch.zeros(t, dtype=torch.float64)
    ref = 0.0
    for s in range(0, n, chunk):
        d = (sparse[s:s + chunk].double() - dense[s:s + chunk].double())
        per_pos += (d * d).sum((0, 2))
        ref += float((dense[s:s + chunk].double() ** 2).sum())
    tot = float(per_pos.sum())
    rest = float(per_pos[1:].sum())
    return {"err": tot / (n * t * h), "rel": tot / max(ref, 1e-30), "tok0_share": float(per_pos[0]) / max(tot, 1e-30),
            "err_no_tok0": rest / (n * max(t - 1, 1) * h)}
