"""One FLOPs model for GQA + SwiGLU decoders and BERT encoders, and the papers' conventions beside it.

FLOPs = 2 x multiply-accumulates of the matrix products (what ``torch.utils.flop_counter.FlopCounterMode``
counts; norms, softmax, RoPE and activations are not counted). For a block running on ``n`` tokens:

decoder (hidden ``d``, ``H`` query heads, ``H_kv`` key/value heads of size ``h``, SwiGLU width ``m``)::

    projections  2n·d·Hh (q) + 2·2n·d·H_kv·h (k, v) + 2n·Hh·d (o)
    attention    2n²·Hh (q kᵀ) + 2n²·Hh (A v)          # the full square, as SDPA computes it
    MLP          3 · 2n·d·m                             # gate, up, down

encoder (BERT): projections 4 · 2n·d², attention 2 · 2n²·d, FFN 2 · 2n·d·m. The LM head adds 2n·d·V
(decoders), the mean pooling 2n·d (encoders).

Papers count differently: FastV and DivPrune (``tflops.py``) use ``4nd² + 2n²d + 2ndm`` per layer (MACs,
MHA, a two-matrix FFN), SparseVLM ``4nd² + 2n²d + 3ndm``. :func:`fastv_convention` shows both; ratios
pruned/unpruned are what the papers report.

Introduced in: notebooks/03-tokens/03a-budgets-flops-latency.md
"""

from __future__ import annotations

from torch import nn

from .attention import TokenInputError, is_encoder


def _dims(config) -> dict:
    d = config.hidden_size
    h_q = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or d // h_q
    return {"d": d, "H": h_q, "Hkv": getattr(config, "num_key_value_heads", None) or h_q, "hd": hd,
            "m": config.intermediate_size, "V": config.vocab_size}


def block_flops(config, n: int, encoder: bool = False) -> dict:
    """FLOPs of one block on ``n`` tokens, split into ``proj``, ``attn``, ``mlp``."""
    k = _dims(config)
    d, hh, kv, m = k["d"], k["H"] * k["hd"], k["Hkv"] * k["hd"], k["m"]
    if encoder:
        return {"proj": 4 * 2 * n * d * d, "attn": 2 * 2 * n * n * d, "mlp": 2 * 2 * n * d * m}
    return {"proj": 2 * n * d * hh + 2 * 2 * n * d * kv + 2 * n * hh * d, "attn": 2 * 2 * n * n * hh,
            "mlp": 3 * 2 * n * d * m}


def model_flops(model_or_config, tokens_per_layer: list[int], *, head_tokens: int | None = None) -> dict:
    """Total FLOPs of a forward whose block ``l`` runs on ``tokens_per_layer[l]`` tokens.

    ``head_tokens``: rows the LM head is applied to (decoders; default the last block's count; 0 for none);
    for encoders ``head`` is the mean pooling (``2·n·d``; pass ``head_tokens=0`` to leave it out).
    Returns ``{"proj", "attn", "mlp", "head", "total"}`` (ints).
    """
    config = getattr(model_or_config, "config", model_or_config)
    enc = getattr(config, "model_type", "") == "bert"
    if len(tokens_per_layer) != config.num_hidden_layers:
        raise TokenInputError(f"tokens_per_layer has {len(tokens_per_layer)} entries, the model has "
                              f"{config.num_hidden_layers} blocks")
    out = {"proj": 0, "attn": 0, "mlp": 0}
    for n in tokens_per_layer:
        for key, v in block_flops(config, int(n), enc).items():
            out[key] += v
    if enc:  # the mean pooling of the last hidden states is one [n] x [n, d] product
        out["head"] = 2 * tokens_per_layer[-1] * config.hidden_size if head_tokens is None else head_tokens
    else:
        ht = tokens_per_layer[-1] if head_tokens is None else head_tokens
        out["head"] = 2 * ht * config.hidden_size * config.vocab_size
    out["total"] = sum(out.values())
    return out


def scoring_flops(model_or_config, n: int) -> int:
    """Extra FLOPs of recomputing one layer's attention probabilities on ``n`` tokens for scoring
    (q and k projections and ``q kᵀ``; :func:`shrink.tokens.attention.layer_qkv` with ``values=False``)."""
    config = getattr(model_or_config, "config", model_or_config)
    k = _dims(config)
    d, hh = k["d"], k["H"] * k["hd"]
    kv = hh if getattr(config, "model_type", "") == "bert" else k["Hkv"] * k["hd"]
    return 2 * n * d * hh + 2 * n * d * kv + 2 * n * n * hh


def fastv_convention(config, tokens_per_layer: list[int], ffn_matrices: int = 2) -> int:
    """The FastV / DivPrune count ``Σ_l 4nd² + 2n²d + 2ndm`` (``ffn_matrices=3``: SparseVLM's 3ndm)."""
    d, m = config.hidden_size, config.intermediate_size
    return sum(4 * n * d * d + 2 * n * n * d + ffn_matrices * n * d * m for n in tokens_per_layer)


def counted_flops(fn, *args, **kwargs) -> tuple[int, object]:
    """``(FLOPs counted by FlopCounterMode, fn's result)`` for ``fn(*args, **kwargs)``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        out = fn(*args, **kwargs)
    return int(fc.get_total_flops()), out


def prefill_tokens(n_layers: int, t: int, kept: int, prune_at: int) -> list[int]:
    """Token counts per block of a prefill pruned at block ``prune_at`` from ``t`` to ``kept`` tokens."""
    return [t] * prune_at + [kept] * (n_layers - prune_at)


def is_supported(model: nn.Module) -> bool:
    return is_encoder(model) or hasattr(getattr(model, "model", None), "layers")

