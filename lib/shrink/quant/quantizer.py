"""One fake-quantizer for weights and activations (uniform integer grid, round-to-nearest).

Conventions implemented (bits.md §2.2, CushionCache Eq. 3-4, SmoothQuant ``fake_quant.py``,
QLLM-Eval/AWQ ``pseudo_quantize_tensor``):

* **symmetric** (SmoothQuant, weights of QLLM-Eval): ``s = max|x| / qmax`` with ``qmax = 2^(b-1) - 1``;
  ``x_hat = clamp(round(x / s), qmin, qmax) * s``; ``qmin = -qmax`` (``narrow=True``, SmoothQuant's
  effective range, the default) or ``-2^(b-1)`` (``narrow=False``, AWQ/QLLM-Eval's clamp).
* **asymmetric** (CushionCache/QLLM-Eval activations; CushionCache Eq. 4 with the ``2^N - 1``
  denominator — the paper prints ``2^(N-1) - 1``, which bits.md §1.6 treats as a typo):
  ``s = (max - min) / (2^b - 1)``, integer zero point ``z = clamp(round(-min / s), 0, 2^b - 1)``,
  ``x_hat = (clamp(round(x / s) + z, 0, 2^b - 1) - z) * s``.

Granularities act on a tensor ``x`` of shape ``[..., D]`` (``D`` = the last, input-feature dimension):

``tensor``  one scale for the whole tensor (or one per sample with ``per_sample=True``: the leading
            dimension is a batch of independent sequences, as in the batched candidate search).
``token``   one scale per row of ``D`` values: per-token for activations ``[B, T, D]``; for a weight
            ``[out, in]`` this is per-output-channel (alias ``channel``, SmoothQuant's ``per_channel``).
``column``  one scale per input feature ``D`` (activation per-channel; reduces over all leading dims).
``group``   groups of ``group_size`` consecutive values along ``D`` (weights group-wise as in QLLM-Eval).

Static quantization stores ``(scale, zero)`` computed once by calibration (:mod:`shrink.quant.fakequant`);
dynamic quantization recomputes them from each input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from ..errors import ShrinkError


class QuantError(ShrinkError, ValueError):
    """Bad quantizer configuration or input."""


GRANULARITIES = ("tensor", "token", "channel", "column", "group")


@dataclass(frozen=True)
class QuantSpec:
    """A uniform quantizer.

    Attributes:
        bits: integer bit width (2..16).
        symmetric: symmetric abs-max grid (True) or asymmetric min/max grid with zero point (False).
        granularity: ``tensor`` | ``token`` (= ``channel`` for weights: one scale per row) | ``column`` |
            ``group`` (see module docstring).
        group_size: values per group along the last dim (``granularity="group"``).
        static: activations only: use calibrated ranges (True) or recompute per input (False).
        narrow: symmetric only: ``qmin = -qmax`` (True) or ``-2^(b-1)`` (False).
        clip_top: static calibration only: fraction of calibration tokens with the largest per-token
            range excluded before taking the max (0.02 = SmoothQuant/Outlier-Suppression's "clip the top
            2 % of tokens"); 0 = plain abs-max/min-max calibration.
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "token"
    group_size: int = 128
    static: bool = False
    narrow: bool = True
    clip_top: float = 0.0

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise QuantError(f"bits must be an integer in [2, 16], got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise QuantError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group" and self.group_size <= 0:
            raise QuantError(f"group_size must be positive, got {self.group_size}")
        if not 0.0 <= self.clip_top < 1.0:
            raise QuantError(f"clip_top is a fraction of tokens in [0, 1), got {self.clip_top}")
        if self.static and self.granularity not in ("tensor", "column"):
            raise QuantError(f"static ranges are calibrated per tensor or per column; granularity "
                             f"{self.granularity!r} changes with the input, use static=False (dynamic)")

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1) - 1) if self.narrow else -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1 if not self.symmetric else 2 ** (self.bits - 1) - 1

    def with_(self, **kw) -> "QuantSpec":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        g = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        kind = "static" if self.static else "dynamic"
        clip = f", clip top {self.clip_top:.0%}" if self.clip_top else ""
        return f"INT{self.bits} {'sym' if self.symmetric else 'asym'} {g} {kind}{clip}"


EPS = 1e-8


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    d = x.shape[-1]
    if d % spec.group_size:
        raise QuantError(f"group_size={spec.group_size} does not divide the last dimension {d}; "
                         f"choose a divisor of {d} (e.g. {_divisor_hint(d, spec.group_size)})")
    return x.reshape(*x.shape[:-1], d // spec.group_size, spec.group_size)


def _divisor_hint(d: int, g: int) -> int:
    return max(k for k in range(1, min(d, g) + 1) if d % k == 0)


def range_of(x: torch.Tensor, spec: QuantSpec, *, per_sample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduction of ``x`` to the (min, max) tensors the quantizer's scales are computed from.

    Returns ``(lo, hi)`` broadcastable against ``x`` (or against the grouped view for ``group``). For
    symmetric specs ``lo = -hi = -max|x|``.
    """
    xf = x.float()
    if spec.granularity == "group":
        xf = _grouped(xf, spec)
        dims: tuple = (-1,)
    elif spec.granularity in ("token", "channel"):
        dims = (-1,)
    elif spec.granularity == "column":
        dims = tuple(range(xf.dim() - 1))
    else:  # tensor
        dims = tuple(range(1, xf.dim())) if per_sample else tuple(range(xf.dim()))
    if spec.symmetric:
        hi = xf.abs().amax(dim=dims, keepdim=True)
        return -hi, hi
    return xf.amin(dim=dims, keepdim=True), xf.amax(dim=dims, keepdim=True)


def qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point from a range (CushionCache Eq. 3-4; QLLM-Eval convention).

    Symmetric: ``s = max(|lo|, |hi|) / qmax``, ``z = 0``. Asymmetric: ``s = (hi - lo) / (2^b - 1)``,
    ``z = clamp(round(-lo / s), 0, 2^b - 1)``. Scales are clamped to >= 1e-8. fp32 tensors.
    """
    if spec.symmetric:
        s = torch.maximum(lo.abs(), hi.abs()).clamp(min=EPS) / spec.qmax
        return s, torch.zeros_like(s)
    lo = torch.minimum(lo, torch.zeros_like(lo))  # the grid always holds 0 (exact zero padding/ReLU)
    hi = torch.maximum(hi, torch.zeros_like(hi))
    s = (hi - lo).clamp(min=EPS) / spec.qmax
    z = torch.round(-lo / s).clamp(0, spec.qmax)
    return s, z


def fake_quant(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
               zero: torch.Tensor | None = None, *, per_sample: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``x`` (any float dtype, shape ``[..., D]``) -> same shape and dtype.

    ``q(x) = (clamp(round(x / s) + z, qmin, qmax) - z) * s`` (CushionCache Eq. 3 with integer ``z``).
    With ``scale``/``zero`` given (static, from calibration) they are used as they are; otherwise they are
    computed from ``x`` (dynamic). Values outside a static range are clipped to the grid.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise QuantError(f"fake_quant needs a floating tensor, got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}: the result is cast back to "
                         "x's dtype, so integers would be truncated silently. Pass x.float().")
    if scale is None:
        lo, hi = range_of(x, spec, per_sample=per_sample)
        if not bool(torch.isfinite(hi).all() & torch.isfinite(lo).all()):  # one NaN/inf would poison its group
            bad = int((~torch.isfinite(x)).sum())
            raise QuantError(f"fake_quant input holds {bad} NaN/inf value(s): their {spec.granularity} range is "
                             "undefined and every value sharing it would become NaN. Find where they come from "
                             "(a diverged model, an overflow in fp16), or clean them with torch.nan_to_num.")
        scale, zero = qparams(lo, hi, spec)
    elif not bool(torch.isfinite(torch.as_tensor(scale)).all() & (torch.as_tensor(scale) > 0).all()):
        raise QuantError("fake_quant scale must be finite and > 0; recalibrate (shrink.quant.calibrate) on finite "
                         "activations.")
    xf = x.float()
    grouped = spec.granularity == "group"
    if grouped:
        xf = _grouped(xf, spec)
    q = torch.clamp(torch.round(xf / scale) + zero, spec.qmin, spec.qmax)
    out = (q - zero) * scale
    if grouped:
        out = out.reshape(x.shape)
    return out.to(x.dtype)


def fake_quant_kernel(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
                      zero: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`fake_quant` of an activation through the ``shrink.ops`` kernels wherever an op computes exactly
    its arithmetic, else :func:`fake_quant` itself; same shape, dtype and values bit for bit either way.

    * dynamic per-token (``granularity="token"``, no ``scale``): ``shrink.ops.fake_quant_per_token``. The op
      gives an all-zero row step 1 where :func:`qparams` floors the step at ``1e-8 / qmax``; both give zeros
      for that row, so the op is taken unless some row's range is in ``(0, 1e-8)`` (or not finite, which
      :func:`fake_quant` reports): those inputs take :func:`fake_quant`.
    * static per-tensor (``granularity="tensor"`` with a calibrated one-element ``scale``/``zero``):
      ``shrink.ops.fake_quant_affine`` on the spec's own grid ``[qmin, qmax]`` (narrow symmetric INT8 is
      ``[-127, 127]``); a non-finite input takes :func:`fake_quant`, which lets NaN through as before.
    * anything else (per-column static, groups, per-tensor dynamic): :func:`fake_quant`.

    On a CPU the ops run their reference (the same float32 operations as :func:`fake_quant`); on a CUDA device
    with the compiled kernels loaded, K1 (``kernels/csrc``). ``shrink.ops.last_backend(op)`` says which ran.
    """
    from .. import ops

    if scale is None and spec.granularity == "token" and x.is_floating_point() and x.dim() and x.shape[-1]:
        xf = x.float()
        if spec.symmetric:
            r = xf.abs().amax(dim=-1)
        else:
            lo, hi = xf.aminmax(dim=-1)
            r = hi.clamp(min=0) - lo.clamp(max=0)
        if bool(((r >= EPS) | (r == 0)).all()):  # False for NaN/inf ranges too
            return ops.fake_quant_per_token(x, spec.bits, spec.symmetric)
    elif (scale is not None and spec.granularity == "tensor" and x.is_floating_point()
          and torch.as_tensor(scale).numel() == 1 and zero is not None and torch.as_tensor(zero).numel() == 1
          and bool(torch.isfinite(x).all())):
        return ops.fake_quant_affine(x, scale, int(torch.as_tensor(zero).item()), spec.qmin, spec.qmax)
    return fake_quant(x, spec, scale, zero)


@dataclass(frozen=True, eq=False)
class WeightGrid:
    """The grid one quantized weight matrix lies on: ``W_hat = (q - zero) * scale`` with integer codes ``q`` in
    ``[spec.qmin, spec.qmax]`` — what a weight-only quantizer (RTN, GPTQ, RSQ, FlexRound) must keep so the result
    can be stored as integers (:mod:`shrink.quant.export`) instead of re-derived from the rounded weights.

    Attributes:
        scale: float32 ``[rows, G]`` — one step per output row (``G = 1``: channel, or a tensor grid's one value
            repeated) or per group of ``spec.group_size`` input columns (``G = in / group_size``).
        zero: float32 ``[rows, G]`` integer-valued zero points (0 for symmetric grids).
        spec: the :class:`QuantSpec` (bits, symmetric, granularity, group size).
        g_idx: int64 ``[in]`` group of each input column when groups are not contiguous (GPTQ ``act_order`` with
            groups), else None.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    g_idx: torch.Tensor | None = None

    @classmethod
    def of(cls, weight: torch.Tensor, spec: QuantSpec) -> "WeightGrid":
        """Round-to-nearest's grid of ``weight`` float ``[rows, in]`` (the one :func:`fake_quant` uses)."""
        lo, hi = range_of(weight, spec)
        s, z = qparams(lo, hi, spec)
        rows = weight.shape[0]
        shape = (rows, -1) if spec.granularity == "group" else (1, 1) if spec.granularity == "tensor" else (rows, 1)
        return cls(s.reshape(shape).expand(rows, -1).contiguous(), z.reshape(shape).expand(rows, -1).contiguous(),
                   spec)

    def expanded(self, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` float32 ``[rows, cols]``: each column's step and zero point."""
        if self.g_idx is not None:
            idx = self.g_idx
        elif self.spec.granularity == "group":
            idx = torch.arange(cols) // self.spec.group_size
        else:
            idx = torch.zeros(cols, dtype=torch.long)
        return self.scale[:, idx], self.zero[:, idx]

    def codes(self, weight: torch.Tensor, *, name: str = "weight", tol: float = 1e-3) -> torch.Tensor:
        """Integer codes ``q`` (int64 ``[rows, in]``) of ``weight``, which must lie on this grid.

        Raises :class:`QuantError` when a value is off the grid by more than ``tol`` steps or its code is out of
        ``[qmin, qmax]`` (the weights were changed after quantization, or the grid is not theirs).
        """
        s, z = self.expanded(weight.shape[1])
        if s.shape[0] != weight.shape[0]:
            raise QuantError(f"{name}: grid has {s.shape[0]} rows, weight {tuple(weight.shape)}")
        x = weight.detach().float() / s
        q = torch.round(x) + z
        off = float((x + z - q).abs().max()) if x.numel() else 0.0
        if off > tol or bool((q < self.spec.qmin).any() | (q > self.spec.qmax).any()):
            raise QuantError(f"{name} is not on its {self.spec.describe()} grid (off by up to {off:.3g} steps, or "
                             f"codes outside [{self.spec.qmin}, {self.spec.qmax}]): the weights changed after "
                             "quantization, or the grid belongs to another result. Quantize again and export the "
                             "grids that quantization returned.")
        return q.long()

    def dequant(self, codes: torch.Tensor) -> torch.Tensor:
        """``(codes - zero) * scale`` float32 ``[rows, in]``."""
        s, z = self.expanded(codes.shape[1])
        return (codes.float() - z) * s


def quant_error(x: torch.Tensor, spec: QuantSpec, *, per_sample: bool = False) -> torch.Tensor:
    """``||x - q(x)||^2`` (CushionCache's L_q term for one tensor); per sample (``[B]``) if ``per_sample``."""
    err = (x.float() - fake_quant(x, spec, per_sample=per_sample).float()).pow(2)
    return err.flatten(1).sum(1) if per_sample else err.sum()
