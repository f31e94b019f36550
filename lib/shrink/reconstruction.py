"""Block-output reconstruction: fit a unit's parameters so that its output matches a target (core, axis-neutral).

Shared by every method that trains a block (or a window of blocks) against the dense model's activations:

* pruning's BR / GP / CR (Shin et al., EMNLP 2024, Eq. 2; :mod:`shrink.pruning.reconstruct` keeps the mask
  fixed through the ``hooks`` / ``after_step`` callbacks of :func:`fit_unit`);
* FlexRound's learned rounding (Lee et al., ICML 2023, Sec. 3; :mod:`shrink.quant.flexround` trains only the
  rounding scales).

Axes never import each other; they meet here and in :mod:`shrink.blockwise` (the sequential loop that calls
the method's reconstruction once per unit).

The problem (Rethinking Eq. 2 / FlexRound Eq. 4 with the MSE of the official code)::

    min_theta  1/(B T D) * sum_{b,t,d} w_t * (f_theta(x)_{btd} - y_{btd})^2

over minibatches of ``B`` sequences of the calibration stream: ``x`` = the compressed stream's input of the unit,
``y`` = the target (the dense unit on ``x`` for BR, the dense model's own activation for GP), ``w_t`` = per-position
weights normalised to mean 1 (``first_token_weight`` down-weights the attention-sink token; 1 = plain MSE).

Optimiser: AdamW (weight decay 0 = Adam) with a per-step schedule to 0 (``linear``: Rethinking's official
configs; ``cosine``: FlexRound's ``CosineAnnealingLR(T_max=iters, eta_min=0)``; ``constant``), shuffled batches
drawn epoch by epoch from a seeded generator (the last partial batch of an epoch is kept).

Held-out tracking: with ``heldout=(x_h, y_h)`` and ``eval_at`` steps, the unweighted block MSE on the calibration
set and on the held-out set is measured (no gradient, no random draw: training is bit-identical with or without
it) before the first step (``0``) and after the listed steps — the overfitting curve of one unit.

Introduced in: notebooks/01-weights/01b-reconstruction.md (BR), notebooks/02-bits/02j-flexround.md (FlexRound)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .errors import BadInputError

SCHEDULES = ("linear", "cosine", "constant")


class ReconstructionError(BadInputError):
    """Bad reconstruction input: configuration, shapes, parameters."""


@dataclass(frozen=True)
class FitConfig:
    """Optimiser settings of one unit's reconstruction.

    Attributes:
        steps: optimiser steps (0 = no training; only ``eval_at`` step 0 is measured).
        batch_size: sequences per step.
        lr, betas, eps, weight_decay: AdamW's (``weight_decay=0`` is Adam).
        schedule: ``linear`` | ``cosine`` | ``constant`` decay of the lr to 0 over ``steps``.
        first_token_weight: loss weight of position 0 before normalising the weights to mean 1.
        max_grad_norm: clip the gradient norm (None = off).
        seed: batch-order generator seed.
        eval_at: steps after which the calibration and held-out MSE are measured (0 = before training).
        fused: AdamW's fused kernel (``torch.optim.AdamW(fused=True)``: one pass per tensor on CPU and CUDA)
            instead of torch's default for-loop implementation. Same update rule, other rounding; the speed-up
            and the weight difference on a SmolLM2-135M block, against the seed-to-seed band, are measured by
            ``benchmarks/bench_reconstruct.py`` (record ``results/bench/reconstruct.json``). Records made
            before this default (fifth session of 2026-12-01) used the for-loop; ``fused=False`` reproduces
            them bit for bit.
    """

    steps: int
    batch_size: int = 8
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "linear"
    first_token_weight: float = 1.0
    max_grad_norm: float | None = None
    seed: int = 0
    eval_at: tuple[int, ...] = ()
    fused: bool = True

    def check(self) -> "FitConfig":
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ReconstructionError(f"FitConfig.steps must be an integer >= 0, got {self.steps!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ReconstructionError(f"FitConfig.batch_size must be a positive integer, got {self.batch_size!r}")
        if not self.lr > 0:
            raise ReconstructionError(f"FitConfig.lr must be > 0, got {self.lr!r} (BR: 2e-4, FlexRound: 2.5e-3)")
        if self.schedule not in SCHEDULES:
            raise ReconstructionError(f"unknown schedule {self.schedule!r}; use one of {SCHEDULES}")
        bad = [s for s in self.eval_at if not 0 <= s <= self.steps]
        if bad:
            raise ReconstructionError(f"eval_at steps {bad} lie outside [0, steps={self.steps}]; list steps the "
                                      "run reaches (0 = before training)")
        return self


def _lr_factor(schedule: str, total: int) -> Callable[[int], float]:
    if schedule == "linear":
        return lambda s: max(0.0, 1.0 - s / total)
    if schedule == "cosine":
        return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))
    return lambda s: 1.0


@torch.no_grad()
def unit_mse(unit: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor,
             device: torch.device | str, batch: int = 8) -> float:
    """Unweighted ``mean((unit(x) - y)^2)`` over ``inputs`` / ``targets`` float ``[N, T, D]`` (fp64 accumulation)."""
    tot, cnt = 0.0, 0
    for s in range(0, inputs.shape[0], batch):
        d = unit(inputs[s:s + batch].to(device)).double() - targets[s:s + batch].to(device).double()
        tot += float((d * d).sum())
        cnt += d.numel()
    return tot / max(cnt, 1)


def fit_unit(unit: Callable[[torch.Tensor], torch.Tensor], params: Iterable[nn.Parameter], inputs: torch.Tensor,
             targets: torch.Tensor, cfg: FitConfig, *, heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
             hooks: Callable[[], list] | None = None, after_step: Callable[[], None] | None = None,
             eval_batch: int = 8) -> dict:
    """Train ``params`` so that ``unit(inputs)`` matches ``targets`` (module docstring).

    Args:
        unit: ``[B, T, D] -> [B, T, D]``, differentiable w.r.t. ``params`` (one block or a window of blocks).
        params: the parameters to train (their ``requires_grad`` is restored afterwards, gradients cleared).
        inputs: float ``[N, T, D]`` unit inputs (compressed stream; CPU or the model's device).
        targets: float ``[N, T, D']`` targets (``D' = D`` for a block; a single linear layer may change it).
        cfg: :class:`FitConfig`.
        heldout: ``(inputs [Nh, T', D], targets [Nh, T', D])`` for the held-out curve (optional).
        hooks: called once after the parameters require grad; returns hook handles removed at the end (pruning:
            ``MaskSet.hook_gradients`` zeroes the pruned weights' gradients).
        after_step: called after every optimiser step (pruning: ``MaskSet.apply`` re-zeroes pruned weights).
        eval_batch: sequences per no-grad forward of the curve.
    Returns:
        ``{"losses": [per-step weighted loss], "steps", "seconds", "curve": [{"step", "calib", "heldout"}],
        "optimizer"}`` (``curve`` only at ``cfg.eval_at``; ``heldout`` is None without held-out data).
    """
    cfg.check()
    params = list(params)
    if not params:
        raise ReconstructionError("fit_unit got no parameters to train: pass the unit's parameters (BR: every "
                                  "parameter of the block; FlexRound: the rounding scales)")
    if inputs.dim() != 3 or targets.dim() != 3 or inputs.shape[:2] != targets.shape[:2]:
        raise ReconstructionError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must be "
                                  "[N, T, D_in] and [N, T, D_out] with the same N and T")
    if heldout is not None and (heldout[0].dim() != 3 or heldout[0].shape[:2] != heldout[1].shape[:2]
                                or heldout[1].shape[2:] != targets.shape[2:]):
        raise ReconstructionError(f"held-out inputs {tuple(heldout[0].shape)} and targets "
                                  f"{tuple(heldout[1].shape)} must be [Nh, T', D_in] and [Nh, T', D_out]")
    n, t, _ = inputs.shape
    total = cfg.steps
    device = params[0].device
    curve: list[dict] = []

    def measure(step: int) -> None:
        if step in cfg.eval_at:
            curve.append({"step": step, "calib": unit_mse(unit, inputs, targets, device, eval_batch),
                          "heldout": None if heldout is None else unit_mse(unit, *heldout, device, eval_batch)})

    measure(0)
    if total == 0:
        return {"losses": [], "steps": 0, "seconds": 0.0, "curve": curve}
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                            fused=bool(cfg.fused))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg.schedule, total))
    handles = hooks() if hooks is not None else []
    w = torch.ones(t, device=device)
    w[0] = cfg.first_token_weight
    w = (w / w.mean()).view(1, t, 1)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, t0, step = [], time.perf_counter(), 0
    try:
        with torch.enable_grad():
            while step < total:
                perm = torch.randperm(n, generator=gen)
                for s in range(0, n, cfg.batch_size):
                    if step == total:
                        break
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
                    if after_step is not None:
                        after_step()
                    losses.append(float(loss.detach()))
                    step += 1
                    measure(step)
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(params, was):
            p.requires_grad_(r)
            p.grad = None
    return {"losses": losses, "steps": total, "seconds": time.perf_counter() - t0, "curve": curve,
            "optimizer": "adamw-fused" if cfg.fused else "adamw-for-loop"}


__all__ = ["FitConfig", "fit_unit", "unit_mse", "ReconstructionError", "SCHEDULES"]
