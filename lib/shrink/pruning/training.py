"""Training-time sparsity behind one updater around a ``torch.optim`` optimizer (issue 16, library part).

One API for the pruning and sparse-training algorithms that JaxPruner (Lee et al. 2023, google-research/jaxpruner,
``base_updater.py``) puts behind one optax wrapper, adapted to PyTorch: :class:`SparseUpdater` holds the masks in
the **same** :class:`~shrink.pruning.masks.MaskSet` the one-shot pruners return (``True`` = kept, keyed by
parameter name), updates them on a schedule, and re-applies them after every optimizer step.

Usage (any training loop; the updater replaces ``optimizer.step()``)::

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    upd = SparseUpdater(model, opt, algorithm="rigl", sparsity=0.8, distribution="erk",
                        update_every=100, end_step=7500, drop_fraction=0.3)
    for x, y in batches:
        opt.zero_grad()
        with upd.forward():             # STE: masked weights, straight-through gradient; else a no-op
            loss = loss_fn(model(x), y)
        loss.backward()
        upd.step()                      # mask update on schedule, optimizer step, re-mask
    masks = upd.finalize()              # MaskSet; the weights are zero where pruned (export as one-shot)

One step (:meth:`SparseUpdater.step`, JaxPruner's ``wrap_optax`` + ``post_gradient_update``), at count ``t``
(the number of earlier ``step`` calls):

1. if ``t`` is an update step of the schedule: new masks from the **raw** gradients (RigL grows from the
   dense gradient of pruned weights, SNIP scores ``|w*g|``, so no gradient hook may zero them first);
   optimizer moments are zeroed where the mask changed (newly pruned and newly grown entries), and newly
   grown weights are set to 0 (RigL ``grow_init='zeros'``);
2. the gradients are masked (``grad *= mask``; not for STE);
3. ``optimizer.step()``, skipped on RigL/SET update steps (``skip_gradients`` in JaxPruner and RigL) and on the
   LTH rewind step;
4. the masks are re-applied to the weights (not for STE, whose weights stay dense).

Re-applying the mask after every step is what keeps pruned weights at zero under Adam/AdamW: gradient masking
alone does not, because the moments of a weight that was active keep moving it for many steps
(ruihangdu/PyTorch-Deep-Compression#2; tested in ``tests/lib/test_pruning_training.py``). Zeroing the moments
of a regrown entry is not a fresh Adam start: Adam's ``step`` is per parameter tensor, so its bias correction
is already near 1 (JaxPruner and RigL behave the same).

Algorithms (``algorithm=``; scores are "higher = kept"):

=============  ====================================================  ===========================================
``magnitude``  ``|w|``, one-shot at ``start_step``                    (JaxPruner ``magnitude`` + ``OneShotSchedule``)
``random``     uniform random, one-shot at ``start_step``, seeded     (``random``)
``saliency``   ``|w * g|`` (SNIP, Lee et al. ICLR 2019; per layer     (``saliency``)
               under the distribution, not SNIP's global ranking)
``static``     random mask at construction, never updated            (``static_sparse``)
``gmp``        ``|w|`` at the polynomial schedule (Zhu & Gupta 2017)  (``magnitude`` + ``PolynomialSchedule``)
``ste``        ``|w|`` of the dense weights at ``s(t)``, recomputed   (``magnitude_ste``; Bengio et al. 2013)
               every step; forward with masked weights, gradient
               passed straight through to all weights
``set``        drop lowest ``|w|``, grow uniformly at random          (Mocanu et al. 2018; JaxPruner ``set``)
``rigl``       drop lowest ``|w|``, grow largest ``|dense grad|``     (Evci et al. ICML 2020; JaxPruner ``rigl``)
``lth``        dense to ``end_step``, mask = magnitude(θ_T), rewind   (Frankle & Carbin 2019; rewinding:
               to θ_k ⊙ m (``k = rewind_step``), optimizer reset     Frankle et al. 2020)
=============  ====================================================  ===========================================

Schedules: :class:`OneShotSchedule`, :class:`PolynomialSchedule` (GMP, Zhu & Gupta 2017 Eq. 1),
:class:`PeriodicSchedule` (RigL/SET, constant sparsity, updates every ``update_every`` steps in
``[start_step, end_step]``). RigL/SET's drop fraction decays by cosine, ``α_t = α/2 (1 + cos(π min(t, T)/T))``
with ``T = end_step`` (RigL paper Eq. 1 as implemented by JaxPruner's ``api.py``: counted from step 0).

Distributions: ``"uniform"`` (every target layer at ``s``), ``"erk"`` (Erdős–Rényi(-Kernel), Evci et al.
2020 Sec. 3, :func:`erk_allocation`), or a dict ``{name: sparsity}``.

Counting rule (exact, checked by :meth:`SparseUpdater.check`): a layer of ``N`` weights at sparsity ``s`` has
``int(N * s)`` pruned (floor; the rule of :func:`~shrink.pruning.masks.check_mask`, so a uniform mask passes
``check_mask(mask, Pattern(s))``); JaxPruner keeps ``round(N(1-s))``, one weight more pruned in some layers.
ERK allocates exactly the uniform budget ``Σ_l int(N_l s)`` of pruned weights (largest-remainder rounding of
the ERK densities), so ERK and uniform runs have the same number of non-zeros. Ties are broken by index
(:func:`~shrink.pruning.masks.lowest_k_mask`).

``torch.ao.pruning`` (torch 2.13, a kept library) compared: it offers a ``FakeSparsity`` parametrization
(``mask * original``), ``WeightNormSparsifier`` (block norms; unstructured with ``sparse_block_shape=(1, 1)``,
``zeros_per_block=1``, pruning ``round(sN)``) and the cubic ``CubicSL`` scheduler. It lacks what this module
needs: ERK or any global budget, gradient scores (saliency, RigL), drop/grow regrowth (SET, RigL), optimizer
state handling (the Adam revival above), a straight-through forward (its parametrization masks the gradient
too), rewinding, and masks as plain bool tensors (it renames the parameter to
``parametrizations.weight.original``, which breaks optimizers built before ``prepare`` and state-dict keys).
Building on it would force a second mask type next to :class:`MaskSet`, so it is not used here; its
``CubicSL.sparsity_compute_fn`` cross-checks :class:`PolynomialSchedule` in the tests.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ShrinkError, check_fraction, check_int
from .masks import MaskSet, PruningError, lowest_k_mask

ALGORITHMS = ("magnitude", "random", "saliency", "static", "gmp", "ste", "set", "rigl", "lth")
DISTRIBUTIONS = ("uniform", "erk")
#: optimizer state entries (shaped like the parameter) that are zeroed where a mask changes
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


class SparseTrainingError(PruningError):
    """Bad sparse-training input (algorithm, schedule, distribution, optimizer state)."""


def _fraction(name: str, value, fix: str) -> float:
    try:
        return check_fraction(name, value, fix=fix)
    except ShrinkError as exc:  # re-raised as a pruning error, same message
        raise SparseTrainingError(str(exc)) from None


def _int(name: str, value, minimum: int, fix: str = "") -> int:
    try:
        return check_int(name, value, minimum=minimum, fix=fix)
    except ShrinkError as exc:
        raise SparseTrainingError(str(exc)) from None


# --------------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OneShotSchedule:
    """Prune once, at step ``step``: sparsity 0 before it, the target from it on."""

    step: int = 0

    def sparsity(self, t: int, final: float) -> float:
        return final if t >= self.step else 0.0

    def is_update(self, t: int) -> bool:
        return t == self.step


@dataclass(frozen=True)
class PolynomialSchedule:
    """Gradual magnitude pruning's schedule (Zhu & Gupta 2017, "To prune, or not to prune", Eq. 1).

    ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^power`` for ``t`` in ``[t0, t0 + n Δt]``, with
    ``t0 = start``, ``n Δt = end - start``, ``Δt = every``; ``s_i`` before ``start`` and ``s_f`` after ``end``.
    Masks are updated at ``t = t0 + j Δt``, ``j = 0..n`` (so ``end - start`` must be a multiple of ``every``:
    the final sparsity is reached at an update). ``shift=1`` gives JaxPruner's variant, which evaluates the
    formula at ``t + 1`` (``s(9 | s_f=0.5, 0, 20) = 0.4375`` in its ``sparsity_schedules_test.py``).
    """

    start: int
    end: int
    every: int = 1
    initial: float = 0.0
    power: int = 3
    shift: int = 0

    def __post_init__(self):
        _int("start_step", self.start, 0)
        _int("update_every", self.every, 1, "Pass update_every=1 (every step) or larger.")
        if not isinstance(self.end, int) or self.end <= self.start:
            raise SparseTrainingError(f"end_step must be an integer > start_step={self.start}, got {self.end!r}; "
                                      "set end_step to the step where the final sparsity is reached.")
        if (self.end - self.start) % self.every:
            raise SparseTrainingError(
                f"end_step - start_step = {self.end - self.start} is not a multiple of update_every={self.every}, "
                "so the final sparsity would never be reached at an update; pick end_step = start_step + "
                "n * update_every.")
        _fraction("initial sparsity", self.initial, "Pass initial=0.0 (dense at the start).")

    def sparsity(self, t: int, final: float) -> float:
        p = min(max(t + self.shift - self.start, 0), self.end - self.start) / (self.end - self.start)
        return final + (self.initial - final) * (1.0 - p) ** self.power

    def is_update(self, t: int) -> bool:
        return self.start <= t <= self.end and (t - self.start) % self.every == 0


@dataclass(frozen=True)
class PeriodicSchedule:
    """Constant sparsity; mask updates at ``t = start + j * every`` while ``t <= end`` (RigL/SET ΔT)."""

    start: int
    end: int
    every: int = 100

    def __post_init__(self):
        _int("start_step", self.start, 0)
        _int("update_every", self.every, 1, "Pass update_every=100 (RigL's ΔT) or another positive integer.")
        if not isinstance(self.end, int) or self.end < self.start:
            raise SparseTrainingError(f"end_step must be an integer >= start_step={self.start}, got {self.end!r}; "
                                      "set end_step to the last step with mask updates (RigL: ~75% of training).")

    def sparsity(self, t: int, final: float) -> float:
        return final

    def is_update(self, t: int) -> bool:
        return self.start <= t <= self.end and (t - self.start) % self.every == 0


def cosine_drop_fraction(t: int, alpha: float, end: int) -> float:
    """RigL's drop fraction ``α/2 (1 + cos(π min(t, T)/T))`` with ``T = end`` (0 at and after ``end``)."""
    if end <= 0:
        return alpha
    return alpha * 0.5 * (1.0 + math.cos(math.pi * min(t, end) / end))


# --------------------------------------------------------------------------------------------------
# distributions
# --------------------------------------------------------------------------------------------------
def _largest_remainder(quotas: dict[str, float], total: int, caps: dict[str, int]) -> dict[str, int]:
    """Integers ``k_l`` with ``floor(q_l) <= k_l <= min(ceil(q_l), cap_l)`` summing to ``total`` (Hamilton)."""
    base = {n: min(int(math.floor(q)), caps[n]) for n, q in quotas.items()}
    rest = total - sum(base.values())
    order = sorted(quotas, key=lambda n: (-(quotas[n] - math.floor(quotas[n])), list(quotas).index(n)))
    for n in order:
        if rest <= 0:
            break
        if base[n] < caps[n]:
            base[n] += 1
            rest -= 1
    if rest > 0:  # all quotas were integers at their caps but the total is larger (cannot happen for ERK)
        for n in quotas:
            take = min(rest, caps[n] - base[n])
            base[n] += take
            rest -= take
    return base


def erk_allocation(shapes: dict[str, tuple[int, ...]], sparsity: float, power: float = 1.0) -> dict[str, int]:
    """Pruned-weight counts per layer under Erdős–Rényi-Kernel (Evci et al. 2020, RigL Sec. 3 / App.).

    Layer ``l`` (a ``[n_out, n_in]`` linear, or a conv ``[n_out, n_in, k...]``) gets density ``ε r_l`` with
    ``r_l = (Σ dims / Π dims)^power`` — for a linear ``(n_in + n_out) / (n_in n_out)``; conv kernels add their
    dims (ERK). ε solves ``ε Σ_{l∉D} r_l N_l = K - Σ_{l∈D} N_l`` for the kept budget
    ``K = Σ_l (N_l - int(s N_l))`` (the uniform distribution's exact count). While ``ε max r > 1``, every layer
    at the maximal ``r`` joins the dense set ``D`` and ε is solved again (the loop of RigL's
    ``sparse_utils.get_sparsities_erdos_renyi`` and JaxPruner's ``sparsity_distributions.erk``). The kept
    counts ``ε r_l N_l`` are rounded by largest remainder so that the pruned counts sum to
    ``Σ_l int(s N_l)`` **exactly**.

    Args:
        shapes: ``{name: weight shape}`` (at least 2-D).
        sparsity: global fraction pruned, in ``[0, 1)``.
    Returns:
        ``{name: number of pruned weights}``.
    """
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / math.prod(s)) ** power for n, s in shapes.items()}
    budget_kept = sum(N - int(N * sparsity) for N in numel.values())
    dense: set[str] = set()
    while True:
        sparse = [n for n in shapes if n not in dense]
        if not sparse:
            break
        rhs = budget_kept - sum(numel[n] for n in dense)
        eps = rhs / sum(raw[n] * numel[n] for n in sparse)
        top = max(raw[n] for n in sparse)
        if eps * top > 1.0:
            dense |= {n for n in sparse if raw[n] == top}
            continue
        break
    quotas = {n: float(numel[n]) if n in dense else eps * raw[n] * numel[n] for n in shapes}
    kept = _largest_remainder(quotas, budget_kept, numel)
    return {n: numel[n] - kept[n] for n in shapes}


def allocation(shapes: dict[str, tuple[int, ...]], sparsity: float, distribution="uniform") -> dict[str, int]:
    """Pruned counts per layer at global sparsity ``sparsity``: ``"uniform"`` -> ``int(N_l s)``; ``"erk"`` ->
    :func:`erk_allocation`; a dict ``{name: s_l}`` -> ``int(N_l s_l)`` (``sparsity`` unused; the updater scales
    the dict along its schedule)."""
    if isinstance(distribution, dict):
        return {n: int(math.prod(s) * distribution[n]) for n, s in shapes.items()}
    if distribution == "uniform":
        return {n: int(math.prod(s) * sparsity) for n, s in shapes.items()}
    if distribution == "erk":
        return erk_allocation(shapes, sparsity)
    raise SparseTrainingError(f"distribution must be one of 'uniform', 'erk' or a dict {{name: sparsity}}, got "
                              f"{distribution!r}; use distribution='erk' (RigL's choice) or 'uniform'.")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (same shape) keeping exactly the ``k`` highest scores of the whole tensor (ties by index)."""
    flat = scores.reshape(1, -1)
    return lowest_k_mask(flat, flat.shape[1] - k).reshape(scores.shape)


def default_targets(model: nn.Module) -> list[str]:
    """Weights of every ``nn.Linear``, except ``lm_head`` and any weight tied to an ``nn.Embedding``
    (tied storage found by ``data_ptr``; embeddings, norms and biases are never targets)."""
    emb = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] != "lm_head" and mod.weight.data_ptr() not in emb:
            out.append(f"{name}.weight" if name else "weight")
    return out


def reset_moments(optimizer: torch.optim.Optimizer, p: torch.Tensor, where: torch.Tensor) -> None:
    """Zero the optimizer state of ``p`` at the bool positions ``where`` (Adam/AdamW ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``; SGD ``momentum_buffer``). Scalars such as ``step`` are kept.

    Raises :class:`SparseTrainingError` for any other state tensor shaped like ``p`` (an optimizer whose state
    this function cannot reset), rather than leaving it to revive pruned weights.
    """
    state = optimizer.state.get(p)
    if not state:
        return
    for key, val in state.items():
        if not isinstance(val, torch.Tensor) or val.shape != p.shape:
            continue
        if key not in MOMENT_KEYS:
            raise SparseTrainingError(
                f"{type(optimizer).__name__} keeps per-weight state {key!r} that the sparse updater cannot reset at "
                f"pruned/regrown positions; use torch.optim.SGD, Adam or AdamW (state {', '.join(MOMENT_KEYS)}).")
        val.masked_fill_(where, 0)


# --------------------------------------------------------------------------------------------------
# the updater
# --------------------------------------------------------------------------------------------------
class SparseUpdater:
    """Sparse training around a ``torch.optim`` optimizer (JaxPruner's ``BaseUpdater`` in PyTorch).

    Args:
        model: the module; ``targets`` name its parameters.
        optimizer: a ``torch.optim`` optimizer over (a superset of) the target parameters.
        algorithm: one of :data:`ALGORITHMS` (see the module docstring).
        sparsity: final fraction pruned, in ``[0, 1)`` (global; per layer under ``distribution``).
        distribution: ``"uniform"``, ``"erk"`` or ``{name: final sparsity}``.
        schedule: a schedule object (``sparsity(t, final)``, ``is_update(t)``); default from the algorithm:
            one-shot at ``start_step`` (magnitude, random, saliency), polynomial from ``start_step`` to
            ``end_step`` every ``update_every`` (gmp; ste: every step), periodic (set, rigl).
        update_every: mask-update period ΔT (gmp, set, rigl).
        start_step, end_step: first / last update step (gmp, ste, set, rigl); LTH prunes and rewinds at
            ``end_step``.
        drop_fraction: RigL/SET α (fraction of active weights dropped and regrown per update).
        drop_decay: ``"cosine"`` (RigL) or ``"constant"``.
        rewind_step: LTH's ``k`` (weights saved after ``k`` steps; 0 = the initialisation).
        targets: parameter names (default :func:`default_targets`).
        masks: an initial :class:`MaskSet` (e.g. a Wanda mask to fine-tune with static or RigL); its counts
            replace the allocation for ``static``/``set``/``rigl``.
        seed: seeds random masks and SET's growth (a generator per (seed, step), reproducible on resume).
        power: polynomial power of the default GMP schedule (3, Zhu & Gupta).

    Attributes:
        masks: the :class:`MaskSet` (bool, ``True`` = kept), updated in place.
        count: number of :meth:`step` calls so far.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, algorithm: str = "rigl", *,
                 sparsity: float = 0.8, distribution="uniform", schedule=None, update_every: int = 100,
                 start_step: int = 0, end_step: int | None = None, drop_fraction: float = 0.3,
                 drop_decay: str = "cosine", rewind_step: int = 0, targets=None, masks: MaskSet | None = None,
                 seed: int = 0, power: int = 3):
        if algorithm not in ALGORITHMS:
            raise SparseTrainingError(f"unknown sparse-training algorithm {algorithm!r}; use one of "
                                      f"{', '.join(ALGORITHMS)}.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise SparseTrainingError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                                      "pass e.g. torch.optim.AdamW(model.parameters(), lr=1e-3).")
        self.model, self.optimizer, self.algorithm = model, optimizer, algorithm
        self.sparsity = _fraction("sparsity", sparsity, "Pass the fraction of weights pruned, e.g. sparsity=0.8.")
        if not (isinstance(distribution, dict) or distribution in DISTRIBUTIONS):
            raise SparseTrainingError(f"distribution must be one of 'uniform', 'erk' or a dict {{name: sparsity}}, "
                                      f"got {distribution!r}; use distribution='erk' (RigL's choice) or 'uniform'.")
        self.distribution = distribution
        self.update_every = _int("update_every", update_every, 1, "Pass update_every=100 (RigL's ΔT) or larger.")
        self.start_step = _int("start_step", start_step, 0)
        self.drop_fraction = _fraction("drop_fraction", drop_fraction, "Pass e.g. drop_fraction=0.3 (RigL's α).")
        self.drop_decay = drop_decay
        if drop_decay not in ("cosine", "constant"):
            raise SparseTrainingError(f"drop_decay must be 'cosine' or 'constant', got {drop_decay!r}; use "
                                      "drop_decay='cosine' (RigL).")
        self.rewind_step = _int("rewind_step", rewind_step, 0)
        self.seed = int(seed)
        needs_end = algorithm in ("gmp", "ste", "set", "rigl", "lth") and schedule is None
        if needs_end and end_step is None:
            raise SparseTrainingError(f"algorithm {algorithm!r} needs end_step (the last mask-update step); pass "
                                      "end_step=..., e.g. 75% of the training steps.")
        self.end_step = end_step
        if algorithm == "lth" and not (isinstance(end_step, int) and end_step > self.rewind_step):
            raise SparseTrainingError(f"lth needs end_step > rewind_step={self.rewind_step}, got {end_step!r}; "
                                      "pass end_step = the step where the dense run ends and the mask is taken.")

        # targets and their parameters
        names = list(targets) if targets is not None else default_targets(model)
        if not names:
            raise SparseTrainingError("no parameters to sparsify: the model has no nn.Linear weights outside "
                                      "embeddings/lm_head; pass targets=[parameter names].")
        opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.params: dict[str, nn.Parameter] = {}
        for n in names:
            try:
                p = model.get_parameter(n)
            except AttributeError:
                raise SparseTrainingError(f"target {n!r} is not a parameter of the model; pass names from "
                                          "model.named_parameters(), e.g. 'layers.0.fc1.weight'.") from None
            if p.dim() < 2:
                raise SparseTrainingError(f"target {n!r} has shape {tuple(p.shape)}; only weights with >= 2 dims "
                                          "are sparsified; remove biases/norms from targets.")
            if id(p) not in opt_params:
                raise SparseTrainingError(f"target {n!r} is not in the optimizer; build the optimizer over "
                                          "model.parameters() (including the targets).")
            self.params[n] = p
        self.shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        if isinstance(distribution, dict):
            missing = set(self.shapes) - set(distribution)
            if missing:
                raise SparseTrainingError(f"distribution dict lacks {sorted(missing)[:3]}; give a sparsity for every "
                                          "target or use 'uniform'/'erk'.")
            for n, s in distribution.items():
                _fraction(f"distribution[{n!r}]", s, "Give per-layer sparsities in [0, 1).")

        if schedule is None:
            if algorithm in ("magnitude", "random", "saliency"):
                schedule = OneShotSchedule(self.start_step)
            elif algorithm == "gmp":
                schedule = PolynomialSchedule(self.start_step, end_step, self.update_every, power=power)
            elif algorithm == "ste":  # masks recomputed every step: s(t) follows the curve step by step
                schedule = PolynomialSchedule(self.start_step, end_step, 1, power=power)
            elif algorithm in ("set", "rigl"):
                schedule = PeriodicSchedule(self.start_step, end_step, self.update_every)
            elif algorithm == "lth":
                schedule = OneShotSchedule(end_step)
            else:  # static
                schedule = OneShotSchedule(-1)  # never
        self.schedule = schedule
        self.count = 0
        self.rewind_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []  # one entry per mask update: step, sparsity, changed counts
        self._static_counts: dict[str, int] | None = None

        # initial masks: dense, or at the target for static/set/rigl (random), or a given MaskSet
        init = {n: torch.ones(s, dtype=torch.bool, device=self.params[n].device) for n, s in self.shapes.items()}
        if masks is not None:
            for n in self.shapes:
                if n not in masks.masks:
                    raise SparseTrainingError(f"initial masks lack {n!r}; pass a MaskSet over the same targets.")
                init[n] = masks.masks[n].clone()
        elif algorithm in ("static", "set", "rigl"):
            counts = self.target_counts(0)
            gen = self._gen(-1)
            for n, s in self.shapes.items():
                init[n] = keep_top(torch.rand(s, generator=gen), math.prod(s) - counts[n]).to(init[n].device)
        self.masks = MaskSet(model, init)
        self._static_counts = {n: int((~m).sum()) for n, m in self.masks} if masks is not None else None
        if algorithm != "ste":
            self.masks.apply()

    # -- schedule and counts --------------------------------------------------------------------------------
    def _gen(self, t: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + t + 1)

    def scheduled_sparsity(self, t: int | None = None) -> float:
        """Global target sparsity at step ``t`` (default: the current count)."""
        return self.schedule.sparsity(self.count if t is None else t, self.sparsity)

    def target_counts(self, t: int | None = None) -> dict[str, int]:
        """Exact pruned count per target at step ``t`` (what :meth:`check` asserts after an update)."""
        if self.algorithm in ("static", "set", "rigl"):
            if self._static_counts is not None:
                return dict(self._static_counts)
            return allocation(self.shapes, self.sparsity, self.distribution)
        s = self.scheduled_sparsity(t)
        if isinstance(self.distribution, dict):
            scale = s / self.sparsity if self.sparsity > 0 else 0.0
            return allocation(self.shapes, s, {n: v * scale for n, v in self.distribution.items()})
        return allocation(self.shapes, s, self.distribution)

    def drop_fraction_at(self, t: int) -> float:
        if self.drop_decay == "constant":
            return self.drop_fraction
        return cosine_drop_fraction(t, self.drop_fraction, self.end_step or 0)

    # -- hooks ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def forward(self):
        """Context for the forward pass. STE: every target weight ``w`` is replaced by
        ``w_eff = w + (w*m - w).detach()`` (value ``w ⊙ m``, gradient passed straight through to all of ``w``),
        with ``m`` the magnitude mask of the dense weights at ``s(t)``, recomputed here every step. Other
        algorithms: a no-op (their weights are already masked)."""
        if self.algorithm != "ste":
            yield
            return
        self._update_masks(self.count, raw_grads=False)
        swapped = []
        for n, p in self.params.items():
            mod_name, _, attr = n.rpartition(".")
            mod = self.model.get_submodule(mod_name)
            m = self.masks.masks[n]
            mod._parameters[attr] = p + (p * m - p).detach()
            swapped.append((mod, attr, p))
        try:
            yield
        finally:
            for mod, attr, p in swapped:
                mod._parameters[attr] = p

    @torch.no_grad()
    def step(self, closure=None) -> dict:
        """Replace ``optimizer.step()``: mask update on schedule, gradient masking, optimizer step, re-mask.

        Returns ``{"step": t, "updated": bool, "skipped": bool, "rewound": bool}``. After an LTH rewind the
        caller resets its LR schedule to ``rewind_step`` (the updater does not own it).
        """
        t = self.count
        info = {"step": t, "updated": False, "skipped": False, "rewound": False}
        if self.algorithm == "lth" and t == self.rewind_step:
            self.rewind_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.algorithm != "ste" and self.schedule.is_update(t):
            self._update_masks(t, raw_grads=True)
            info["updated"] = True
        if self.algorithm == "lth" and t == self.end_step:
            self._rewind()
            info["rewound"] = info["skipped"] = True
        else:
            if self.algorithm != "ste":
                for n, p in self.params.items():
                    if p.grad is not None:
                        p.grad.mul_(self.masks.masks[n])
            if info["updated"] and self.algorithm in ("set", "rigl"):
                info["skipped"] = True  # RigL/JaxPruner skip_gradients: no optimizer step on update steps
            else:
                with torch.enable_grad():
                    self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        if self.algorithm != "ste":
            self.masks.apply()
        self.count += 1
        return info

    # -- mask updates -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_masks(self, t: int, raw_grads: bool) -> None:
        counts = self.target_counts(t)
        changed = {}
        for n, p in self.params.items():
            old = self.masks.masks[n]
            new = self._new_mask(n, p, old, counts[n], t)
            diff = old ^ new
            changed[n] = int(diff.sum())
            if changed[n]:
                grown = new & ~old
                p.masked_fill_(grown, 0.0)  # RigL grow_init='zeros' (already 0 unless the weight was dense)
                if self.algorithm != "ste":
                    reset_moments(self.optimizer, p, diff)
                old.copy_(new)  # in place: anyone holding the mask sees the update
        self.history.append({"step": t, "sparsity": self.scheduled_sparsity(t), "changed": changed})

    def _grad(self, n: str, p: torch.Tensor) -> torch.Tensor:
        if p.grad is None:
            raise SparseTrainingError(f"{self.algorithm} needs the gradient of {n!r} at a mask update but it is None; "
                                      "call loss.backward() before updater.step().")
        return p.grad

    def _new_mask(self, n: str, p: torch.Tensor, old: torch.Tensor, k_pruned: int, t: int) -> torch.Tensor:
        numel = p.numel()
        alg = self.algorithm
        if alg in ("set", "rigl"):
            return self._drop_grow(n, p, old, t)
        if alg == "static":
            return old.clone()
        if alg in ("magnitude", "gmp", "lth", "ste"):
            scores = p.detach().abs().float()
        elif alg == "saliency":
            scores = (p.detach() * self._grad(n, p)).abs().float()
        elif alg == "random":
            scores = torch.rand(p.shape, generator=self._gen(t)).to(p.device)
        else:  # pragma: no cover
            raise AssertionError(alg)
        if alg != "ste":
            # monotone: an entry pruned earlier is never revived by a tie at 0 (GMP's kept set only shrinks)
            scores = scores.masked_fill(~old, -math.inf)
        return keep_top(scores, numel - k_pruned)

    def _drop_grow(self, n: str, p: torch.Tensor, old: torch.Tensor, t: int) -> torch.Tensor:
        """SET / RigL update of one layer: drop ``floor(n_on * α_t)`` active weights of lowest ``|w|``, grow the
        same number among the entries not kept after the drop (just-dropped ones included, as in JaxPruner and
        RigL's code) by largest ``|dense gradient|`` (RigL, Evci et al. 2020 Sec. 3) or uniformly at random
        (SET, Mocanu et al. 2018). The count of active weights is unchanged."""
        n_on = int(old.sum())
        n_drop = int(n_on * self.drop_fraction_at(t))
        if n_drop == 0:
            return old.clone()
        mag = p.detach().abs().float().masked_fill(~old, math.inf)
        kept = old & keep_top(mag, p.numel() - n_drop)  # the n_drop lowest |w| among active entries dropped
        if self.algorithm == "rigl":
            grow = self._grad(n, p).detach().abs().float()
        else:
            grow = torch.rand(p.shape, generator=self._gen(t)).to(p.device)
        grow = grow.masked_fill(kept, -math.inf)
        new = kept | keep_top(grow, n_drop)
        return new

    @torch.no_grad()
    def _rewind(self) -> None:
        """LTH: the mask (already taken from θ_T at this step) is kept; weights <- θ_k ⊙ m; optimizer state
        cleared (Frankle et al. 2020: rewind weights, reset the optimizer, resume the LR schedule at k)."""
        if self.rewind_state is None:
            raise SparseTrainingError("lth has no saved weights to rewind to; step() must run from step 0 so that "
                                      "rewind_step is reached before end_step.")
        self.model.load_state_dict(self.rewind_state)
        self.masks.apply()
        self.optimizer.state.clear()
        for p in self.model.parameters():
            p.grad = None

    # -- checks, reports, export, resume ---------------------------------------------------------------------
    def check(self) -> dict[str, int]:
        """Assert the exact pruned count of every mask (the scheduled allocation at the last update; for
        RigL/SET/static the count fixed at construction) and, except for STE, that pruned weights are 0.
        Returns ``{name: pruned}``. Raises :class:`SparseTrainingError` naming the layer."""
        last = self.history[-1]["step"] if self.history else None
        if self.algorithm in ("static", "set", "rigl"):
            want = self.target_counts()
        elif last is None:
            want = {n: 0 for n in self.shapes}
        else:
            want = self.target_counts(last)
        got = {n: int((~m).sum()) for n, m in self.masks}
        for n in self.shapes:
            if got[n] != want[n]:
                raise SparseTrainingError(f"{n}: {got[n]} weights pruned, the schedule/distribution says {want[n]}; "
                                          "masks were changed outside the updater (use updater.masks in place).")
        if self.algorithm != "ste":
            self.masks.verify()
        return got

    def report(self) -> list[dict]:
        """One row per target: ``numel``, ``pruned`` (mask), ``sparsity`` (mask; equals
        ``MaskSet.sparsity()``), ``zeros`` (actual zero weights, >= pruned when some kept weights are 0)
        and ``zero_fraction``; plus a row ``"__all__"``. Feed it to :func:`shrink.report.table`."""
        rows, frac = [], self.masks.sparsity()
        tot = {"numel": 0, "pruned": 0, "zeros": 0}
        for n, m in self.masks:
            p = self.params[n]
            r = {"name": n, "numel": m.numel(), "pruned": int((~m).sum()), "sparsity": frac[n],
                 "zeros": int((p.detach() == 0).sum())}
            r["zero_fraction"] = r["zeros"] / r["numel"]
            for k in tot:
                tot[k] += r[k]
            rows.append(r)
        rows.append({"name": "__all__", **tot, "sparsity": frac["__all__"],
                     "zero_fraction": tot["zeros"] / max(tot["numel"], 1)})
        return rows

    @torch.no_grad()
    def finalize(self) -> MaskSet:
        """Export: for STE the final magnitude mask at ``s(count)`` is computed from the dense weights; every
        algorithm then has its pruned weights set to 0. Returns the :class:`MaskSet` (as one-shot pruners do)."""
        if self.algorithm == "ste":
            self._update_masks(self.count, raw_grads=False)
        self.masks.apply()
        return self.masks

    def state_dict(self) -> dict:
        """Masks, count, history and LTH's saved weights (random draws derive from (seed, step), so nothing
        else is needed to resume bit-identically)."""
        return {"algorithm": self.algorithm, "count": self.count, "seed": self.seed,
                "masks": {n: m.clone() for n, m in self.masks},
                "history": [dict(h) for h in self.history],
                "rewind_state": None if self.rewind_state is None else dict(self.rewind_state),
                "static_counts": self._static_counts}

    def load_state_dict(self, state: dict) -> None:
        """Resume: build the updater as before, load this, then load the model's and the optimizer's state
        dicts (the constructor applies the initial masks to the weights)."""
        if state.get("algorithm") != self.algorithm or set(state.get("masks", {})) != set(self.shapes):
            raise SparseTrainingError(f"state is for algorithm {state.get('algorithm')!r} over other targets; load "
                                      f"it into a SparseUpdater built with algorithm={state.get('algorithm')!r} and "
                                      "the same targets.")
        for n, m in state["masks"].items():
            self.masks.masks[n].copy_(m)
        self.count, self.seed = int(state["count"]), int(state["seed"])
        self.history = [dict(h) for h in state["history"]]
        self.rewind_state = state["rewind_state"]
        self._static_counts = state["static_counts"]
