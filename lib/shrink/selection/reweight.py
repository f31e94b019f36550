"""Dynamic loss-based sample reweighting (Sow, Woisetschläger, Bulusu, Wang, Jacobsen, Liang; ICLR 2025).

Every strategy is a callable ``w = strategy(losses, t)`` for the ``sample_weights=`` hook of
:func:`shrink.train.train`: ``losses`` are the ``[B]`` per-sample mean token losses of the minibatch
(detached, float), ``t`` the step (from 0), and ``w`` the ``[B]`` weights of the loss ``L = Σ_i w_i ℓ_i``.

The paper's recipe (its Algorithm 1, "fully online instance reweighting"; the official code is
``src/trainer.py`` of sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025, read, not copied) for one minibatch:

1. **normalise** the losses to ``[-δ, δ]`` with the batch's min and max (δ = 1)::

       x_i = 2δ ℓ_i / (ℓ_max - ℓ_min) - δ (ℓ_max + ℓ_min) / (ℓ_max - ℓ_min)

   (``x_i = -δ`` at the batch's smallest loss, ``+δ`` at its largest, ``0`` at the midpoint);
   a batch whose losses are all equal gets ``x_i = 0`` (the official code divides by ``max(ℓ_max - ℓ_min,
   1e-6)``, which gives the same 0);
2. apply the **strategy's score** ``f``:

   ===========  =========================  ==================================================
   strategy     ``f(x)``                   effect
   ===========  =========================  ==================================================
   linupper     ``min(x + δ, δ)``          down-weights low losses, flat (capped) above the midpoint
   quadratic    ``1 - x² / δ²``            favours medium losses (the code's ``"mid"``)
   extremes     ``|x|``                    favours both ends
   ===========  =========================  ==================================================

3. **softmax with temperature** ``r`` (the code's ``kl_reg``, default 1): ``w_i = exp((f_i - max f)/r) /
   Σ_j exp((f_j - max f)/r)`` — the solution of ``max_w Σ w_i f_i - r KL(w || uniform)`` on the simplex;
   ``r → ∞`` gives uniform weights, ``r → 0`` all weight on the arg-max;
4. the first ``burn_in`` steps (the code's ``burnout_steps``: 1000 of 20,000 in its configs) use uniform
   weights.

``"uniform"`` (and every strategy during burn-in) returns exactly :func:`shrink.train.uniform_weights` — the
loop's default — so it reproduces the unweighted trajectory bit for bit under the same seed
(``tests/lib/test_selection_reweight.py`` checks it with the real loop).

Note on scale: with the official code's single-process reduction ``Σ_i w_i ℓ_i`` (``len_norms`` are ``1/B``
for equal lengths and it multiplies by ``B``), the weighted loss has the same scale as the mean loss.

Introduced in: notebooks/04-data/04f-loss-reweighting.md
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..train import uniform_weights
from .errors import SelectionError

STRATEGIES = ("uniform", "linupper", "quadratic", "extremes")


def normalize_losses(losses: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Step 1: per-sample losses ``[B]`` mapped linearly onto ``[-δ, δ]`` by the batch's min and max.

    Returns a ``[B]`` tensor of the losses' dtype; all zeros when every loss is equal (or ``B == 1``).
    """
    lo, hi = losses.min(), losses.max()
    span = hi - lo
    if float(span) <= 0.0:
        return torch.zeros_like(losses)
    # the paper's 2δℓ/(ℓmax-ℓmin) - δ(ℓmax+ℓmin)/(ℓmax-ℓmin), written as δ(2(ℓ-ℓmin)/(ℓmax-ℓmin) - 1): the same
    # map, without the cancellation of two large terms in float32 (the ends map to exactly -δ and +δ)
    return delta * (2.0 * (losses - lo) / span - 1.0)


def score(strategy: str, x: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Step 2: the strategy's score ``f(x)`` of normalised losses ``x`` ``[B]`` (table in the module docstring)."""
    if strategy == "linupper":
        return torch.minimum(x + delta, torch.full_like(x, delta))
    if strategy == "quadratic":
        return 1.0 - x * x / (delta * delta)
    if strategy == "extremes":
        return x.abs()
    if strategy == "uniform":
        return torch.zeros_like(x)
    raise SelectionError(f"unknown reweighting strategy {strategy!r}; use one of {', '.join(STRATEGIES)}.")


def weights(losses: torch.Tensor, strategy: str, r: float = 1.0, delta: float = 1.0) -> torch.Tensor:
    """Steps 1-3 for one minibatch: ``[B]`` weights summing to 1 (``"uniform"``: exactly ``1/B``)."""
    if strategy == "uniform":
        return uniform_weights(losses)
    f = score(strategy, normalize_losses(losses, delta), delta)
    g = torch.exp((f - f.max()) / r)
    return g / g.sum()


@dataclass(frozen=True)
class Reweighter:
    """A ``sample_weights(losses[B], t) -> w[B]`` callable for :func:`shrink.train.train`.

    Attributes:
        strategy: ``"uniform"``, ``"linupper"``, ``"quadratic"`` or ``"extremes"``.
        r: softmax temperature (> 0; the paper's ``kl_reg``, default 1).
        delta: half-width of the normalised loss range (the paper's δ = 1).
        burn_in: steps ``t < burn_in`` use uniform weights (the paper's ``burnout_steps``).
    """

    strategy: str = "uniform"
    r: float = 1.0
    delta: float = 1.0
    burn_in: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise SelectionError(f"unknown reweighting strategy {self.strategy!r}; use one of "
                                 f"{', '.join(STRATEGIES)} (the paper's 'mid' is 'quadratic').")
        if isinstance(self.r, bool) or not isinstance(self.r, (int, float)) or not (self.r > 0) or math.isnan(self.r):
            raise SelectionError(f"reweighting temperature r must be a positive number, got {self.r!r}; use r=1 "
                                 "(the paper's default kl_reg) or larger for weights closer to uniform.")
        if not isinstance(self.delta, (int, float)) or not (self.delta > 0) or not math.isfinite(self.delta):
            raise SelectionError(f"delta must be a positive finite number, got {self.delta!r}; use delta=1 (the "
                                 "paper's).")
        if isinstance(self.burn_in, bool) or not isinstance(self.burn_in, int) or self.burn_in < 0:
            raise SelectionError(f"burn_in must be a non-negative integer number of steps, got {self.burn_in!r}; "
                                 "e.g. 10% of the steps.")

    def __call__(self, losses: torch.Tensor, t: int = 0) -> torch.Tensor:
        if losses.dim() != 1 or losses.numel() == 0:
            raise SelectionError(f"sample weights need per-sample losses of shape [B], got {tuple(losses.shape)}; "
                                 "pass shrink.train.sample_losses(...) of the minibatch.")
        if self.strategy == "uniform" or t < self.burn_in:
            return uniform_weights(losses, t)
        return weights(losses, self.strategy, self.r, self.delta)

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "r": float(self.r), "delta": float(self.delta), "burn_in": self.burn_in}
