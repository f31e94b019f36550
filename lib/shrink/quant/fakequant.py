"""W8A8-style fake quantization of every decoder linear (weights + input activations) and static
calibration.

:func:`wrap_model` replaces each ``nn.Linear`` inside the decoder blocks by a :class:`QuantLinear` whose
weight is fake-quantized once and whose input is fake-quantized on every call (dynamic) or with ranges
fixed by :func:`calibrate` (static). ``lm_head`` and the embeddings stay in full precision (SmoothQuant,
QLLM-Eval and CushionCache all leave them; bits.md §1.6). BMM inputs / the KV cache are **not** quantized
(the paper does not say whether it did; bits.md §6) — a documented gap of this implementation.

Prefix positions: a :class:`shrink.models.KVPrefix` enters the forward as ``past_key_values``, so the
linears never see prefix positions and static ranges are calibrated on text tokens only (CushionCache
Sec. 4.1: "s, z determined on t_{1:n}"). For prefixes given *in the sequence*, ``skip_first`` excludes
the first positions from calibration.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..models import KVPrefix, decoder_blocks
from .quantizer import QuantError, QuantSpec, fake_quant, fake_quant_kernel, qparams, range_of


class QuantLinear(nn.Module):
    """``y = q_a(x) @ q_w(W)^T + b`` (fake quantization, fp32 arithmetic).

    Args:
        linear: the wrapped ``nn.Linear`` (kept as ``.linear``; its weight is not modified).
        w_spec: weight quantizer (``None``: full-precision weight). ``token``/``channel`` = per output row.
        a_spec: input-activation quantizer (``None``: full-precision input).
        name: qualified module name (for reports).

    State: ``act_enabled`` / ``weight_enabled`` switch quantization off without unwrapping;
    ``lo``/``hi`` hold the calibrated static range (``a_spec.static``).
    """

    def __init__(self, linear: nn.Linear, w_spec: QuantSpec | None, a_spec: QuantSpec | None, name: str = ""):
        super().__init__()
        if w_spec is not None and w_spec.static:
            raise QuantError("weight quantizers are computed from the weight itself; use static=False for w_spec")
        self.linear, self.w_spec, self.a_spec, self.name = linear, w_spec, a_spec, name
        self.act_enabled = self.weight_enabled = True
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self._observing = False
        self._skip_first = 0
        self._batch = 1
        self._obs: dict = {}
        self.range_jitter: tuple[float, float] | None = None  # dynamic ranges: (lo, hi) factors, see perturb_ranges
        self.refresh_weight()

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def refresh_weight(self) -> None:
        """Re-quantize the weight (call after changing ``linear.weight``, e.g. SmoothQuant)."""
        w = self.linear.weight.detach()
        self.wq = fake_quant(w, self.w_spec) if self.w_spec is not None else None

    # ---- calibration ---------------------------------------------------------------------------
    def _observe(self, x: torch.Tensor) -> None:
        if x.dim() == 2:  # OPT flattens [B, T, D] -> [B*T, D] before its FFN
            x = x.reshape(self._batch, -1, x.shape[-1])
        x = x[:, self._skip_first:]
        xf = x.detach().float().reshape(-1, x.shape[-1])  # [N, D]
        o = self._obs
        if self.a_spec.granularity == "column":
            lo, hi = xf.amin(0), xf.amax(0)
            o["lo"] = lo if "lo" not in o else torch.minimum(o["lo"], lo)
            o["hi"] = hi if "hi" not in o else torch.maximum(o["hi"], hi)
        else:  # per-tensor: keep per-token extremes so that top-p % token clipping is exact
            o.setdefault("tok_lo", []).append(xf.amin(1))
            o.setdefault("tok_hi", []).append(xf.amax(1))

    def finish_calibration(self) -> None:
        spec, o = self.a_spec, self._obs
        if not o:
            raise QuantError(f"{self.name}: no calibration data reached this layer; run calibrate() with data")
        if spec.granularity == "column":
            if spec.clip_top:
                raise QuantError("clip_top is defined for per-tensor static ranges only")
            lo, hi = o["lo"], o["hi"]
        else:
            tlo, thi = torch.cat(o["tok_lo"]), torch.cat(o["tok_hi"])
            keep = tlo.numel() - int(spec.clip_top * tlo.numel())  # drop the top clip_top fraction of tokens
            if spec.symmetric:
                amax = torch.maximum(tlo.abs(), thi.abs()).sort().values[keep - 1]
                lo, hi = -amax, amax
            else:
                hi = thi.sort().values[keep - 1]
                lo = tlo.sort(descending=True).values[keep - 1]
        self.lo, self.hi = lo.reshape(1, -1) if lo.dim() else lo, hi.reshape(1, -1) if hi.dim() else hi
        self._obs, self._observing = {}, False

    # ---- forward -------------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.a_spec
        if spec is None or not self.act_enabled:
            return x
        if spec.static:
            if self.lo is None:
                raise QuantError(f"{self.name}: static activation quantizer is not calibrated; call "
                                 "shrink.quant.calibrate(model, calibration_ids) first")
            s, z = qparams(self.lo, self.hi, spec)
            return fake_quant_kernel(x, spec, s, z)
        if self.range_jitter is not None:  # dynamic range, scaled by the perturbation factors
            lo, hi = range_of(x, spec)
            s, z = qparams(lo * self.range_jitter[0], hi * self.range_jitter[1], spec)
            return fake_quant(x, spec, s, z)
        return fake_quant_kernel(x, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observing:
            self._observe(x)
            return self.linear(x)
        w = self.wq if (self.wq is not None and self.weight_enabled) else self.linear.weight
        return F.linear(self.quantize_input(x), w, self.linear.bias)

    def extra_repr(self) -> str:
        w = self.w_spec.describe() if self.w_spec else "fp"
        a = self.a_spec.describe() if self.a_spec else "fp"
        return f"{self.name}: W {w} | A {a}"


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` (or wrapped :class:`QuantLinear`) inside the decoder blocks, by qualified name
    ``"<block>.<path>"`` (e.g. ``"11.mlp.down_proj"``). ``lm_head`` is outside the blocks."""
    out = {}
    for i, block in enumerate(decoder_blocks(model)):
        for name, mod in block.named_modules():
            if isinstance(mod, QuantLinear):
                out[f"{i}.{name}"] = mod
            elif isinstance(mod, nn.Linear):
                parent = name.rpartition(".")[0]
                if not isinstance(block.get_submodule(parent) if parent else block, QuantLinear):
                    out[f"{i}.{name}"] = mod
    return out


def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


def wrap_model(model: nn.Module, w_spec: QuantSpec | None, a_spec: QuantSpec | None, *,
               exclude: Iterable[str] = ()) -> dict[str, QuantLinear]:
    """Wrap every decoder linear in place (W ``w_spec``, A ``a_spec``); ``lm_head``/embeddings stay fp.

    Args:
        exclude: substrings of linear names to leave in full precision (e.g. ``("down_proj",)``).

    Returns:
        ``{name: QuantLinear}``. Undo with :func:`unwrap_model`. Wrapping twice raises.
    """
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise QuantError("model is already wrapped; call shrink.quant.unwrap_model(model) first")
    wrapped = {}
    blocks = decoder_blocks(model)
    for name, lin in decoder_linears(model).items():
        if any(e in name for e in exclude):
            continue
        i, _, sub = name.partition(".")
        q = QuantLinear(lin, w_spec, a_spec, name)
        _set_child(blocks[int(i)], sub, q)
        wrapped[name] = q
    return wrapped


def unwrap_model(model: nn.Module) -> None:
    """Put the original ``nn.Linear`` modules back (inverse of :func:`wrap_model`)."""
    for i, block in enumerate(decoder_blocks(model)):
        for name, mod in list(block.named_modules()):
            if isinstance(mod, QuantLinear):
                _set_child(block, name, mod.linear)


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """The wrapped linears of ``model`` by name."""
    return {m.name: m for m in model.modules() if isinstance(m, QuantLinear)}


@contextlib.contextmanager
def quantized(model: nn.Module, w_spec: QuantSpec | None, a_spec: QuantSpec | None, *,
              calib_ids: torch.Tensor | None = None, prefix: KVPrefix | None = None, exclude=(), batch_size=1,
              ranges: dict | None = None, perturb: tuple[float, int] | None = None):
    """Context manager: wrap, calibrate if ``a_spec.static`` (on ``calib_ids`` with ``prefix``), unwrap.

    Args:
        ranges: ``{name: (lo, hi)}`` from an earlier :func:`calibrate` with the same model, specs and data:
            used instead of calibrating again (copies; the dict is not modified).
        perturb: ``(eps, seed)``: after calibration, :func:`perturb_ranges` scales every range by
            ``1 + eps*u`` (None: off).
    """
    wrap_model(model, w_spec, a_spec, exclude=exclude)
    try:
        if a_spec is not None and a_spec.static:
            if ranges is not None:
                set_ranges(model, ranges)
            else:
                if calib_ids is None:
                    raise QuantError("static activation quantization needs calib_ids (int64 [n, L])")
                calibrate(model, calib_ids, prefix=prefix, batch_size=batch_size)
        if perturb is not None:
            perturb_ranges(model, *perturb)
        yield model
    finally:
        unwrap_model(model)


@torch.no_grad()
def calibrate(model: nn.Module, calib_ids: torch.Tensor, *, prefix: KVPrefix | None = None, skip_first: int = 0,
              batch_size: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Static range calibration of every wrapped linear with a static ``a_spec``.

    Runs ``calib_ids`` (int64 ``[n, L]``) through the model (starting from ``prefix`` if given, so prefix
    positions are never observed), with activation quantization *off* (ranges of the full-precision
    activations, SmoothQuant ``get_static_decoder_layer_scales`` convention); ``skip_first`` additionally
    drops the first positions of every sequence. Per-tensor ranges support ``a_spec.clip_top``.

    Returns:
        ``{name: (lo, hi)}`` fp32 ranges (scalars, or ``[1, D]`` for ``column``).
    """
    if calib_ids.dim() != 2 or calib_ids.is_floating_point():
        raise QuantError(f"calib_ids must be int64 [n, L], got {calib_ids.dtype} {tuple(calib_ids.shape)}")
    if calib_ids.shape[0] == 0 or calib_ids.shape[1] == 0:
        raise QuantError(f"calib_ids is empty ({tuple(calib_ids.shape)}): static ranges need calibration windows; "
                         "pass shrink.data.calibration_set(tok, nsamples=8, seqlen=512) or similar.")
    if batch_size < 1:
        raise QuantError(f"batch_size must be >= 1, got {batch_size}")
    mods = [m for m in quant_linears(model).values() if m.a_spec is not None and m.a_spec.static]
    if not mods:
        raise QuantError("no wrapped linear has a static activation quantizer; wrap_model(..., a_spec=static spec)")
    for m in mods:
        m._observing, m._skip_first, m._obs = True, skip_first, {}
    try:
        dev = next(model.parameters()).device
        for s in range(0, calib_ids.shape[0], batch_size):
            ids = calib_ids[s:s + batch_size].to(dev)
            for m in mods:
                m._batch = ids.shape[0]
            kw = {} if prefix is None else {"past_key_values": prefix.cache(ids.shape[0]), "use_cache": True}
            model(input_ids=ids, **kw)
    except BaseException:
        for m in mods:
            m._observing = False
        raise
    for m in mods:
        m.finish_calibration()
    return {m.name: (m.lo, m.hi) for m in mods}


def static_ranges(model: nn.Module) -> dict[str, float]:
    """Calibrated static range of each wrapped linear as its abs-max ``max(|lo|, |hi|)`` (floats)."""
    return {n: float(torch.maximum(m.lo.abs(), m.hi.abs()).max()) for n, m in quant_linears(model).items()
            if m.lo is not None}


def largest_static_range(model: nn.Module) -> tuple[str, float]:
    """``(name, abs-max)`` of the widest calibrated static range (bits.md §4.4 "largest static range")."""
    r = static_ranges(model)
    if not r:
        raise QuantError("no calibrated static ranges; call calibrate() first")
    name = max(r, key=r.get)
    return name, r[name]


def set_ranges(model: nn.Module, ranges: dict) -> None:
    """Install static ranges ``{name: (lo, hi)}`` (as returned by :func:`calibrate`) on the wrapped linears."""
    mods = {n: m for n, m in quant_linears(model).items() if m.a_spec is not None and m.a_spec.static}
    if set(mods) != set(ranges):
        missing, extra = sorted(set(mods) - set(ranges)), sorted(set(ranges) - set(mods))
        raise QuantError(f"ranges do not match the wrapped static linears (missing {missing[:3]}, extra "
                         f"{extra[:3]}); calibrate this model with the same specs and exclude= first")
    for n, m in mods.items():
        lo, hi = ranges[n]
        m.lo, m.hi = lo.clone(), hi.clone()


def perturb_ranges(model: nn.Module, eps: float, seed: int) -> dict[str, tuple]:
    """Scale every quantization range by ``1 + eps*u``, ``u ~ U(-1, 1)``: a conditioning probe (issue 9).

    Static quantizers: every calibrated ``lo`` and ``hi`` element is multiplied by its own factor
    (``lo * (1 + eps*u_lo)``, ``hi * (1 + eps*u_hi)``; computed in float64, stored fp32). Dynamic quantizers:
    the range computed from each input is multiplied by one pair of per-layer factors (``range_jitter``),
    so dynamic numbers are probed by the same perturbation. Draws come from ``torch.Generator`` seeded with
    ``seed``, layer by layer in :func:`quant_linears` order (two scalars per dynamic layer, one per range
    element per static layer), so ``(eps, seed)`` fixes the perturbation exactly. ``eps = 1e-6`` is ~8 fp32
    ulps: a result that moves under it is decided by float rounding, not by the method.

    Returns:
        ``{name: (factor_lo, factor_hi)}`` (tensors for static, floats for dynamic layers).
    """
    if not (eps >= 0.0 and eps < 0.5):
        raise QuantError(f"perturbation eps must be in [0, 0.5) (a relative range change, e.g. 1e-6), got {eps!r}")
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for name, m in quant_linears(model).items():
        spec = m.a_spec
        if spec is None:
            continue
        if spec.static:
            if m.lo is None:
                raise QuantError(f"{name}: perturb_ranges needs calibrated ranges; call calibrate() first")
            f_lo = 1.0 + eps * (torch.rand(m.lo.shape, generator=gen, dtype=torch.float64) * 2 - 1)
            f_hi = 1.0 + eps * (torch.rand(m.hi.shape, generator=gen, dtype=torch.float64) * 2 - 1)
            m.lo = (m.lo.double() * f_lo).to(m.lo.dtype)
            m.hi = (m.hi.double() * f_hi).to(m.hi.dtype)
        else:
            u = torch.rand(2, generator=gen, dtype=torch.float64) * 2 - 1
            f_lo, f_hi = (1.0 + eps * float(u[0]), 1.0 + eps * float(u[1]))
            m.range_jitter = (f_lo, f_hi)
        out[name] = (f_lo, f_hi)
    return out
