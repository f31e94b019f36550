"""Attention probabilities recomputed from a layer's queries and keys.

Fused attention backends (PyTorch SDPA, FlashAttention) never return the attention matrix, yet every
attention-based token score (EViT, LTP, FastV, H2O, Zero-TPrune's WPR) needs it. Instead of switching the
whole model to eager attention, we recompute the probabilities of **one** layer from its input hidden
states: ``A = softmax(q kᵀ · d_head^-1/2 + mask)``, with the model's own projections, RoPE and GQA.
This is independent of the backend that runs the forward (checked against eager ``output_attentions`` in
``tests/lib/test_tokens.py``).

Two families:

* LLaMA-like decoders (LLaMA, Mistral, Qwen2, SmolLM2): pre-norm ``input_layernorm``; ``q_proj``/``k_proj``;
  rotary embedding (rotate-half convention, cos/sin from the model's ``rotary_emb`` so rope scaling is
  honoured); GQA keys repeated ``H / H_kv`` times; causal mask.
* BERT encoders (MiniLM): post-norm, the block input goes straight into ``attention.self.query``/``key``;
  bidirectional, no positions inside attention.

Core module (axes never import each other): the tokens axis (:mod:`shrink.tokens`, token scores) and the bits
axis (:mod:`shrink.quant.rsq`, RSQ's attention-concentration token weights) both read it.

Introduced in: notebooks/03-tokens/03b-token-scores.md
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ShrinkError


class AttentionInputError(ShrinkError, ValueError):
    """Bad input to an attention-recomputation function (the message names the fix)."""


def is_encoder(model: nn.Module) -> bool:
    """True for BERT-style encoders (``model.encoder.layer``)."""
    return getattr(model.config, "model_type", "") == "bert"


def blocks(model: nn.Module) -> nn.ModuleList:
    """Transformer blocks of an encoder (``encoder.layer``) or LLaMA-like decoder (``model.layers``)."""
    if is_encoder(model):
        return model.encoder.layer
    if hasattr(model, "model") and hasattr(model.model, "layers"):
        return model.model.layers
    raise AttentionInputError(f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')}) is neither a "
                              "BERT encoder nor a LLaMA-like decoder; attention recomputation (shrink.tokens, RSQ) "
                              "supports minilm/tiny-bert and LLaMA/Mistral/Qwen2-style decoders (smollm2-135m, "
                              "tiny-llama, tiny-llama3).")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dim (the rotate-half RoPE convention of LLaMA in HF)."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE: ``x [B, H, T, d]``, ``cos/sin [B, T, d]`` -> ``[B, H, T, d]`` (Su et al., Eq. 34)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def rotary(model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
    """``(cos, sin)`` of shape ``[B, T, d_head]`` for ``position_ids [B, T]`` from the model's rotary module."""
    return model.model.rotary_emb(hidden, position_ids=position_ids)


@dataclass
class QK:
    """Queries and keys of one layer after positions: ``q [B, H, T, d]``, ``k [B, H, T, d]`` (GQA keys
    already repeated to ``H`` heads), ``v [B, H, T, d]`` values, ``scaling`` = d^-1/2, ``causal``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scaling: float
    causal: bool


@torch.no_grad()
def layer_qkv(model: nn.Module, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
              values: bool = True) -> QK:
    """Queries, keys and values of block ``layer`` for its input ``hidden [B, T, D]`` (fp32 or the model dtype).

    ``position_ids [B, T]`` (int64) are the RoPE positions of the decoder tokens (``arange(T)`` if omitted;
    pass the original positions of kept tokens after pruning). Ignored for encoders. ``values=False`` skips
    the value projection (``v`` is then None): scoring needs only q and k.
    """
    if hidden.dim() != 3:
        raise AttentionInputError(f"hidden must be [B, T, D], got shape {tuple(hidden.shape)}")
    blk = blocks(model)[layer]
    b, t, _ = hidden.shape
    if is_encoder(model):
        att = blk.attention.self
        hd = att.attention_head_size

        def heads(x):
            return x.view(b, t, -1, hd).transpose(1, 2)
        v = heads(att.value(hidden)) if values else None
        return QK(heads(att.query(hidden)), heads(att.key(hidden)), v, hd ** -0.5, False)
    att = blk.self_attn
    hd = att.head_dim
    x = blk.input_layernorm(hidden)
    q = att.q_proj(x).view(b, t, -1, hd).transpose(1, 2)
    k = att.k_proj(x).view(b, t, -1, hd).transpose(1, 2)
    if position_ids is None:
        position_ids = torch.arange(t, device=hidden.device)[None].expand(b, t)
    cos, sin = rotary(model, hidden, position_ids)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)   # GQA: query head h uses key head h // rep
    v = att.v_proj(x).view(b, t, -1, hd).transpose(1, 2).repeat_interleave(rep, dim=1) if values else None
    return QK(q, k, v, float(att.scaling), True)


def probs_from_qk(qk: QK, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q kᵀ · scaling + mask)`` -> ``[B, H, T, T]`` fp32, rows sum to 1.

    ``key_bias [B, T]`` is added to every row's logits (ToMe's proportional attention, ``log size``; or
    ``-inf`` for padding). Causal layers mask ``j > i``.
    """
    logits = (qk.q.float() @ qk.k.float().transpose(-1, -2)) * qk.scaling
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :].float()
    if qk.causal:
        t = logits.shape[-1]
        future = torch.ones(t, t, dtype=torch.bool, device=logits.device).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    return logits.softmax(-1)


def attention_probs(model: nn.Module, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
                    key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities ``[B, H, T, T]`` (fp32) of block ``layer`` given its input ``hidden [B, T, D]``.

    Equals the eager backend's ``output_attentions`` for that layer (tested to 1e-5), whatever backend the
    model runs with.
    """
    return probs_from_qk(layer_qkv(model, layer, hidden, position_ids), key_bias)


def causal_bias(t: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Additive causal mask ``[1, 1, T, T]``: 0 on and below the diagonal, the dtype's minimum above.

    Passed explicitly to decoder blocks so the result does not depend on a backend's ``is_causal`` default.
    """
    m = torch.zeros(t, t, dtype=dtype, device=device)
    m.masked_fill_(torch.ones(t, t, dtype=torch.bool, device=device).triu(1), torch.finfo(dtype).min)
    return m[None, None]
