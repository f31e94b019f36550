"""Real INT8 W8A8 linears: int8 weights stored, int32 accumulation, a dequant epilogue (issue 14 §3).

The bits chapter measures quantization error with fake quantization (:class:`~shrink.quant.QuantLinear`:
quantize, dequantize, fp32 GEMM). :class:`Int8Linear` computes the same quantized linear the way a W8A8
kernel does (SmoothQuant Sec. 2, ``Y = diag(Δ_X) · (X_q W_qᵀ) · diag(Δ_W)``):

1. the weight codes ``W_q = clamp(round(W / Δ_W), -127, 127)`` are stored as **int8** ``[N, K]`` with one
   float32 step per output row (or one per tensor), computed once — 1 byte per weight instead of 4;
2. each call quantizes the input to int8 codes ``X_q`` (per token, dynamic; or per tensor, static from the
   :func:`~shrink.quant.calibrate` range), with exactly the arithmetic of :func:`~shrink.quant.fake_quant`
   (same scales, same codes — tested bit for bit);
3. ``shrink.ops.int8_matmul_dequant`` accumulates ``X_q W_qᵀ`` in int32 (``torch._int_mm`` on CPU, the K2
   kernel on CUDA, the float64 reference elsewhere: all exact) and applies ``(acc · Δ_X[m]) · Δ_W[n]``.

What differs from fake quantization is only the order of float rounding: fake quant rounds every product
``(q_x Δ_X)(q_w Δ_W)`` and the fp32 sum; here the integer sum is exact and rounded once. The outputs agree to
fp32 rounding (relative ~1e-6, tested) and the codes are identical. Symmetric grids only (the asymmetric
activation zero point needs a row-sum correction term that no W8A8 kernel here implements: an asymmetric spec
raises :class:`~shrink.quant.QuantError` instead of silently computing something else).

Introduced in: benchmarks/bench_int8.py (prefill and decode time, memory), tests/lib/test_quant_int8.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .fakequant import QuantLinear, _set_child, quant_linears
from .quantizer import QuantError, QuantSpec, qparams, range_of


def _check_spec(spec: QuantSpec | None, what: str, granularities: tuple[str, ...]) -> None:
    if spec is None:
        raise QuantError(f"Int8Linear needs a {what} quantizer; wrap the model with W8A8 specs "
                         "(shrink.quant.wrap_model(model, QuantSpec(8), QuantSpec(8))) first.")
    if spec.bits != 8 or not spec.symmetric or not spec.narrow:
        raise QuantError(f"Int8Linear implements symmetric narrow INT8 ([-127, 127]); the {what} spec is "
                         f"{spec.describe()}{'' if spec.narrow else ' (narrow=False)'}. Use QuantSpec(bits=8, "
                         "symmetric=True, narrow=True), or keep fake quantization for other grids.")
    if spec.granularity not in granularities:
        raise QuantError(f"Int8Linear supports {what} granularity {' or '.join(granularities)}, got "
                         f"{spec.granularity!r}; a per-{spec.granularity} scale does not factor out of the int32 "
                         "sum. Use fake quantization (QuantLinear) for it.")


class Int8Linear(nn.Module):
    """A W8A8 linear with int8 weights (see the module docstring).

    Buffers:
        w_q: int8 ``[N, K]`` weight codes; s_w: float32 ``[N]`` weight steps (per-tensor: one value repeated);
        bias: float32 ``[N]`` or None; a_lo / a_hi: the static activation range (per-tensor static only).

    Built with :meth:`from_quant_linear` from a (calibrated, if static) :class:`QuantLinear`.
    """

    def __init__(self, w_q: torch.Tensor, s_w: torch.Tensor, bias: torch.Tensor | None, a_spec: QuantSpec,
                 a_range: tuple[torch.Tensor, torch.Tensor] | None = None, name: str = ""):
        super().__init__()
        if w_q.dtype != torch.int8 or w_q.dim() != 2:
            raise QuantError(f"w_q must be int8 [out, in], got {w_q.dtype} {tuple(w_q.shape)}")
        self.register_buffer("w_q", w_q.contiguous())
        self.register_buffer("s_w", s_w.reshape(-1).to(torch.float32).expand(w_q.shape[0]).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.a_spec, self.name = a_spec, name
        if a_spec.static:
            if a_range is None:
                raise QuantError(f"{name}: static activation quantizer is not calibrated; call "
                                 "shrink.quant.calibrate(model, calibration_ids) before to_int8().")
            self.register_buffer("a_lo", a_range[0].detach().clone())
            self.register_buffer("a_hi", a_range[1].detach().clone())

    @property
    def in_features(self) -> int:
        return self.w_q.shape[1]

    @property
    def out_features(self) -> int:
        return self.w_q.shape[0]

    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, ql: QuantLinear) -> "Int8Linear":
        """The real-int8 twin of a fake-quant linear: same weight codes and steps, same activation rule."""
        _check_spec(ql.w_spec, "weight", ("token", "channel", "tensor"))
        _check_spec(ql.a_spec, "activation", ("token", "tensor"))
        w = ql.linear.weight.detach().float()
        lo, hi = range_of(w, ql.w_spec)
        s, _ = qparams(lo, hi, ql.w_spec)  # [N, 1] or [1, 1]
        q = torch.clamp(torch.round(w / s), ql.w_spec.qmin, ql.w_spec.qmax).to(torch.int8)
        a_range = (ql.lo, ql.hi) if ql.a_spec.static and ql.lo is not None else None
        return cls(q, s, ql.linear.bias, ql.a_spec, a_range, ql.name)

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x2`` float ``[M, K]`` -> (int8 codes ``[M, K]``, float32 steps ``[M]``), as fake_quant computes them."""
        spec = self.a_spec
        xf = x2.float()
        if spec.static:
            s, _ = qparams(self.a_lo, self.a_hi, spec)
        else:
            lo, hi = range_of(xf, spec)
            s, _ = qparams(lo, hi, spec)
        q = torch.clamp(torch.round(xf / s), spec.qmin, spec.qmax).to(torch.int8)
        return q, s.reshape(-1).expand(xf.shape[0]).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        q, s_x = self.quantize_input(x.reshape(-1, shape[-1]))
        y = ops.int8_matmul_dequant(q, self.w_q, s_x, self.s_w)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.name}: W int8 [{self.out_features}, {self.in_features}] | A {self.a_spec.describe()}"


def to_int8(model: nn.Module) -> dict:
    """Replace every :class:`QuantLinear` of a W8A8-wrapped (and, if static, calibrated) model by an
    :class:`Int8Linear`, in place. Returns ``{"linears": n, "fp32_bytes": ..., "int8_bytes": ...}`` (weights
    and their steps; the original fp32 weights are released from the converted modules)."""
    qls = quant_linears(model)
    if not qls:
        raise QuantError("to_int8 found no QuantLinear: wrap the model first "
                         "(shrink.quant.wrap_model(model, QuantSpec(8), QuantSpec(8)), then calibrate if static).")
    names = {id(m): n for n, m in model.named_modules()}
    fp32 = int8 = 0
    for _, ql in qls.items():
        il = Int8Linear.from_quant_linear(ql)
        fp32 += ql.linear.weight.numel() * 4
        int8 += il.w_q.numel() + il.s_w.numel() * 4
        _set_child(model, names[id(ql)], il)
    return {"linears": len(qls), "fp32_bytes": fp32, "int8_bytes": int8}


def int8_linears(model: nn.Module) -> dict[str, Int8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}


def fake_twin_output(ql: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The fake-quant output of ``ql`` on ``x`` (for comparisons): ``F.linear(q_a(x), q_w(W), b)``."""
    return F.linear(ql.quantize_input(x), ql.wq, ql.linear.bias)
