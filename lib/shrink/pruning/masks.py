"""Boolean pruning masks: selection by score, N:M patterns, keeping masks applied, sparsity checks.

A mask is a ``torch.bool`` tensor with the weight's shape, ``True`` = **kept**. Sparse weights are stored
dense (zeros in place) next to their mask; :class:`MaskSet` keeps them applied through later training
(gradient masking + re-masking after every optimiser step), the recipe the SparseGPT maintainers give
for fine-tuning sparse models (``IST-DASLab/sparsegpt#17``) and what the "Rethinking" code achieves with
``mask * weight`` in the forward.

Comparison groups (which weights compete for survival):

* ``"matrix"``   one threshold per weight matrix (magnitude pruning, Wanda's and SparseGPT's ``--gmp``).
* ``"row"``      one threshold per output row (Wanda, Sun et al. 2024, Sec. 3 "comparison group").
* N:M            in every group of ``M`` consecutive input columns of a row, the ``N`` lowest scores are
  pruned (SparseGPT ``--prunen N --prunem M``; "2:4" prunes 2 of every 4).

Ties are broken by index (stable sort), so the pruned count is *exact*: ``int(numel * sparsity)`` per
matrix, ``int(cols * sparsity)`` per row. (A ``score > threshold`` rule, as in the official magnitude
code, prunes more than asked when weights tie, e.g. 50.009 % on the Q4_1-derived SmolLM2 weights.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ShrinkError


class PruningError(ShrinkError, ValueError):
    """Bad pruning input (pattern, sparsity, shapes, a violated sparsity invariant)."""


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: unstructured at ``sparsity`` or N:M (``n`` pruned in every ``m``)."""

    sparsity: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"unstructured-{self.sparsity:g}"


def parse_pattern(pattern: str, sparsity: float = 0.5) -> Pattern:
    """``"unstructured"`` (with ``sparsity``) or ``"N:M"`` (e.g. ``"2:4"``, ``"4:8"``; sparsity = N/M).

    Raises :class:`PruningError` for anything else.
    """
    try:
        ok = not isinstance(sparsity, (str, bool)) and 0.0 <= float(sparsity) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise PruningError(f"sparsity must be a number in [0, 1), got {sparsity!r}; e.g. sparsity=0.5 (half the "
                           "weights), or an N:M pattern such as '2:4'.")
    if pattern == "unstructured":
        return Pattern(float(sparsity))
    match = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if not match:
        raise PruningError(f"unknown sparsity pattern {pattern!r}; use 'unstructured', '2:4' or '4:8' (N:M).")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise PruningError(f"N:M pattern needs 0 < N < M, got {pattern!r}; use e.g. '2:4' or '4:8'.")
    return Pattern(n / m, n, m)


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning exactly the ``k`` lowest entries of ``scores`` along the last dim (ties by index).

    Equivalent to pruning the first ``k`` entries of a stable ascending sort, computed in O(n) per slice:
    the ``k``-th smallest value ``v`` (``kthvalue``), all entries ``< v``, and the lowest-index entries ``== v``
    until ``k`` are pruned.

    Args:
        scores: float ``[..., n]``.
        k: number pruned per slice, ``0 <= k <= n``.
    Returns:
        bool ``[..., n]`` (``True`` = kept).
    """
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise PruningError(f"cannot prune {k} of {n} entries")
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    thr = scores.kthvalue(k, dim=-1, keepdim=True).values
    below = scores < thr
    ties = scores == thr
    need = k - below.sum(-1, keepdim=True)
    prune = below | (ties & (ties.cumsum(-1) <= need))
    return ~prune


def score_mask(scores: torch.Tensor, pattern: Pattern, group: str = "matrix") -> torch.Tensor:
    """Keep-mask from a score matrix (higher = more important).

    Args:
        scores: float ``[rows, cols]``.
        pattern: :class:`Pattern`; for N:M ``cols`` must be divisible by ``m``.
        group: ``"matrix"`` (one threshold for the matrix) or ``"row"`` (per output row); ignored for N:M.
    Returns:
        bool ``[rows, cols]``.
    """
    if scores.dim() != 2:
        raise PruningError(f"scores must be 2-D [rows, cols], got shape {tuple(scores.shape)}")
    rows, cols = scores.shape
    if pattern.is_nm:
        if cols % pattern.m:
            raise PruningError(f"{pattern} needs cols divisible by {pattern.m}; got {cols} columns")
        return lowest_k_mask(scores.reshape(rows, cols // pattern.m, pattern.m), pattern.n).reshape(rows, cols)
    if group == "row":
        return lowest_k_mask(scores, int(cols * pattern.sparsity))
    if group == "matrix":
        return lowest_k_mask(scores.reshape(1, -1), int(scores.numel() * pattern.sparsity)).reshape(rows, cols)
    raise PruningError(f"unknown comparison group {group!r}; use 'matrix' or 'row'")


def check_mask(mask: torch.Tensor, pattern: Pattern, group: str = "matrix", name: str = "weight",
               blocksize: int = 128) -> dict:
    """Assert the exact sparsity invariant of ``mask`` (bool ``[rows, cols]``) and return counts.

    * unstructured, ``group="matrix"``: exactly ``int(numel*s)`` pruned;
    * unstructured, ``group="row"``: exactly ``int(cols*s)`` pruned in every row;
    * ``group="block"``: SparseGPT's adaptive mask: exactly ``int(rows*w*s)`` pruned in every
      ``blocksize``-column block of width ``w``;
    * N:M: exactly ``n`` pruned in every group of ``m`` columns of every row.

    Raises :class:`PruningError` naming the matrix on violation.
    """
    rows, cols = mask.shape
    pruned = (~mask).sum().item()
    info = {"name": name, "numel": mask.numel(), "pruned": int(pruned), "sparsity": pruned / mask.numel()}
    if pattern.is_nm:
        per = (~mask).reshape(rows, cols // pattern.m, pattern.m).sum(-1)
        ok = bool((per == pattern.n).all())
        want = f"{pattern.n} pruned per group of {pattern.m}"
    elif group == "row":
        per = (~mask).sum(1)
        ok = bool((per == int(cols * pattern.sparsity)).all())
        want = f"{int(cols * pattern.sparsity)} pruned per row"
    elif group == "block":
        ok, want = True, f"exact count per {blocksize}-column block"
        for c0 in range(0, cols, blocksize):
            blk = mask[:, c0:c0 + blocksize]
            ok &= int((~blk).sum()) == int(blk.numel() * pattern.sparsity)
    else:
        ok = pruned == int(mask.numel() * pattern.sparsity)
        want = f"{int(mask.numel() * pattern.sparsity)} pruned in the matrix"
    if not ok:
        raise PruningError(f"{name}: mask violates the {pattern} invariant ({want}); measured sparsity "
                           f"{info['sparsity']:.6f}. The mask was changed after pruning or the pruner is wrong.")
    return info


class MaskSet:
    """Masks of named parameters, kept applied through training.

    Args:
        model: the module the names refer to (``model.get_parameter(name)``).
        masks: ``{parameter name: bool tensor of the parameter's shape}`` (``True`` = kept).

    ``apply()`` zeroes pruned weights; ``hook_gradients()`` registers gradient hooks that zero the gradient
    of pruned weights (so Adam never moves them) and returns the handles; ``verify()`` checks that every
    pruned weight is exactly zero.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor] | None = None):
        self.model = model
        self.masks: dict[str, torch.Tensor] = {}
        for name, m in (masks or {}).items():
            self.add(name, m)

    def add(self, name: str, mask: torch.Tensor) -> None:
        p = self.model.get_parameter(name)
        if mask.dtype != torch.bool or mask.shape != p.shape:
            raise PruningError(f"mask for {name} must be bool {tuple(p.shape)}, got {mask.dtype} "
                               f"{tuple(mask.shape)}")
        self.masks[name] = mask.to(p.device)

    def __len__(self) -> int:
        return len(self.masks)

    def __iter__(self):
        return iter(self.masks.items())

    @torch.no_grad()
    def apply(self) -> None:
        for name, m in self.masks.items():
            self.model.get_parameter(name).mul_(m)

    def hook_gradients(self) -> list:
        handles = []
        for name, m in self.masks.items():
            p = self.model.get_parameter(name)
            handles.append(p.register_hook(lambda g, m=m: g * m))
        return handles

    @torch.no_grad()
    def verify(self) -> None:
        for name, m in self.masks.items():
            bad = int((self.model.get_parameter(name)[~m] != 0).sum())
            if bad:
                raise PruningError(f"{name}: {bad} pruned weights are non-zero; call MaskSet.apply() after "
                                   "every optimiser step (or hook the gradients).")

    def sparsity(self) -> dict:
        """``{name: fraction pruned}`` and the overall fraction under key ``"__all__"``."""
        out = {n: float((~m).float().mean()) for n, m in self.masks.items()}
        tot = sum(m.numel() for m in self.masks.values())
        out["__all__"] = sum(int((~m).sum()) for m in self.masks.values()) / max(tot, 1)
        return out
