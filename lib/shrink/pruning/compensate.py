"""Training-free compensation of a pruned linear layer: EoRA low-rank and FLAP-style bias.

The axis-neutral code lives in the core module :mod:`shrink.lowrank` (shared with the bits chapter, which
compensates GPTQ / PB-LLM outputs); this module re-exports it and keeps the pruning chapter's API:
:func:`compensate_model` selects the pruned linears by ``targets`` (``all`` | ``attn`` | ``mlp``, as
:func:`shrink.pruning.select_linears`). See :mod:`shrink.lowrank` for the equations (EoRA Sec. 3; FLAP Sec. 3.3).
"""

from __future__ import annotations

import torch
from torch import nn

from ..lowrank import (LowRankAdd, LowRankError, bias_compensation, eora_factors, extra_parameters,  # noqa: F401
                       svd_factors)
from ..lowrank import compensate_model as _compensate_model
from .masks import PruningError


@torch.no_grad()
def compensate_model(sparse_model: nn.Module, dense_model: nn.Module, calib_ids: torch.Tensor, *, rank: int = 0,
                     bias: bool = False, targets: str = "all", batch: int = 8) -> dict:
    """Attach EoRA adapters (``rank > 0``) and/or bias corrections to every pruned linear, block by block
    (:func:`shrink.lowrank.compensate_model` on the linears ``targets`` selects). The sparse weights are not
    modified. Returns ``{"extra_params"}``."""
    from .sequential import select_linears

    if rank <= 0 and not bias:
        raise PruningError("compensate_model needs rank > 0 or bias=True")
    return _compensate_model(sparse_model, dense_model, calib_ids, rank=rank, bias=bias,
                             linears=lambda block: select_linears(block, targets), method="eora", batch=batch)


__all__ = ["eora_factors", "svd_factors", "LowRankAdd", "bias_compensation", "extra_parameters", "compensate_model",
           "LowRankError"]
