"""Small helpers the bits notebooks share, so that cells stay short and identical measurements are cached
once (same config -> same result record, whichever notebook asks first).

Every perplexity goes through :func:`shrink.eval.perplexity` (``prefix=`` for CushionCache prefixes).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .. import data, eval as ev, results
from ..errors import ShrinkError
from ..models import KVPrefix, load
from .fakequant import largest_static_range, quantized
from .presets import BitsPreset
from .quantizer import QuantSpec
from .smoothquant import act_scales, smooth_model

CHAPTER = "02-bits"


class BitsContext:
    """Model, tokenizer, evaluation stream and calibration windows of a :class:`BitsPreset` (lazy model)."""

    def __init__(self, cfg: BitsPreset, scale: str):
        self.cfg, self.scale = cfg, scale
        self._model = None
        self._tok = None
        self._memo: dict = {}  # in-session reuse: calibrated ranges / smoothed model of the last config

    def _load(self):
        if self._model is None:
            self._model, self._tok = load(self.cfg.model, seed=self.cfg.seed)
        return self._model, self._tok

    @property
    def model(self) -> nn.Module:
        return self._load()[0]

    @property
    def tok(self):
        return self._load()[1]

    def eval_tokens(self) -> torch.Tensor:
        return data.eval_tokens(self.tok, self.cfg.eval_corpus, self.cfg.eval_split)

    def calib_ids(self, seed: int | None = None) -> torch.Tensor:
        """Calibration windows ``[calib_nsamples, calib_seqlen]``; ``seed`` (default ``cfg.seed``) picks the draw."""
        c = self.cfg
        return data.calibration_set(self.tok, c.calib_corpus, c.calib_split, nsamples=c.calib_nsamples,
                                    seqlen=c.calib_seqlen, seed=c.seed if seed is None else seed)

    def base_config(self, calib_seed: int | None = None) -> dict:
        c = self.cfg
        return {"model": c.model, "eval": [c.eval_corpus, c.eval_split, c.seqlen, c.windows],
                "calib": [c.calib_corpus, c.calib_split, c.calib_nsamples, c.calib_seqlen,
                          c.seed if calib_seed is None else calib_seed]}

    def ppl(self, *, w: QuantSpec | None = None, a: QuantSpec | None = None, prefix: KVPrefix | None = None,
            prefix_name: str | None = None, smooth_alpha: float | None = None, tag: str = "",
            perturb: tuple[float, int] | None = None, calib_seed: int | None = None) -> dict:
        """Cached perplexity of one configuration: ``{"ppl", "largest_range", "largest_range_at"}``.

        ``prefix_name`` identifies the prefix in the cache key; default :func:`prefix_key` of ``prefix`` (from
        the config that made it, never from its values). SmoothQuant (``smooth_alpha``) runs on a deep copy; the loaded model is never
        modified.

        Noise probes (both part of the cache key; the defaults leave the key of every earlier record as it was):

        * ``perturb=(eps, seed)``: every quantization range scaled by ``1 + eps*u``
          (:func:`shrink.quant.fakequant.perturb_ranges`), after calibration.
        * ``calib_seed``: another draw of the calibration windows (static ranges and SmoothQuant scales);
          ``None`` or ``cfg.seed`` is the preset's draw.

        Calibrated ranges and the smoothed model of the latest configuration are kept in memory, so a sweep
        over perturbation seeds calibrates once.
        """
        if perturb is not None:
            if len(perturb) != 2:
                raise ShrinkError(f"perturb must be (eps, seed), e.g. (1e-6, 0); got {perturb!r}")
            perturb = (float(perturb[0]), int(perturb[1]))
        if calib_seed is not None and calib_seed == self.cfg.seed:
            calib_seed = None
        if prefix_name is None:
            prefix_name = prefix_key(prefix)
        elif prefix is not None and prefix_name == "none":
            raise ShrinkError("ppl(prefix=..., prefix_name='none'): 'none' is the key of runs without a prefix; "
                              "leave prefix_name out (it defaults to prefix_key(prefix)).")
        cfg = {**self.base_config(calib_seed), "w": w.to_dict() if w else None, "a": a.to_dict() if a else None,
               "prefix": prefix_name, "smooth_alpha": smooth_alpha, "tag": tag}
        if perturb is not None:
            cfg["perturb"] = list(perturb)

        def run():
            static = a is not None and a.static
            model = self.model
            if smooth_alpha is not None:
                mkey = ("smooth", prefix_name, smooth_alpha, calib_seed)
                if self._memo.get("smooth_key") != mkey:
                    self._memo.pop("smooth_model", None)
                    smoothed = copy.deepcopy(model)
                    smooth_model(smoothed, act_scales(smoothed, self.calib_ids(calib_seed), prefix=prefix),
                                 smooth_alpha)
                    self._memo.update(smooth_key=mkey, smooth_model=smoothed)
                model = self._memo["smooth_model"]
            rkey = results.config_key({k: v for k, v in cfg.items() if k not in ("perturb", "tag", "eval")})
            ranges = self._memo.get("ranges") if static and self._memo.get("ranges_key") == rkey else None
            calib = self.calib_ids(calib_seed) if (static and ranges is None) else None
            out = {}
            with quantized(model, w, a, calib_ids=calib, prefix=prefix, ranges=ranges, perturb=None):
                if static and ranges is None:
                    from .fakequant import quant_linears

                    self._memo.update(ranges_key=rkey, ranges={n: (m.lo.clone(), m.hi.clone()) for n, m in
                                                                quant_linears(model).items() if m.lo is not None})
                if perturb is not None:
                    from .fakequant import perturb_ranges

                    perturb_ranges(model, *perturb)
                if static:
                    out["largest_range_at"], out["largest_range"] = largest_static_range(model)
                r = ev.perplexity(model, self.eval_tokens(), self.cfg.seqlen, max_windows=self.cfg.windows,
                                  prefix=prefix, dataset=self.cfg.eval_corpus, split=self.cfg.eval_split)
            out.update(ppl=r.ppl, nll=r.nll, n_windows=r.n_windows, seconds=r.seconds)
            return out

        return results.cached("ppl", cfg, run, scale=self.scale, chapter=CHAPTER)

    def ppl_spread(self, *, seeds=None, eps: float | None = None, with_record: bool = True, **kw) -> ev.Spread:
        """Perplexity of one configuration under ``len(seeds)`` range perturbations (``cfg.perturb_seeds``,
        ``eps = cfg.perturb_eps`` by default), as a :class:`shrink.eval.Spread`.

        ``with_record=True`` (default) adds the unperturbed record as one more draw (seed ``"record"``; kind
        ``"record + range perturbations"``): the record may come from another machine / kernel set, which is the
        same kind of float noise, and a range of 3 perturbations alone misses a 4th draw half of the time.
        ``kw`` as in :meth:`ppl` (``w``, ``a``, ``prefix``, ``prefix_name``, ``smooth_alpha``, ``calib_seed``)."""
        seeds = tuple(self.cfg.perturb_seeds if seeds is None else seeds)
        eps = self.cfg.perturb_eps if eps is None else eps
        pert = ev.spread(lambda s: self.ppl(perturb=(eps, s), **kw)["ppl"], seeds, kind="range perturbation")
        if not with_record:
            return pert
        return ev.Spread((self.ppl(**kw)["ppl"], *pert.values), kind="record + range perturbations",
                         seeds=("record", *seeds))

    def calib_spread(self, *, seeds=None, **kw) -> ev.Spread:
        """Perplexity of one configuration over calibration draws (``cfg.calib_seeds``; the preset's own seed
        is one of them when listed): a :class:`shrink.eval.Spread` of kind ``"calibration draws"``."""
        seeds = self.cfg.calib_seeds if seeds is None else seeds
        return ev.spread(lambda s: self.ppl(calib_seed=s, **kw)["ppl"], seeds, kind="calibration draws")


def search_texts(ctx: BitsContext) -> torch.Tensor:
    """Stage-1 search texts ``[search_nsamples, search_seqlen]`` (seed ``cfg.seed + 1``: disjoint draw from
    the calibration windows)."""
    c = ctx.cfg
    return data.calibration_set(ctx.tok, c.search_corpus, c.search_split, nsamples=c.search_nsamples,
                                seqlen=c.search_seqlen, seed=c.seed + 1)


def search_candidates(ctx: BitsContext) -> torch.Tensor:
    """Candidates scored exactly: the full vocabulary (``shortlist_k=None``, paper) or :func:`shortlist`
    of ``shortlist_k`` tokens built from the calibration windows' frequencies (CPU)."""
    if ctx.cfg.shortlist_k is None:
        return torch.arange(len(ctx.tok))
    from .cushioncache import shortlist

    return shortlist(ctx.tok, ctx.calib_ids().flatten(), ctx.cfg.shortlist_k)


def run_search(ctx: BitsContext) -> dict:
    """Greedy search (Algorithm 1) with the preset's settings, cached; checkpoint after every step under
    ``$SHRINK_CACHE/quant/``. Returns ``{"tokens", "history", "done"}``."""
    from .. import env
    from .cushioncache import greedy_search

    c = ctx.cfg
    conf = {**ctx.base_config(), "search": [c.search_corpus, c.search_split, c.search_nsamples, c.search_seqlen,
                                            c.shortlist_k, c.tau, c.max_len, c.prerank_top, list(c.init_tokens)]}

    def run():
        texts, cands = search_texts(ctx), search_candidates(ctx)
        ck = env.cache_dir("quant") / f"search-{ctx.scale}-{results.config_key(conf)}.json"
        pool = torch.arange(len(ctx.tok)) if c.prerank_top else None
        res = greedy_search(ctx.model, texts, cands, tau=c.tau, max_len=c.max_len, batch_size=c.search_batch_size,
                            checkpoint=ck, prerank_pool=pool, prerank_top=c.prerank_top,
                            init_tokens=tuple(c.init_tokens))
        return res.to_dict()

    return results.cached("search", conf, run, scale=ctx.scale, chapter=CHAPTER)


def greedy_prefix(ctx: BitsContext) -> KVPrefix | None:
    """The stage-1 prefix of :func:`run_search` as a full-precision :class:`KVPrefix` (None if empty)."""
    toks = run_search(ctx)["tokens"]
    return KVPrefix.from_tokens(ctx.model, toks) if toks else None


def frozen_ranges(ctx: BitsContext, prefix: KVPrefix | None) -> dict:
    """Static per-tensor ranges of every decoder linear input, calibrated with ``prefix`` (the stop-grad
    scales of stage 2 in the handbook's interpretation). ``{name: (lo, hi)}``."""
    from .fakequant import calibrate, unwrap_model, wrap_model

    _, a = ctx.cfg.specs("static")
    wrap_model(ctx.model, None, a)
    try:
        return {k: (lo.clone(), hi.clone()) for k, (lo, hi) in
                calibrate(ctx.model, ctx.calib_ids(), prefix=prefix).items()}
    finally:
        unwrap_model(ctx.model)


def tuning_data(ctx: BitsContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-2 training and validation windows from the calibration corpus (seeds ``seed+2``, ``seed+3``)."""
    c = ctx.cfg
    train = data.calibration_set(ctx.tok, c.calib_corpus, c.calib_split, nsamples=c.tune_nsamples,
                                 seqlen=c.tune_seqlen, seed=c.seed + 2)
    val = data.calibration_set(ctx.tok, c.calib_corpus, c.calib_split, nsamples=c.tune_val_nsamples,
                               seqlen=c.tune_seqlen, seed=c.seed + 3)
    return train, val


def tuning_config(ctx: BitsContext, lambda_q: float | None = None, rounding_grad: str = "detach") -> dict:
    """The config that determines a stage-2 run (its cache key; the stage-1 token ids come from the committed
    search record)."""
    c = ctx.cfg
    lam = c.lambda_q if lambda_q is None else lambda_q
    return {**ctx.base_config(), "search": run_search(ctx)["tokens"], "lambda_q": lam, "grad": rounding_grad,
            "tune": [c.tune_steps, c.tune_lr, c.tune_batch_size, c.tune_seqlen, c.tune_nsamples, c.tune_val_nsamples]}


def run_tuning(ctx: BitsContext, lambda_q: float | None = None, rounding_grad: str = "detach") -> dict:
    """Stage 2 from the greedy prefix: ``{"prefix": KVPrefix, "history": [...]}``.

    ``lambda_q=None`` uses the preset's (0.01); ``0`` is plain prefix tuning (Table 3's "+ prefix tuning").
    The tuned prefix (per layer ``[1, H_kv, P, d_head]`` float32 keys and values, ~46 KB at cpu) is stored
    with the results, ``results/<scale>/02-bits/tensors/prefix-tuning-<hash>.safetensors`` (sha256 in the
    JSON record beside it, with the token ids and the training history), keyed by :func:`tuning_config`;
    the returned prefix carries ``origin = "tuned=<that key>"``, which :func:`prefix_key` uses.
    """
    from .cushioncache import tune_prefix

    c = ctx.cfg
    lam = c.lambda_q if lambda_q is None else lambda_q
    conf = tuning_config(ctx, lambda_q, rounding_grad)

    def run():
        init = greedy_prefix(ctx)
        if init is None:
            raise ShrinkError("stage 1 accepted no token; stage 2 needs an initial prefix (lower tau?)")
        train, val = tuning_data(ctx)
        ranges = frozen_ranges(ctx, init)
        torch.manual_seed(c.seed)
        tuned, hist = tune_prefix(ctx.model, init, train, steps=c.tune_steps, lr=c.tune_lr, lambda_q=lam,
                                  batch_size=c.tune_batch_size, ranges=ranges, rounding_grad=rounding_grad,
                                  val_ids=val, eval_every=max(1, c.tune_steps // 4))
        return {"keys": tuned.keys, "values": tuned.values, "token_ids": tuned.token_ids, "history": hist}

    out = results.cached_tensors("prefix-tuning", conf, run, scale=ctx.scale, chapter=CHAPTER)
    prefix = KVPrefix(out["keys"], out["values"], out["token_ids"])
    prefix.origin = f"tuned={results.config_key(conf)}"
    return {"prefix": prefix, "history": out["history"]}


def prefix_key(prefix: KVPrefix | None) -> str:
    """The cache-key string of a prefix, from the config that made it (never from its computed values):

    * ``"none"`` for no prefix;
    * ``prefix.origin`` when set: ``"tuned=<key>"`` for :func:`run_tuning`'s output (the key of its
      :func:`tuning_config`);
    * ``"tokens=[ids]"`` otherwise: a prefix of :meth:`KVPrefix.from_tokens` (the model is in every ppl
      config already).

    A prefix made any other way (trained or edited by hand, loaded from a file) must be given an ``origin``
    naming its config first; one with neither ``origin`` nor token ids raises :class:`ShrinkError`.
    """
    if prefix is None:
        return "none"
    origin = getattr(prefix, "origin", None)
    if origin:
        return str(origin)
    if prefix.token_ids is None:
        raise ShrinkError("this prefix has no token ids and no origin, so no config names it: set "
                          "`prefix.origin = '<name>=<config key>'` (e.g. results.config_key of what made it) "
                          "before caching results that use it.")
    return f"tokens={list(prefix.token_ids)}"


def gap_closed(ppl_q: float, ppl_fp: float, ppl_q_prefix: float, ppl_fp_prefix: float, *, log: bool = False) -> float:
    """Fraction of the quantization gap closed by a prefix, each gap measured against full precision with
    the *same* prefix (bits.md §4.4): ``1 - (q_p - fp_p) / (q - fp)``; with ``log=True`` on log-perplexity
    (mean NLL per token): ``1 - (ln q_p - ln fp_p) / (ln q - ln fp)``."""
    if log:
        ppl_q, ppl_fp, ppl_q_prefix, ppl_fp_prefix = (math.log(v) for v in (ppl_q, ppl_fp, ppl_q_prefix, ppl_fp_prefix))
    return 1.0 - (ppl_q_prefix - ppl_fp_prefix) / (ppl_q - ppl_fp)


def gap_closed_spread(q: ev.Spread, fp: float, q_prefix: ev.Spread, fp_prefix: float, *, log: bool = False) -> ev.Spread:
    """:func:`gap_closed` over every pair (draw of ``q``, draw of ``q_prefix``): ``q.n * q_prefix.n`` values
    (the perturbations of the two configurations are independent, so every pairing is a possible outcome).
    ``fp`` / ``fp_prefix`` are full-precision numbers (they do not depend on quantization ranges)."""
    vals = [gap_closed(x, float(fp), y, float(fp_prefix), log=log) for x in q.values for y in q_prefix.values]
    return ev.Spread(tuple(vals), kind=f"{q.kind} pairs" if not q.kind.endswith("s") else q.kind)


__all__ = ["BitsContext", "prefix_key", "gap_closed", "gap_closed_spread", "run_search", "search_texts", "search_candidates",
           "greedy_prefix", "frozen_ranges", "tuning_data", "tuning_config", "run_tuning"]
