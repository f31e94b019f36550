"""PB-LLM experiments of the bits chapter (notebook 02i): one cached perplexity per (fraction, metric, GPTQ, seed).

A cell copies the model, runs :func:`shrink.quant.pbllm.pbllm_model` (GPTQ-PB or direct rounding; magnitude or
Hessian saliency) and scores it with the handbook's one perplexity function on the preset's evaluation windows,
the same windows as notebook 02g. Cells that use calibration data (GPTQ-PB, or the Hessian criterion) depend on
the calibration draw: their noise is the spread over ``calib_seeds``; direct rounding with the magnitude
criterion uses no data and is deterministic (one record).

Introduced in: notebooks/02-bits/02i-pb-llm.md
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .. import data, eval as ev, results
from ..eval import Spread
from ..scales import Preset, PresetError
from .weightonly import LazyModelContext, zero_shot_fields, zero_shot_key
from .pbllm import PBSpec, pbllm_model

CHAPTER = "02-bits"


@dataclass(frozen=True)
class PBLLMPreset(Preset):
    """Knobs of notebook 02i.

    GPTQ-PB cells: the Hessian criterion at every fraction of ``fracs`` and the magnitude criterion at every
    fraction of ``magnitude_fracs``, each on every calibration seed of ``calib_seeds``; ``direct_fracs`` are
    also rounded directly without GPTQ with the magnitude criterion (no data: deterministic, one record)."""

    eval_corpus: str = "wikitext2"
    eval_split: str = "test"
    seqlen: int = 512
    windows: int | None = 4
    calib_corpus: str = "wikitext2"
    calib_split: str = "validation"
    calib_nsamples: int = 8
    calib_seqlen: int = 256
    fracs: tuple = (0.05, 0.1, 0.2)
    magnitude_fracs: tuple = (0.1,)
    direct_fracs: tuple = (0.05, 0.1, 0.2)
    calib_seeds: tuple = (0, 1, 2)
    high_bits: int = 8
    zero_shot: bool = False  # paper scale: the lm-eval zero-shot tasks per cell (weightonly.zero_shot_fields)

    def check(self) -> None:
        allf = (*self.fracs, *self.magnitude_fracs, *self.direct_fracs)
        if not self.fracs or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0
                                 for f in allf):
            raise PresetError(f"fracs / magnitude_fracs / direct_fracs are salient fractions in [0, 1] (e.g. "
                              f"(0.05, 0.1, 0.2)), got {self.fracs}, {self.magnitude_fracs}, {self.direct_fracs}")
        if list(self.fracs) != sorted(set(self.fracs)):
            raise PresetError(f"fracs must be increasing and distinct (the sweep's x axis), got {self.fracs}")
        if not self.calib_seeds:
            raise PresetError("calib_seeds needs at least one seed, e.g. (0, 1, 2)")


class PBLLMContext(LazyModelContext):
    """Model, tokenizer, evaluation stream and calibration sets of a :class:`PBLLMPreset` (lazy)."""

    def __init__(self, cfg: PBLLMPreset, scale: str):
        super().__init__(cfg, scale)
        self._stream = None

    def stream(self) -> torch.Tensor:
        if self._stream is None:
            self._stream = data.eval_tokens(self.tok, self.cfg.eval_corpus, self.cfg.eval_split)
        return self._stream

    def ppl(self, model) -> float:
        c = self.cfg
        return ev.perplexity(model, self.stream(), c.seqlen, max_windows=c.windows, dataset=c.eval_corpus,
                             split=c.eval_split).ppl

    def spec(self, frac: float, metric: str, gptq: bool) -> PBSpec:
        return PBSpec(salient_frac=frac, metric=metric, gptq=gptq, high_bits=self.cfg.high_bits).check()

    def config(self, spec: PBSpec | None, seed: int | None) -> dict:
        c = self.cfg
        calib = None
        if spec is not None and spec.needs_calibration:
            calib = [c.calib_corpus, c.calib_split, c.calib_nsamples, c.calib_seqlen, seed]
        pb = None if spec is None else {k: v for k, v in spec.to_dict().items() if k != "batch"}
        return {"model": c.model, "eval": [c.eval_corpus, c.eval_split, c.seqlen, c.windows], "pb": pb,
                "calib": calib}

    def dense(self) -> dict:
        return results.cached("pbllm", self.config(None, None), lambda: {"ppl": self.ppl(self.model)},
                              scale=self.scale, chapter=CHAPTER)

    def measure(self, frac: float, metric: str, gptq: bool = True, seed: int = 0) -> dict:
        """Cached cell ``{"ppl", "err_calib", "bits" (exact accounting), "times"}``."""
        spec = self.spec(frac, metric, gptq)
        if not spec.needs_calibration:
            seed = None

        def run():
            m = copy.deepcopy(self.model)
            res = pbllm_model(m, self.calib(seed) if spec.needs_calibration else None, spec, verbose=False)
            out = {"ppl": self.ppl(m), "err_calib": res["final"]["err_calib"] if res["final"] else None,
                   "bits": res["bits"], "times": res["times"], **zero_shot_fields(self.cfg, self.scale, m, self.tok)}
            del m
            return out

        return results.cached("pbllm", {**self.config(spec, seed), **zero_shot_key(self.cfg, self.scale)}, run,
                              scale=self.scale, chapter=CHAPTER)

    def spread(self, frac: float, metric: str, gptq: bool = True, key: str = "ppl") -> Spread:
        """``key`` over the calibration draws of a cell (one value when it uses no data or is not seeded)."""
        spec = self.spec(frac, metric, gptq)
        seeds = self.cfg.calib_seeds if spec.needs_calibration else (None,)
        return Spread(tuple(self.measure(frac, metric, gptq, s)[key] for s in seeds), kind="calibration draws",
                      seeds=tuple(-1 if s is None else s for s in seeds))


__all__ = ["PBLLMPreset", "PBLLMContext", "CHAPTER"]
