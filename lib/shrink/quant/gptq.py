"""Weight-only quantization: round-to-nearest (RTN) and GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, ICLR 2023).

Layer-wise problem (GPTQ Eq. 1): ``argmin_{W_hat on the grid} ||W X - W_hat X||^2`` with the Hessian
``H = 2 X X^T`` of the calibration inputs (``shrink.obs.InputStats``). GPTQ (Algorithm 1) quantizes one column
at a time in a fixed order and moves the rounding error onto the not-yet-quantized columns with the OBS update
(Eq. 2-3), using the upper Cholesky factor of ``H^-1`` and lazy batches of 128 columns — the same sweep as
SparseGPT (:func:`shrink.obs.obs_sweep`), with the grid point as the column's target instead of zero.

Choices (the official ``IST-DASLab/gptq`` code, ``gptq.py::fasterquant``; documented where we differ):

* the grid is :class:`shrink.quant.QuantSpec`'s (asymmetric min/max with the range widened to hold 0, as
  GPTQ's ``find_params``; symmetric = shrink's narrow abs-max grid ``qmin = -qmax``, **not** GPTQ's
  ``sym`` which is an asymmetric grid with the zero point fixed at the middle);
* per-channel (``granularity="channel"``): one scale per output row, computed once from the full matrix before
  the sweep (official);
* groups (``granularity="group"``): the scale of a group is computed when the sweep reaches its first column,
  from the matrix *as it is at the start of the current lazy block* (the official code reads ``W``, not the
  block's running copy) — the grid therefore already reflects the error moved in from earlier blocks;
* ``act_order``: columns in order of decreasing ``diag(H)`` (official ``--act-order``), groups follow the
  permuted order (official default, no ``static_groups``); the result is un-permuted;
* dead inputs (``H_ii = 0``) get weight 0 and ``H_ii = 1``; damping ``0.01 * mean(diag H)``.

Linears that share an input (q/k/v, gate/up) can be solved together (rows stacked): the grid is per row, so the
result equals solving each alone (tested).

Introduced in: notebooks/02-bits/ (weight-only chapter, issue 15)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..obs import inverse_hessian_factor, obs_sweep
from .quantizer import QuantError, QuantSpec, WeightGrid, fake_quant, qparams, range_of


def _check_weight_spec(spec: QuantSpec) -> None:
    if spec.granularity not in ("channel", "token", "group", "tensor"):
        raise QuantError(f"weight quantization needs granularity 'channel', 'group' or 'tensor', got "
                         f"{spec.granularity!r} (per input column makes no sense for a weight)")
    if spec.static:
        raise QuantError("weights are quantized once; QuantSpec.static is for activations — leave it False")


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest on ``spec``'s grid: float ``[out, in]`` -> same shape and dtype (the baseline)."""
    _check_weight_spec(spec)
    return fake_quant(weight, spec)


def _column_quant(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize one column ``w [rows]`` with per-row scale ``s [rows]`` and zero point ``z [rows]``."""
    return (torch.clamp(torch.round(w / s) + z, spec.qmin, spec.qmax) - z) * s


@torch.no_grad()
def gptq_quantize(weights: list[torch.Tensor], H: torch.Tensor, spec: QuantSpec, *, blocksize: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, dtype: torch.dtype = torch.float32,
                  return_grids: bool = False):
    """GPTQ (Algorithm 1) for one or more weight matrices that share the input Hessian ``H``.

    Args:
        weights: list of float ``[rows_k, d]`` (not modified).
        H: float ``[d, d]`` input Hessian (``2 X^T X / n``; token-weighted for RSQ).
        spec: the weight grid (``channel`` = per output row, ``group`` of ``group_size`` input columns,
            ``tensor``: one scale per matrix).
        blocksize: lazy-batch width (128).
        percdamp: relative damping of ``H``.
        act_order: process columns by decreasing ``diag(H)``.
        dtype: compute dtype (fp32; fp64 for reference tests).
        return_grids: also return each matrix's :class:`~shrink.quant.WeightGrid` (the steps and zero points
            the sweep used; groups in ``act_order`` are the permuted ones, given by ``g_idx``).
    Returns:
        list of quantized-dequantized ``[rows_k, d]`` in each input's dtype (every value on the grid); with
        ``return_grids``, ``(weights, grids)``.
    """
    _check_weight_spec(spec)
    d = H.shape[0]
    if any(w.dim() != 2 or w.shape[1] != d for w in weights):
        raise QuantError(f"every weight must be [rows, {d}] to match H {tuple(H.shape)}; got "
                         f"{[tuple(w.shape) for w in weights]}")
    if spec.granularity == "group" and d % spec.group_size:
        raise QuantError(f"group_size={spec.group_size} does not divide the input width {d}")
    rows = [w.shape[0] for w in weights]
    bounds = torch.tensor([0, *rows]).cumsum(0).tolist()
    W = torch.cat([w.detach().to(dtype) for w in weights], 0)
    Hd = H.to(dtype)
    dead = torch.diag(Hd) == 0
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(Hd), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, Hd = W[:, perm], Hd[perm][:, perm]
    U, _ = inverse_hessian_factor(Hd, percdamp)
    state: dict = {}

    def params(block: torch.Tensor):  # [rows, k] -> per-row (scale, zero) [rows]
        row_spec = spec.with_(granularity="channel")
        if spec.granularity == "tensor":
            s, z = [], []
            for a, b in zip(bounds[:-1], bounds[1:]):  # one scale per matrix of the stacked group
                lo, hi = range_of(block[a:b], spec)
                sa, za = qparams(lo, hi, spec)
                s.append(sa.expand(b - a, 1))
                z.append(za.expand(b - a, 1))
            return torch.cat(s).flatten(), torch.cat(z).flatten()
        lo, hi = range_of(block, row_spec)
        s, z = qparams(lo, hi, row_spec)
        return s.flatten().to(dtype), z.flatten().to(dtype)

    used: list = []  # the (scale, zero) of every group, in sweep order
    if spec.granularity != "group":
        state["s"], state["z"] = params(W)
        used.append((state["s"], state["z"]))

    def target(j, W1, i):
        if spec.granularity == "group" and j % spec.group_size == 0:
            state["s"], state["z"] = params(W[:, j:j + spec.group_size])
            used.append((state["s"], state["z"]))
        return _column_quant(W1[:, i], state["s"], state["z"], spec)

    obs_sweep(W, U, target, blocksize=blocksize)
    if perm is not None:
        W = W[:, torch.argsort(perm)]
    out = [W[a:b].to(w.dtype) for w, a, b in zip(weights, bounds[:-1], bounds[1:])]
    if not return_grids:
        return out
    S = torch.stack([u[0] for u in used], 1).float()  # [rows, G]
    Z = torch.stack([u[1] for u in used], 1).float()
    g_idx = None
    if perm is not None and spec.granularity == "group":  # column perm[k] was swept k-th: group k // size
        g_idx = torch.empty(d, dtype=torch.long)
        g_idx[perm] = torch.arange(d) // spec.group_size
    grids = [WeightGrid(S[a:b].clone(), Z[a:b].clone(), spec, g_idx) for a, b in zip(bounds[:-1], bounds[1:])]
    return out, grids


# --------------------------------------------------------------------------------------------------------------
# Whole models: the shared sequential loop (GPTQ's ``llama_sequential``)
# --------------------------------------------------------------------------------------------------------------
WEIGHT_METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class WeightQuantSpec:
    """What to quantize and how (one cell of GPTQ Tables 2-4).

    Attributes:
        method: ``rtn`` | ``gptq``.
        grid: the weight :class:`QuantSpec` (bits, symmetric, ``channel`` / ``group`` + ``group_size``).
        act_order, blocksize, percdamp: GPTQ's options (ignored by RTN).
        batch: sequences per no-grad forward (memory knob).
    """

    method: str = "gptq"
    grid: QuantSpec = QuantSpec(bits=4, symmetric=False, granularity="channel")
    act_order: bool = False
    blocksize: int = 128
    percdamp: float = 0.01
    batch: int = 8

    def check(self) -> "WeightQuantSpec":
        if self.method not in WEIGHT_METHODS:
            raise QuantError(f"unknown weight-quantization method {self.method!r}; use one of {WEIGHT_METHODS}")
        _check_weight_spec(self.grid)
        for name in ("blocksize", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise QuantError(f"WeightQuantSpec.{name} must be a positive integer, got {v!r}")
        if not 0 < self.percdamp < 1:
            raise QuantError(f"WeightQuantSpec.percdamp must be in (0, 1), got {self.percdamp!r} (GPTQ uses 0.01)")
        return self

    def to_dict(self) -> dict:
        return {**asdict(self), "grid": self.grid.to_dict()}

    def bits_per_weight(self) -> float:
        """Storage cost per weight: the code plus the per-row/group scale and zero point (16 bits each)."""
        g = self.grid
        extra = (16 + (0 if g.symmetric else 16)) / g.group_size if g.granularity == "group" else 0.0
        return g.bits + extra


def decoder_weight_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of a decoder block, names relative to the block (GPTQ quantizes all of them)."""
    out = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    if not out:
        raise QuantError(f"no linear layers in {type(block).__name__}")
    return out


@torch.no_grad()
def quantize_model(model: nn.Module, calib_ids: torch.Tensor | None, spec: WeightQuantSpec, *,
                   heldout_ids: torch.Tensor | None = None, token_weights=None, runner=None,
                   verbose: bool = True) -> dict:
    """Quantize every decoder linear in place, block by block (GPTQ's sequential procedure).

    GPTQ's statistics come from the *quantized* stream (the inputs of block ``i`` are the outputs of the
    already-quantized blocks), through :func:`shrink.blockwise.sequential`; RTN needs no calibration data
    (``calib_ids`` may be None, then no errors are logged).

    Args:
        model: a causal LM supported by :class:`shrink.models.BlockRunner` (modified in place).
        calib_ids: int64 ``[N, T]`` calibration windows (required for GPTQ).
        spec: :class:`WeightQuantSpec`.
        heldout_ids: int64 ``[Nh, Th]`` for held-out block errors (optional).
        token_weights: RSQ's per-token Hessian weights, ``(block index, block, inputs [N, T, D]) -> [N, T]``
            (:func:`shrink.quant.rsq.token_weight_fn`); None = GPTQ (GPTQ only).
        runner: the block runner (default ``BlockRunner(model)``; :class:`shrink.quant.rsq.PrefixBlockRunner` runs
            every block from a fixed key/value prefix).
    Returns:
        ``{"spec", "blocks" (per-block App. A errors), "final", "times", "bits_per_weight", "grids"}``; ``grids``:
        ``{"<block>.<path>": WeightGrid}`` of every quantized linear (names as
        :func:`shrink.quant.decoder_linears`), what :func:`shrink.quant.export.export_quantized` stores.
    """
    from ..blockwise import sequential
    from ..models import BlockRunner

    spec.check()
    if token_weights is not None and spec.method != "gptq":
        raise QuantError("token_weights (RSQ) weight GPTQ's Hessian; RTN uses no calibration statistics — use "
                         "method='gptq' or drop token_weights")
    runner = runner if runner is not None else BlockRunner(model)
    grids: dict[str, WeightGrid] = {}

    def rtn(b, lin):
        for n, m in lin.items():
            grids[f"{b}.{n}"] = WeightGrid.of(m.weight, spec.grid)
            m.weight.copy_(rtn_quantize(m.weight, spec.grid))

    if calib_ids is None:
        if spec.method == "gptq":
            raise QuantError("GPTQ needs calibration windows: pass shrink.data.calibration_set(tok, ...)")
        for b, block in enumerate(runner.blocks):
            rtn(b, decoder_weight_linears(block))
        return {"spec": spec.to_dict(), "blocks": [], "final": None, "times": {},
                "bits_per_weight": spec.bits_per_weight(), "grids": grids}
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long \
            or calib_ids.shape[0] == 0:
        raise QuantError("calib_ids must be a non-empty int64 [N, T] tensor; build it with "
                         "shrink.data.calibration_set(tok, nsamples=..., seqlen=...)")

    def compress(b, _block, lin, sc):
        if spec.method == "rtn":
            rtn(b, lin)
            return
        for group in sc.groups:  # one solve per shared Hessian (q/k/v, gate/up)
            group = [n for n in group if n in lin]
            res, gr = gptq_quantize([lin[n].weight for n in group], sc.stats[group[0]].hessian(), spec.grid,
                                    blocksize=spec.blocksize, percdamp=spec.percdamp, act_order=spec.act_order,
                                    return_grids=True)
            for n, w, g in zip(group, res, gr):
                lin[n].weight.copy_(w)
                grids[f"{b}.{n}"] = g

    seq = sequential(runner, calib_ids, calib_ids.shape[0], linears=decoder_weight_linears, compress=compress,
                     needs_stats=spec.method == "gptq", hessian=True, batch=spec.batch, heldout_ids=heldout_ids,
                     token_weights=token_weights if spec.method == "gptq" else None, verbose=verbose)
    return {"spec": spec.to_dict(), "blocks": seq.blocks, "final": seq.blocks[-1],
            "times": {k: round(v, 3) for k, v in seq.times.items()}, "bits_per_weight": spec.bits_per_weight(),
            "grids": grids}


__all__ = ["rtn_quantize", "gptq_quantize", "WeightQuantSpec", "quantize_model", "decoder_weight_linears",
           "WEIGHT_METHODS"]
