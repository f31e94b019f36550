"""KV-cache eviction during generation / streaming evaluation, through ``transformers``' cache API.

Two policies (a cache of at most ``budget`` positions per layer, after every decode step):

``streaming``  StreamingLLM (Xiao et al., ICLR 2024): the first ``sink`` positions (attention sinks) and the
               most recent ``budget - sink``.
``h2o``        H2O (Zhang et al., NeurIPS 2023): per layer and key/value head, the ``heavy`` positions with
               the largest attention *accumulated* over all decode steps so far, plus the most recent
               ``budget - heavy``. Evicts greedily every step.

Keys keep the RoPE rotation of their **original** position (they are cached rotated) and every new token
gets its true position id, as H2O's real-drop code does. The accumulated attention of the new query is
recomputed from the layer's input (captured by a forward pre-hook) and the cached keys, so it works
whatever attention backend runs the model.

Introduced in: (planned) notebooks/03-tokens/03g-kv-eviction.md
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import TokenInputError, blocks, is_encoder, layer_qkv

POLICIES = ("none", "streaming", "h2o")


def _check(policy: str, budget: int | None, sink: int, heavy: int | None) -> None:
    if policy not in POLICIES:
        raise TokenInputError(f"unknown eviction policy {policy!r}; policies: {', '.join(POLICIES)}")
    if policy == "none":
        return
    if not isinstance(budget, int) or budget < 2:
        raise TokenInputError(f"budget must be an integer >= 2 cached positions, got {budget!r}")
    if policy == "streaming" and not 0 <= sink < budget:
        raise TokenInputError(f"sink={sink} must lie in [0, budget={budget}) (the rest is the recent window)")
    if policy == "h2o" and (heavy is None or not 0 <= heavy < budget):
        raise TokenInputError(f"h2o needs heavy= in [0, budget={budget}) heavy hitters (the rest is the recent "
                              f"window), got {heavy!r}")


@torch.no_grad()
def streaming_nll(model: nn.Module, input_ids: torch.Tensor, *, policy: str = "streaming", budget: int | None = None,
                  sink: int = 4, heavy: int | None = None) -> dict:
    """Token-by-token negative log-likelihood of ``input_ids [1, T]`` with the KV cache evicted to ``budget``.

    Returns ``{"nll": [T-1 floats], "mean": float, "max_cache": int, "kept_positions": [[...] of layer 0,
    head 0 at the end]}``. ``policy="none"`` (or a budget >= T) equals the full causal forward.
    """
    from transformers import DynamicCache

    if is_encoder(model):
        raise TokenInputError("KV-cache eviction needs a decoder (smollm2-135m, tiny-llama...)")
    _check(policy, budget, sink, heavy)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise TokenInputError(f"streaming_nll takes one sequence [1, T], got {tuple(input_ids.shape)}")
    layers = blocks(model)
    t_total = input_ids.shape[1]
    cache = DynamicCache()
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    if policy == "h2o":
        for li, layer in enumerate(layers):
            def pre(_m, args, kwargs, li=li):
                captured[li] = args[0] if args else kwargs["hidden_states"]
            hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    acc: list[torch.Tensor | None] = [None] * len(layers)        # [1, H_kv, T_cache] accumulated attention
    pos: list[torch.Tensor | None] = [None] * len(layers)        # [1, H_kv, T_cache] original positions
    nll, max_cache = [], 0
    try:
        for t in range(t_total - 1):
            x = input_ids[:, t:t + 1]
            out = model(input_ids=x, cache=cache, position_ids=torch.tensor([[t]]), use_cache=True)
            logp = out.logits[0, -1].float().log_softmax(-1)
            nll.append(float(-logp[input_ids[0, t + 1]]))
            for li, lay in enumerate(cache.layers):
                k = lay.keys                                        # [1, H_kv, T_c, d]
                hkv = k.shape[1]
                new_pos = torch.full((1, hkv, 1), t, dtype=torch.long)
                pos[li] = new_pos if pos[li] is None else torch.cat([pos[li], new_pos], dim=-1)
                if policy == "h2o":
                    qk = layer_qkv(model, li, captured[li], torch.tensor([[t]]), values=False)
                    rep = qk.q.shape[1] // hkv
                    kk = k.repeat_interleave(rep, dim=1).float()
                    p = ((qk.q.float() @ kk.transpose(-1, -2)) * qk.scaling).softmax(-1)   # [1, H, 1, T_c]
                    p = p[:, :, 0].view(1, hkv, rep, -1).sum(2)                             # per kv head
                    prev = acc[li]
                    acc[li] = p if prev is None else torch.cat([prev, torch.zeros_like(p[..., :1])], -1) + p
                if policy != "none" and k.shape[-2] > budget:
                    keep = _keep(policy, k.shape[-2], budget, sink, heavy, acc[li], hkv)   # [1, H_kv, budget]
                    idx = keep[..., None].expand(-1, -1, -1, k.shape[-1])
                    lay.keys = k.gather(2, idx)
                    lay.values = lay.values.gather(2, idx)
                    pos[li] = pos[li].gather(2, keep)
                    if acc[li] is not None:
                        acc[li] = acc[li].gather(2, keep)
                max_cache = max(max_cache, lay.keys.shape[-2])
    finally:
        for h in hooks:
            h.remove()
    return {"nll": nll, "mean": sum(nll) / len(nll), "max_cache": max_cache,
            "kept_positions": pos[0][0, 0].tolist() if pos[0] is not None else []}


def _keep(policy, n, budget, sink, heavy, acc, hkv) -> torch.Tensor:
    """Sorted kept cache indices ``[1, H_kv, budget]``."""
    if policy == "streaming":
        idx = torch.cat([torch.arange(sink), torch.arange(n - (budget - sink), n)])
        return idx[None, None].expand(1, hkv, budget).clone()
    recent = budget - heavy
    cand = acc[..., : n - recent]                                      # older positions compete on accumulation
    top = cand.topk(heavy, dim=-1).indices if heavy > 0 else cand[..., :0].long()
    rec = torch.arange(n - recent, n)[None, None].expand(1, hkv, recent)
    return torch.cat([top, rec], dim=-1).sort(-1).values


def ppl(result: dict) -> float:
    """Perplexity of a :func:`streaming_nll` result."""
    return math.exp(result["mean"])
