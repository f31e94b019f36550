"""Prefill pruning in a LLaMA-like decoder (FastV-style), original RoPE positions kept.

``prefill(model, ids, n_context=C, method=..., keep=..., prune_at=K)`` runs blocks ``0 .. K-1`` on the
whole sequence, scores the **context** tokens ``0 .. C-1`` with block ``K-1``'s attention among the context
(recomputed from q/k with RoPE and GQA; the continuation ``C .. T-1`` never influences which context
tokens survive), keeps ``round(keep · C)`` context tokens (the attention sink, token 0, always when
``protect_sink``) plus every continuation token, and runs blocks ``K .. L-1`` on the kept tokens at
their **original** positions (RoPE cos/sin of the kept position ids, a causal mask over the kept order).
``keep = 1.0`` reproduces ``model(ids).logits``.

Methods (:data:`METHODS`): ``none``, every score of :mod:`shrink.tokens.scores` (``last`` = FastV, the
last context token's row; ``recency`` + the protected sink = StreamingLLM's sink + window), ``divprune``
(max-min on the block-K input hidden states), ``zero_tprune`` (WPR + S-stage on keys).

Introduced in: notebooks/03-tokens/03f-prefill-pruning.md
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import scores as S
from . import select as sel
from .attention import TokenInputError, blocks, causal_bias, is_encoder, layer_qkv, probs_from_qk, rotary

METHODS = ("none", *S.SCORES, "divprune", "zero_tprune")


@dataclass
class PrefillOut:
    """``logits [B, T', V]`` at the kept positions; ``kept [B, T']`` original indices (= RoPE positions);
    ``tokens_per_layer`` the count each block ran on."""

    logits: torch.Tensor
    kept: torch.Tensor
    tokens_per_layer: list[int] = field(default_factory=list)


def _block(layer: nn.Module, h: torch.Tensor, pos: torch.Tensor, cos_sin) -> torch.Tensor:
    mask = causal_bias(h.shape[1], h.dtype, h.device)
    out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    return out[0] if isinstance(out, tuple) else out


def select_context(model: nn.Module, layer: int, h: torch.Tensor, n_context: int, method: str, keep: float, *,
                   protect_sink: bool = True, generator: torch.Generator | None = None, iterations: int = 30,
                   heads: str = "eir", exclude_sink: bool = False, damping: float = 1.0,
                   s_share: float = 0.5) -> torch.Tensor:
    """Kept context indices ``[B, k]`` (sorted) from block ``layer``'s attention over the context tokens.

    ``h [B, T, D]`` is the input of block ``layer`` (positions ``0 .. T-1``); only ``h[:, :n_context]`` is used.
    """
    b = h.shape[0]
    hc = h[:, :n_context]
    prot = [0] if protect_sink else None
    if method == "divprune":  # features are the next block's input hidden states
        raise TokenInputError("divprune needs the next block's input: call prefill(), not select_context()")
    if method in ("random", "recency"):
        return sel.topk_keep(S.score(method, n=n_context, batch=b, generator=generator), keep, protected=prot)
    qk = layer_qkv(model, layer, hc, values=False)
    attn = probs_from_qk(qk)
    if method == "zero_tprune":
        imp = S.score("wpr", attn, iterations=iterations, heads=heads, exclude_sink=exclude_sink, damping=damping)
        feats = qk.k.transpose(1, 2).reshape(b, n_context, -1)
        return sel.zero_tprune_keep(imp, feats, keep, protected=prot, s_share=s_share)
    sc = S.score(method, attn, n=n_context, batch=b, generator=generator, query=n_context - 1,
                 iterations=iterations, heads=heads, exclude_sink=exclude_sink, damping=damping)
    return sel.topk_keep(sc, keep, protected=prot)


@torch.no_grad()
def prefill(model: nn.Module, input_ids: torch.Tensor, *, n_context: int | None = None, method: str = "none",
            keep: float = 1.0, prune_at: int = 3, protect_sink: bool = True,
            generator: torch.Generator | None = None, **score_options) -> PrefillOut:
    """Pruned prefill of ``input_ids [B, T]`` (int64); context = the first ``n_context`` tokens (all if None).

    Returns logits at the kept positions (the continuation's logits are the last ``T - n_context`` rows).
    """
    if is_encoder(model):
        raise TokenInputError("prefill() runs decoders; for BERT encoders use shrink.tokens.encoder.encode")
    if method not in METHODS:
        raise TokenInputError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    layers = blocks(model)
    if method != "none" and not 1 <= prune_at < len(layers):
        raise TokenInputError(f"prune_at={prune_at} must lie in [1, {len(layers) - 1}] (scores come from block "
                              "prune_at-1)")
    sel.kept_count(keep, 2)
    b, t = input_ids.shape
    c = t if n_context is None else n_context
    if not 1 <= c <= t:
        raise TokenInputError(f"n_context={n_context} must lie in [1, T={t}]")
    h = model.model.embed_tokens(input_ids)
    pos = torch.arange(t, device=h.device)[None].expand(b, t)
    if method == "none" or keep >= 1.0:
        return PrefillOut(head(model, run_blocks(model, h, pos, 0, len(layers))), pos, [t] * len(layers))
    h_prev = run_blocks(model, h, pos, 0, prune_at - 1)          # input of block K-1 (the scoring block)
    h = run_blocks(model, h_prev, pos, prune_at - 1, prune_at)   # input of block K
    idx = keep_indices(model, prune_at, h_prev, h, c, method, keep, protect_sink=protect_sink,
                       generator=generator, **score_options)
    h, pos = sel.gather(h, idx), idx
    h = run_blocks(model, h, pos, prune_at, len(layers))
    per_layer = [t] * prune_at + [idx.shape[1]] * (len(layers) - prune_at)
    return PrefillOut(head(model, h), pos, per_layer)


def keep_indices(model: nn.Module, prune_at: int, h_prev: torch.Tensor, h: torch.Tensor, n_context: int,
                 method: str, keep: float, *, protect_sink: bool = True, generator: torch.Generator | None = None,
                 **score_options) -> torch.Tensor:
    """All kept indices ``[B, k + T - C]``: the selected context tokens, then the whole continuation.

    ``h_prev`` is the input of block ``prune_at - 1`` (scores), ``h`` the input of block ``prune_at``
    (DivPrune's features)."""
    b, t = h.shape[:2]
    if method == "divprune":
        idx_c = sel.divprune_keep(h[:, :n_context], keep, protected=[0] if protect_sink else None)
    else:
        idx_c = select_context(model, prune_at - 1, h_prev, n_context, method, keep, protect_sink=protect_sink,
                               generator=generator, **score_options)
    cont = torch.arange(n_context, t, device=h.device)[None].expand(b, t - n_context)
    return torch.cat([idx_c, cont], dim=1)


def run_blocks(model: nn.Module, h: torch.Tensor, pos: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Blocks ``start .. stop-1`` on ``h [B, T, D]`` at RoPE positions ``pos [B, T]`` (explicit causal mask)."""
    if start >= stop:
        return h
    cos_sin = rotary(model, h, pos)
    for layer in blocks(model)[start:stop]:
        h = _block(layer, h, pos, cos_sin)
    return h


def head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Final norm and LM head: ``[B, T, D]`` -> logits ``[B, T, V]``."""
    return model.lm_head(model.model.norm(h))


def continuation_nll(logits: torch.Tensor, input_ids: torch.Tensor, n_context: int) -> torch.Tensor:
    """Mean NLL ``[B]`` of the continuation tokens ``input_ids[:, C:]`` given ``logits`` whose last ``T - C``
    rows are the continuation positions: token ``C + j`` is predicted by the row before it (the last
    context row predicts token ``C``)."""
    t = input_ids.shape[1]
    m = t - n_context
    pred = logits[:, -m - 1:-1].float()
    target = input_ids[:, n_context:]
    return torch.nn.functional.cross_entropy(pred.transpose(1, 2), target, reduction="none").mean(-1)
