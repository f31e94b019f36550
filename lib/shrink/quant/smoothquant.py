"""SmoothQuant (Xiao et al., ICML 2023): migrate activation outliers into the weights.

Per input channel ``j`` of a smoothing point (SmoothQuant Eq. 4; ``smoothquant/smooth.py``)::

    s_j = max|X_j|^alpha / max_k |W_kj|^(1 - alpha)      (weight max over all consuming linears, clamp >= 1e-5)

and ``X diag(s)^-1 . diag(s) W^T`` is folded into the preceding norm (``norm.weight /= s``, also the bias
for LayerNorm) and the linears' input columns (``W[:, j] *= s_j``): the full-precision function is
unchanged (up to fp rounding), only the activation/weight ranges move.

Smoothing points (the two per block of SmoothQuant's code; ``o_proj``/``down_proj`` have no preceding
norm and are *not* smoothed — which is where LLaMA's massive activation enters, bits.md §2.1):

* LLaMA/Mistral: ``input_layernorm -> q/k/v_proj``; ``post_attention_layernorm -> gate/up_proj``.
* OPT: ``self_attn_layer_norm -> q/k/v_proj``; ``final_layer_norm -> fc1``.

O1/O2/O3 (SmoothQuant Table 2) are quantizer pairings, see :func:`shrink.quant.presets.smoothquant_level`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import KVPrefix, arch, decoder_blocks
from .fakequant import decoder_linears
from .quantizer import QuantError


@torch.no_grad()
def act_scales(model: nn.Module, calib_ids: torch.Tensor, *, prefix: KVPrefix | None = None,
               batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Per-input-channel abs-max of every decoder linear input (``get_act_scales`` of SmoothQuant).

    Args:
        calib_ids: int64 ``[n, L]`` calibration windows (SmoothQuant: 512 Pile sentences; here the
            handbook's calibration sampler — a documented deviation).
        prefix: optional KV prefix (its positions are not observed).

    Returns:
        ``{linear name: fp32 [in_features]}``.
    """
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for name, lin in decoder_linears(model).items():
        def hook(_m, args, name=name):
            a = args[0].detach().abs().float().reshape(-1, args[0].shape[-1]).amax(0)
            stats[name] = a if name not in stats else torch.maximum(stats[name], a)
        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        dev = next(model.parameters()).device
        for s in range(0, calib_ids.shape[0], batch_size):
            ids = calib_ids[s:s + batch_size].to(dev)
            kw = {} if prefix is None else {"past_key_values": prefix.cache(ids.shape[0]), "use_cache": True}
            model(input_ids=ids, **kw)
    finally:
        for h in hooks:
            h.remove()
    return stats


def smoothing_points(model: nn.Module) -> list[tuple[nn.Module, list[nn.Linear], str]]:
    """``[(norm, [linears], name of the first linear)]`` for every block (two per block)."""
    a = arch(model)
    pts = []
    for i, b in enumerate(decoder_blocks(model)):
        if a in ("llama", "mistral", "qwen2"):
            at, mlp = b.self_attn, b.mlp
            pts.append((b.input_layernorm, [at.q_proj, at.k_proj, at.v_proj], f"{i}.self_attn.q_proj"))
            pts.append((b.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], f"{i}.mlp.gate_proj"))
        elif a == "opt":
            at = b.self_attn
            pts.append((b.self_attn_layer_norm, [at.q_proj, at.k_proj, at.v_proj], f"{i}.self_attn.q_proj"))
            pts.append((b.final_layer_norm, [b.fc1], f"{i}.fc1"))
        else:
            raise QuantError(f"SmoothQuant smoothing points are defined for llama/mistral/qwen2/opt, not {a!r} "
                             "(its norm may not be a plain scale, e.g. Gemma's 1 + w)")
    return pts


@torch.no_grad()
def smooth_model(model: nn.Module, scales: dict[str, torch.Tensor], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Apply SmoothQuant in place (``smooth_lm``). Call on an *unwrapped* model, before :func:`wrap_model`.

    Args:
        scales: output of :func:`act_scales` on the same model.
        alpha: migration strength in [0, 1] (SmoothQuant default 0.5; CushionCache uses 0.8 for all models).

    Returns:
        ``{first linear name: s [in_features]}``, the smoothing factors applied.
    """
    if not 0.0 <= alpha <= 1.0:
        raise QuantError(f"alpha must be in [0, 1], got {alpha}")
    applied = {}
    for norm, fcs, key in smoothing_points(model):
        if key not in scales:
            raise QuantError(f"no activation scale for {key}; compute scales with act_scales() on this model")
        act = scales[key].to(fcs[0].weight.device).float()
        w_max = torch.stack([fc.weight.abs().amax(0).float() for fc in fcs]).amax(0).clamp(min=1e-5)
        s = (act.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
        norm.weight.div_(s.to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s.to(norm.bias.dtype))
        for fc in fcs:
            fc.weight.mul_(s.to(fc.weight.dtype).view(1, -1))
        applied[key] = s
    return applied
