"""Export a pruned model: weights (zeros in place), its masks and the sparsity report (issue 14 §4).

Writes ``save_pretrained`` safetensors (``transformers`` reloads it as a plain dense model whose pruned
weights are exactly zero), ``masks.safetensors`` (every mask bit-packed along its last dim, uint8, with the
shapes in the manifest) and the per-linear report of :func:`shrink.export.linear_report`. Reload is bit
for bit: same weights, same perplexity (tested).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import export as X
from .masks import MaskSet, PruningError


def _masks(masks) -> dict[str, torch.Tensor]:
    d = masks.masks if isinstance(masks, MaskSet) else masks
    if not isinstance(d, dict) or not d:
        raise PruningError("export_pruned needs the masks the pruner returned (a MaskSet or {name: bool tensor}); "
                           "pass result.masks from prune_model.")
    return d


def export_pruned(model: nn.Module, masks, out_dir, *, tokenizer=None, what: dict | None = None,
                  overwrite: bool = False) -> dict:
    """Save a pruned model and its masks; returns the manifest.

    Raises :class:`PruningError` when a pruned position holds a non-zero weight (the model is not what its
    masks say: re-apply them with ``MaskSet.apply()``) — nothing is written then.
    """
    from safetensors.torch import save_file

    d = _masks(masks)
    bad = {}
    for name, m in d.items():
        p = model.get_parameter(name)
        n = int((p.detach()[~m] != 0).sum())
        if n:
            bad[name] = n
    if bad:
        first = next(iter(bad))
        raise PruningError(f"{len(bad)} linears hold non-zero weights at pruned positions (e.g. {first}: "
                           f"{bad[first]}); re-apply the masks (MaskSet.apply()) before exporting.")
    out = X.check_out_dir(out_dir, overwrite)
    packed, shapes = {}, {}
    for name, m in d.items():
        packed[name] = torch.from_numpy(np.packbits(m.cpu().numpy(), axis=-1))
        shapes[name] = list(m.shape)
    model.save_pretrained(out, safe_serialization=True)
    save_file(packed, str(Path(out) / "masks.safetensors"))
    report = X.linear_report(model)
    kept = sum(int(m.sum()) for m in d.values())
    total = sum(m.numel() for m in d.values())
    info = {"kind": "pruned", "mask_shapes": shapes, "sparsity": 1 - kept / total, "linears": report,
            **(what or {})}
    return X.save(model, out, tokenizer=tokenizer, what=info, save_model=False)


def load_masks(out_dir) -> dict[str, torch.Tensor]:
    """The bool masks saved by :func:`export_pruned` (``True`` = kept)."""
    from safetensors.torch import load_file

    shapes = X.read_manifest(out_dir)["what"]["mask_shapes"]
    packed = load_file(str(Path(out_dir) / "masks.safetensors"))
    return {n: torch.from_numpy(np.unpackbits(packed[n].numpy(), axis=-1, count=s[-1]).astype(bool)).reshape(s)
            for n, s in shapes.items()}
