"""PB-LLM: partially binarized weights (Shang, Yuan, Wu, Dong, ICLR 2024), post-training variant GPTQ-PB.

A small fraction ``f`` of each weight matrix is *salient* and kept on an 8-bit grid; the rest is binarized to
``±alpha`` per output row. With calibration data the binarization error is compensated by the GPTQ/OBS column
sweep (GPTQ-PB, paper Sec. 3.3), the same sweep as GPTQ and SparseGPT (:func:`shrink.obs.obs_sweep`) with a
third kind of per-column target: the 8-bit grid point where the weight is salient, ``alpha * sign(w)`` where it
is not.

Definitions (``W [rows, d]`` of one linear; ``H = 2 X^T X / n`` its input Hessian; ``U`` the damped upper
Cholesky factor of ``H^-1`` from :func:`shrink.obs.inverse_hessian_factor`):

* **saliency** (paper Sec. 3.2, official ``gptq_pb/gptq.py::fasterquant``): ``magnitude``: ``|w_ij|``;
  ``hessian``: ``w_ij^2 / U_jj^2``. The paper writes ``w^2 / [H^-1]_jj^2``; the official code divides by the
  square of the *Cholesky factor's* diagonal, ``U_jj^2`` (the OBS denominator of the column sweep, as in
  SparseGPT's mask selection). We follow the code.
* **salient set**: exactly ``k = round(f * rows * d)`` weights of the matrix with the largest saliency (ties by
  flat index, stable), chosen once on the weights before the sweep (official: one threshold per matrix,
  ``--groupsize -1``; its ``<=`` threshold lets ties and the ``int()`` index move the count by a few weights —
  we make the count exact).
* **salient weights**: asymmetric ``high_bits`` (8) per-row grid whose range is the *whole* row's min/max before
  the sweep (official ``HighQuantizer(8, perchannel=True, sym=False).calibrate(W)``; the official code calibrates
  before zeroing the columns of dead inputs, we after — the same unless an input is never active).
* **binarized weights**: ``alpha_r * sign(w)`` with ``sign(0) = +1`` and ``alpha_r = mean |w_rj|`` over the
  row's non-salient weights: the minimiser of ``sum_j (w_rj - alpha sign(w_rj))^2`` (the optimal binary scale of
  XNOR-Net, used by PB-LLM Eq. 2 / Sec. 4). Fixed before the sweep, as the official code does.
  *Differs from the official PTQ code*, whose ``xnor`` quantizer subtracts a per-row mean first and computes
  mean and scale over the row with the salient entries set to zero (its own comment: "seems to have
  problem"); ours keeps exactly two values ``±alpha`` per row.
* ``gptq=False`` is PB-LLM without reconstruction (official ``--disable_gptq``: every weight is rounded
  directly; the Hessian criterion still needs ``H``).

Storage (:func:`bit_accounting`, exact integer counts): payload ``(n - k) * 1 + k * high_bits`` bits; the mask
either as a **bitmap** (1 bit per weight — PTQ1.61's point that PB-LLM's mask costs +1 bit/weight) or as
**sparse indices** (CSR: one ``ceil(log2 d)``-bit column index per salient weight + one 32-bit row pointer per
row); per row one fp16 ``alpha`` and the 8-bit grid's fp16 scale and 8-bit zero point. The paper's "bits" count
the payload only: ``(1 - f) + 8 f`` (1.7 bits at ``f = 0.1``).

Linears that share an input (q/k/v, gate/up) are solved together with rows stacked; the salient set is chosen
per matrix, the scales per row, so the result equals solving each alone (tested).

Introduced in: notebooks/02-bits/02i-pb-llm.md
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..obs import inverse_hessian_factor, obs_sweep
from .gptq import _column_quant, decoder_weight_linears
from .quantizer import QuantError, QuantSpec, qparams, range_of

SALIENT_METRICS = ("magnitude", "hessian")
#: storage of one per-row fp16 number / one CSR row pointer (bits)
SCALE_BITS, ZERO_BITS, ROWPTR_BITS = 16, 8, 32


@dataclass(frozen=True)
class PBSpec:
    """One PB-LLM configuration.

    Attributes:
        salient_frac: fraction of each matrix's weights kept at ``high_bits`` (official ``1 - low_frac``), in [0, 1].
        metric: ``magnitude`` | ``hessian`` (official ``--salient_metric``).
        high_bits: bits of the salient weights (official ``--high_bit 8``).
        gptq: GPTQ-PB reconstruction (False = official ``--disable_gptq``).
        blocksize, percdamp: the OBS sweep's lazy-batch width and damping (128, 0.01 as GPTQ).
        batch: sequences per no-grad forward (memory knob).
    """

    salient_frac: float = 0.1
    metric: str = "magnitude"
    high_bits: int = 8
    gptq: bool = True
    blocksize: int = 128
    percdamp: float = 0.01
    batch: int = 8

    def check(self) -> "PBSpec":
        if isinstance(self.salient_frac, bool) or not isinstance(self.salient_frac, (int, float)) \
                or not 0.0 <= self.salient_frac <= 1.0:
            raise QuantError(f"PBSpec.salient_frac is a fraction of weights in [0, 1] (PB-LLM: 0.05-0.5), got "
                             f"{self.salient_frac!r}")
        if self.metric not in SALIENT_METRICS:
            raise QuantError(f"PBSpec.metric must be one of {SALIENT_METRICS}, got {self.metric!r}")
        if isinstance(self.high_bits, bool) or not isinstance(self.high_bits, int) or not 2 <= self.high_bits <= 16:
            raise QuantError(f"PBSpec.high_bits must be an integer in [2, 16] (PB-LLM: 8), got {self.high_bits!r}")
        for name in ("blocksize", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise QuantError(f"PBSpec.{name} must be a positive integer, got {v!r}")
        if not 0 < self.percdamp < 1:
            raise QuantError(f"PBSpec.percdamp must be in (0, 1), got {self.percdamp!r} (GPTQ uses 0.01)")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.gptq or self.metric == "hessian"

    @property
    def high_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.high_bits, symmetric=False, granularity="channel")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------
# One matrix
# --------------------------------------------------------------------------------------------------------------
def saliency(W: torch.Tensor, metric: str, U: torch.Tensor | None = None) -> torch.Tensor:
    """Saliency of every weight, float ``[rows, d]``: ``|w|`` or ``w^2 / U_jj^2`` (``U [d, d]`` needed)."""
    if metric == "magnitude":
        return W.abs()
    if metric == "hessian":
        if U is None or U.shape != (W.shape[1], W.shape[1]):
            raise QuantError(f"the Hessian saliency needs U [{W.shape[1]}, {W.shape[1]}] from "
                             "shrink.obs.inverse_hessian_factor(H); pass the layer's Hessian")
        return W ** 2 / torch.diag(U).reshape(1, -1) ** 2
    raise QuantError(f"unknown salient metric {metric!r}; use one of {SALIENT_METRICS}")


def n_salient(numel: int, frac: float) -> int:
    """The exact salient count ``round(frac * numel)`` (half to even, Python's ``round``)."""
    return int(round(frac * numel))


def salient_mask(score: torch.Tensor, frac: float) -> torch.Tensor:
    """Bool ``[rows, d]``: True on exactly :func:`n_salient` entries with the largest ``score`` (ties: lower flat
    index first)."""
    n = score.numel()
    k = n_salient(n, frac)
    flat = score.detach().flatten().cpu()
    if k == 0 or k == n:
        return torch.full(score.shape, k == n, dtype=torch.bool, device=score.device)
    thr = torch.kthvalue(flat, n - k + 1).values  # the k-th largest score (O(n), no full sort)
    mask = flat > thr
    need = k - int(mask.sum())
    mask[torch.nonzero(flat == thr).flatten()[:need]] = True  # ties at the threshold: lowest flat index first
    return mask.reshape(score.shape).to(score.device)


def binary_scale(W: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``alpha [rows]``: mean ``|w|`` over each row's non-salient weights (0 for a row with none)."""
    keep = (~mask).to(W.dtype)
    cnt = keep.sum(1)
    return (W.abs() * keep).sum(1) / cnt.clamp_min(1)


def _binarize(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return torch.where(w >= 0, alpha, -alpha)


@torch.no_grad()
def pbllm_quantize(weights: list[torch.Tensor], H: torch.Tensor | None, spec: PBSpec, *,
                   dtype: torch.dtype = torch.float32, return_params: bool = False):
    """PB-LLM / GPTQ-PB for one or more matrices sharing the input Hessian ``H``.

    Args:
        weights: list of float ``[rows_k, d]`` (not modified).
        H: float ``[d, d]`` input Hessian; may be None only for ``metric="magnitude", gptq=False``.
        spec: :class:`PBSpec`.
        dtype: compute dtype (fp32; fp64 for reference tests).
        return_params: also return, per matrix, ``{"alpha", "scale", "zero"}`` float32 ``[rows_k]`` (the binary
            scale and the salient grid), what :func:`shrink.quant.export.export_pbllm` packs.
    Returns:
        ``(quantized [rows_k, d] in each input's dtype, salient masks bool [rows_k, d])``: every salient value on
        its row's ``high_bits`` grid, every other value ``±alpha_row``; with ``return_params``, a third list.
    """
    spec.check()
    d = weights[0].shape[1] if weights else 0
    if not weights or any(w.dim() != 2 or w.shape[1] != d for w in weights):
        raise QuantError(f"pbllm_quantize needs a non-empty list of [rows, d] weights with one d; got "
                         f"{[tuple(w.shape) for w in weights]}")
    if H is None and spec.needs_calibration:
        raise QuantError("GPTQ-PB and the Hessian saliency need the layer's input Hessian: pass H "
                         "(shrink.obs.InputStats(..., hessian=True).hessian()) or use metric='magnitude', gptq=False")
    if H is not None and H.shape != (d, d):
        raise QuantError(f"H must be [{d}, {d}] to match the weights, got {tuple(H.shape)}")
    bounds = torch.tensor([0, *[w.shape[0] for w in weights]]).cumsum(0).tolist()
    W = torch.cat([w.detach().to(dtype) for w in weights], 0)
    U = None
    if H is not None:
        Hd = H.to(dtype)
        W[:, torch.diag(Hd) == 0] = 0  # dead inputs (official: W[:, dead] = 0)
        U, _ = inverse_hessian_factor(Hd, spec.percdamp)
    score = saliency(W, spec.metric, U)
    mask = torch.cat([salient_mask(score[a:b], spec.salient_frac) for a, b in zip(bounds[:-1], bounds[1:])], 0)
    alpha = binary_scale(W, mask)
    hs = spec.high_spec
    s, z = qparams(*range_of(W, hs), hs)
    s, z = s.flatten().to(dtype), z.flatten().to(dtype)

    maskT, neg_alpha = mask.T.contiguous(), -alpha  # contiguous columns of the mask for the sweep

    def target(j, W1, i):
        w = W1[:, i]
        return torch.where(maskT[j], _column_quant(w, s, z, hs), torch.where(w >= 0, alpha, neg_alpha))

    if spec.gptq:
        obs_sweep(W, U, target, blocksize=spec.blocksize)
    else:
        W = torch.where(mask, _column_quant(W, s.unsqueeze(1), z.unsqueeze(1), hs), _binarize(W, alpha.unsqueeze(1)))
    out = [W[a:b].to(w.dtype) for w, a, b in zip(weights, bounds[:-1], bounds[1:])]
    masks = [mask[a:b].clone() for a, b in zip(bounds[:-1], bounds[1:])]
    if not return_params:
        return out, masks
    params = [{"alpha": alpha[a:b].float().clone(), "scale": s[a:b].float().clone(), "zero": z[a:b].float().clone()}
              for a, b in zip(bounds[:-1], bounds[1:])]
    return out, masks, params


def bit_accounting(shapes_and_salient: list[tuple[int, int, int]], high_bits: int = 8) -> dict:
    """Exact storage of PB-LLM matrices, from ``(rows, d, n_salient)`` per matrix.

    Returns integer bit counts ``weights``, ``salient``, ``payload`` (``(n - k) + k * high_bits``),
    ``mask_bitmap`` (``n``), ``mask_sparse`` (``k * ceil(log2 d) + rows * 32``), ``scales`` (``rows * (16 + 16 +
    8)``: alpha, the high grid's scale and zero point) and the per-weight figures ``bpw_paper`` (payload only,
    the paper's count), ``bpw_bitmap``, ``bpw_sparse`` (payload + mask + scales) and ``salient_frac`` (exact).
    """
    n = k = payload = bitmap = sparse = scales = 0
    for rows, d, ks in shapes_and_salient:
        if not 0 <= ks <= rows * d:
            raise QuantError(f"salient count {ks} outside [0, {rows * d}] for a [{rows}, {d}] matrix")
        nm = rows * d
        n, k = n + nm, k + ks
        payload += (nm - ks) + ks * high_bits
        bitmap += nm
        sparse += ks * max(1, math.ceil(math.log2(d))) + rows * ROWPTR_BITS
        scales += rows * (SCALE_BITS + SCALE_BITS + ZERO_BITS)
    if n == 0:
        raise QuantError("bit_accounting needs at least one non-empty matrix")
    return {"weights": n, "salient": k, "payload": payload, "mask_bitmap": bitmap, "mask_sparse": sparse,
            "scales": scales, "salient_frac": k / n, "bpw_paper": payload / n,
            "bpw_bitmap": (payload + bitmap + scales) / n, "bpw_sparse": (payload + sparse + scales) / n}


def accounting_of_masks(masks: list[torch.Tensor], high_bits: int = 8) -> dict:
    """:func:`bit_accounting` of bool salient masks ``[rows, d]``."""
    return bit_accounting([(m.shape[0], m.shape[1], int(m.sum())) for m in masks], high_bits)


# --------------------------------------------------------------------------------------------------------------
# Whole models: the shared sequential loop
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def pbllm_model(model: nn.Module, calib_ids: torch.Tensor | None, spec: PBSpec, *,
                heldout_ids: torch.Tensor | None = None, keep_params: bool = False, verbose: bool = True) -> dict:
    """PB-LLM on every decoder linear, in place, block by block (statistics from the already-quantized stream,
    as :func:`shrink.quant.quantize_model`).

    Args:
        model: a causal LM supported by :class:`shrink.models.BlockRunner` (modified in place).
        calib_ids: int64 ``[N, T]`` (None only for ``magnitude`` without GPTQ).
        spec: :class:`PBSpec`.
        keep_params: also return ``"params"``: ``{"<block>.<path>": {"mask" bool [rows, d], "alpha", "scale",
            "zero" float32 [rows]}}`` for :func:`shrink.quant.export.export_pbllm` (one byte per weight in memory).
    Returns:
        ``{"spec", "blocks", "final", "times", "bits"}`` (``bits``: :func:`bit_accounting` over all linears).
    """
    from ..blockwise import sequential
    from ..models import BlockRunner

    spec.check()
    runner = BlockRunner(model)
    shapes: list[tuple[int, int, int]] = []
    kept: dict[str, dict] = {}

    def keep(b, names, masks, params):
        for n, m, p in zip(names, masks, params):
            shapes.append((m.shape[0], m.shape[1], int(m.sum())))
            if keep_params:
                kept[f"{b}.{n}"] = {"mask": m, **p}

    if calib_ids is None:
        if spec.needs_calibration:
            raise QuantError("GPTQ-PB and the Hessian saliency need calibration windows: pass "
                             "shrink.data.calibration_set(tok, ...), or use metric='magnitude', gptq=False")
        for b, block in enumerate(runner.blocks):
            for n, lin in decoder_weight_linears(block).items():
                (q,), ms, ps = pbllm_quantize([lin.weight], None, spec, return_params=True)
                lin.weight.copy_(q)
                keep(b, [n], ms, ps)
        return {"spec": spec.to_dict(), "blocks": [], "final": None, "times": {},
                "bits": bit_accounting(shapes, spec.high_bits), **({"params": kept} if keep_params else {})}
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long \
            or calib_ids.shape[0] == 0:
        raise QuantError("calib_ids must be a non-empty int64 [N, T] tensor; build it with "
                         "shrink.data.calibration_set(tok, nsamples=..., seqlen=...)")

    def compress(b, _block, lin, sc):
        for group in sc.groups:  # one solve per shared Hessian (q/k/v, gate/up)
            group = [n for n in group if n in lin]
            res, masks, params = pbllm_quantize([lin[n].weight for n in group], sc.stats[group[0]].hessian(), spec,
                                                return_params=True)
            for n, w in zip(group, res):
                lin[n].weight.copy_(w)
            keep(b, group, masks, params)

    seq = sequential(runner, calib_ids, calib_ids.shape[0], linears=decoder_weight_linears, compress=compress,
                     needs_stats=True, hessian=True, batch=spec.batch, heldout_ids=heldout_ids, verbose=verbose)
    return {"spec": spec.to_dict(), "blocks": seq.blocks, "final": seq.blocks[-1],
            "times": {k: round(v, 3) for k, v in seq.times.items()}, "bits": bit_accounting(shapes, spec.high_bits),
            **({"params": kept} if keep_params else {})}


__all__ = ["PBSpec", "SALIENT_METRICS", "saliency", "n_salient", "salient_mask", "binary_scale", "pbllm_quantize",
           "bit_accounting", "accounting_of_masks", "pbllm_model"]
