"""KV-cache eviction during generation / streaming evaluation, through ``transformers``' cache API.

Two policies (a cache of at most ``budget`` positions per layer, after every decode step):

``streaming``  StreamingLLM (Xiao et al., ICLR 2024): the first ``sink`` positions (attention sinks) and the
               most recent ``budget - sink``.
``h2o``        H2O (Zhang et al., NeurIPS 2023): per layer and key/value head, the ``heavy`` positions with
               the largest attention *accumulated* over all decode steps so far, plus the most recent
               ``budget - heavy``. Evicts greedily every step.
``random``     the matched baseline of H2O's ablation: the most recent ``budget - heavy`` plus ``heavy`` older
               positions kept at random (per layer and key/value head; each step evicts one uniformly random
               older position, seeded by ``seed``).

``prefill=P`` runs the first ``P`` tokens as one causal forward with the full cache (a prompt), evicts the
cache down to the budget once (H2O's accumulated attention is then the column sum of the prompt's causal
attention, Eq. 2's score summed over the prompt's queries), and decodes the rest token by token. The
predictions of tokens ``P+1 .. T-1`` are the ones made with an evicted cache (``decoded_nll``). With
``P <= budget`` this equals the token-by-token run exactly (tested).

Keys keep the RoPE rotation of their **original** position (they are cached rotated) and every new token
gets its true position id, as H2O's real-drop code does. The accumulated attention of the new query is
recomputed from the layer's input (captured by a forward pre-hook) and the cached keys, so it works
whatever attention backend runs the model.

Introduced in: (planned) notebooks/03-tokens/03g-kv-eviction.md
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .attention import TokenInputError, blocks, is_encoder, layer_qkv, rotary

POLICIES = ("none", "streaming", "h2o", "random")


def _check(policy: str, budget: int | None, sink: int, heavy: int | None) -> None:
    if policy not in POLICIES:
        raise TokenInputError(f"unknown eviction policy {policy!r}; policies: {', '.join(POLICIES)}")
    if policy == "none":
        return
    if not isinstance(budget, int) or budget < 2:
        raise TokenInputError(f"budget must be an integer >= 2 cached positions, got {budget!r}")
    if policy == "streaming" and not 0 <= sink < budget:
        raise TokenInputError(f"sink={sink} must lie in [0, budget={budget}) (the rest is the recent window)")
    if policy in ("h2o", "random") and (heavy is None or not 0 <= heavy < budget):
        raise TokenInputError(f"{policy} needs heavy= in [0, budget={budget}) heavy-hitter (or random) positions "
                              f"(the rest is the recent window), got {heavy!r}")


@torch.no_grad()
def streaming_nll(model: nn.Module, input_ids: torch.Tensor, *, policy: str = "streaming", budget: int | None = None,
                  sink: int = 4, heavy: int | None = None, prefill: int = 0,
                  seed: int = 0, return_logp: bool = False) -> dict:
    """Token-by-token negative log-likelihood of ``input_ids [1, T]`` with the KV cache evicted to ``budget``.

    Args:
        policy: see :data:`POLICIES`; budget: cached positions per layer after every step; sink: StreamingLLM's
            sink count; heavy: H2O's heavy hitters (or the random policy's older positions).
        prefill: tokens run as one full-cache forward before decoding (0: token by token from the start).
        seed: seed of the ``random`` policy (layer ``l`` draws from its own generator seeded ``seed * 1009 + l``).
        return_logp: also return the decode steps' log-probabilities ``[T-1-P, V]`` (fp32).

    Returns ``{"nll": [T-1 floats] (nll[t] = -log p(x_{t+1} | cache)), "mean": float, "decoded_nll": nll[P:]
    (the predictions made with an evicted cache; all of ``nll`` when P = 0), "decoded_mean": float,
    "max_cache": int, "kept_positions": [layer 0, head 0, at the end], "logp": [T-1-P, V] if asked}``.
    ``policy="none"`` (or a budget >= T) equals the full causal forward.
    """
    from transformers import DynamicCache

    if is_encoder(model):
        raise TokenInputError("KV-cache eviction needs a decoder (smollm2-135m, tiny-llama...)")
    _check(policy, budget, sink, heavy)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise TokenInputError(f"streaming_nll takes one sequence [1, T], got {tuple(input_ids.shape)}")
    layers = blocks(model)
    t_total = input_ids.shape[1]
    if not isinstance(prefill, int) or not 0 <= prefill < t_total:
        raise TokenInputError(f"prefill={prefill!r} must be an integer in [0, T={t_total}) (the prompt tokens run "
                              "as one forward before decoding)")
    gens = _generators(policy, seed, len(layers))
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
    nll, max_cache, logps = [], 0, []
    steps = ([(0, prefill)] if prefill > 0 else []) + [(t, t + 1) for t in range(prefill, t_total - 1)]
    try:
        for a, e in steps:
            x = input_ids[:, a:e]
            out = model(input_ids=x, cache=cache, position_ids=torch.arange(a, e)[None], use_cache=True)
            logp = out.logits[0].float().log_softmax(-1)                    # [e - a, V]
            nll.extend((-logp.gather(1, input_ids[0, a + 1:e + 1, None])[:, 0]).tolist())
            if return_logp and e - a == 1:
                logps.append(logp[-1])
            for li, lay in enumerate(cache.layers):
                k = lay.keys                                        # [1, H_kv, T_c, d]
                hkv = k.shape[1]
                new_pos = torch.arange(a, e).view(1, 1, -1).expand(1, hkv, -1)
                pos[li] = new_pos if pos[li] is None else torch.cat([pos[li], new_pos], dim=-1)
                if policy == "h2o":
                    qk = layer_qkv(model, li, captured[li], torch.arange(a, e)[None], values=False)
                    rep = qk.q.shape[1] // hkv
                    kk = k.repeat_interleave(rep, dim=1).float()
                    logits = (qk.q.float() @ kk.transpose(-1, -2)) * qk.scaling            # [1, H, e-a, T_c]
                    if e - a > 1:   # the prompt: causal within it (the cache holds nothing older yet)
                        logits = logits.masked_fill(torch.ones(e - a, e - a, dtype=torch.bool).triu(1), float("-inf"))
                    p = logits.softmax(-1).sum(2).view(1, hkv, rep, -1).sum(2)             # summed over queries, per kv head
                    prev = acc[li]
                    acc[li] = p if prev is None else torch.cat([prev, torch.zeros_like(p[..., :e - a])], -1) + p
                if policy != "none" and k.shape[-2] > budget:
                    keep = _keep(policy, k.shape[-2], budget, sink, heavy, acc[li], hkv, gens[li])  # [1, H_kv, budget]
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
    dec = nll[prefill:] if prefill > 0 else nll
    res = {"nll": nll, "mean": sum(nll) / len(nll), "decoded_nll": dec, "decoded_mean": sum(dec) / len(dec),
           "max_cache": max_cache, "kept_positions": pos[0][0, 0].tolist() if pos[0] is not None else []}
    if return_logp:
        res["logp"] = torch.stack(logps)
    return res


def _generators(policy: str, seed: int, n_layers: int) -> list:
    if policy != "random":
        return [None] * n_layers
    return [torch.Generator().manual_seed(seed * 1009 + li) for li in range(n_layers)]


def _keep(policy, n, budget, sink, heavy, acc, hkv, generator=None) -> torch.Tensor:
    """Sorted kept cache indices ``[1, H_kv, budget]``."""
    if policy == "streaming":
        idx = torch.cat([torch.arange(sink), torch.arange(n - (budget - sink), n)])
        return idx[None, None].expand(1, hkv, budget).clone()
    recent = budget - heavy
    if policy == "random":   # fresh uniform scores: each older position is equally likely to stay
        acc = torch.rand(1, hkv, n, generator=generator)
    cand = acc[..., : n - recent]                                      # older positions compete on accumulation
    top = cand.topk(heavy, dim=-1).indices if heavy > 0 else cand[..., :0].long()
    rec = torch.arange(n - recent, n)[None, None].expand(1, hkv, recent)
    return torch.cat([top, rec], dim=-1).sort(-1).values


@dataclass
class Prompt:
    """The full-cache state after a prompt of ``P`` tokens, shared by every policy and budget: per block the
    cached keys/values ``[1, H_kv, P, d]`` (RoPE applied) and H2O's accumulated attention ``[1, H_kv, P]``
    (the prompt's causal attention summed over its queries and over the query heads of each kv head), and
    the logits row that predicts token ``P``."""

    length: int
    keys: list
    values: list
    acc: list


@torch.no_grad()
def prompt_state(model: nn.Module, input_ids: torch.Tensor, prefill: int) -> Prompt:
    """Run ``input_ids[:, :prefill]`` with a full cache and return its :class:`Prompt`."""
    from transformers import DynamicCache

    layers = blocks(model)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for li, layer in enumerate(layers):
        def pre(_m, args, kwargs, li=li):
            captured[li] = args[0] if args else kwargs["hidden_states"]
        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    cache = DynamicCache()
    try:
        model.model(input_ids=input_ids[:, :prefill], cache=cache, position_ids=torch.arange(prefill)[None],
                    use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    causal = torch.ones(prefill, prefill, dtype=torch.bool).tril()
    accs = []
    for li in range(len(layers)):
        qk = layer_qkv(model, li, captured[li], torch.arange(prefill)[None], values=False)
        hkv = cache.layers[li].keys.shape[1]
        lg = ((qk.q.float() @ qk.k.float().transpose(-1, -2)) * qk.scaling).masked_fill(~causal, float("-inf"))
        accs.append(lg.softmax(-1).sum(2).view(1, hkv, -1, prefill).sum(2))
    return Prompt(prefill, [lay.keys for lay in cache.layers], [lay.values for lay in cache.layers], accs)


@torch.no_grad()
def simulate_nll(model: nn.Module, input_ids: torch.Tensor, *, policy: str = "streaming", budget: int | None = None,
                 sink: int = 4, heavy: int | None = None, prefill: int = 1, seed: int = 0,
                 return_logp: bool = False, prompt: Prompt | None = None) -> dict:
    """The same run as :func:`streaming_nll` (a prompt of ``prefill`` tokens with the full cache, then
    decoding with the cache evicted to ``budget`` after every step), computed with one forward per block
    over all decoded tokens at once.

    Decoding token ``t`` attends to the cached set ``S_t`` (what survived step ``t-1``) plus itself, and only
    its own row of every block depends on that set, so each block runs the ``M = T-1-P`` decoded rows at
    once against the prompt's cached keys/values plus their own, with an attention mask ``[1, H, M, P+M]``
    whose row ``t`` allows ``S_t ∪ {t}``. The sets are found block by block: for block ``l`` the new query
    ``q_t`` only needs block ``l``'s input, which the previous block already produced, so ``S_t`` (H2O: the
    accumulated attention over ``S_t ∪ {t}``, per key/value head) is updated in a loop over ``t`` that touches
    ``q_t · K`` only. This is H2O's "simulation by masking" made exact; ``tests/lib/test_tokens_kvcache.py``
    checks it against the cache-based :func:`streaming_nll`. The prompt (``prompt=`` from
    :func:`prompt_state`) is shared by every policy and budget; a decode row costs what a prefill row does,
    instead of a python-bound decode step.

    Returns ``{"decoded_nll": [M] (predictions of tokens P+1 .. T-1), "decoded_mean", "max_cache",
    "kept_positions" (block 0, kv head 0, after the last step), "logp" [M, V] fp32 if asked}``.
    """
    from transformers import DynamicCache

    if is_encoder(model):
        raise TokenInputError("KV-cache eviction needs a decoder (smollm2-135m, tiny-llama...)")
    _check(policy, budget, sink, heavy)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise TokenInputError(f"simulate_nll takes one sequence [1, T], got {tuple(input_ids.shape)}")
    t_total = input_ids.shape[1]
    if not isinstance(prefill, int) or not 1 <= prefill < t_total - 1:
        raise TokenInputError(f"prefill={prefill!r} must be an integer in [1, T-1={t_total - 1}) (prefill=1 is "
                              "token-by-token decoding from the start)")
    if prompt is None:
        prompt = prompt_state(model, input_ids, prefill)
    elif prompt.length != prefill:
        raise TokenInputError(f"prompt= holds {prompt.length} tokens but prefill={prefill}; build it with "
                              f"prompt_state(model, input_ids, {prefill})")
    layers = blocks(model)
    gens = _generators(policy, seed, len(layers))
    n = t_total - 1                            # the last token is never fed (nothing left to predict)
    m = n - prefill
    pos = torch.arange(prefill, n)[None]
    h = model.model.embed_tokens(input_ids[:, prefill:n])
    cos_sin = rotary(model, h, pos)
    cache_obj = DynamicCache()
    for li in range(len(layers)):             # the prompt's tensors are concatenated onto, never modified
        cache_obj.update(prompt.keys[li], prompt.values[li], li)
    max_cache, kept0 = 0, None
    for li, layer in enumerate(layers):
        hkv = prompt.keys[li].shape[1]
        allowed = torch.zeros(1, hkv, m, n, dtype=torch.bool)
        qk = layer_qkv(model, li, h, pos, values=False) if policy == "h2o" else None
        if qk is not None:           # every decoded query against every key once: [1, H, M, n] logits
            rep = qk.q.shape[1] // hkv
            keys = torch.cat([prompt.keys[li].repeat_interleave(rep, dim=1), qk.k], dim=2).float()   # [1, H, n, d]
            logits_all = (qk.q.float() @ keys.transpose(-1, -2)) * qk.scaling
        cache = torch.arange(prefill)[None, None].expand(1, hkv, prefill).clone()     # [1, H_kv, n_c] positions
        acc = prompt.acc[li] if policy == "h2o" else None
        for t in range(prefill, n + 1):
            if policy != "none" and cache.shape[-1] > budget:
                keep = _keep(policy, cache.shape[-1], budget, sink, heavy, acc, hkv, gens[li])
                cache = cache.gather(2, keep)
                if acc is not None:
                    acc = acc.gather(2, keep)
            max_cache = max(max_cache, cache.shape[-1])
            if t == n:
                break
            cache = torch.cat([cache, torch.full((1, hkv, 1), t, dtype=torch.long)], -1)
            allowed[0, :, t - prefill].scatter_(-1, cache[0], True)
            if qk is not None:
                p = logits_all[:, :, t - prefill].gather(2, cache.repeat_interleave(rep, dim=1)).softmax(-1)
                p = p.view(1, hkv, rep, -1).sum(2)
                acc = torch.cat([acc, torch.zeros_like(p[..., :1])], -1) + p
        if li == 0:
            kept0 = cache[0, 0].tolist()
        mask = torch.zeros(1, hkv, m, n, dtype=h.dtype).masked_fill(~allowed, torch.finfo(h.dtype).min)
        mask = mask.repeat_interleave(model.config.num_attention_heads // hkv, dim=1)
        out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin, cache=cache_obj,
                    use_cache=True)
        h = out[0] if isinstance(out, tuple) else out
    logp = model.lm_head(model.model.norm(h))[0].float().log_softmax(-1)          # rows predicting P+1 .. T-1
    dec = (-logp.gather(1, input_ids[0, prefill + 1:, None])[:, 0]).tolist()
    res = {"decoded_nll": dec, "decoded_mean": sum(dec) / len(dec), "max_cache": max_cache, "kept_positions": kept0}
    if return_logp:
        res["logp"] = logp
    return res


def ppl(result: dict) -> float:
    """Perplexity of a :func:`streaming_nll` result."""
    return math.exp(result["mean"])
