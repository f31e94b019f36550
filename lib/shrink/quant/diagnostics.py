"""Outlier diagnostics: massive activations, attention sinks, per-linear-input statistics, kurtosis.

Builds on :func:`shrink.probe.residual_stats` (re-exported here; it takes ``prefix=``) with:

* :func:`residual_stats` — the same per-layer top-1/2/3/median of ``hidden_states[l]``, on text positions
  only, optionally after a :class:`~shrink.models.KVPrefix` (CushionCache Fig. 2 analogue).
* :func:`linear_input_stats` — top-1/2/3, median and kurtosis of every quantized decoder-linear input
  (the tensors that are actually quantized; bits.md §1.3).
* :func:`attention_mass` — mean attention each key position receives (CushionCache Fig. 3 analogue).
* :func:`table5_stats` — top-1 / top-10 % / median of |x| at the input of a block (CushionCache Table 5).
* :func:`massive_intervention` — Sun et al.'s check: set the massive activation to its mean or to zero.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..models import KVPrefix, decoder_blocks
from ..probe import magnitude_stats, residual_stats  # noqa: F401 - re-exported
from .fakequant import decoder_linears


def kurtosis(x: torch.Tensor) -> float:
    """Pearson kurtosis ``E[(x - mu)^4] / sigma^4`` of all entries (3 for a Gaussian; Bondarenko et al.)."""
    x = x.double().flatten()
    c = x - x.mean()
    return float(c.pow(4).mean() / c.pow(2).mean().pow(2).clamp(min=1e-30))


def _kw(prefix: KVPrefix | None, b: int) -> dict:
    return {} if prefix is None else {"past_key_values": prefix.cache(b), "use_cache": True}


@torch.no_grad()
def linear_input_stats(model: nn.Module, ids: torch.Tensor, prefix: KVPrefix | None = None) -> dict[str, dict]:
    """``{linear name: {top1, top2, top3, median, ratio, kurtosis, token, channel}}`` of every decoder-linear
    input (text positions of ``ids`` ``[B, T]``; prefix positions are in the cache, never seen)."""
    stats: dict[str, dict] = {}
    hooks = []
    for name, lin in decoder_linears(model).items():
        def hook(_m, args, name=name):
            a = args[0].detach().float()
            r = magnitude_stats(a.abs())
            r["ratio"] = r["top1"] / max(r["median"], 1e-12)
            r["kurtosis"] = kurtosis(a)
            stats[name] = r
        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        model(input_ids=ids, **_kw(prefix, ids.shape[0]))
    finally:
        for h in hooks:
            h.remove()
    return stats


@torch.no_grad()
def attention_mass(model: nn.Module, ids: torch.Tensor, prefix: KVPrefix | None = None, *,
                   query_start: int = 0) -> torch.Tensor:
    """Mean attention probability each key position receives, per layer: fp32 ``[L, P + T]``.

    Averaged over the batch, heads and the queries ``query_start..T-1`` (text positions). Key positions
    ``0..P-1`` are the prefix. Uses eager attention for the duration of the call (weights are needed).
    """
    old = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        att = model(input_ids=ids, output_attentions=True, **_kw(prefix, ids.shape[0])).attentions
    finally:
        model.set_attn_implementation(old)
    return torch.stack([a[:, :, query_start:].float().mean(dim=(0, 1, 2)) for a in att])


@torch.no_grad()
def table5_stats(model: nn.Module, ids: torch.Tensor, prefix: KVPrefix | None = None, *, block: int = -1) -> dict:
    """CushionCache Table 5: top-1, top-10 % (the 90th percentile of |x|) and median of |x| at the input
    of decoder block ``block`` (default the last), text positions only, over ``ids`` ``[B, T]``."""
    blocks = decoder_blocks(model)
    store = {}

    def hook(_m, args, kwargs):
        store["x"] = (args[0] if args else kwargs["hidden_states"]).detach().abs().float().reshape(-1)

    h = blocks[block].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(input_ids=ids, **_kw(prefix, ids.shape[0]))
    finally:
        h.remove()
    a = store["x"]
    k = max(1, int(0.9 * a.numel()))
    return {"top1": float(a.max()), "top10pct": float(a.kthvalue(k).values), "median": float(a.median())}


@contextlib.contextmanager
def massive_intervention(model: nn.Module, layer: int, channels: list[int], values: torch.Tensor | float,
                         position: int = 0):
    """Overwrite ``hidden_states[layer + 1][:, position, channels]`` (the output of block ``layer``) with
    ``values`` during forwards without a prefix — Sun et al.'s check (mean: harmless; zero: destructive)."""
    blk = decoder_blocks(model)[layer]
    vals = torch.as_tensor(values, dtype=torch.float32)

    def hook(_m, _args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, position, channels] = vals.to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = blk.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
