"""The sequential pruning loop over decoder blocks with two activation streams (the loop itself is the core
:func:`shrink.blockwise.sequential`, shared with weight-only quantization; this module supplies the pruning).

"Rethinking Pruning LLMs" (Shin et al., EMNLP 2024), Sec. 3 and the official ``prune_model``; SparseGPT's
``opt_sequential`` and Wanda's ``prune_wanda`` for the LR part. Per unit (one block; two consecutive
blocks for CR):

1. **statistics**: the still-dense block runs on the *sparse stream* ``x_i`` (output of the already pruned
   blocks) over the first ``N`` calibration sequences; forward hooks accumulate Wanda's ``||X_j||^2`` or
   SparseGPT's Hessian once per group of linears sharing an input (:mod:`shrink.obs`). The same
   forward gives the BR target ``g_i(w_bar_i; x_i)`` (Eq. 2). Extra sequences (self-generated data) never
   enter the statistics, only the reconstruction loss (as in the official code);
2. the **dense stream** ``x_bar_{i+1} = g_i(w_bar_i; x_bar_i)`` is advanced before the block is pruned (or read
   from a cache of the dense model's activations, :func:`dense_streams`): the GP target;
3. **prune** every selected linear (magnitude / Wanda / SparseGPT; unstructured or N:M); masks are
   explicit bool tensors (:class:`~shrink.pruning.masks.MaskSet`);
4. **reconstruct** (BR, BR+GP, BR+GP+CR) with the mask fixed (:mod:`shrink.pruning.reconstruct`);
5. advance the sparse stream through the pruned block and log the normalised error (App. A) against the
   dense stream on the calibration sequences and on held-out sequences.

CR windows follow the official code: ``[0], [0,1], [1,2], ..., [L-2,L-1], [L-1]`` — every block is optimised
twice. Deviation (documented, not a parameter): a block keeps the mask it got when it was first pruned; the
official code re-runs the pruner on the whole window (identical masks for Wanda/magnitude; for SparseGPT it
re-solves OBS on already-zero weights). CR is implemented with GP targets (the paper's BR+GP+CR).

Activation buffers live on ``act_device`` (default CPU) and move to the model's device batch by batch.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..blockwise import dense_streams, embed_all, map_block, memory_estimate, sequential  # noqa: F401 (re-exported)
from ..models import BlockRunner
from ..obs import StatsCollector
from .magnitude import magnitude_mask
from .masks import MaskSet, Pattern, PruningError, check_mask, parse_pattern
from .reconstruct import ReconConfig, reconstruct
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_mask

PRUNERS = ("magnitude", "wanda", "sparsegpt")
SCHEMES = ("LR", "BR", "BR+GP", "BR+GP+CR")
TARGETS = ("all", "attn", "mlp")


@dataclass(frozen=True)
class PruneSpec:
    """What to prune and how (one cell of the paper's Tables 1/3/7).

    Attributes:
        pruner: ``magnitude`` | ``wanda`` | ``sparsegpt``.
        sparsity: fraction pruned for ``pattern="unstructured"`` (N:M fixes it to N/M).
        pattern: ``unstructured`` | ``"2:4"`` | ``"4:8"``.
        scheme: ``LR`` | ``BR`` | ``BR+GP`` | ``BR+GP+CR``.
        targets: which linears of each block: ``all`` | ``attn`` (names containing "attn") | ``mlp`` (the rest).
        blocksize, percdamp: SparseGPT's block width (128) and damping (0.01).
        batch: sequences per no-grad forward (memory knob; results do not depend on it).
        recon: :class:`ReconConfig` (ignored for LR).
    """

    pruner: str = "wanda"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    scheme: str = "LR"
    targets: str = "all"
    blocksize: int = 128
    percdamp: float = 0.01
    batch: int = 8
    recon: ReconConfig = field(default_factory=ReconConfig)

    def check(self) -> "PruneSpec":
        if self.pruner not in PRUNERS:
            raise PruningError(f"unknown pruner {self.pruner!r}; use one of {PRUNERS}")
        if self.scheme not in SCHEMES:
            raise PruningError(f"unknown scheme {self.scheme!r}; use one of {SCHEMES}")
        if self.targets not in TARGETS:
            raise PruningError(f"unknown targets {self.targets!r}; use one of {TARGETS}")
        parse_pattern(self.pattern, self.sparsity)
        for name in ("blocksize", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PruningError(f"PruneSpec.{name} must be a positive integer, got {v!r} (defaults: blocksize=128, "
                                   "batch=8)")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or not 0 < self.percdamp < 1:
            raise PruningError(f"PruneSpec.percdamp must be in (0, 1), got {self.percdamp!r} (SparseGPT uses 0.01)")
        self.recon.check()
        return self

    @property
    def pat(self) -> Pattern:
        return parse_pattern(self.pattern, self.sparsity)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PruneResult:
    """What :func:`prune_model` returns.

    ``blocks``: one dict per block (``block``, ``err_calib``, ``rel_calib``, ``tok0_calib``, and with held-out
    data ``err_test``, ``rel_test``, ``tok0_test``); ``final`` = the last block's dict; ``times`` in seconds
    (``stats`` = calibration forwards + statistics, ``solve`` = mask selection / OBS, ``recon`` = Adam,
    ``eval`` = stream advance + errors, ``total``); ``sparsity`` per linear and overall.
    """

    spec: PruneSpec
    masks: MaskSet
    blocks: list[dict]
    times: dict
    sparsity: dict
    memory_mb: float
    recon_losses: list[list[float]]

    @property
    def final(self) -> dict:
        return self.blocks[-1]

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "blocks": self.blocks, "final": self.final, "times": self.times,
                "sparsity": self.sparsity, "memory_mb": self.memory_mb,
                "recon_final_loss": [ls[-1] if ls else None for ls in self.recon_losses]}


def select_linears(block: nn.Module, targets: str = "all") -> dict[str, nn.Linear]:
    """Named ``nn.Linear`` modules of a block (``all`` | ``attn`` | ``mlp``); names relative to the block."""
    out = {}
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear):
            is_attn = "attn" in name
            if targets == "all" or (targets == "attn") == is_attn:
                out[name] = mod
    if not out:
        raise PruningError(f"no linear layers selected with targets={targets!r} in {type(block).__name__}")
    return out


def _mask_group(spec: PruneSpec) -> str:
    if spec.pattern != "unstructured":
        return "nm"
    return {"magnitude": "matrix", "wanda": "row", "sparsegpt": "block"}[spec.pruner]


def prune_model(model: nn.Module, calib_ids: torch.Tensor, spec: PruneSpec, *,
                heldout_ids: torch.Tensor | None = None, extra_ids: torch.Tensor | None = None,
                dense: list[torch.Tensor] | None = None, dense_heldout: list[torch.Tensor] | None = None,
                act_device: str | torch.device = "cpu", verbose: bool = True) -> PruneResult:
    """Prune ``model`` in place block by block, with optional reconstruction (paper Sec. 3).

    Args:
        model: a causal LM supported by :class:`shrink.models.BlockRunner` (weights are modified in place).
        calib_ids: int64 ``[N, T]`` calibration windows (statistics, reconstruction, ``err_calib``).
        spec: :class:`PruneSpec`.
        heldout_ids: int64 ``[Nh, Th]`` held-out windows for ``err_test`` per block (optional).
        extra_ids: int64 ``[M, T]`` extra sequences used **only** in the reconstruction loss (self-generated
            data, paper App. C), never in the pruner statistics.
        dense, dense_heldout: caches from :func:`dense_streams` of ``cat(calib_ids, extra_ids)`` and of
            ``heldout_ids`` (optional; computed on the fly otherwise).
        act_device: where activation buffers live (``"cpu"`` keeps GPU memory to one block).
        verbose: print the memory estimate and one line per block.
    Returns:
        :class:`PruneResult`.
    """
    spec.check()
    pat = spec.pat
    runner = BlockRunner(model)
    L = len(runner)
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
        raise PruningError("calib_ids must be int64 [N, T], got " + (f"{calib_ids.dtype} {tuple(calib_ids.shape)}"
                           if isinstance(calib_ids, torch.Tensor) else type(calib_ids).__name__)
                           + "; build it with shrink.data.calibration_set().")
    n_cal = calib_ids.shape[0]
    if n_cal == 0 or calib_ids.shape[1] < 2:
        raise PruningError(f"calib_ids is empty ({tuple(calib_ids.shape)}): pruning needs calibration windows; "
                           "pass shrink.data.calibration_set(tok, nsamples=16, seqlen=256) or similar.")
    for b, blk in enumerate(runner.blocks):
        for name, p in blk.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise PruningError(f"block {b} {name} holds NaN/inf weights before pruning: the model is broken "
                                   "(a corrupt cache or a diverged update). Reload it (shrink.models.load) first.")
    if extra_ids is not None and extra_ids.shape[1:] != calib_ids.shape[1:]:
        raise PruningError(f"extra_ids must have the calibration length {calib_ids.shape[1]}, "
                           f"got shape {tuple(extra_ids.shape)}")
    ids = calib_ids if extra_ids is None else torch.cat([calib_ids, extra_ids])
    if dense is not None and (len(dense) != L + 1 or dense[0].shape[:2] != ids.shape):
        raise PruningError("dense cache does not match: pass dense_streams(model, cat(calib_ids, extra_ids))")
    gp = "GP" in spec.scheme
    cr = spec.scheme.endswith("CR")
    d = runner.blocks[0].parameters().__next__().shape[-1]
    mem = memory_estimate(ids.shape[0], ids.shape[1], d, scheme=spec.scheme,
                          heldout=tuple(heldout_ids.shape) if heldout_ids is not None else (0, 0))
    if verbose:
        print(f"[shrink.pruning] {spec.pruner} {pat} {spec.scheme} targets={spec.targets}: {L} blocks, "
              f"calibration {n_cal}x{ids.shape[1]}" + (f" + {ids.shape[0] - n_cal} extra" if extra_ids is not None
                                                          else "") + f"; activation buffers ~{mem:.0f} MB on {act_device}")
    block_names = {id(m): n for n, m in model.named_modules()}
    masks = MaskSet(model)

    def compress(b, block, lin, sc):
        _prune_block(block, lin, sc, spec, pat, masks, block_names)

    def recon(unit, unit_in, target):
        params = [p for b in unit for p in runner.blocks[b].parameters()]
        unit_masks = MaskSet(model, {n: m for n, m in masks
                                     if any(n.startswith(block_names[id(runner.blocks[b])] + ".") for b in unit)})

        def fn(h):
            for b in unit:
                h = runner.run_block(b, h)
            return h
        cfg = spec.recon
        return reconstruct(fn, params, unit_masks, unit_in, target,
                           ReconConfig(**{**asdict(cfg), "seed": cfg.seed + unit[0]}))["losses"]

    seq = sequential(runner, ids, n_cal, linears=lambda block: select_linears(block, spec.targets), compress=compress,
                     needs_stats=spec.pruner != "magnitude", hessian=spec.pruner == "sparsegpt",
                     block_target=spec.scheme == "BR", reconstruct=recon if spec.scheme != "LR" else None, gp=gp, cr=cr,
                     batch=spec.batch, dense=dense, heldout_ids=heldout_ids, dense_heldout=dense_heldout,
                     act_device=act_device, verbose=verbose)
    group = _mask_group(spec)
    sp = {}
    for name, m in masks:
        sp[name] = check_mask(m, pat, group if group != "nm" else "matrix", name, spec.blocksize)["sparsity"]
    sp["__all__"] = masks.sparsity()["__all__"]
    masks.verify()
    return PruneResult(spec, masks, seq.blocks, {k: round(v, 3) for k, v in seq.times.items()}, sp, round(mem, 1),
                       seq.losses)


@torch.no_grad()
def _prune_block(block, lin: dict, sc: StatsCollector, spec: PruneSpec, pat: Pattern, masks: MaskSet,
                 block_names: dict) -> None:
    prefix = block_names[id(block)]
    if spec.pruner == "magnitude":
        for name, mod in lin.items():
            m = magnitude_mask(mod.weight, pat)
            mod.weight.mul_(m)
            masks.add(f"{prefix}.{name}.weight", m)
        return
    missing = [n for n in lin if n not in sc.stats]
    if missing:
        raise PruningError(f"no calibration statistics for {missing}: these linears were not called in the "
                           "block's forward")
    if spec.pruner == "wanda":
        for name, mod in lin.items():
            m = wanda_mask(mod.weight, sc.stats[name].sq_norm, pat)
            mod.weight.mul_(m)
            masks.add(f"{prefix}.{name}.weight", m)
        return
    for group in sc.groups:  # sparsegpt: one solve per shared Hessian
        group = [n for n in group if n in lin]
        res = sparsegpt_prune([lin[n].weight for n in group], sc.stats[group[0]].hessian(), pat,
                              blocksize=spec.blocksize, percdamp=spec.percdamp)
        for n, (w, m) in zip(group, res):
            lin[n].weight.copy_(w)
            masks.add(f"{prefix}.{n}.weight", m)
