"""Export quantized models in the ``compressed-tensors`` format (vLLM, llmcompressor and ``transformers`` read
it) — issue 14 §4, issue 15 (weight-only results).

What is written: every decoder linear's integer weight codes and their steps (and zero points for asymmetric
grids). The grid comes from one of two places:

* ``grids=None``: computed here with **this chapter's quantizer** (:func:`~shrink.quant.qparams` on the weight:
  round-to-nearest), so the weights ``transformers`` decompresses on reload are bit for bit the fake-quantized
  weights the chapter measured (tested);
* ``grids={"<block>.<path>": WeightGrid}``: the grids a quantizer used and returned —
  :func:`~shrink.quant.quantize_model` (RTN, GPTQ, RSQ's token-weighted GPTQ, rotated or not) and
  :func:`~shrink.quant.flexround.flexround_model` (learned ``s1``). The model's weights must lie on them (checked
  per linear: the codes are *read* from the weights, never re-rounded from a re-derived grid), and the reload is
  again bit for bit the quantized model (tested for GPTQ per channel and per group, RSQ with rotation,
  FlexRound, 2/3/4/8 bits).

Storage is the format ``compressed-tensors`` infers (8-bit per channel: ``int-quantized``, int8 tensors; below
8 bits: ``pack-quantized``, codes packed into int32, 1-8 bits). Asymmetric grids store their zero points:
``compressed-tensors`` uses signed codes, so a code ``q`` in ``[0, 2^b - 1]`` with zero point ``z`` is stored as
``q - 2^(b-1)`` with zero point ``z - 2^(b-1)`` (the same value ``(q - z) s``). ``lm_head`` and the embeddings
stay in full precision, as in the chapter; a model whose ``lm_head`` no longer equals its tied embedding
(rotation folded the final norm into it) is saved untied.

PB-LLM's mixed 1-bit / 8-bit matrices have no ``compressed-tensors`` scheme: :func:`export_pbllm` saves the
quantized weights densely (any ``transformers`` reloads them bit for bit) plus ``pbllm.safetensors``, the packed
form the bit accounting counts (salient bitmap, sign bits, 8-bit codes, per-row alpha/scale/zero), which
:func:`load_pbllm` unpacks back to the same weights (tested).

Activations (W8A8): the config declares dynamic per-token symmetric INT8 activations; the runtime that loads
the model computes them with *its* convention — ``compressed-tensors`` 0.20 divides the per-token max by
127.5 (half of the 255-wide range) where this chapter divides by 127 (``QuantSpec.narrow``) — so a reloaded
W8A8 model matches the chapter's weights exactly and its activations up to that step convention; the test
bounds the perplexity difference it causes. Weight-only exports reload with identical perplexity.

Not exported: static activation ranges; GPTQ ``act_order`` with groups (its groups are permuted, which needs
``compressed-tensors``' ``g_idx``; per-channel ``act_order`` exports).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import export as X
from ..models import decoder_blocks
from .fakequant import decoder_linears
from .quantizer import QuantError, QuantSpec, WeightGrid

STRATEGY = {"channel": "channel", "token": "channel", "tensor": "tensor", "group": "group"}


def _check(w_spec: QuantSpec, a_spec: QuantSpec | None) -> None:
    if not 2 <= w_spec.bits <= 8 or w_spec.granularity not in STRATEGY or w_spec.static \
            or (not w_spec.symmetric and w_spec.granularity == "tensor"):
        raise QuantError(f"export supports 2-8-bit weight grids per channel or group (symmetric or asymmetric) or "
                         f"per tensor (symmetric); got {w_spec.describe()}. Use e.g. QuantSpec(bits=4, "
                         "symmetric=False, granularity='group', group_size=128).")
    if a_spec is not None and not (a_spec.bits == 8 and a_spec.symmetric and not a_spec.static
                                   and a_spec.granularity == "token"):
        raise QuantError(f"export supports weight-only (a_spec=None) or W8A8 with dynamic per-token symmetric INT8 "
                         f"activations; got activations {a_spec.describe()}. Static ranges are not exported yet.")


def _scheme(w_spec: QuantSpec, a_spec: QuantSpec | None, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = QuantizationArgs(num_bits=w_spec.bits, type="int", symmetric=w_spec.symmetric,
                         strategy=STRATEGY[w_spec.granularity],
                         group_size=w_spec.group_size if w_spec.granularity == "group" else None)
    a = None if a_spec is None else QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token",
                                                     dynamic=True)
    return QuantizationScheme(targets=targets, weights=w, input_activations=a)


def _grid_spec(grids: dict[str, WeightGrid], w_spec: QuantSpec | None) -> QuantSpec:
    specs = {g.spec for g in grids.values()}
    if len(specs) != 1:
        raise QuantError(f"the grids mix {len(specs)} weight specs ({sorted(s.describe() for s in specs)}); one "
                         "compressed-tensors scheme holds one: export models quantized with one spec.")
    (spec,) = specs
    if w_spec is not None and w_spec != spec:
        raise QuantError(f"w_spec {w_spec.describe()} differs from the grids' {spec.describe()}; pass w_spec=None "
                         "(the grids say what they are) or the spec the model was quantized with.")
    if any(g.g_idx is not None for g in grids.values()):
        raise QuantError("GPTQ act_order with groups permutes the groups (g_idx), which this exporter does not "
                         "write; quantize with act_order=False, or per channel (act_order is fine there).")
    return spec


def _untie_if_changed(model: nn.Module) -> bool:
    """Save untied when ``lm_head`` no longer equals the input embedding (e.g. a rotation folded the final norm
    into it); returns whether the config was changed."""
    cfg = getattr(model, "config", None)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if cfg is None or not getattr(cfg, "tie_word_embeddings", False) or head is None:
        return False
    if head.weight is emb.weight or torch.equal(head.weight, emb.weight):
        return False
    cfg.tie_word_embeddings = False
    if hasattr(cfg, "get_text_config"):
        cfg.get_text_config().tie_word_embeddings = False
    return True


@torch.no_grad()
def export_quantized(model: nn.Module, out_dir, w_spec: QuantSpec | None = None, a_spec: QuantSpec | None = None,
                     *, grids: dict[str, WeightGrid] | None = None, tokenizer=None, what: dict | None = None,
                     overwrite: bool = False) -> dict:
    """Save ``model``'s decoder linears as integer codes on their grids (and declare ``a_spec``).

    Args:
        model: plain float model (not wrapped by :func:`~shrink.quant.wrap_model`); modified (its linears carry
            the compressed tensors afterwards) — export a copy if you need the float model.
        w_spec: the weight grid to round to (``grids=None``), or None / the grids' spec.
        a_spec: None (weight-only) or dynamic per-token symmetric INT8 activations (W8A8).
        grids: ``{"<block>.<path>": WeightGrid}`` from a weight-only quantizer (``result["grids"]``); the weights
            must lie on them. None: round to ``w_spec`` here (RTN).
    Returns the manifest (``what`` holds the format, the specs, the linears, ``grid_source``, ``untied``).
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus,
                                                 apply_quantization_config)

    if grids is not None:
        w_spec = _grid_spec(grids, w_spec)
    elif w_spec is None:
        raise QuantError("export_quantized needs w_spec (to round here) or grids (from quantize_model / "
                         "flexround_model: result['grids']).")
    _check(w_spec, a_spec)
    if any(type(m).__name__ == "QuantLinear" for m in model.modules()):
        raise QuantError("export_quantized needs the plain float model; call shrink.quant.unwrap_model(model) first "
                         "(the exporter quantizes the weights itself, with the same quantizer).")
    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    names = [f"{prefix}.{n}" for n in decoder_linears(model)]
    rel = {f"{prefix}.{n}": n for n in decoder_linears(model)}
    if grids is not None and set(grids) != set(rel.values()):
        missing, extra = sorted(set(rel.values()) - set(grids)), sorted(set(grids) - set(rel.values()))
        raise QuantError(f"the grids do not match the model's decoder linears (missing {missing[:4]}, unknown "
                         f"{extra[:4]}): pass the grids returned by quantizing this model.")
    fq = {}
    for n in names:  # every check before anything is written
        w = model.get_submodule(n).weight.detach()
        if grids is None:  # round-to-nearest here: compressed-tensors rounds the float weights onto this grid
            fq[n] = WeightGrid.of(w, w_spec)
        else:
            grids[rel[n]].codes(w, name=n)  # raises unless the weights lie on the quantizer's grid
            fq[n] = grids[rel[n]]
    out = X.check_out_dir(out_dir, overwrite)
    untied = _untie_if_changed(model)
    offset = 0 if w_spec.symmetric else 2 ** (w_spec.bits - 1)  # compressed-tensors' codes are signed
    cfg = QuantizationConfig(config_groups={"group_0": _scheme(w_spec, a_spec, [f"re:^{n}$" for n in names])},
                             quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, cfg)
    for n in names:
        lin, g = model.get_submodule(n), fq[n]
        scale, zero = (g.scale[:1, :1], g.zero[:1, :1]) if w_spec.granularity == "tensor" else (g.scale, g.zero)
        lin.weight_scale.data = scale.to(lin.weight_scale.dtype).reshape(lin.weight_scale.shape).clone()
        zp = (zero - offset).round().to(lin.weight_zero_point.dtype).reshape(lin.weight_zero_point.shape)
        lin.weight_zero_point.data = zp.clone()
    # symmetric: the format compressed-tensors infers (int-quantized at 8 bits, pack-quantized below); asymmetric:
    # int-quantized (one int8 per code, zero points unpacked) — transformers 5.24 / compressed-tensors 0.20 build the
    # empty model of a pack-quantized checkpoint with *unpacked* zero points and cannot load packed ones.
    from loguru import logger  # compressed-tensors warns that int-quantized is not the format it would infer

    logger.disable("compressed_tensors")
    try:
        comp = ModelCompressor.from_pretrained_model(model, quantization_format=None if w_spec.symmetric
                                                     else "int-quantized")
    finally:
        logger.enable("compressed_tensors")
    fmt = getattr(getattr(comp.quantization_config, "format", None), "value", None) or str(comp.quantization_config.format)
    comp.compress_model(model)
    model.save_pretrained(out, safe_serialization=True)
    comp.update_config(str(out))
    info = {"kind": "quantized", "format": fmt, "w_spec": w_spec.to_dict(),
            "a_spec": None if a_spec is None else a_spec.to_dict(), "linears": names,
            "grid_source": "rtn (computed at export)" if grids is None else "the quantizer's grids",
            "untied": untied, **(what or {})}
    return X.save(model, out, tokenizer=tokenizer, what=info, save_model=False)


def dequantized_reload(out_dir, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A ``compressed-tensors`` export reloaded with its weights decompressed to floats
    (``CompressedTensorsConfig(dequantize=True)``): what the round-trip tests compare bit for bit."""
    import warnings

    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    with warnings.catch_warnings():  # "the model already has a quantization_config": only dequantize is passed
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype,
                                                    quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


# --------------------------------------------------------------------------------------------------------------
# PB-LLM: mixed 1-bit / 8-bit matrices (no compressed-tensors scheme): dense weights + the packed sidecar
# --------------------------------------------------------------------------------------------------------------
PBLLM_FILE = "pbllm.safetensors"


def _pack_bits(b: torch.Tensor) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.packbits(b.flatten().numpy().astype(bool)))


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.unpackbits(packed.numpy(), count=n).astype(bool))


@torch.no_grad()
def export_pbllm(model: nn.Module, out_dir, params: dict[str, dict], spec, *, tokenizer=None,
                 what: dict | None = None, overwrite: bool = False) -> dict:
    """Save a PB-LLM model (:func:`shrink.quant.pbllm.pbllm_model` with ``keep_params=True``).

    ``model.safetensors`` holds the quantized weights densely (``transformers`` reloads them bit for bit, no
    Shrink code needed); ``pbllm.safetensors`` holds each linear in the packed form PB-LLM's bit accounting counts:
    ``<name>.mask`` (salient bitmap, ``np.packbits``), ``<name>.sign`` (one bit per non-salient weight),
    ``<name>.codes`` (uint8, the salient weights' codes on the row's ``high_bits`` grid, row-major),
    ``<name>.alpha / .scale / .zero`` (float32 ``[rows]``), ``<name>.shape``. :func:`load_pbllm` unpacks it. The
    weights must be the ones the params describe (checked: every linear is rebuilt and compared before writing).
    """
    from safetensors.torch import save_file

    from .pbllm import accounting_of_masks

    hs = spec.high_spec
    if hs.bits > 8:
        raise QuantError(f"export_pbllm stores salient codes as uint8; high_bits={hs.bits} needs more")
    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    rel = {n: f"{prefix}.{n}" for n in decoder_linears(model)}
    if set(params) != set(rel):
        raise QuantError(f"params do not match the model's decoder linears (missing {sorted(set(rel) - set(params))[:4]}"
                         f", unknown {sorted(set(params) - set(rel))[:4]}): run pbllm_model(..., keep_params=True) on "
                         "this model and pass result['params'].")
    tensors = {}
    for n, p in params.items():
        w = model.get_submodule(rel[n]).weight.detach().float()
        mask = p["mask"]
        s, z = p["scale"].unsqueeze(1), p["zero"].unsqueeze(1)
        codes = (torch.round(w / s) + z).clamp(hs.qmin, hs.qmax)
        tensors.update({f"{n}.mask": _pack_bits(mask), f"{n}.sign": _pack_bits(w[~mask] >= 0),
                        f"{n}.codes": codes[mask].to(torch.uint8), f"{n}.alpha": p["alpha"].float(),
                        f"{n}.scale": p["scale"].float(), f"{n}.zero": p["zero"].float(),
                        f"{n}.shape": torch.tensor(list(w.shape))})
        back = _unpack_one(tensors, n)
        if not torch.equal(back, w):
            raise QuantError(f"{rel[n]}: the weights are not the PB-LLM result the params describe (max diff "
                             f"{float((back - w).abs().max()):.3g}); export right after pbllm_model(..., "
                             "keep_params=True), before changing the model.")
    out = X.check_out_dir(out_dir, overwrite)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / PBLLM_FILE))
    acc = accounting_of_masks([p["mask"] for p in params.values()], hs.bits)
    info = {"kind": "quantized", "format": "dense + pbllm.safetensors (PB-LLM packed)", "pbllm_spec": spec.to_dict(),
            "linears": list(rel.values()), "bits": acc, **(what or {})}
    return X.save(model, out, tokenizer=tokenizer, what=info)


def _unpack_one(t: dict, n: str) -> torch.Tensor:
    rows, d = (int(v) for v in t[f"{n}.shape"])
    mask = _unpack_bits(t[f"{n}.mask"], rows * d).view(rows, d)
    alpha = t[f"{n}.alpha"].unsqueeze(1).expand(rows, d)
    sign = _unpack_bits(t[f"{n}.sign"], int((~mask).sum()))
    w = torch.empty(rows, d, dtype=torch.float32)
    w[~mask] = torch.where(sign, alpha[~mask], -alpha[~mask])
    s, z = (t[f"{n}.{k}"].unsqueeze(1).expand(rows, d) for k in ("scale", "zero"))
    w[mask] = (t[f"{n}.codes"].float() - z[mask]) * s[mask]
    return w


def load_pbllm(out_dir) -> dict[str, torch.Tensor]:
    """``{"<block>.<path>": float32 [rows, d]}``: every linear rebuilt from ``pbllm.safetensors`` alone."""
    from pathlib import Path

    from safetensors.torch import load_file

    p = Path(out_dir) / PBLLM_FILE
    if not p.exists():
        raise QuantError(f"{p} is missing: {out_dir} is not a PB-LLM export (shrink.quant.export.export_pbllm).")
    t = load_file(str(p))
    return {k[:-len(".shape")]: _unpack_one(t, k[:-len(".shape")]) for k in t if k.endswith(".shape")}
