"""Export quantized models in the ``compressed-tensors`` format (vLLM, llmcompressor and ``transformers`` read
it) — issue 14 §4.

What is written: every decoder linear's integer weight codes and their steps, computed with **this chapter's
quantizer** (:func:`~shrink.quant.qparams` on the weight, symmetric; zero point 0), so the weights that
``transformers`` decompresses on reload are bit for bit the fake-quantized weights the chapter measured
(tested). The storage format is the one ``compressed-tensors`` infers (W8A8: ``int-quantized``, int8 tensors;
weight-only: ``pack-quantized``, codes packed into int32). ``lm_head`` and the embeddings stay in full precision, as in the chapter.

Activations (W8A8): the config declares dynamic per-token symmetric INT8 activations; the runtime that loads
the model computes them with *its* convention — ``compressed-tensors`` 0.20 divides the per-token max by
127.5 (half of the 255-wide range) where this chapter divides by 127 (``QuantSpec.narrow``) — so a reloaded
W8A8 model matches the chapter's weights exactly and its activations up to that step convention; the test
bounds the perplexity difference it causes. Weight-only exports reload with identical perplexity.

Not exported yet: static activation ranges, asymmetric grids, and GPTQ results (GPTQ's per-group grids are
not kept by :func:`~shrink.quant.quantize_model`; exporting them needs those grids, not a re-derivation).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import export as X
from ..models import decoder_blocks
from .fakequant import decoder_linears
from .quantizer import QuantError, QuantSpec, qparams, range_of

STRATEGY = {"channel": "channel", "token": "channel", "tensor": "tensor", "group": "group"}


def _check(w_spec: QuantSpec, a_spec: QuantSpec | None) -> None:
    if not w_spec.symmetric or w_spec.bits not in (4, 8) or w_spec.granularity not in STRATEGY:
        raise QuantError(f"export supports symmetric INT8/INT4 weights per channel, tensor or group; got "
                         f"{w_spec.describe()}. Use QuantSpec(bits=8 or 4, symmetric=True, granularity='channel' "
                         "or 'group').")
    if a_spec is not None and not (a_spec.bits == 8 and a_spec.symmetric and not a_spec.static
                                   and a_spec.granularity == "token"):
        raise QuantError(f"export supports weight-only (a_spec=None) or W8A8 with dynamic per-token symmetric INT8 "
                         f"activations; got activations {a_spec.describe()}. Static ranges are not exported yet.")


def _scheme(w_spec: QuantSpec, a_spec: QuantSpec | None, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = QuantizationArgs(num_bits=w_spec.bits, type="int", symmetric=True, strategy=STRATEGY[w_spec.granularity],
                         group_size=w_spec.group_size if w_spec.granularity == "group" else None)
    a = None if a_spec is None else QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token",
                                                     dynamic=True)
    return QuantizationScheme(targets=targets, weights=w, input_activations=a)


@torch.no_grad()
def export_quantized(model: nn.Module, out_dir, w_spec: QuantSpec, a_spec: QuantSpec | None = None, *,
                     tokenizer=None, what: dict | None = None, overwrite: bool = False) -> dict:
    """Quantize ``model``'s decoder linears with ``w_spec`` (and declare ``a_spec``) and save them compressed.

    ``model`` must be plain (not wrapped by :func:`~shrink.quant.wrap_model`); it is modified (its linears carry
    the compressed tensors afterwards) — export a copy if you need the float model. Returns the manifest.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus,
                                                 apply_quantization_config)

    _check(w_spec, a_spec)
    if any(type(m).__name__ == "QuantLinear" for m in model.modules()):
        raise QuantError("export_quantized needs the plain float model; call shrink.quant.unwrap_model(model) first "
                         "(the exporter quantizes the weights itself, with the same quantizer).")
    blocks = decoder_blocks(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    names = [f"{prefix}.{n}" for n in decoder_linears(model)]
    out = X.check_out_dir(out_dir, overwrite)
    fq = {}
    for n in names:
        lin = model.get_submodule(n)
        w = lin.weight.detach().float()
        lo, hi = range_of(w, w_spec)
        s, _ = qparams(lo, hi, w_spec)
        fq[n] = s.reshape(w.shape[0], -1) if w_spec.granularity == "group" else s.reshape(-1, 1)
    cfg = QuantizationConfig(config_groups={"group_0": _scheme(w_spec, a_spec, [f"re:^{n}$" for n in names])},
                             quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, cfg)
    for n in names:
        lin = model.get_submodule(n)
        scale = fq[n] if w_spec.granularity != "tensor" else fq[n].reshape(1)
        lin.weight_scale.data = scale.to(lin.weight_scale.dtype).reshape(lin.weight_scale.shape).clone()
        lin.weight_zero_point.data.zero_()
    comp = ModelCompressor.from_pretrained_model(model)  # format inferred by compressed-tensors
    fmt = getattr(getattr(comp.quantization_config, "format", None), "value", None) or str(comp.quantization_config.format)
    comp.compress_model(model)
    model.save_pretrained(out, safe_serialization=True)
    comp.update_config(str(out))
    info = {"kind": "quantized", "format": fmt, "w_spec": w_spec.to_dict(),
            "a_spec": None if a_spec is None else a_spec.to_dict(), "linears": names, **(what or {})}
    return X.save(model, out, tokenizer=tokenizer, what=info, save_model=False)
