"""Weight-only quantization experiments of the bits chapter (notebook 02g): one cached perplexity per cell.

A cell is (method, bits, grid, calibration seed): the model is copied, quantized with
:func:`shrink.quant.quantize_model` (RTN or GPTQ on the shared block loop) and scored with the handbook's one
perplexity function on the preset's evaluation windows (and the second held-out corpus). RTN uses no
calibration data, so its cells do not depend on the seed (one record per grid); GPTQ's spread over calibration
draws (``calib_seeds``) is its noise.

Introduced in: notebooks/02-bits/02g-weight-only-gptq.md
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .. import data, eval as ev, results
from ..eval import Spread
from ..models import load
from ..scales import Preset, PresetError
from .gptq import WeightQuantSpec, quantize_model
from .quantizer import QuantSpec

CHAPTER = "02-bits"


@dataclass(frozen=True)
class WeightOnlyPreset(Preset):
    """Knobs of notebook 02g. ``grids`` are names: ``channel`` (one scale per output row) or ``gN`` (groups of
    ``N`` input columns); asymmetric min/max grids as GPTQ's default."""

    eval_corpus: str = "wikitext2"
    eval_split: str = "test"
    seqlen: int = 512
    windows: int | None = 4
    ood_corpus: str = "pydocs"
    ood_split: str = "all"
    calib_corpus: str = "wikitext2"
    calib_split: str = "validation"
    calib_nsamples: int = 16
    calib_seqlen: int = 512
    bits: tuple = (8, 4, 3, 2)
    grids: tuple = ("channel", "g64", "g32")
    calib_seeds: tuple = (0, 1, 2)
    #: cells measured on every calibration seed (the rest on the first seed only, and the table says so)
    seeded_cells: tuple = ((3, "channel"), (4, "channel"))
    #: grids GPTQ is measured on (RTN runs on every grid); None = all of ``grids``
    gptq_grids: tuple | None = None
    act_order: bool = False
    #: (bits, grid) of the GPTQ cell exported with its own grids and reloaded (None: no export cell)
    export_cell: tuple | None = (3, "channel")
    #: paper scale: also the seven lm-eval zero-shot tasks per cell (:func:`zero_shot_fields`)
    zero_shot: bool = False

    def check(self) -> None:
        for g in self.grids:
            grid_spec(g, 4)  # raises PresetError on a bad name
        if not self.calib_seeds:
            raise PresetError("calib_seeds needs at least one seed, e.g. (0, 1, 2)")
        if self.gptq_grids is not None and not set(self.gptq_grids) <= set(self.grids):
            raise PresetError(f"gptq_grids {self.gptq_grids} must be a subset of grids {self.grids}")
        for b, g in self.seeded_cells:
            if b not in self.bits or g not in self.grids:
                raise PresetError(f"seeded cell ({b}, {g!r}) is not in bits={self.bits} x grids={self.grids}")
        if self.export_cell is not None:
            b, g = self.export_cell
            if not 2 <= b <= 8:
                raise PresetError(f"export_cell bits must be 2-8 (what compressed-tensors stores), got {b}")
            grid_spec(g, b)


def grid_spec(name: str, bits: int) -> QuantSpec:
    """``"channel"`` -> per-output-row grid; ``"g32"`` -> groups of 32 input columns (asymmetric, GPTQ default)."""
    if name == "channel":
        return QuantSpec(bits=bits, symmetric=False, granularity="channel")
    if name.startswith("g") and name[1:].isdigit() and int(name[1:]) > 0:
        return QuantSpec(bits=bits, symmetric=False, granularity="group", group_size=int(name[1:]))
    raise PresetError(f"unknown weight grid {name!r}: use 'channel' or 'g<N>' (e.g. 'g32', 'g128')")


def zero_shot_key(cfg, scale: str) -> dict:
    """The cache-key entry of :func:`zero_shot_fields` (empty unless the preset asks for zero-shot at paper scale,
    so the keys of every other record are unchanged)."""
    return {"zero_shot": ev.zero_shot_key()} if getattr(cfg, "zero_shot", False) and scale == "paper" else {}


def zero_shot_fields(cfg, scale: str, model, tok) -> dict:
    """``{"zero_shot": lm-eval accuracies or the reason they were not run}`` for a paper-scale cell whose preset sets
    ``zero_shot`` (the papers' zero-shot tables: GPTQ Table 4-style, RSQ, PB-LLM, FlexRound, EoRA); else ``{}``."""
    return {"zero_shot": ev.paper_zero_shot(model, tok)} if zero_shot_key(cfg, scale) else {}


class LazyModelContext:
    """The preset's model and tokenizer, loaded on first use, and its calibration draws
    (``cfg.calib_corpus / calib_split / calib_nsamples / calib_seqlen``): the base of the weight-only chapter's
    experiment contexts (02g, 02i, 02k)."""

    def __init__(self, cfg, scale: str):
        self.cfg, self.scale = cfg, scale
        self._model = self._tok = None

    def _load(self):
        if self._model is None:
            self._model, self._tok = load(self.cfg.model, seed=self.cfg.seed)
        return self._model, self._tok

    @property
    def model(self):
        return self._load()[0]

    @property
    def tok(self):
        return self._load()[1]

    def calib(self, seed: int) -> torch.Tensor:
        """int64 ``[calib_nsamples, calib_seqlen]``: calibration draw ``seed``."""
        c = self.cfg
        return data.calibration_set(self.tok, c.calib_corpus, c.calib_split, nsamples=c.calib_nsamples,
                                    seqlen=c.calib_seqlen, seed=seed)


class WeightOnlyContext(LazyModelContext):
    """Model, tokenizer, evaluation streams and calibration sets of a :class:`WeightOnlyPreset` (lazy)."""

    def __init__(self, cfg: WeightOnlyPreset, scale: str):
        super().__init__(cfg, scale)
        self._streams: dict = {}

    def stream(self, corpus: str, split: str) -> torch.Tensor:
        if (corpus, split) not in self._streams:
            self._streams[corpus, split] = data.eval_tokens(self.tok, corpus, split)
        return self._streams[corpus, split]

    def _ppl(self, model, corpus, split) -> float:
        c = self.cfg
        return ev.perplexity(model, self.stream(corpus, split), c.seqlen, max_windows=c.windows, dataset=corpus,
                             split=split).ppl

    def config(self, method: str | None, bits: int | None, grid: str | None, seed: int | None) -> dict:
        c = self.cfg
        return {"model": c.model, "eval": [c.eval_corpus, c.eval_split, c.seqlen, c.windows],
                "ood": [c.ood_corpus, c.ood_split], "method": method, "bits": bits, "grid": grid,
                "calib": ([c.calib_corpus, c.calib_split, c.calib_nsamples, c.calib_seqlen, seed]
                          if method == "gptq" else None), "act_order": c.act_order if method == "gptq" else None}

    def dense(self) -> dict:
        """Full-precision perplexities (the control every cell is compared with)."""
        def run():
            return {"ppl": self._ppl(self.model, self.cfg.eval_corpus, self.cfg.eval_split),
                    "ppl_ood": self._ppl(self.model, self.cfg.ood_corpus, self.cfg.ood_split)}
        return results.cached("weightonly", self.config(None, None, None, None), run, scale=self.scale,
                              chapter=CHAPTER)

    def measure(self, method: str, bits: int, grid: str, seed: int = 0) -> dict:
        """Cached cell: ``{"ppl", "ppl_ood", "err_calib", "bits_per_weight", "times"}`` (``err_calib``: App. A
        error of the last block on the calibration windows; None for RTN)."""
        spec = WeightQuantSpec(method=method, grid=grid_spec(grid, bits), act_order=self.cfg.act_order)
        conf = {**self.config(method, bits, grid, seed), **zero_shot_key(self.cfg, self.scale)}

        def run():
            m = copy.deepcopy(self.model)
            res = quantize_model(m, self.calib(seed) if method == "gptq" else None, spec, verbose=False)
            out = {"ppl": self._ppl(m, self.cfg.eval_corpus, self.cfg.eval_split),
                   "ppl_ood": self._ppl(m, self.cfg.ood_corpus, self.cfg.ood_split),
                   "err_calib": res["final"]["err_calib"] if res["final"] else None,
                   "bits_per_weight": res["bits_per_weight"], "times": res["times"],
                   **zero_shot_fields(self.cfg, self.scale, m, self.tok)}
            del m
            return out

        return results.cached("weightonly", conf, run, scale=self.scale, chapter=CHAPTER)

    def export_round_trip(self, bits: int, grid: str, seed: int = 0) -> dict:
        """Cached: GPTQ on ``(bits, grid)`` with draw ``seed``, exported with its own grids
        (:func:`shrink.quant.export.export_quantized`) to a temporary folder and reloaded with plain
        ``transformers``. ``{"ppl", "ppl_reloaded", "weights_identical", "format", "bytes_model", "bytes_fp32",
        "stored_bits_per_weight", "seconds_export", "seconds_reload"}`` (``weights_identical``: every decoder
        linear, dequantized on reload, equals the quantized model's bit for bit)."""
        import tempfile
        import time
        from pathlib import Path

        from .. import export as X
        from .export import dequantized_reload, export_quantized

        spec = WeightQuantSpec(method="gptq", grid=grid_spec(grid, bits), act_order=self.cfg.act_order)
        conf = {**self.config("gptq", bits, grid, seed), "export": "compressed-tensors"}

        def run():
            m = copy.deepcopy(self.model)
            res = quantize_model(m, self.calib(seed), spec, verbose=False)
            ppl = self._ppl(m, self.cfg.eval_corpus, self.cfg.eval_split)
            with tempfile.TemporaryDirectory(prefix="shrink-export-") as tmp:
                t0 = time.perf_counter()
                man = export_quantized(copy.deepcopy(m), tmp, grids=res["grids"])
                t1 = time.perf_counter()
                r = X.reload(tmp)
                t2 = time.perf_counter()
                ppl_r = self._ppl(r, self.cfg.eval_corpus, self.cfg.eval_split)
                del r
                d = dequantized_reload(tmp)
                same = all(torch.equal(d.get_parameter(n), p) for n, p in m.named_parameters())
                size = (Path(tmp) / "model.safetensors").stat().st_size
                n_lin = sum(lin.weight.numel() for lin in _decoder_linear_modules(m))
                fp32 = sum(p.numel() for p in m.parameters()) * 4
            return {"ppl": ppl, "ppl_reloaded": ppl_r, "weights_identical": same, "format": man["what"]["format"],
                    "bytes_model": size, "bytes_fp32": fp32, "linear_weights": n_lin,
                    "seconds_export": round(t1 - t0, 2), "seconds_reload": round(t2 - t1, 2)}

        return results.cached("weightonly-export", conf, run, scale=self.scale, chapter=CHAPTER)

    def has_gptq(self, grid: str) -> bool:
        """Whether the preset measures GPTQ on ``grid`` (RTN is measured on every grid)."""
        return self.cfg.gptq_grids is None or grid in self.cfg.gptq_grids

    def seeds_for(self, bits: int, grid: str) -> tuple:
        return self.cfg.calib_seeds if (bits, grid) in self.cfg.seeded_cells else self.cfg.calib_seeds[:1]

    def gptq_spread(self, bits: int, grid: str, metric: str = "ppl") -> Spread:
        """GPTQ ``metric`` over the calibration draws of this cell (one value if the cell is not seeded)."""
        seeds = self.seeds_for(bits, grid)
        return Spread(tuple(self.measure("gptq", bits, grid, s)[metric] for s in seeds), kind="calibration draws",
                      seeds=seeds)


def sweep_cells(cfg: WeightOnlyPreset) -> list[dict]:
    """Every cached measurement notebook 02g reads, as keyword dicts for :func:`sweep_cell` (``shrink sweep
    weight-only``): the dense control, RTN on every bits x grid, GPTQ on ``gptq_grids`` x the cell's calibration
    draws (``seeded_cells``), and the export round trip."""
    ctx = WeightOnlyContext(cfg, "tiny")  # only for has_gptq / seeds_for (nothing is loaded)
    cells = [{"kind": "dense"}]
    for b in cfg.bits:
        for g in cfg.grids:
            cells.append({"kind": "measure", "method": "rtn", "bits": b, "grid": g, "seed": 0})
            if ctx.has_gptq(g):
                cells += [{"kind": "measure", "method": "gptq", "bits": b, "grid": g, "seed": s}
                          for s in ctx.seeds_for(b, g)]
    if cfg.export_cell is not None:
        b, g = cfg.export_cell
        cells.append({"kind": "export", "bits": b, "grid": g, "seed": 0})
    return cells


def sweep_cell(cfg: WeightOnlyPreset, *, scale: str, kind: str, method: str | None = None, bits: int | None = None,
               grid: str | None = None, seed: int = 0) -> dict:
    """One cell of :func:`sweep_cells` through the notebook's own cached functions (same records, same keys)."""
    ctx = WeightOnlyContext(cfg, scale)
    if kind == "dense":
        return ctx.dense()
    if kind == "measure":
        return ctx.measure(method, bits, grid, seed)
    if kind == "export":
        return ctx.export_round_trip(bits, grid, seed)
    raise PresetError(f"unknown weight-only sweep cell kind {kind!r}: dense | measure | export")


def _decoder_linear_modules(model):
    from .fakequant import decoder_linears

    return list(decoder_linears(model).values())


__all__ = ["WeightOnlyPreset", "WeightOnlyContext", "grid_spec", "zero_shot_fields", "zero_shot_key", "CHAPTER"]
