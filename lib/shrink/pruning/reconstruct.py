"""Block-wise reconstruction with a fixed mask (BR / GP / CR of Shin et al., EMNLP 2024, Sec. 3 and Eq. 2).

``reconstruct`` minimises ``mean((f(x) - y)^2)`` over every parameter of the unit ``f`` (one decoder block for
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
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

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
                inputs: torch.Tensor, targets: torch.Tensor, cfg: ReconConfig) -> dict:
    """Train ``params`` so that ``unit(inputs)`` matches ``targets`` with ``masks`` fixed.

    Args:
        unit: function ``[B, T, D] -> [B, T, D]`` (runs one block or a window of blocks; must be
            differentiable w.r.t. ``params``).
        params: parameters to train (all parameters of the unit).
        masks: masks of the pruned weights among ``params`` (kept applied).
        inputs: float ``[N, T, D]`` sparse-stream inputs (on CPU or the model's device).
        targets: float ``[N, T, D]`` targets (BR: dense unit on ``inputs``; GP: dense unit on the dense stream).
        cfg: :class:`ReconConfig`.
    Returns:
        dict with ``losses`` (per step), ``steps``, ``seconds``.
    """
    cfg.check()
    if inputs.shape != targets.shape:
        raise PruningError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must match")
    n, t, _ = inputs.shape
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if total == 0:
        return {"losses": [], "steps": 0, "seconds": 0.0}
    device = params[0].device
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
    handles = masks.hook_gradients()
    w = torch.ones(t, device=device)
    w[0] = cfg.first_token_weight
    w = (w / w.mean()).view(1, t, 1)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, t0 = [], time.perf_counter()
    try:
        with torch.enable_grad():
            for _ in range(cfg.epochs):
                perm = torch.randperm(n, generator=gen)
                for s in range(0, n, cfg.batch_size):
                    idx = perm[s:s + cfg.batch_size]
                    x = inputs[idx].to(device)
                    y = targets[idx].to(device)
                    loss = ((unit(x) - y) ** 2 * w).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    opt.step()
                    sched.step()
                    masks.apply()
                    losses.append(float(loss.detach()))
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(params, was):
            p.requires_grad_(r)
            p.grad = None
    masks.verify()
    return {"losses": losses, "steps": total, "seconds": time.perf_counter() - t0}
