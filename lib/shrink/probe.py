"""Activation probes shared by the chapters: residual-stream statistics per layer.

Introduced in: notebooks/00-start/00-tour.md
"""

from __future__ import annotations

import torch
from torch import nn

from .models import KVPrefix


def magnitude_stats(a: torch.Tensor) -> dict:
    """Top-1/2/3 and median of a magnitude tensor ``a`` = |x| ``[B, T, D]`` (float), and where the top-1 is.

    Returns ``{"top1", "top2", "top3", "median"}`` (floats) and ``{"token", "channel"}`` (ints: position and
    hidden dimension of the top-1 value).
    """
    flat = a.reshape(-1)
    top = flat.topk(3).values
    idx = int(flat.argmax())
    d, t = a.shape[-1], a.shape[-2]
    return {"top1": float(top[0]), "top2": float(top[1]), "top3": float(top[2]), "median": float(flat.median()),
            "token": (idx // d) % t, "channel": idx % d}


@torch.no_grad()
def residual_stats(model: nn.Module, input_ids: torch.Tensor, prefix: KVPrefix | None = None) -> dict[str, torch.Tensor]:
    """Per-layer magnitude statistics of the residual stream ``hidden_states[l]`` on the text positions.

    ``hidden_states[0]`` is the embedding output and ``hidden_states[l]`` the output of block ``l-1``
    (transformers' convention; the last entry is after the final norm for LLaMA-type models). With
    ``prefix`` the forward starts from the prefix's key/value cache, so prefix positions are never counted
    (CushionCache Fig. 2 analogue).

    Args:
        model: causal LM supporting ``output_hidden_states=True``.
        input_ids: int64 ``[B, T]``.
        prefix: optional :class:`shrink.models.KVPrefix`.

    Returns:
        dict of float tensors ``[L+1]``: ``top1``, ``top2``, ``top3``, ``median``, ``ratio`` (= top1 / median);
        int tensors ``[L+1]``: ``token``, ``channel`` (position in ``input_ids`` and channel of the top-1).
    """
    kw = {} if prefix is None else {"past_key_values": prefix.cache(input_ids.shape[0]), "use_cache": True}
    hs = model(input_ids=input_ids, output_hidden_states=True, **kw).hidden_states
    rows = [magnitude_stats(h.abs().float()) for h in hs]
    out = {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
    out["ratio"] = out["top1"] / out["median"]
    return out
