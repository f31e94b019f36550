"""Block-wise reconstruction with a fixed mask (BR / GP / CR of Shin et al., EMNLP 2024, Sec. 3 and Eq. 2).

``reconstruct`` (the mask-keeping wrapper of the core :func:`shrink.reconstruction.fit_unit`, shared with
FlexRound's learned rounding) minimises ``mean((f(x) - y)^2)`` over every parameter of the unit ``f`` (one decoder block for
BR/GP, a window of two consecutive blocks for CR), where

* ``x`` = sparse-stream input of the unit (output of the already pruned blocks),
* ``y`` = the dense unit's output on ``x`` (BR, Eq. 2) or the dense model's own activation after the unit,
  i.e. the dense unit on the dense stream (GP),

with the mask fixed: gradients of pruned weights are zeroed by hooks and pruned weights are re-zeroed after
every step (``MaskSet``). All parameters of the unit train (linear weights, norm weights, OPT biases), as in
the official code (every parameter whose name is not ``mask``).

Schedule (paper App. A / official ``configs``): AdamW, lr 2e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0,
linear decay to 0 without warm-up over ``epochs * ceil(N / batch_size)`` steps, shuffled batches, batch 8,
10 epochs. Deviations, all parameters: fp32 throughout (the official code uses fp16 autocast + GradScaler);
the last partial batch is kept (the official loader drops nothing either: ``floor`` only sizes the
schedule); optional token weighting (``first_token_weight``) down-weights position 0, the massive-activation
token that dominates the loss on SmolLM2 (an RSQ-style token-weighted loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..reconstruction import FitConfig, fit_unit
from .masks import MaskSet, PruningError


@dataclass(frozen=True)
class ReconConfig:
    """Reconstruction hyper-parameters (defaults = the paper's schedule)."""

    epochs: int = 10
    batch_size: int = 8
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    first_token_weight: float = 1.0
    max_grad_norm: float | None = None  # official: 1000 (effectively off)
    seed: int = 0

    def check(self) -> "ReconConfig":
        if self.epochs < 0 or self.batch_size <= 0 or self.lr <= 0:
            raise PruningError(f"ReconConfig needs epochs >= 0, batch_size > 0, lr > 0; got {self}")
        return self


def reconstruct(unit: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter], masks: MaskSet,
                inputs: torch.Tensor, targets: torch.Tensor, cfg: ReconConfig, *,
                heldout: tuple[torch.Tensor, torch.Tensor] | None = None, eval_at: tuple[int, ...] = ()) -> dict:
    """Train ``params`` so that ``unit(inputs)`` matches ``targets`` with ``masks`` fixed.

    The optimisation is the core :func:`shrink.reconstruction.fit_unit` (shared with FlexRound); this function
    adds the mask (gradients of pruned weights zeroed by hooks, pruned weights re-zeroed after every step,
    verified at the end) and the paper's epoch-based budget ``epochs * ceil(N / batch_size)`` steps with linear
    decay.

    Args:
        unit: function ``[B, T, D] -> [B, T, D]`` (runs one block or a window of blocks; must be
            differentiable w.r.t. ``params``).
        params: parameters to train (all parameters of the unit).
        masks: masks of the pruned weights among ``params`` (kept applied).
        inputs: float ``[N, T, D]`` sparse-stream inputs (on CPU or the model's device).
        targets: float ``[N, T, D]`` targets (BR: dense unit on ``inputs``; GP: dense unit on the dense stream).
        cfg: :class:`ReconConfig`.
        heldout, eval_at: held-out ``(inputs, targets)`` and the steps at which the block MSE is measured
            (:func:`shrink.reconstruction.fit_unit`; training is the same with or without them).
    Returns:
        dict with ``losses`` (per step), ``steps``, ``seconds`` and ``curve``.
    """
    cfg.check()
    if inputs.shape != targets.shape:
        raise PruningError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must match")
    total = cfg.epochs * math.ceil(inputs.shape[0] / cfg.batch_size)
    if total == 0:
        return {"losses": [], "steps": 0, "seconds": 0.0, "curve": []}
    fit = FitConfig(steps=total, batch_size=cfg.batch_size, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, schedule="linear", first_token_weight=cfg.first_token_weight,
                    max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, eval_at=eval_at)
    out = fit_unit(unit, params, inputs, targets, fit, heldout=heldout, hooks=masks.hook_gradients,
                   after_step=masks.apply)
    masks.verify()
    return out
