"""The encoder (all-MiniLM-L6-v2, BERT) run block by block, pruned or merged after chosen layers.

``encode(model, ids, method=..., keep=..., prune_at=(2,))`` runs blocks ``0 .. p-1`` on all tokens; at each
``p`` in ``prune_at`` it scores the tokens with the attention of block ``p-1`` (recomputed from that block's
input, :mod:`shrink.tokens.attention`), keeps ``round(keep · n)`` of them (protected [CLS] and [SEP]
always) or merges ``n - round(keep · n)`` (ToMe), and runs the remaining blocks on the kept tokens. The
sentence embedding is the mean of the last hidden states (all-MiniLM-L6-v2's pooling), size-weighted
after merging. ``keep = 1.0`` (or ``method="none"``) reproduces ``model(ids).last_hidden_state`` exactly.

Methods (:data:`METHODS`): ``none``, the scores of :mod:`shrink.tokens.scores` (``random``, ``cls``,
``mean``, ``h2o``, ``wpr``, ``last``, ``recency``), ``zero_tprune`` (WPR I-stage + S-stage), ``divprune``
(max-min on hidden states), ``tome`` (bipartite merging, proportional attention).

Introduced in: notebooks/03-tokens/03c-zero-tprune.md
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import scores as S
from . import select as sel
from .attention import TokenInputError, blocks, is_encoder, layer_qkv, probs_from_qk

METHODS = ("none", *S.SCORES, "zero_tprune", "divprune", "tome")


@dataclass
class EncoderOut:
    """``hidden [B, n', D]`` last hidden states of the surviving tokens; ``sizes [B, n']`` original tokens
    per row (ones without merging); ``kept [B, n']`` original index each row continues; ``embedding
    [B, D]`` size-weighted mean; ``tokens_per_layer`` the token count each block ran on (for FLOPs)."""

    hidden: torch.Tensor
    sizes: torch.Tensor
    kept: torch.Tensor
    embedding: torch.Tensor
    tokens_per_layer: list[int] = field(default_factory=list)


def encode_text(tokenizer, text: str, max_tokens: int = 128) -> torch.Tensor:
    """``[1, N]`` ids with [CLS] first and [SEP] last (WordPiece), or ``<bos> bytes <eos>`` for the tiny
    byte tokenizer; truncated to ``max_tokens``."""
    if hasattr(tokenizer, "cls_token_id") and tokenizer.cls_token_id is not None:
        ids = tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"]
    else:
        body = tokenizer.encode(text)[: max_tokens - 2]
        ids = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    return torch.tensor([ids], dtype=torch.long)


def _run_layer(layer: nn.Module, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    mask = None if bias is None else bias[:, None, None, :].to(h.dtype)
    out = layer(h, attention_mask=mask)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def encode(model: nn.Module, input_ids: torch.Tensor, *, method: str = "none", keep: float = 1.0,
           prune_at: tuple[int, ...] = (2,), protected: tuple[int, ...] = (0, -1),
           generator: torch.Generator | None = None, iterations: int = 30, heads: str = "eir",
           vhf: tuple[float, float] | None = None, s_share: float = 0.5, s_features: str = "key",
           partition: str = "seq", proportional: bool = True,
           start: tuple[torch.Tensor, torch.Tensor] | None = None) -> EncoderOut:
    """Pruned (or merged) encoder forward of ``input_ids [B, N]`` (int64, no padding).

    Args:
        method: see :data:`METHODS`.
        keep: kept ratio per pruning step, in (0, 1].
        prune_at: block indices before which tokens are pruned (each in ``1 .. L-1``).
        protected: original token indices never dropped or merged ([CLS] = 0, [SEP] = -1).
        generator: seeded generator (``random``).
        iterations, heads, vhf: WPR options; s_share, s_features (``key|query|value|hidden``), partition:
            Zero-TPrune S-stage options; proportional: ToMe's ``log size`` attention bias.
        start: ``(input of block p-1, input of block p)`` for ``p = min(prune_at)``, from :func:`states`:
            skips the unpruned blocks (benches reuse them across methods; the result is identical).
    """
    if not is_encoder(model):
        raise TokenInputError("encode() runs BERT encoders (minilm, tiny-bert); for decoders use "
                              "shrink.tokens.decoder.prefill")
    if method not in METHODS:
        raise TokenInputError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    if s_features not in ("key", "query", "value", "hidden"):
        raise TokenInputError(f"s_features must be key, query, value or hidden, got {s_features!r}")
    layers = blocks(model)
    n_layers = len(layers)
    for p in prune_at:
        if method != "none" and not 1 <= p < n_layers:
            raise TokenInputError(f"prune_at={prune_at}: each entry must lie in [1, {n_layers - 1}] (a block "
                                  "whose predecessor's attention gives the scores)")
    sel.kept_count(keep, 2)  # validates the ratio early
    b, n = input_ids.shape
    first = 0 if start is None else min(prune_at)
    h = model.embeddings(input_ids=input_ids) if start is None else start[1]
    sizes = torch.ones(b, n, dtype=torch.float32, device=h.device)
    kept = torch.arange(n, device=h.device)[None].expand(b, n).clone()
    prot_orig = sel.protected_mask(protected, b, n, h.device)
    merged = False
    h_prev, bias_prev = (None, None) if start is None else (start[0], None)
    per_layer = [n] * first
    for i, layer in enumerate(layers):
        if i < first:
            continue
        if i in prune_at and method != "none" and keep < 1.0:
            prot = torch.gather(prot_orig, 1, kept)
            cur = h.shape[1]
            k = sel.kept_count(keep, cur)
            if method in ("random", "recency", "divprune"):
                qk = None
            else:
                qk = layer_qkv(model, i - 1, h_prev, values=(method == "zero_tprune" and s_features == "value"))
            if method == "tome":
                # head-averaged keys [B, n, d]; one bipartite round merges at most the unprotected half,
                # so a larger r runs several rounds at this point (keys merged like the tokens)
                metric = qk.k.mean(1)
                while h.shape[1] > k:
                    n_a = int((~prot[:, 0::2]).sum(-1).min())
                    m = sel.tome_merge(h, metric, min(h.shape[1] - k, n_a), sizes=sizes, protected=prot)
                    metric = sel.tome_merge(metric, metric, min(h.shape[1] - k, n_a), sizes=sizes,
                                            protected=prot).x
                    h, sizes = m.x, m.sizes
                    kept = torch.gather(kept, 1, m.origin)
                    prot = torch.gather(prot, 1, m.origin)
                merged = True
            else:
                # the previous block's attention was computed on its own (possibly merged) tokens
                attn = probs_from_qk(qk, bias_prev) if qk is not None else None
                if method == "divprune":
                    idx = sel.divprune_keep(h, keep, protected=prot)
                elif method == "zero_tprune":
                    imp = S.score("wpr", attn, iterations=iterations, heads=heads, vhf=vhf)
                    feats = {"key": qk.k, "query": qk.q, "value": qk.v}.get(s_features)
                    feats = h if feats is None else feats.transpose(1, 2).reshape(b, cur, -1)
                    idx = sel.zero_tprune_keep(imp, feats, keep, protected=prot, s_share=s_share,
                                               partition=partition)
                else:
                    sc = S.score(method, attn, n=cur, batch=b, generator=generator, iterations=iterations,
                                 heads=heads, vhf=vhf)
                    idx = sel.topk_keep(sc, keep, protected=prot)
                h = sel.gather(h, idx)
                sizes = torch.gather(sizes, 1, idx)
                kept = torch.gather(kept, 1, idx)
        bias = torch.log(sizes) if (merged and proportional) else None
        h_prev, bias_prev = h, bias
        per_layer.append(h.shape[1])
        h = _run_layer(layer, h, bias)
    w = sizes / sizes.sum(-1, keepdim=True)
    emb = torch.einsum("bn,bnd->bd", w, h.float())
    return EncoderOut(h, sizes, kept, emb, per_layer)


@torch.no_grad()
def states(model: nn.Module, input_ids: torch.Tensor, prune_at: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of blocks ``prune_at - 1`` and ``prune_at`` of the unpruned forward (for ``encode(start=...)``)."""
    layers = blocks(model)
    if not 1 <= prune_at < len(layers):
        raise TokenInputError(f"prune_at={prune_at} must lie in [1, {len(layers) - 1}]")
    h = model.embeddings(input_ids=input_ids)
    for layer in layers[: prune_at - 1]:
        h = _run_layer(layer, h, None)
    return h, _run_layer(layers[prune_at - 1], h, None)


def embedding_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two embedding batches ``[B, D]`` -> ``[B]``."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)

