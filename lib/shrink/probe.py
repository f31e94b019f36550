"""Activation probes shared by the chapters: residual-stream statistics per layer.

Introduced in: notebooks/00-start/00-tour.md
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def residual_stats(model: nn.Module, input_ids: torch.Tensor, *, exclude_first: int = 0) -> dict[str, torch.Tensor]:
    """Per-layer magnitude statistics of the residual stream ``hidden_states[l]``.

    ``hidden_states[0]`` is the embedding output and ``hidden_states[l]`` the output of block ``l-1``
    (transformers' convention; the last entry is after the final norm for LLaMA-type models).

    Args:
        model: causal LM supporting ``output_hidden_states=True``.
        input_ids: int64 ``[B, T]``.
        exclude_first: drop the first positions (e.g. a prefix) before computing statistics.

    Returns:
        dict of float tensors ``[L+1]``: ``top1``, ``top2``, ``top3`` (largest |h| values), ``median``
        (median |h|), ``ratio`` (= top1 / median); and int tensors ``[L+1]`` ``token`` and ``channel``
        (position and hidden dimension of the top-1 value).
    """
    hs = model(input_ids=input_ids, output_hidden_states=True, use_cache=False).hidden_states
    out = {k: [] for k in ("top1", "top2", "top3", "median", "token", "channel")}
    for h in hs:
        a = h[:, exclude_first:].abs().float()  # [B, T, D]
        flat = a.reshape(-1)
        top = flat.topk(3).values
        idx = int(flat.argmax())
        d, t = a.shape[-1], a.shape[-2]
        out["top1"].append(top[0]); out["top2"].append(top[1]); out["top3"].append(top[2])
        out["median"].append(flat.median())
        out["token"].append(torch.tensor((idx // d) % t + exclude_first)); out["channel"].append(torch.tensor(idx % d))
    stats = {k: torch.stack(v) for k, v in out.items()}
    stats["ratio"] = stats["top1"] / stats["median"]
    return stats
