"""``shrink.ops``: the kernel façade. One function per op; each dispatches to the compiled CUDA kernel when
that is loaded and the tensors are on a CUDA device, and to the pure-PyTorch reference otherwise.

Ops (specs, shapes, dtypes and paper equations in :mod:`shrink.ops.reference`):

=================================== =========================================================== ==========
op                                  what                                                        chapter
=================================== =========================================================== ==========
quantize_per_tensor_static_int8     K1: ``int8 = clamp(round(x / s), -128, 127)``               bits
fake_quant_per_tensor               static affine fake quant on a ``bits``-bit grid              bits
  (``fake_quant_affine``)           the same on an explicit ``[qmin, qmax]`` grid                bits
fake_quant_per_token                dynamic per-token (sym/asym) fake quant                      bits
int8_matmul_dequant                 K2: W8A8 GEMM, int32 accumulation, dequant epilogue          bits
gather_tokens                       K3: ``out[b, k] = h[b, keep_idx[b, k]]``                     tokens
nm_prune_mask                       N:M keep-mask (n largest scores per m columns)               weights
=================================== =========================================================== ==========

Backends (``backend(op, device)`` tells which one a call takes; ``last_backend(op)`` which one it took):

- ``"cuda"``: the compiled kernels of ``kernels/csrc`` (``torch.ops.shrink.*``), for CUDA tensors once
  :func:`load_cuda` succeeded (it runs at import on CUDA machines; it only loads a prebuilt library unless
  ``SHRINK_KERNELS_BUILD=1``). They are *designed* to match the reference bit for bit (``--fmad=false``,
  explicitly rounded intrinsics) and ``tests/kernels`` compares them with ``torch.equal`` on a GPU, but so far
  they have only been compiled (``make kernels-check``: nvcc for sm_80/sm_90 against the torch headers), never
  run on a GPU: their numerics are untested (see ``kernels/README.md``, "Test tiers").
- ``"cpu_int_mm"``: ``int8_matmul_dequant`` on a CPU with int8 dot-product instructions (AVX-512 VNNI,
  AVX-VNNI or AMX) uses ``torch._int_mm`` (exact int32) for the accumulation and the reference epilogue.
- ``"cpu_f32_exact"``: on other CPUs (``torch._int_mm`` falls back to a slow generic loop there: 525 ms for a
  256x576x576 product on this project's AVX2 machine, against 21 ms for the fp32 GEMM) the int8 codes are
  multiplied by the fp32 GEMM in chunks of at most 1024 along K: every partial sum is an integer of magnitude
  <= 1024 * 128**2 = 2**24, which float32 represents exactly whatever the summation order, so the chunk
  results convert to int32 exactly and their int32 sum is the exact accumulator. Both CPU paths are
  bit-identical to the reference (float64 matmul), only faster.
- ``"reference"``: :mod:`shrink.ops.reference`, on any device.

``SHRINK_OPS_BACKEND=reference`` (or ``with shrink.ops.reference_only():``) forces the reference.
No backend ever changes a result: a backend that cannot reproduce the reference is not used.
Bad input raises :class:`OpInputError` (a ``ShrinkError``) on every backend.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from . import _library, cuda, reference
from .reference import MAX_INT8_K, OpInputError, signed_range, unsigned_range

__all__ = [
    "quantize_per_tensor_static_int8",
    "fake_quant_per_tensor",
    "fake_quant_affine",
    "fake_quant_per_token",
    "quantize_per_token",
    "int8_matmul_dequant",
    "gather_tokens",
    "nm_prune_mask",
    "backend",
    "last_backend",
    "reference_only",
    "load_cuda",
    "cuda_status",
    "OpInputError",
    "OP_NAMES",
    "MAX_INT8_K",
    "reference",
    "signed_range",
    "unsigned_range",
]

OP_NAMES = _library.OP_NAMES
BACKENDS = ("cuda", "cpu_int_mm", "cpu_f32_exact", "reference")
#: K chunk of the ``cpu_f32_exact`` accumulation: 1024 * 128**2 = 2**24 (exact in float32).
F32_EXACT_K = 1024

_library.define()
_state = threading.local()
_LAST: dict[str, str] = {}
_INT_MM_CPU: bool | None = None


def load_cuda(build_if_missing: bool | None = None) -> dict:
    """Try to load the compiled CUDA kernels (never raises); returns :func:`cuda_status`."""
    cuda.load(build_if_missing)
    return cuda_status()


def cuda_status() -> dict:
    """``{"loaded": bool, "path": str | None, "reason": str}`` of the CUDA extension."""
    return cuda.STATUS.to_dict()


@contextlib.contextmanager
def reference_only():
    """Within the block, every op runs the reference (e.g. to compare a kernel against its spec)."""
    prev = getattr(_state, "force_ref", False)
    _state.force_ref = True
    try:
        yield
    finally:
        _state.force_ref = prev


def _forced_reference() -> bool:
    return getattr(_state, "force_ref", False) or os.environ.get("SHRINK_OPS_BACKEND", "auto") == "reference"


def _int_mm_cpu_ok() -> bool:
    """Whether ``torch._int_mm`` runs on CPU here and is exact on a probe (checked once)."""
    global _INT_MM_CPU
    if _INT_MM_CPU is None:
        try:
            g = torch.Generator().manual_seed(0)
            a = torch.randint(-128, 128, (5, 40), dtype=torch.int8, generator=g)
            b = torch.randint(-128, 128, (7, 40), dtype=torch.int8, generator=g)
            _INT_MM_CPU = bool(torch.equal(torch._int_mm(a, b.t()), reference.int32_accumulate(a, b)))
        except Exception:  # older torch, or a CPU without the kernel
            _INT_MM_CPU = False
    return _INT_MM_CPU


def backend(op_name: str, device: str | torch.device = "cpu") -> str:
    """The backend that ``shrink.ops.<op_name>`` takes for tensors on ``device``: one of :data:`BACKENDS`."""
    if op_name not in OP_NAMES:
        raise OpInputError(f"unknown op {op_name!r}; ops are {', '.join(OP_NAMES)}")
    dev = torch.device(device)
    if _forced_reference():
        return "reference"
    if dev.type == "cuda" and cuda.STATUS.loaded:
        return "cuda"
    if dev.type == "cpu" and op_name == "int8_matmul_dequant":
        return "cpu_int_mm" if (_int8_dot_cpu() and _int_mm_cpu_ok()) else "cpu_f32_exact"
    return "reference"


def _int8_dot_cpu() -> bool:
    """Whether this CPU has int8 dot-product instructions (where ``torch._int_mm`` is fast)."""
    from ..env import _cpu_flags

    flags = _cpu_flags()[1]
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


def _f32_exact_accumulate(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``x_q @ w_qᵀ`` from fp32 GEMMs over K-chunks of <= :data:`F32_EXACT_K` (see module doc)."""
    K = x_q.shape[1]
    acc = None
    for k0 in range(0, K, F32_EXACT_K):
        part = (x_q[:, k0:k0 + F32_EXACT_K].to(torch.float32) @ w_q[:, k0:k0 + F32_EXACT_K].to(torch.float32).t())
        part = part.to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    return acc


def last_backend(op_name: str) -> str | None:
    """The backend the most recent call of ``op_name`` in this process took (None before the first call)."""
    return _LAST.get(op_name)


def _take(op_name: str, device: torch.device) -> str:
    b = backend(op_name, device)
    _LAST[op_name] = b
    return b


# ------------------------------------------------------------------------------------------------ ops
def quantize_per_tensor_static_int8(x: torch.Tensor, scale) -> torch.Tensor:
    """K1, static per-tensor INT8: ``clamp(round(float32(x) / scale), -128, 127)`` -> int8, x's shape.

    See :func:`shrink.ops.reference.quantize_per_tensor_static_int8` (SmoothQuant Eq. (1), O3 setting).
    """
    reference._check_float(x, "x")
    if _take("quantize_per_tensor_static_int8", x.device) == "cuda":
        reference._check_finite(x, "x")
        s = float(reference._scale_f32(scale))
        return _library.op("quantize_per_tensor_static_int8")(x, s)
    return reference.quantize_per_tensor_static_int8(x, scale)


def fake_quant_per_tensor(x: torch.Tensor, scale, zero_point: int = 0, bits: int = 8,
                          signed: bool = True) -> torch.Tensor:
    """Static affine fake quant: ``(clamp(round(x / s) + z, qmin, qmax) - z) * s`` in float32, x's dtype.

    Grid ``[-2**(bits-1), 2**(bits-1)-1]`` (signed) or ``[0, 2**bits-1]``. See
    :func:`shrink.ops.reference.fake_quant_per_tensor` (Jacob et al. 2018 Eq. (1); PrefixQuant static).
    """
    reference._check_float(x, "x")
    qmin, qmax = reference.per_tensor_grid(bits, signed, zero_point)
    return fake_quant_affine(x, scale, zero_point, qmin, qmax)


def fake_quant_affine(x: torch.Tensor, scale, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """The same op on an explicit integer grid ``[qmin, qmax]`` (e.g. the bits chapter's narrow symmetric
    ``[-127, 127]``): what the bits chapter's static per-tensor activation quantizer dispatches to.

    See :func:`shrink.ops.reference.fake_quant_affine`. Backend name: ``"fake_quant_per_tensor"``.
    """
    reference._check_float(x, "x")
    if _take("fake_quant_per_tensor", x.device) == "cuda":
        reference.check_affine_grid(zero_point, qmin, qmax)
        reference._check_finite(x, "x")
        s = float(reference._scale_f32(scale))
        return _library.op("fake_quant_per_tensor")(x, s, zero_point, qmin, qmax)
    return reference.fake_quant_affine(x, scale, zero_point, qmin, qmax)


def fake_quant_per_token(x: torch.Tensor, bits: int = 8, symmetric: bool = True) -> torch.Tensor:
    """Dynamic per-token fake quant over the last dim (symmetric abs-max or asymmetric min-max), x's dtype.

    See :func:`shrink.ops.reference.fake_quant_per_token` (SmoothQuant O1, PrefixQuant Table 4).
    """
    reference._check_float(x, "x")
    if _take("fake_quant_per_token", x.device) == "cuda":
        bits = reference._check_bits(bits)
        if x.dim() == 0 or x.shape[-1] == 0:
            raise OpInputError(f"x must have a non-empty last (feature) dimension, got shape {tuple(x.shape)}")
        reference._check_finite(x, "x")
        return _library.op("fake_quant_per_token")(x, bits, bool(symmetric))
    return reference.fake_quant_per_token(x, bits, symmetric)


quantize_per_token = reference.quantize_per_token


def int8_matmul_dequant(x_q: torch.Tensor, w_q: torch.Tensor, s_x, s_w) -> torch.Tensor:
    """K2, W8A8 GEMM + dequant: float32 ``[M, N] = (float32(x_q @ w_qᵀ in int32) * s_x[m]) * s_w[n]``.

    ``x_q`` int8 ``[M, K]``, ``w_q`` int8 ``[N, K]``, ``s_x`` scalar or ``[M]``, ``s_w`` scalar or ``[N]``.
    See :func:`shrink.ops.reference.int8_matmul_dequant` (SmoothQuant Sec. 2).
    """
    reference._check_int8_mm(x_q, w_q)
    sx = reference._as_scale_vector(s_x, x_q.shape[0], "s_x", x_q.device)
    sw = reference._as_scale_vector(s_w, w_q.shape[0], "s_w", x_q.device)
    for name, s in (("s_x", sx), ("s_w", sw)):
        if s.numel() and not bool((torch.isfinite(s) & (s >= 0)).all()):
            raise OpInputError(f"{name} must be finite and >= 0 (a NaN scale makes every output NaN), got "
                               f"{s[~(torch.isfinite(s) & (s >= 0))][:3].tolist()}...; scales are max|x| / 127 from "
                               "calibration: recalibrate on finite activations.")
    b = _take("int8_matmul_dequant", x_q.device)
    if b == "cuda":
        return _library.op("int8_matmul_dequant")(x_q, w_q, sx, sw)
    if b == "cpu_int_mm":
        return reference.dequant_epilogue(torch._int_mm(x_q, w_q.t()), sx, sw)
    if b == "cpu_f32_exact":
        return reference.dequant_epilogue(_f32_exact_accumulate(x_q, w_q), sx, sw)
    return reference.int8_matmul_dequant(x_q, w_q, sx, sw)


def gather_tokens(h: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """K3, token compaction: ``[B, T, ...] -> [B, K, ...]``, ``out[b, k] = h[b, keep_idx[b, k]]`` (exact).

    See :func:`shrink.ops.reference.gather_tokens` (FastV / ToMe / DivPrune keep step).
    """
    reference._check_gather(h, keep_idx)
    if _take("gather_tokens", h.device) == "cuda":
        return _library.op("gather_tokens")(h, keep_idx)
    return reference.gather_tokens(h, keep_idx)


def nm_prune_mask(w: torch.Tensor, scores: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask, bool ``[R, C]``: the ``n`` largest ``scores`` of every ``m`` consecutive columns per row
    (ties: lower column index kept; ``scores=None`` means ``|w|``).

    See :func:`shrink.ops.reference.nm_prune_mask` (SparseGPT / Wanda N:M, 2:4 = n=2, m=4).
    """
    s = reference._check_nm(w, scores, n, m)
    if _take("nm_prune_mask", w.device) == "cuda":
        return _library.op("nm_prune_mask")(s, n, m)
    return reference.nm_prune_mask(w, s, n, m)


cuda.load()  # best effort, never raises; on a CPU machine it only records why nothing was loaded
