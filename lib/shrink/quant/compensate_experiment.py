"""EoRA compensation experiments of the bits chapter (notebook 02k): low-rank adapters on GPTQ / PB-LLM outputs.

A cell is (base quantizer, adapter method, rank, calibration draw): the base quantized model of the draw is
computed once (GPTQ at ``bits`` per channel, or GPTQ-PB at ``pb_frac`` with the Hessian criterion; weights kept in
``$SHRINK_CACHE``, not committed), a copy gets rank-``r`` adapters on every decoder linear
(:func:`shrink.quant.compensate.compensate_quantized`: EoRA from the same calibration draw, or the plain SVD of
``dW``, data-free), and the handbook's perplexity function scores it. EoRA and SVD at one rank add exactly the same
number of parameters, ``r (out + in)`` per linear: the comparison is at equal extra parameters by construction.

Introduced in: notebooks/02-bits/02k-eora-compensation.md
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .. import data, eval as ev, results
from ..eval import Spread
from ..lowrank import LOWRANK_METHODS
from ..models import BlockRunner
from ..scales import Preset, PresetError
from .weightonly import LazyModelContext, zero_shot_fields, zero_shot_key
from .compensate import compensate_quantized, extra_parameters_of
from .gptq import WeightQuantSpec, decoder_weight_linears, quantize_model
from .pbllm import PBSpec, pbllm_model
from .quantizer import QuantSpec

CHAPTER = "02-bits"
BASES = ("gptq", "pbllm")


@dataclass(frozen=True)
class EoRAPreset(Preset):
    """Knobs of notebook 02k (evaluation and calibration as notebook 02i)."""

    eval_corpus: str = "wikitext2"
    eval_split: str = "test"
    seqlen: int = 512
    windows: int | None = 4
    calib_corpus: str = "wikitext2"
    calib_split: str = "validation"
    calib_nsamples: int = 8
    calib_seqlen: int = 256
    bits: int = 3
    pb_frac: float = 0.1
    bases: tuple = ("gptq", "pbllm")
    ranks: tuple = (8, 32)
    methods: tuple = ("eora", "svd")
    calib_seeds: tuple = (0, 1, 2)
    zero_shot: bool = False  # paper scale: the lm-eval zero-shot tasks per cell (weightonly.zero_shot_fields)

    def check(self) -> None:
        if any(b not in BASES for b in self.bases) or not self.bases:
            raise PresetError(f"bases must be drawn from {BASES}, got {self.bases}")
        if any(m not in LOWRANK_METHODS for m in self.methods) or not self.methods:
            raise PresetError(f"methods must be drawn from {LOWRANK_METHODS}, got {self.methods}")
        if not self.ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.ranks):
            raise PresetError(f"ranks must be positive integers (EoRA: 16-512 at 7B), got {self.ranks}")
        if not 0.0 <= self.pb_frac <= 1.0:
            raise PresetError(f"pb_frac is a salient fraction in [0, 1], got {self.pb_frac}")
        if not self.calib_seeds:
            raise PresetError("calib_seeds needs at least one seed, e.g. (0, 1, 2)")


class EoRAContext(LazyModelContext):
    """Model, evaluation stream, calibration draws and cached base quantizations of an :class:`EoRAPreset`."""

    def __init__(self, cfg: EoRAPreset, scale: str):
        super().__init__(cfg, scale)
        self._stream = None

    def ppl(self, model) -> float:
        c = self.cfg
        if self._stream is None:
            self._stream = data.eval_tokens(self.tok, c.eval_corpus, c.eval_split)
        return ev.perplexity(model, self._stream, c.seqlen, max_windows=c.windows, dataset=c.eval_corpus,
                             split=c.eval_split).ppl

    def base_config(self, base: str, seed: int) -> dict:
        c = self.cfg
        q = {"bits": c.bits, "grid": "channel"} if base == "gptq" else {"salient_frac": c.pb_frac,
                                                                           "metric": "hessian", "high_bits": 8}
        return {"model": c.model, "base": base, "quant": q,
                "calib": [c.calib_corpus, c.calib_split, c.calib_nsamples, c.calib_seqlen, seed]}

    def quantized(self, base: str, seed: int):
        """A fresh copy of the model with the base quantization of draw ``seed`` (weights cached locally)."""
        def run():
            m = copy.deepcopy(self.model)
            if base == "gptq":
                spec = WeightQuantSpec(method="gptq", grid=QuantSpec(bits=self.cfg.bits, symmetric=False,
                                                                     granularity="channel"))
                quantize_model(m, self.calib(seed), spec, verbose=False)
            else:
                pbllm_model(m, self.calib(seed), PBSpec(salient_frac=self.cfg.pb_frac, metric="hessian"), verbose=False)
            return {n: l.weight.detach().clone() for i, b in enumerate(BlockRunner(m).blocks)
                    for n, l in ((f"{i}.{k}", v) for k, v in decoder_weight_linears(b).items())}

        weights = results.cached_tensors("eora-base", self.base_config(base, seed), run)
        m = copy.deepcopy(self.model)
        with torch.no_grad():
            for i, b in enumerate(BlockRunner(m).blocks):
                for k, lin in decoder_weight_linears(b).items():
                    lin.weight.copy_(weights[f"{i}.{k}"])
        return m

    def measure(self, base: str, method: str | None, rank: int, seed: int) -> dict:
        """Cached cell ``{"ppl", "extra_params", "extra_bits_per_weight"}`` (``method=None``: the base alone)."""
        conf = {**self.base_config(base, seed), "eval": [self.cfg.eval_corpus, self.cfg.eval_split, self.cfg.seqlen,
                                                        self.cfg.windows],
                "adapter": None if method is None else [method, rank], **zero_shot_key(self.cfg, self.scale)}

        def run():
            m = self.quantized(base, seed)
            extra = 0
            if method is not None:
                extra = compensate_quantized(m, self.model, self.calib(seed), rank=rank, method=method)["extra_params"]
            numel = sum(l.weight.numel() for b in BlockRunner(m).blocks for l in decoder_weight_linears(b).values())
            return {"ppl": self.ppl(m), "extra_params": extra, "extra_bits_per_weight": 16 * extra / numel,
                    **zero_shot_fields(self.cfg, self.scale, m, self.tok)}

        return results.cached("eora", conf, run, scale=self.scale, chapter=CHAPTER)

    def spread(self, base: str, method: str | None, rank: int = 0) -> Spread:
        seeds = self.cfg.calib_seeds
        return Spread(tuple(self.measure(base, method, rank, s)["ppl"] for s in seeds), kind="calibration draws",
                      seeds=seeds)

    def extra_params(self, rank: int) -> int:
        return extra_parameters_of(self.model, rank)


__all__ = ["EoRAPreset", "EoRAContext", "BASES", "CHAPTER"]

