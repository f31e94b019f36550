"""Compressed models out, in formats others load (issue 14 §4): the part every axis shares.

:func:`save` writes a model with ``transformers``' ``save_pretrained`` (safetensors), its tokenizer when it
has one, and ``shrink_export.json`` (what was done, per-linear report, versions, code hash, sha256 of every
file); :func:`reload` loads it back with ``AutoModelForCausalLM.from_pretrained`` (no Shrink code needed on
the other side — for quantized exports ``compressed-tensors`` is what ``transformers``, vLLM and
llmcompressor use to read them); :func:`linear_report` gives the sparsity and storage dtype of every
linear, which the exporters check against what was asked.

The axis-specific exporters: :func:`shrink.pruning.export.export_pruned` (masks + sparsity report; reload
is bit-identical) and :func:`shrink.quant.export.export_quantized` (W8A8 / weight-only INT8/INT4 in the
``compressed-tensors`` format). The CLI: ``shrink export OUT_DIR --prune wanda:0.5`` or ``--quant w8a8``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import env
from .errors import BadInputError

MANIFEST = "shrink_export.json"


def linear_report(model: nn.Module) -> dict[str, dict]:
    """``{name: {"shape", "dtype", "zeros", "numel", "sparsity"}}`` of every ``nn.Linear`` (its stored weight)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and isinstance(getattr(mod, "weight", None), torch.Tensor):
            w = mod.weight
            zeros = int((w == 0).sum())
            out[name] = {"shape": list(w.shape), "dtype": str(w.dtype).replace("torch.", ""), "zeros": zeros,
                         "numel": w.numel(), "sparsity": zeros / max(w.numel(), 1)}
    return out


def check_out_dir(out_dir, overwrite: bool = False) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BadInputError(f"export folder {out} is not empty; pass a new folder (or overwrite=True / --overwrite "
                            "to replace its files).")
    out.mkdir(parents=True, exist_ok=True)
    return out


def save(model: nn.Module, out_dir, *, tokenizer=None, what: dict, save_model: bool = True) -> dict:
    """Save ``model`` (unless ``save_model=False``: the caller already wrote it) and the manifest."""
    out = Path(out_dir)
    if save_model:
        model.save_pretrained(out, safe_serialization=True)
    tok_saved = False
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
        tok_saved = True
    files = {p.name: env.sha256_file(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"what": what, "tokenizer_saved": tok_saved, "files": files, "versions": env.versions(),
                "code_hash": env.code_hash(), "model": getattr(model, "shrink_info", {}).get("name")}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    return manifest


def reload(out_dir, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The exported model as anyone loads it: ``AutoModelForCausalLM.from_pretrained(out_dir)`` (eval mode)."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if not (out / "config.json").exists():
        raise BadInputError(f"{out} holds no exported model (no config.json); export one first with "
                            "`shrink export OUT_DIR ...`.")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    return model.eval()


def read_manifest(out_dir) -> dict:
    p = Path(out_dir) / MANIFEST
    if not p.exists():
        raise BadInputError(f"{p} is missing: {out_dir} was not written by shrink export.")
    return json.loads(p.read_text())
