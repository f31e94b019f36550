"""Token pruning and merging (chapter 03-tokens): attention recomputation, token scores, selections
(exact-count top-k with protected tokens, Zero-TPrune, DivPrune, ToMe), pruned encoder and decoder
forwards, KV-cache eviction (H2O, StreamingLLM), learned budgets (VFlowOpt-style search), the FLOPs model.

Modules: :mod:`~shrink.tokens.attention`, :mod:`~shrink.tokens.scores`, :mod:`~shrink.tokens.select`,
:mod:`~shrink.tokens.encoder`, :mod:`~shrink.tokens.decoder`, :mod:`~shrink.tokens.flops`,
presets in :mod:`~shrink.tokens.presets`; multi-vector retrieval (:mod:`~shrink.tokens.retrieval`, CRISP
analogue), cluster-then-reconstruct (:mod:`~shrink.tokens.expedit`), the ViT paper path
(:mod:`~shrink.tokens.vision`; import them explicitly). This package does not import the other chapters'
packages.
"""

from . import attention, budget, decoder, encoder, flops, kvcache, presets, scores, select
from .attention import TokenInputError, attention_probs
from .scores import SCORES, score, wpr_heads
from .select import divprune_keep, kept_count, tome_merge, topk_keep, zero_tprune_keep

__all__ = ["attention", "budget", "decoder", "encoder", "flops", "kvcache", "scores", "select", "TokenInputError", "attention_probs",
           "SCORES", "score", "wpr_heads", "divprune_keep", "kept_count", "tome_merge", "topk_keep",
           "zero_tprune_keep"]
