"""FlexRound experiments of the bits chapter (notebook 02j): cached cells beside 02g's RTN and GPTQ records.

A FlexRound cell is (bits, calibration seed, steps per block): the model is copied, quantized with
:func:`shrink.quant.flexround.flexround_model` (per-channel asymmetric grid, the block loop and the
reconstruction shared with pruning's BR) and scored with the handbook's one perplexity function on the
evaluation windows of the ``weight-only`` preset, so the RTN and GPTQ cells of notebook 02g are the same records
(:class:`shrink.quant.weightonly.WeightOnlyContext`). Every cell also logs the final-block App. A error on its
calibration windows and on held-out windows (the end of WikiText-2 test, disjoint from the perplexity windows at
its beginning), and per block the block-MSE curve over the Adam steps (calibration vs held-out).

Introduced in: notebooks/02-bits/02j-flexround.md
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .. import data, results, scales
from ..eval import Spread
from ..scales import Preset, PresetError
from .flexround import FlexRoundSpec, flexround_model
from .quantizer import QuantSpec
from .weightonly import CHAPTER, WeightOnlyContext, zero_shot_fields, zero_shot_key


@dataclass(frozen=True)
class FlexRoundPreset(Preset):
    """Knobs of notebook 02j.

    Attributes:
        weight_only: the preset whose model, evaluation windows and RTN / GPTQ cells are reused (02g's).
        bits: bit widths of the comparison (per-channel asymmetric grid).
        calib_*: FlexRound's calibration windows (drawn per seed of ``calib_seeds``).
        heldout_*: held-out windows for the block errors (taken from the end of the corpus stream).
        steps, batch_size, lr, schedule, target: FlexRound's reconstruction per block (:class:`FlexRoundSpec`).
        eval_at: steps at which every block's calibration / held-out block MSE is logged.
        budget_bits, budget_seed, budgets: the budget sweep (steps per block; 0 = RTN through the same loop).
        seeded_bits: bit widths measured on every seed of ``calib_seeds`` (the others on the first seed only;
            None = all of ``bits``).
    """

    weight_only: str = "weight-only"
    bits: tuple = (4, 3)
    calib_corpus: str = "wikitext2"
    calib_split: str = "validation"
    calib_nsamples: int = 8
    calib_seqlen: int = 256
    calib_seeds: tuple = (0, 1, 2)
    heldout_corpus: str = "wikitext2"
    heldout_split: str = "test"
    heldout_nsamples: int = 4
    heldout_seqlen: int = 256
    steps: int = 8
    batch_size: int = 1
    lr: float = 1e-2
    schedule: str = "cosine"
    target: str = "GP"
    zero_shot: bool = False  # paper scale: the lm-eval zero-shot tasks per cell (weightonly.zero_shot_fields)
    eval_at: tuple = (0, 2, 4, 8)
    budget_bits: int = 3
    budget_seed: int = 0
    budgets: tuple = (0, 2, 8, 32)
    seeded_bits: tuple | None = None

    def check(self) -> None:
        if self.seeded_bits is not None and not set(self.seeded_bits) <= set(self.bits):
            raise PresetError(f"seeded_bits {self.seeded_bits} must be a subset of bits {self.bits}")
        if not self.calib_seeds:
            raise PresetError("calib_seeds needs at least one seed, e.g. (0, 1, 2)")
        if self.budget_bits not in self.bits:
            raise PresetError(f"budget_bits={self.budget_bits} must be one of bits={self.bits}")
        if self.steps not in self.budgets:
            raise PresetError(f"budgets {self.budgets} must contain the main budget steps={self.steps}")
        if any(s < 0 for s in self.budgets):
            raise PresetError(f"budgets must be >= 0, got {self.budgets}")
        if any(not 0 <= s <= self.steps for s in self.eval_at):
            raise PresetError(f"eval_at {self.eval_at} must lie in [0, steps={self.steps}]")
        FlexRoundSpec(steps=self.steps, batch_size=self.batch_size, lr=self.lr, schedule=self.schedule,
                      target=self.target).check()


def grid(bits: int) -> QuantSpec:
    """The comparison's grid: per output channel, asymmetric min/max (02g's ``channel``)."""
    return QuantSpec(bits=bits, symmetric=False, granularity="channel")


class FlexRoundContext:
    """Model, data and cached cells of a :class:`FlexRoundPreset` (RTN / GPTQ through 02g's context)."""

    def __init__(self, cfg: FlexRoundPreset, scale: str):
        self.cfg, self.scale = cfg, scale
        self.wo = WeightOnlyContext(scales.get(cfg.weight_only, scale), scale)
        if self.wo.cfg.model != cfg.model:
            raise PresetError(f"FlexRoundPreset.model {cfg.model!r} differs from the {cfg.weight_only!r} preset's "
                              f"{self.wo.cfg.model!r}: the RTN / GPTQ cells would be of another model")
        self._held = None

    def calib(self, seed: int) -> torch.Tensor:
        c = self.cfg
        return data.calibration_set(self.wo.tok, c.calib_corpus, c.calib_split, nsamples=c.calib_nsamples,
                                    seqlen=c.calib_seqlen, seed=seed)

    def heldout(self) -> torch.Tensor:
        """int64 ``[heldout_nsamples, heldout_seqlen]`` from the end of the held-out stream."""
        if self._held is None:
            c = self.cfg
            toks = data.eval_tokens(self.wo.tok, c.heldout_corpus, c.heldout_split)
            n, t = c.heldout_nsamples, c.heldout_seqlen
            if toks.numel() < n * t:
                raise PresetError(f"held-out corpus {c.heldout_corpus} has {toks.numel()} tokens < {n}x{t}; lower "
                                  "heldout_nsamples or heldout_seqlen")
            self._held = toks[-n * t:].reshape(n, t)
        return self._held

    def spec(self, bits: int, seed: int, steps: int | None = None) -> FlexRoundSpec:
        c = self.cfg
        steps = c.steps if steps is None else steps
        eval_at = tuple(s for s in c.eval_at if s <= steps) if steps == c.steps else tuple(sorted({0, steps}))
        return FlexRoundSpec(grid=grid(bits), steps=steps, batch_size=c.batch_size, lr=c.lr, schedule=c.schedule,
                             target=c.target, seed=seed, eval_at=eval_at)

    def config(self, bits: int, seed: int, steps: int) -> dict:
        c, w = self.cfg, self.wo.cfg
        return {"model": c.model, "eval": [w.eval_corpus, w.eval_split, w.seqlen, w.windows],
                "ood": [w.ood_corpus, w.ood_split], "method": "flexround", "bits": bits, "grid": "channel",
                "calib": [c.calib_corpus, c.calib_split, c.calib_nsamples, c.calib_seqlen, seed],
                "heldout": [c.heldout_corpus, c.heldout_split, c.heldout_nsamples, c.heldout_seqlen],
                "spec": self.spec(bits, seed, steps).to_dict()}

    def measure(self, bits: int, seed: int, steps: int | None = None) -> dict:
        """Cached cell: ``{"ppl", "ppl_ood", "err_calib", "err_test", "blocks", "recon", "bits_per_weight",
        "times"}`` (``err_*``: App. A error of the last block; ``recon``: per-block curves, flips, s1 ratios)."""
        steps = self.cfg.steps if steps is None else steps
        spec = self.spec(bits, seed, steps)

        def run():
            m = copy.deepcopy(self.wo.model)
            res = flexround_model(m, self.calib(seed), spec, heldout_ids=self.heldout(), verbose=False)
            w = self.wo.cfg
            out = {"ppl": self.wo._ppl(m, w.eval_corpus, w.eval_split),
                   "ppl_ood": self.wo._ppl(m, w.ood_corpus, w.ood_split),
                   "err_calib": res["final"]["err_calib"], "err_test": res["final"]["err_test"],
                   "blocks": res["blocks"], "recon": res["recon"], "bits_per_weight": res["bits_per_weight"],
                   "times": res["times"], **zero_shot_fields(self.cfg, self.scale, m, self.wo.tok)}
            del m
            return out

        return results.cached("flexround", {**self.config(bits, seed, steps), **zero_shot_key(self.cfg, self.scale)},
                              run, scale=self.scale, chapter=CHAPTER)

    def seeds_for(self, bits: int) -> tuple:
        """The calibration seeds FlexRound is measured on at ``bits`` (``seeded_bits``)."""
        c = self.cfg
        return c.calib_seeds if c.seeded_bits is None or bits in c.seeded_bits else c.calib_seeds[:1]

    def spread(self, bits: int, metric: str = "ppl", steps: int | None = None) -> Spread:
        """FlexRound ``metric`` over the calibration draws of ``bits`` (:meth:`seeds_for`)."""
        seeds = self.seeds_for(bits)
        return Spread(tuple(self.measure(bits, s, steps)[metric] for s in seeds), kind="calibration draws",
                      seeds=seeds)

    def gptq_seeds(self, bits: int) -> tuple:
        return self.wo.seeds_for(bits, "channel")

    def gptq(self, bits: int, metric: str = "ppl") -> Spread:
        """GPTQ (02g's records) over the calibration draws 02g measured for this bit width."""
        return self.wo.gptq_spread(bits, "channel", metric)

    def rtn(self, bits: int) -> dict:
        return self.wo.measure("rtn", bits, "channel")


__all__ = ["FlexRoundPreset", "FlexRoundContext", "grid"]
