"""Pure-PyTorch reference implementations: THE specification of every ``shrink.ops`` op.

Every compiled kernel (``kernels/csrc``) must reproduce these functions bit for bit on valid input; the
GPU tests in ``tests/kernels/test_ops.py`` compare them exactly. The numerics are pinned down so that
this is possible:

- All arithmetic on activations is done in **float32** (inputs of other float dtypes are upcast first,
  results of fake-quant ops are cast back to the input dtype with round-to-nearest-even).
- Rounding is ``torch.round``: round half to even (``rintf`` in CUDA). ``x / s`` is a true IEEE
  division (never a multiplication by ``1/s``).
- Integer matmul accumulates exactly in int32 (the reference gets the exact sum through a float64
  matmul: every partial sum of int8 products is an integer below 2**53, so float64 is exact); the
  dequant epilogue is ``(float(acc) * s_x[m]) * s_w[n]`` in float32, in that order.
- Ties are broken deterministically (N:M mask: the lower column index wins).

These functions validate their input and raise :class:`OpInputError` (a ``ShrinkError``) naming the
problem and the fix. They run on any device; ``shrink.ops`` calls them on CPU.
"""

from __future__ import annotations

import math

import torch

from shrink.errors import ShrinkError

__all__ = [
    "OpInputError",
    "quantize_per_tensor_static_int8",
    "fake_quant_per_tensor",
    "fake_quant_affine",
    "fake_quant_per_token",
    "quantize_per_token",
    "int8_matmul_dequant",
    "int32_accumulate",
    "dequant_epilogue",
    "gather_tokens",
    "nm_prune_mask",
    "signed_range",
    "unsigned_range",
    "MAX_INT8_K",
]

#: Largest reduction length K for which an int8 x int8 dot product cannot overflow int32:
#: |acc| <= K * 128 * 128 = K * 2**14 must stay below 2**31.
MAX_INT8_K = 2**31 // 2**14 - 1

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class OpInputError(ShrinkError, ValueError):
    """Bad input to a ``shrink.ops`` op (wrong dtype, shape, range or a non-finite value)."""


# --------------------------------------------------------------------------------------------- helpers
def signed_range(bits: int) -> tuple[int, int]:
    """Signed integer grid of a ``bits``-bit code: ``[-2**(bits-1), 2**(bits-1) - 1]``."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def unsigned_range(bits: int) -> tuple[int, int]:
    """Unsigned integer grid of a ``bits``-bit code: ``[0, 2**bits - 1]``."""
    return 0, 2**bits - 1


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise OpInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise OpInputError(f"{name} must be float32/float16/bfloat16/float64, got {x.dtype}; cast it first "
                           f"(e.g. {name}.float())")


def _check_finite(x: torch.Tensor, name: str) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise OpInputError(f"{name} contains NaN or inf; the quantization grid is undefined for non-finite "
                           f"values: clean the input (e.g. torch.nan_to_num) before quantizing")


def _check_bits(bits, lo: int = 2, hi: int = 16) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise OpInputError(f"bits must be an int in [{lo}, {hi}], got {bits!r}")
    return bits


def _scale_f32(scale, name: str = "scale") -> torch.Tensor:
    """A positive finite scalar scale as a 0-dim float32 tensor (the spec computes in float32)."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise OpInputError(f"{name} must be a scalar (one element), got shape {tuple(scale.shape)}")
        value = float(scale.reshape(()).item())
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
        value = float(scale)
    else:
        raise OpInputError(f"{name} must be a float, got {type(scale).__name__}")
    f32 = torch.tensor(value, dtype=torch.float32)
    if not (math.isfinite(value) and float(f32) > 0):
        raise OpInputError(f"{name} must be finite and > 0 in float32, got {value!r}; a per-tensor scale is "
                           f"usually max|x| / qmax from calibration")
    return f32


# --------------------------------------------------------------------------------------------- K1
def quantize_per_tensor_static_int8(x: torch.Tensor, scale) -> torch.Tensor:
    """Static per-tensor symmetric INT8 quantization (K1).

    SmoothQuant (Xiao et al., ICML 2023), Eq. (1): ``X_q = round(X / Δ)`` with a per-tensor step
    ``Δ`` fixed offline from calibration ("static", their O3 setting, Table 2).

    Args:
        x: float32/float16/bfloat16/float64 tensor of any shape ``[..., D]``; must be finite.
        scale: the step ``Δ`` (Python float or one-element tensor), finite and > 0; cast to float32.

    Returns:
        int8 tensor of ``x``'s shape: ``clamp(round_half_even(float32(x) / float32(scale)), -128, 127)``.
        The clamp range is the full int8 range ``[-128, 127]``.
    """
    _check_float(x, "x")
    _check_finite(x, "x")
    s = _scale_f32(scale).to(x.device)
    q = torch.round(x.to(torch.float32) / s)
    return q.clamp_(-128, 127).to(torch.int8)


def fake_quant_per_tensor(x: torch.Tensor, scale, zero_point: int = 0, bits: int = 8,
                          signed: bool = True) -> torch.Tensor:
    """Per-tensor affine fake quantization with a given (static) scale and zero point.

    Uniform affine quantization ``r = S (q - Z)`` (Jacob et al., CVPR 2018, Eq. (1)); the same
    ``q(X) = s·round(X/s - z) + z``-style quantizer that PrefixQuant (Sec. 4.1) calibrates statically.

    ``q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)``;
    ``out = (q - zero_point) * scale``, all in float32, cast back to ``x.dtype``.

    Args:
        x: float tensor ``[...]`` (float32/float16/bfloat16/float64), finite.
        scale: step > 0 (float or one-element tensor), cast to float32.
        zero_point: integer offset, must lie in ``[qmin, qmax]``.
        bits: code width in [2, 16].
        signed: grid ``[-2**(bits-1), 2**(bits-1)-1]`` (True) or ``[0, 2**bits-1]`` (False).

    Returns:
        tensor of ``x``'s shape and dtype whose float32 values lie on the grid ``scale * (k - zero_point)``.
    """
    qmin, qmax = per_tensor_grid(bits, signed, zero_point)
    return fake_quant_affine(x, scale, zero_point, qmin, qmax)


def per_tensor_grid(bits, signed: bool, zero_point) -> tuple[int, int]:
    """``(qmin, qmax)`` of a ``bits``-bit signed/unsigned grid, after checking ``bits`` and ``zero_point``."""
    bits = _check_bits(bits)
    qmin, qmax = signed_range(bits) if signed else unsigned_range(bits)
    if isinstance(zero_point, bool) or not isinstance(zero_point, int) or not qmin <= zero_point <= qmax:
        raise OpInputError(f"zero_point must be an int in [{qmin}, {qmax}] for bits={bits}, signed={signed}; "
                           f"got {zero_point!r}")
    return qmin, qmax


def check_affine_grid(zero_point, qmin, qmax) -> None:
    """Integers ``qmin <= zero_point <= qmax``, at most 17 bits wide (the explicit grid of the affine op)."""
    if not (isinstance(qmin, int) and isinstance(qmax, int) and isinstance(zero_point, int)
            and not isinstance(zero_point, bool) and qmin <= zero_point <= qmax and qmax - qmin <= 2**16):
        raise OpInputError(f"need integers qmin <= zero_point <= qmax (at most 17 bits wide), got "
                           f"qmin={qmin!r}, zero_point={zero_point!r}, qmax={qmax!r}")


def fake_quant_affine(x: torch.Tensor, scale, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """The grid-explicit core of :func:`fake_quant_per_tensor` (the form the compiled op takes).

    ``q = clamp(round_half_even(float32(x) / float32(scale)) + zero_point, qmin, qmax)``,
    ``out = ((q - zero_point) * scale).to(x.dtype)``; requires ``qmin <= zero_point <= qmax``.
    """
    _check_float(x, "x")
    _check_finite(x, "x")
    check_affine_grid(zero_point, qmin, qmax)
    s = _scale_f32(scale).to(x.device)
    q = (torch.round(x.to(torch.float32) / s) + zero_point).clamp_(qmin, qmax)
    return ((q - zero_point) * s).to(x.dtype)


def quantize_per_token(x: torch.Tensor, bits: int = 8, symmetric: bool = True):
    """Dynamic per-token quantization to integer codes: the first half of :func:`fake_quant_per_token`.

    Each row ``x[..., :]`` (one token's features, last dim D) gets its own step computed on the fly:

    - symmetric (SmoothQuant Sec. 2 "per-token"; their ``fake_quant.py``): ``s = max|x| / qmax`` with
      ``qmax = 2**(bits-1) - 1``; ``q = clamp(round(x / s), -2**(bits-1), qmax)`` (the lower clamp never
      binds since ``|x/s| <= qmax``); zero point 0.
    - asymmetric (min-max, as GPTQ's quantizer): ``lo = min(min x, 0)``, ``hi = max(max x, 0)``,
      ``s = (hi - lo) / (2**bits - 1)``, ``z = round(-lo / s)``, ``q = clamp(round(x / s) + z, 0, 2**bits - 1)``.

    A row that is all zeros gets ``s = 1`` (its codes are all ``z``, so it dequantizes to exact zeros).

    Args:
        x: float tensor ``[..., D]``, finite, D >= 1.
        bits: in [2, 16].
        symmetric: see above.

    Returns:
        ``(q, scale, zero)``: ``q`` float32 ``[..., D]`` holding integers; ``scale`` float32 ``[..., 1]``;
        ``zero`` float32 ``[..., 1]`` holding integers (all 0 when symmetric).
    """
    _check_float(x, "x")
    _check_finite(x, "x")
    bits = _check_bits(bits)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise OpInputError(f"x must have a non-empty last (feature) dimension, got shape {tuple(x.shape)}")
    xf = x.to(torch.float32)
    if symmetric:
        qmin, qmax = signed_range(bits)
        scale = xf.abs().amax(dim=-1, keepdim=True) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.zeros_like(scale)
        q = torch.round(xf / scale).clamp_(qmin, qmax)
    else:
        qmin, qmax = unsigned_range(bits)
        hi = xf.amax(dim=-1, keepdim=True).clamp(min=0)
        lo = xf.amin(dim=-1, keepdim=True).clamp(max=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.round(-lo / scale)
        q = (torch.round(xf / scale) + zero).clamp_(qmin, qmax)
    return q, scale, zero


def fake_quant_per_token(x: torch.Tensor, bits: int = 8, symmetric: bool = True) -> torch.Tensor:
    """Dynamic per-token fake quantization (quantize then dequantize), the A-side of W8A8/W6A6/W4A4.

    SmoothQuant Sec. 2 / Table 2 (O1: per-token dynamic activations) and PrefixQuant Table 4 (per-token
    W6A6/W4A4). ``out = (q - z) * s`` with ``(q, s, z) = quantize_per_token(x, bits, symmetric)``,
    computed in float32 and cast back to ``x.dtype``.

    Args:
        x: float tensor ``[..., D]`` (float32/float16/bfloat16/float64), finite.
        bits: code width in [2, 16].
        symmetric: abs-max symmetric grid (True, SmoothQuant) or min-max asymmetric grid (False).

    Returns:
        tensor of ``x``'s shape and dtype.
    """
    q, scale, zero = quantize_per_token(x, bits, symmetric)
    return ((q - zero) * scale).to(x.dtype)


# --------------------------------------------------------------------------------------------- K2
def _as_scale_vector(s, n: int, name: str, device) -> torch.Tensor:
    """A scalar or ``[n]`` scale as a float32 ``[n]`` tensor (broadcasting a scalar changes no value)."""
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        s = torch.tensor(float(s), dtype=torch.float32)
    if not isinstance(s, torch.Tensor) or not (s.is_floating_point()):
        raise OpInputError(f"{name} must be a float or a float tensor, got {type(s).__name__}"
                           f"{'' if not isinstance(s, torch.Tensor) else ' of dtype ' + str(s.dtype)}")
    if s.numel() == 1:
        s = s.reshape(1).expand(n)
    elif s.dim() != 1 or s.shape[0] != n:
        raise OpInputError(f"{name} must be a scalar or have shape [{n}], got {tuple(s.shape)}")
    return s.to(device=device, dtype=torch.float32).contiguous()


def _check_int8_mm(x_q: torch.Tensor, w_q: torch.Tensor) -> None:
    for name, t in (("x_q", x_q), ("w_q", w_q)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8:
            raise OpInputError(f"{name} must be an int8 tensor, got "
                               f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}; "
                               f"quantize it first (e.g. quantize_per_tensor_static_int8)")
    if x_q.dim() != 2 or w_q.dim() != 2:
        raise OpInputError(f"x_q must be [M, K] and w_q [N, K]; got {tuple(x_q.shape)} and {tuple(w_q.shape)} "
                           f"(flatten leading dims of x_q first)")
    if x_q.shape[1] != w_q.shape[1]:
        raise OpInputError(f"reduction dims differ: x_q is [M, K={x_q.shape[1]}], w_q is [N, K={w_q.shape[1]}]; "
                           f"w_q is stored like nn.Linear.weight ([out, in])")
    if x_q.shape[1] > MAX_INT8_K:
        raise OpInputError(f"K={x_q.shape[1]} > {MAX_INT8_K}: the int32 accumulator could overflow; split K")
    if x_q.device != w_q.device:
        raise OpInputError(f"x_q is on {x_q.device} but w_q on {w_q.device}; move them to one device")


def int32_accumulate(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact ``acc[m, n] = sum_k x_q[m, k] * w_q[n, k]`` as int32 ``[M, N]`` (via an exact float64 matmul)."""
    _check_int8_mm(x_q, w_q)
    return torch.matmul(x_q.to(torch.float64), w_q.to(torch.float64).t()).to(torch.int32)


def dequant_epilogue(acc: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """The W8A8 dequant epilogue ``out[m, n] = (float32(acc[m, n]) * s_x[m]) * s_w[n]`` (float32 [M, N])."""
    return acc.to(torch.float32) * s_x[:, None] * s_w[None, :]


def int8_matmul_dequant(x_q: torch.Tensor, w_q: torch.Tensor, s_x, s_w) -> torch.Tensor:
    """W8A8 matmul with a fused dequant epilogue (K2).

    SmoothQuant Sec. 2: ``Y = diag(Δ_X) · (X_q W_qᵀ) · diag(Δ_W)`` with per-token (or per-tensor) activation
    steps ``Δ_X`` and per-output-channel (or per-tensor) weight steps ``Δ_W``; the int8 x int8 products are
    accumulated in int32 and scaled once at the end (LLM.int8(), Dettmers et al. 2022, Sec. 2 "vector-wise
    quantization" uses the same outer-product rescaling).

    Args:
        x_q: int8 ``[M, K]`` activation codes.
        w_q: int8 ``[N, K]`` weight codes (``nn.Linear.weight`` layout); ``K <= MAX_INT8_K``.
        s_x: float scalar or float ``[M]`` activation steps (cast to float32).
        s_w: float scalar or float ``[N]`` weight steps (cast to float32).

    Returns:
        float32 ``[M, N]``: ``(float32(int32 acc) * s_x[m]) * s_w[n]``.
    """
    acc = int32_accumulate(x_q, w_q)
    sx = _as_scale_vector(s_x, x_q.shape[0], "s_x", x_q.device)
    sw = _as_scale_vector(s_w, w_q.shape[0], "s_w", x_q.device)
    return dequant_epilogue(acc, sx, sw)


# --------------------------------------------------------------------------------------------- K3
def _check_gather(h: torch.Tensor, keep_idx: torch.Tensor) -> None:
    if not isinstance(h, torch.Tensor) or h.dim() < 2:
        raise OpInputError(f"h must be a tensor [B, T, ...], got "
                           f"{tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}")
    if (not isinstance(keep_idx, torch.Tensor) or keep_idx.dtype != torch.int64 or keep_idx.dim() != 2
            or keep_idx.shape[0] != h.shape[0]):
        raise OpInputError(f"keep_idx must be int64 [B={h.shape[0]}, K]; got "
                           f"{(keep_idx.dtype, tuple(keep_idx.shape)) if isinstance(keep_idx, torch.Tensor) else type(keep_idx).__name__}"
                           f" (cast with .long())")
    if keep_idx.device != h.device:
        raise OpInputError(f"h is on {h.device} but keep_idx on {keep_idx.device}; move them to one device")
    if keep_idx.numel():
        lo, hi = int(keep_idx.min()), int(keep_idx.max())
        if lo < 0 or hi >= h.shape[1]:
            raise OpInputError(f"keep_idx values must lie in [0, T={h.shape[1]}), got min {lo}, max {hi}; "
                               f"negative indices are not wrapped")


def gather_tokens(h: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """Token compaction gather (K3): ``out[b, k] = h[b, keep_idx[b, k]]``.

    The "keep the selected tokens" step of token pruning (FastV Sec. 4, ToMe's unmerged tokens, DivPrune):
    hidden states ``[B, T, D]`` (or a KV-cache slice ``[B, T, ...]``; trailing dims are copied whole)
    shrink to ``[B, K, ...]``. Pure data movement: the result is bit-exact for every dtype.

    Args:
        h: tensor ``[B, T, ...]`` of any dtype.
        keep_idx: int64 ``[B, K]``, values in ``[0, T)``; duplicates allowed; the order is kept as given
            (sort it first to preserve positional order, as FastV does).

    Returns:
        tensor ``[B, K, ...]`` of ``h``'s dtype.
    """
    _check_gather(h, keep_idx)
    b = torch.arange(h.shape[0], device=h.device)[:, None]
    return h[b, keep_idx]


# --------------------------------------------------------------------------------------------- N:M
def _check_nm(w: torch.Tensor, scores, n: int, m: int) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise OpInputError(f"w must be a 2-D tensor [R, C] (nn.Linear.weight), got "
                           f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if scores is None:
        scores = w.abs()
    if not isinstance(scores, torch.Tensor) or scores.shape != w.shape:
        raise OpInputError(f"scores must be a tensor of w's shape {tuple(w.shape)}, got "
                           f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    if scores.dtype not in _FLOAT_DTYPES:
        raise OpInputError(f"scores must be a float tensor, got {scores.dtype}")
    if scores.device != w.device:
        raise OpInputError(f"w is on {w.device} but scores on {scores.device}; move them to one device")
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise OpInputError(f"{name} must be an int, got {v!r}")
    if not (1 <= m <= 1024 and 0 <= n <= m):
        raise OpInputError(f"need 0 <= n <= m and 1 <= m <= 1024, got n={n}, m={m} (2:4 means n=2, m=4)")
    if w.shape[1] % m:
        raise OpInputError(f"C={w.shape[1]} columns are not a multiple of m={m}; N:M groups would straddle rows")
    if scores.numel() and bool(torch.isnan(scores).any()):
        raise OpInputError("scores contain NaN; ranking is undefined; fix the score computation")
    return scores


def nm_prune_mask(w: torch.Tensor, scores: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """N:M semi-structured keep-mask: in each row, in every group of ``m`` consecutive columns, keep the
    ``n`` largest scores.

    Serves the N:M variants of SparseGPT (Frantar & Alistarh 2023, Sec. 3 "Semi-structured sparsity") and
    Wanda (Sun et al. 2024, Sec. 3, N:M per output row): 2:4 keeps n=2 of m=4. Their code phrases it as
    "zero the m-n smallest" with ``torch.topk(largest=False)``, whose tie order is unspecified; here ties
    are broken deterministically: **among equal scores the lower column index is kept** (a stable
    descending sort). ``-0.0 == 0.0``; NaN scores are rejected.

    Args:
        w: float ``[R, C]`` weight; only its shape and device are used (C % m == 0).
        scores: float ``[R, C]`` importance (e.g. Wanda ``|W| * ||X||``), or None for ``|w|`` (magnitude).
        n: weights kept per group, ``0 <= n <= m``.
        m: group length, ``1 <= m <= 1024``.

    Returns:
        bool ``[R, C]``: True = keep. Exactly ``n`` True per group.
    """
    scores = _check_nm(w, scores, n, m)
    R, C = scores.shape
    g = scores.reshape(R, C // m, m)
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros(g.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, order, True)
    return mask.reshape(R, C)
