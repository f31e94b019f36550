"""FlexRound: learned rounding by element-wise division (Lee, Kim, Kwon, Lee; ICML 2023, Sec. 3, Eq. 2 and 4).

One weight matrix ``W`` float ``[out, in]`` is quantized as (FlexRound Eq. 2, linear layers)::

    W_hat = s1 * ( clamp( round( W / (s1 * S2 * s3) ) + z, qmin, qmax ) - z )

* ``s1``: the grid's step (common quantization grid size): one per matrix for a ``tensor`` grid, one per output
  row for a ``channel`` grid (the official ``UniformAffineQuantizer`` with ``channel_wise=True`` keeps ``delta1``
  per row). ``z`` is the grid's integer zero point (asymmetric; 0 for symmetric) and stays fixed;
* ``S2``: one divisor per element ``[out, in]``; ``s3``: one divisor per output row ``[out, 1]``;
* every scale is exp-parametrised and starts at the round-to-nearest grid: ``s1 = s1_rtn * exp(a1)``,
  ``S2 = exp(A2)``, ``s3 = exp(a3)`` with ``a1 = A2 = a3 = 0``; the divisor is computed as
  ``s1_rtn * exp(a1 + a3 + A2)``. The official code stores ``delta1 = log s1`` and divides by
  ``exp(delta1 + delta2 + delta3)``; the form here is the same function of the same parameters shifted by a
  constant (``a1 = delta1 - log s1_rtn``; Adam's steps are invariant to that shift) and makes the initial
  quantizer *bitwise* equal to RTN (``s1_rtn * exp(0) == s1_rtn`` exactly, then the same operations as
  :func:`shrink.quant.fake_quant`);
* ``round`` has a straight-through gradient (identity), ``clamp`` passes no gradient outside the grid (the
  official ``round_ste`` + ``torch.clamp``). Only the dequantization multiplies by ``s1``: the output stays on the
  grid ``s1 * (integers in [qmin - z, qmax - z])`` whatever ``S2`` and ``s3`` become, so the storage cost equals
  RTN's (codes + one scale and zero point per row).

Training (FlexRound Sec. 3.2; official ``quant/REM_fast.py``): block by block, only the rounding scales of the
block's linears train (norms, biases and the original weights stay fixed), minimising the block-output MSE on the
calibration stream with Adam and a cosine schedule to 0 (official: 5 000 iterations, batch 2, lr 2.5e-3 for
Llama-2-7B W3A16 and 3e-3 for W4A16, 512 C4 samples). The official target is the full-precision block on the
full-precision input (``cached_fp_output``) with the quantized stream as input: the GP target of
:mod:`shrink.blockwise` (``target="GP"``); ``target="BR"`` uses the dense block on the quantized stream instead.
The optimisation is the core :func:`shrink.reconstruction.fit_unit` (the same code as pruning's BR), on the
sequential loop :func:`shrink.blockwise.sequential` (the same loop as GPTQ and pruning). Deviations: fp32
throughout (the official code uses fp16 autocast); the grid starts at min/max (the official ``clipping=False``
init is the same); the calibration budget is the preset's.

The parametrisation is attached with :func:`torch.nn.utils.parametrize.register_parametrization`, so the block's
``nn.Linear`` runs unchanged; after training it is removed with the quantized weight left in place.

Introduced in: notebooks/02-bits/02j-flexround.md
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..reconstruction import SCHEDULES, FitConfig, fit_unit
from .quantizer import QuantError, QuantSpec, WeightGrid, fake_quant, qparams, range_of

TARGETS = ("GP", "BR")


class RoundSTE(torch.autograd.Function):
    """``round(x)`` forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _check_grid(spec: QuantSpec) -> None:
    if spec.granularity not in ("channel", "token", "tensor"):
        raise QuantError(f"FlexRound is implemented for per-channel and per-tensor weight grids, got granularity "
                         f"{spec.granularity!r}; use QuantSpec(granularity='channel') (or 'tensor')")
    if spec.static:
        raise QuantError("weights are quantized once; QuantSpec.static is for activations — leave it False")


class FlexRoundWeight(nn.Module):
    """FlexRound quantizer of one weight matrix (module docstring), usable as a ``parametrize`` parametrisation.

    Args:
        weight: float ``[out, in]`` — the weight the RTN grid (``s1_rtn``, ``z``) is computed from.
        spec: the grid (``channel`` or ``tensor``; symmetric or asymmetric).
    Parameters (float32): ``log_s1`` ``[out, 1]`` (channel) or ``[1, 1]`` (tensor); ``log_S2`` ``[out, in]``;
    ``log_s3`` ``[out, 1]``, all zero at initialisation. Buffers: ``s1_rtn``, ``zero`` (shape of ``log_s1``).
    """

    def __init__(self, weight: torch.Tensor, spec: QuantSpec):
        super().__init__()
        _check_grid(spec)
        if weight.dim() != 2:
            raise QuantError(f"FlexRound quantizes 2-D weights [out, in], got shape {tuple(weight.shape)}")
        self.spec = spec
        w = weight.detach()
        lo, hi = range_of(w, spec)
        s, z = qparams(lo, hi, spec)  # [out, 1] (channel) or [1, 1] (tensor), fp32
        self.register_buffer("s1_rtn", s.float())
        self.register_buffer("zero", z.float())
        self.log_s1 = nn.Parameter(torch.zeros_like(s, dtype=torch.float32))
        self.log_S2 = nn.Parameter(torch.zeros(w.shape, dtype=torch.float32, device=w.device))
        self.log_s3 = nn.Parameter(torch.zeros(w.shape[0], 1, dtype=torch.float32, device=w.device))

    def s1(self) -> torch.Tensor:
        return self.s1_rtn * torch.exp(self.log_s1)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes ``clamp(round(W / (s1 S2 s3)) + z, qmin, qmax)`` float ``[out, in]`` (STE gradient)."""
        div = self.s1_rtn * torch.exp(self.log_s1 + self.log_s3 + self.log_S2)  # s1 * S2 * s3 in one exp
        return torch.clamp(RoundSTE.apply(weight.float() / div) + self.zero, self.spec.qmin, self.spec.qmax)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``W`` ``[out, in]`` -> ``W_hat`` on the grid, same shape and dtype."""
        return ((self.codes(weight) - self.zero) * self.s1()).to(weight.dtype)


def flexround_quantize(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """FlexRound at initialisation (no training) for ``weight`` float ``[out, in]``: equals RTN bit for bit."""
    with torch.no_grad():
        return FlexRoundWeight(weight, spec)(weight)


def attach(linear: nn.Linear, spec: QuantSpec) -> FlexRoundWeight:
    """Parametrise ``linear.weight`` with a fresh :class:`FlexRoundWeight` (the layer then computes with RTN
    weights); the original weight is frozen. Returns the quantizer (its parameters are the trainable ones)."""
    q = FlexRoundWeight(linear.weight, spec)
    q.weight_requires_grad = linear.weight.requires_grad
    parametrize.register_parametrization(linear, "weight", q)
    linear.parametrizations.weight.original.requires_grad_(False)
    return q


@torch.no_grad()
def detach(linear: nn.Linear) -> dict:
    """Remove the parametrisation, leaving the quantized weight as a plain parameter. Returns
    ``{"flips": fraction of codes that differ from RTN's, "s1_ratio": mean s1 / s1_rtn}``."""
    q = linear.parametrizations.weight[0]
    w0 = linear.parametrizations.weight.original
    flips = float((q.codes(w0) != fake_quant_codes(w0, q)).float().mean())
    ratio = float((q.s1() / q.s1_rtn).mean())
    parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
    linear.weight.requires_grad_(q.weight_requires_grad)
    return {"flips": flips, "s1_ratio": ratio}


@torch.no_grad()
def grid_of(q: FlexRoundWeight) -> WeightGrid:
    """The grid ``q``'s output lies on: step ``s1`` (learned) and zero point ``z`` (fixed), ``[out, 1]`` each."""
    rows = q.log_s3.shape[0]
    return WeightGrid(q.s1().float().expand(rows, 1).clone(), q.zero.float().expand(rows, 1).clone(), q.spec)


def fake_quant_codes(weight: torch.Tensor, q: FlexRoundWeight) -> torch.Tensor:
    """RTN's integer codes on ``q``'s initial grid (``round(W / s1_rtn) + z`` clamped)."""
    return torch.clamp(torch.round(weight.float() / q.s1_rtn) + q.zero, q.spec.qmin, q.spec.qmax)


# --------------------------------------------------------------------------------------------------------------
# Whole models: the shared sequential loop + the shared reconstruction
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlexRoundSpec:
    """FlexRound on a whole model (defaults: the official Llama-2-7B W3A16 script, except the grid bits).

    Attributes:
        grid: the weight :class:`QuantSpec` (``channel`` or ``tensor``).
        steps: Adam steps per block (official ``iters_w`` 5 000; 0 = RTN).
        batch_size: calibration sequences per step (official 2).
        lr: Adam lr of the log-scales (official 2.5e-3 at W3, 3e-3 at W4 for 7B).
        betas: Adam's (official: torch defaults).
        schedule: ``cosine`` (official ``CosineAnnealingLR`` to 0) | ``linear`` | ``constant``.
        target: ``GP`` (official: full-precision block on the full-precision stream) | ``BR``.
        first_token_weight: loss weight of position 0 (1 = plain MSE, official).
        seed: batch order (plus the block index).
        eval_at: steps at which the block MSE on calibration and held-out data is logged (0 = RTN).
        batch: sequences per no-grad forward (memory knob).
    """

    grid: QuantSpec = QuantSpec(bits=3, symmetric=False, granularity="channel")
    steps: int = 5000
    batch_size: int = 2
    lr: float = 2.5e-3
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"
    target: str = "GP"
    first_token_weight: float = 1.0
    seed: int = 0
    eval_at: tuple = field(default_factory=tuple)
    batch: int = 8

    def check(self) -> "FlexRoundSpec":
        _check_grid(self.grid)
        if self.target not in TARGETS:
            raise QuantError(f"unknown FlexRound target {self.target!r}; use one of {TARGETS}")
        if self.schedule not in SCHEDULES:
            raise QuantError(f"unknown schedule {self.schedule!r}; use one of {SCHEDULES}")
        for name in ("steps", "batch_size", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "steps" else 1):
                raise QuantError(f"FlexRoundSpec.{name} must be a {'non-negative' if name == 'steps' else 'positive'}"
                                 f" integer, got {v!r}")
        if not self.lr > 0:
            raise QuantError(f"FlexRoundSpec.lr must be > 0, got {self.lr!r} (official: 2.5e-3 at W3)")
        bad = [s for s in self.eval_at if not 0 <= s <= self.steps]
        if bad:
            raise QuantError(f"eval_at steps {bad} lie outside [0, steps={self.steps}]")
        return self

    def fit_config(self, block: int) -> FitConfig:
        return FitConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, betas=self.betas, eps=1e-8,
                         weight_decay=0.0, schedule=self.schedule, first_token_weight=self.first_token_weight,
                         seed=self.seed + block, eval_at=tuple(self.eval_at))

    def to_dict(self) -> dict:
        return {**asdict(self), "grid": self.grid.to_dict(), "eval_at": list(self.eval_at)}


def flexround_model(model: nn.Module, calib_ids: torch.Tensor, spec: FlexRoundSpec, *,
                    heldout_ids: torch.Tensor | None = None, verbose: bool = True) -> dict:
    """Quantize every decoder linear of ``model`` in place with FlexRound, block by block.

    Per block (:func:`shrink.blockwise.sequential`): attach a :class:`FlexRoundWeight` to every linear (the block
    now computes with RTN weights), train the rounding scales with :func:`shrink.reconstruction.fit_unit` on the
    quantized stream against the target (``spec.target``), remove the parametrisation, advance the streams.

    Args:
        model: a causal LM supported by :class:`shrink.models.BlockRunner` (modified in place).
        calib_ids: int64 ``[N, T]`` calibration windows.
        spec: :class:`FlexRoundSpec`.
        heldout_ids: int64 ``[Nh, Th]`` held-out windows: per-block App. A errors and, with ``spec.eval_at``, the
            held-out block-MSE curve of every block's training.
    Returns:
        ``{"spec", "blocks" (App. A errors per block), "final", "times", "bits_per_weight", "recon", "grids"}``;
        ``recon``: per block ``{"block", "loss_first", "loss_last", "curve", "flips", "s1_ratio", "seconds"}``;
        ``grids``: ``{"<block>.<path>": WeightGrid}`` (the learned ``s1`` and the fixed ``z``), for export.
    """
    from ..blockwise import sequential
    from ..models import BlockRunner
    from .gptq import decoder_weight_linears

    spec.check()
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long \
            or calib_ids.shape[0] == 0:
        raise QuantError("calib_ids must be a non-empty int64 [N, T] tensor; build it with "
                         "shrink.data.calibration_set(tok, nsamples=..., seqlen=...)")
    if spec.eval_at and heldout_ids is None:
        raise QuantError("FlexRoundSpec.eval_at logs a held-out curve: pass heldout_ids (or eval_at=())")
    runner = BlockRunner(model)
    quantizers: dict[int, dict[str, nn.Linear]] = {}
    recon: list[dict] = []
    grids: dict[str, WeightGrid] = {}

    def compress(b, _block, lin, _sc):
        for m in lin.values():
            attach(m, spec.grid)
        quantizers[b] = lin

    def reconstruct(unit, unit_in, target, heldout=None):
        (b,) = unit
        block = runner.blocks[b]
        lin = quantizers.pop(b)
        params = [p for m in lin.values() for p in m.parametrizations.weight[0].parameters()]
        own = {id(p) for p in params}
        frozen = [(p, p.requires_grad) for p in block.parameters() if id(p) not in own]
        for p, _ in frozen:
            p.requires_grad_(False)
        t0 = time.perf_counter()
        try:
            res = fit_unit(lambda h: runner.run_block(b, h), params, unit_in, target, spec.fit_config(b),
                           heldout=heldout)
        finally:
            for p, r in frozen:
                p.requires_grad_(r)
        for n, m in lin.items():
            grids[f"{b}.{n}"] = grid_of(m.parametrizations.weight[0])
        stats = [detach(m) for m in lin.values()]
        n = [m.weight.numel() for m in lin.values()]
        row = {"block": b, "loss_first": res["losses"][0] if res["losses"] else None,
               "loss_last": res["losses"][-1] if res["losses"] else None, "curve": res["curve"],
               "flips": sum(s["flips"] * k for s, k in zip(stats, n)) / sum(n),
               "s1_ratio": sum(s["s1_ratio"] for s in stats) / len(stats), "seconds": time.perf_counter() - t0}
        recon.append(row)
        if verbose and (b == 0 or b == len(runner) - 1 or b % max(1, len(runner) // 5) == 0):
            print(f"  block {b:2d}: loss {row['loss_first']} -> {row['loss_last']}, flips {row['flips']:.3f}")
        return row

    gp = spec.target == "GP"
    seq = sequential(runner, calib_ids, calib_ids.shape[0], linears=decoder_weight_linears, compress=compress,
                     needs_stats=False, hessian=False, block_target=not gp, reconstruct=reconstruct, gp=gp,
                     batch=spec.batch, heldout_ids=heldout_ids, recon_heldout=bool(spec.eval_at),
                     verbose=verbose)
    bits = spec.grid.bits
    return {"spec": spec.to_dict(), "blocks": seq.blocks, "final": seq.blocks[-1],
            "times": {k: round(v, 3) for k, v in seq.times.items()}, "bits_per_weight": float(bits), "recon": recon,
            "grids": grids}


__all__ = ["FlexRoundWeight", "FlexRoundSpec", "RoundSTE", "flexround_quantize", "flexround_model", "attach",
           "detach", "grid_of", "TARGETS"]
