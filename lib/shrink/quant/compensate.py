"""Low-rank compensation of weight-quantized models (EoRA on GPTQ / PB-LLM outputs; notebook 02k).

The quantized weights stay on their grid; a rank-``r`` adapter ``B A`` beside every decoder linear absorbs part
of the quantization residual ``dW = W - W_q``: EoRA (activation-aware, eigenspace of the compressed model's input
Gram matrix, EoRA Sec. 3) or the plain SVD of ``dW`` (data-free baseline). The solver is the core
:mod:`shrink.lowrank`, shared with the pruning chapter. Extra parameters: ``r (out + in)`` per linear
(:func:`extra_parameters_of`), i.e. ``16 r (out + in)`` bits at fp16.

Introduced in: notebooks/02-bits/ (compensation, issue 15)
"""

from __future__ import annotations

import torch
from torch import nn

from ..lowrank import LOWRANK_METHODS, compensate_model, extra_parameters
from .gptq import decoder_weight_linears
from .quantizer import QuantError


@torch.no_grad()
def compensate_quantized(qmodel: nn.Module, fp_model: nn.Module, calib_ids: torch.Tensor, *, rank: int,
                         method: str = "eora", batch: int = 8) -> dict:
    """Attach rank-``rank`` adapters to every decoder linear of ``qmodel`` (in place), block by block on the
    compensated model's own stream. Returns ``{"extra_params"}`` (exact count)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise QuantError(f"compensate_quantized needs an integer rank >= 1 (EoRA: 16-512), got {rank!r}")
    if method not in LOWRANK_METHODS:
        raise QuantError(f"unknown compensation method {method!r}; use one of {LOWRANK_METHODS}")
    return compensate_model(qmodel, fp_model, calib_ids, rank=rank, linears=decoder_weight_linears, method=method,
                            batch=batch)


def extra_parameters_of(model: nn.Module, rank: int) -> int:
    """Parameters a rank-``rank`` adapter adds over every decoder linear of ``model`` (``r (out + in)`` each,
    the rank clipped to ``min(out, in)``)."""
    from ..models import BlockRunner

    return sum(extra_parameters(l.out_features, l.in_features, min(rank, l.out_features, l.in_features))
               for b in BlockRunner(model).blocks for l in decoder_weight_linears(b).values())


__all__ = ["compensate_quantized", "extra_parameters_of"]
