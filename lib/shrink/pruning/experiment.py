"""Glue for the chapter's notebooks: data of a preset, one pruned-model measurement, cached records.

A measurement = prune a fresh copy of the dense model with a :class:`~shrink.pruning.PruneSpec`, then record
the per-block normalised errors (calibration and held-out, App. A), the final-block error, perplexity with the
one perplexity function on WikiText-2 test (and a second held-out corpus), sparsity and times. Records go
through :func:`shrink.results.cached` so a re-run of a notebook is fast.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch

from .. import data, eval as shrink_eval, models, results
from .presets import PruningPreset
from .reconstruct import ReconConfig
from .sequential import PruneSpec, dense_streams, prune_model

CHAPTER = "01-weights"


@dataclass
class Setup:
    """Model, tokenizer and data of a preset (and caches of the dense streams per calibration set)."""

    cfg: PruningPreset
    scale: str
    model: torch.nn.Module
    tok: object
    eval_tokens: torch.Tensor
    eval2_tokens: torch.Tensor | None
    heldout: torch.Tensor
    _dense: dict = field(default_factory=dict)

    def calib(self, seed: int, nsamples: int | None = None) -> torch.Tensor:
        """Calibration windows int64 ``[n, calib_seqlen]`` for ``seed`` (THE sampler)."""
        c = self.cfg
        return data.calibration_set(self.tok, c.calib_corpus, c.calib_split, nsamples=nsamples or c.calib_nsamples,
                                    seqlen=c.calib_seqlen, seed=seed)

    def dense(self, key, ids: torch.Tensor) -> list[torch.Tensor]:
        """Dense-stream activations of ``ids`` (memoised in memory under ``key``)."""
        if key not in self._dense:
            self._dense[key] = dense_streams(self.model, ids)
        return self._dense[key]


def setup(cfg: PruningPreset, scale: str) -> Setup:
    """Load the preset's model and evaluation data."""
    model, tok = models.load(cfg.model)
    ev = data.eval_tokens(tok, "wikitext2", "test")
    ev2 = data.eval_tokens(tok, cfg.eval2_corpus, cfg.eval2_split) if cfg.eval2_corpus else None
    held_tokens = data.eval_tokens(tok, cfg.heldout_corpus, cfg.heldout_split)
    # held-out error windows: taken from the END of the held-out stream so they do not overlap the
    # perplexity windows, which start at the beginning
    n, t = cfg.heldout_nsamples, cfg.heldout_seqlen
    if held_tokens.numel() < n * t:
        raise ValueError(f"held-out corpus has {held_tokens.numel()} tokens < {n}x{t}")
    held = held_tokens[-n * t:].view(n, t)
    return Setup(cfg, scale, model, tok, ev, ev2, held)


def spec_for(cfg: PruningPreset, pruner: str, scheme: str, *, seed: int = 0, epochs: int | None = None,
             batch_size: int | None = None, **kw) -> PruneSpec:
    """The :class:`PruneSpec` of a preset cell (``kw`` overrides fields such as ``targets``, ``pattern``)."""
    recon = ReconConfig(epochs=epochs or cfg.epochs, batch_size=batch_size or cfg.batch_size, lr=cfg.lr, seed=seed)
    base = dict(pruner=pruner, sparsity=cfg.sparsity, pattern=cfg.pattern, scheme=scheme, recon=recon)
    base.update(kw)
    return PruneSpec(**base)


def measure(st: Setup, spec: PruneSpec, calib: torch.Tensor, *, extra: torch.Tensor | None = None,
            dense_key=None, ppl: bool = True, keep_model: bool = False) -> dict:
    """Prune a copy of the dense model and measure it (see module docstring). Returns a JSON-able dict."""
    m = copy.deepcopy(st.model)
    ids = calib if extra is None else torch.cat([calib, extra])
    dense = st.dense(dense_key, ids) if dense_key is not None else None
    dh = st.dense("heldout", st.heldout)
    t0 = time.perf_counter()
    res = prune_model(m, calib, spec, heldout_ids=st.heldout, extra_ids=extra, dense=dense, dense_heldout=dh,
                      verbose=False)
    out = res.to_dict()
    out["prune_seconds"] = round(time.perf_counter() - t0, 2)
    c = st.cfg
    if ppl:
        p = shrink_eval.perplexity(m, st.eval_tokens, c.eval_seqlen, max_windows=c.eval_windows,
                                   dataset="wikitext2", split="test")
        out["ppl"] = p.ppl
        out["ppl_record"] = p.to_dict()
        if st.eval2_tokens is not None:
            p2 = shrink_eval.perplexity(m, st.eval2_tokens, c.eval_seqlen, max_windows=c.eval_windows,
                                        dataset=c.eval2_corpus, split=c.eval2_split)
            out["ppl2"] = p2.ppl
        calib_tokens = calib.reshape(-1)
        out["ppl_calib"] = shrink_eval.perplexity(m, calib_tokens, calib.shape[1], dataset=c.calib_corpus,
                                                  split=c.calib_split).ppl
    if c.zero_shot and st.scale == "paper":  # the paper's 7 tasks through lm-eval (needs internet)
        from .. import env

        out["zero_shot"] = (shrink_eval.zero_shot(m, st.tok) if env.online()
                            else "not run: offline (SHRINK_ONLINE=1 needed for lm-eval task data)")
    if keep_model:
        out["_model"] = m
    return out


def cached_measure(st: Setup, name: str, spec: PruneSpec, seed: int, *, nsamples: int | None = None,
                   extra: torch.Tensor | None = None, extra_tag: str | None = None, ppl: bool = True) -> dict:
    """:func:`measure` through :func:`shrink.results.cached` (key: preset, spec, seed, calibration size, extra)."""
    c = st.cfg
    # key = only what determines the measurement, so notebooks share records (01a's LR cells are 01b's)
    config = {"model": c.model, "calib": [c.calib_corpus, c.calib_split, nsamples or c.calib_nsamples, c.calib_seqlen],
              "heldout": [c.heldout_corpus, c.heldout_split, c.heldout_nsamples, c.heldout_seqlen],
              "eval": [c.eval_seqlen, c.eval_windows, c.eval2_corpus, c.eval2_split], "spec": spec.to_dict(),
              "seed": seed, "extra": extra_tag, "ppl": ppl}

    def fn():
        calib = st.calib(seed, nsamples)
        key = ("calib", seed, nsamples or c.calib_nsamples, extra_tag)
        return measure(st, spec, calib, extra=extra, dense_key=key, ppl=ppl)
    return results.cached(name, config, fn, scale=st.scale, chapter=CHAPTER)


def dense_reference(st: Setup) -> dict:
    """Dense perplexities (cached)."""
    c = st.cfg

    def fn():
        out = {"ppl": shrink_eval.perplexity(st.model, st.eval_tokens, c.eval_seqlen, max_windows=c.eval_windows,
                                             dataset="wikitext2", split="test").ppl}
        if st.eval2_tokens is not None:
            out["ppl2"] = shrink_eval.perplexity(st.model, st.eval2_tokens, c.eval_seqlen,
                                                 max_windows=c.eval_windows).ppl
        return out
    return results.cached("dense", {"model": c.model, "eval_seqlen": c.eval_seqlen, "eval_windows": c.eval_windows,
                                    "eval2": c.eval2_corpus}, fn, scale=st.scale, chapter=CHAPTER)


def self_generated(st: Setup, n: int, seed: int) -> torch.Tensor:
    """``n`` self-generated sequences of ``selfgen_seqlen`` tokens from the dense model (cached tensors)."""
    from .selfgen import self_generate

    c = st.cfg
    key = {"model": c.model, "n": n, "seqlen": c.selfgen_seqlen, "seed": seed, "min_alpha": c.selfgen_min_alpha}
    return results.cached_tensors("selfgen", key, lambda: self_generate(st.model, st.tok, n, c.selfgen_seqlen,
                                                                        seed=seed, min_alpha=c.selfgen_min_alpha))


def cached_compensated(st: Setup, pruner: str, seed: int, *, rank: int = 0, bias: bool = False) -> dict:
    """LR-pruned model + EoRA (``rank``) and/or FLAP-style bias compensation; perplexities and extra parameters
    (cached record)."""
    from .compensate import compensate_model

    c = st.cfg
    spec = spec_for(c, pruner, "LR", seed=seed)
    config = {"model": c.model, "calib": [c.calib_corpus, c.calib_split, c.calib_nsamples, c.calib_seqlen],
              "eval": [c.eval_seqlen, c.eval_windows], "spec": spec.to_dict(), "seed": seed, "rank": rank,
              "bias": bias}

    def fn():
        calib = st.calib(seed)
        m = copy.deepcopy(st.model)
        prune_model(m, calib, spec, verbose=False)
        t0 = time.perf_counter()
        info = compensate_model(m, st.model, calib, rank=rank, bias=bias)
        info["compensate_seconds"] = round(time.perf_counter() - t0, 2)
        info["ppl"] = shrink_eval.perplexity(m, st.eval_tokens, c.eval_seqlen, max_windows=c.eval_windows,
                                             dataset="wikitext2", split="test").ppl
        info["ppl_calib"] = shrink_eval.perplexity(m, calib.reshape(-1), calib.shape[1]).ppl
        return info
    return results.cached("compensated", config, fn, scale=st.scale, chapter=CHAPTER)
