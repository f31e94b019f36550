"""Attention probabilities recomputed from a layer's queries and keys — re-exported from the core module
:mod:`shrink.attention` (shared with the bits axis: RSQ's attention-concentration token weights).

Fused attention backends (PyTorch SDPA, FlashAttention) never return the attention matrix, yet every
attention-based token score (EViT, LTP, FastV, H2O, Zero-TPrune's WPR) needs it; :func:`attention_probs`
recomputes the probabilities of one layer from its input hidden states with the model's own projections,
RoPE and GQA (see :mod:`shrink.attention`).

Introduced in: notebooks/03-tokens/03b-token-scores.md
"""

from __future__ import annotations

from ..attention import (QK, AttentionInputError, attention_probs, blocks, causal_bias,  # noqa: F401
                         is_encoder, layer_qkv, probs_from_qk, rope, rotary, rotate_half)


class TokenInputError(AttentionInputError):
    """Bad input to a token-pruning function (the message names the fix)."""


__all__ = ["QK", "TokenInputError", "AttentionInputError", "attention_probs", "blocks", "causal_bias", "is_encoder",
           "layer_qkv", "probs_from_qk", "rope", "rotary", "rotate_half"]
