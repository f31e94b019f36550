"""Small helpers the bits notebooks share, so that cells stay short and identical measurements are cached
once (same config -> same result record, whichever notebook asks first).

Every perplexity goes through :func:`shrink.eval.perplexity` (``prefix=`` for CushionCache prefixes).
"""

from __future__ import annotations

import copy

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

    def calib_ids(self) -> torch.Tensor:
        c = self.cfg
        return data.calibration_set(self.tok, c.calib_corpus, c.calib_split, nsamples=c.calib_nsamples,
                                    seqlen=c.calib_seqlen, seed=c.seed)

    def base_config(self) -> dict:
        c = self.cfg
        return {"model": c.model, "eval": [c.eval_corpus, c.eval_split, c.seqlen, c.windows],
                "calib": [c.calib_corpus, c.calib_split, c.calib_nsamples, c.calib_seqlen, c.seed]}

    def ppl(self, *, w: QuantSpec | None = None, a: QuantSpec | None = None, prefix: KVPrefix | None = None,
            prefix_name: str = "none", smooth_alpha: float | None = None, tag: str = "") -> dict:
        """Cached perplexity of one configuration: ``{"ppl", "largest_range", "largest_range_at"}``.

        ``prefix_name`` must identify the prefix (token ids, or a file hash for tuned prefixes): it is part
        of the cache key. SmoothQuant (``smooth_alpha``) runs on a deep copy; the loaded model is never
        modified.
        """
        cfg = {**self.base_config(), "w": w.to_dict() if w else None, "a": a.to_dict() if a else None,
               "prefix": prefix_name, "smooth_alpha": smooth_alpha, "tag": tag}

        def run():
            model = self.model
            calib = self.calib_ids() if (a is not None and a.static) else None
            if smooth_alpha is not None:
                model = copy.deepcopy(model)
                smooth_model(model, act_scales(model, self.calib_ids(), prefix=prefix), smooth_alpha)
            out = {}
            with quantized(model, w, a, calib_ids=calib, prefix=prefix):
                if a is not None and a.static:
                    out["largest_range_at"], out["largest_range"] = largest_static_range(model)
                r = ev.perplexity(model, self.eval_tokens(), self.cfg.seqlen, max_windows=self.cfg.windows,
                                  prefix=prefix, dataset=self.cfg.eval_corpus, split=self.cfg.eval_split)
            out.update(ppl=r.ppl, n_windows=r.n_windows, seconds=r.seconds)
            return out

        return results.cached("ppl", cfg, run, scale=self.scale, chapter=CHAPTER)


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


def run_tuning(ctx: BitsContext, lambda_q: float | None = None, rounding_grad: str = "detach") -> dict:
    """Stage 2 from the greedy prefix, cached as tensors: ``{"prefix": KVPrefix, "history": [...]}``.

    ``lambda_q=None`` uses the preset's (0.01); ``0`` is plain prefix tuning (Table 3's "+ prefix tuning").
    """
    from .cushioncache import tune_prefix

    c = ctx.cfg
    lam = c.lambda_q if lambda_q is None else lambda_q
    conf = {**ctx.base_config(), "search": run_search(ctx)["tokens"], "lambda_q": lam, "grad": rounding_grad,
            "tune": [c.tune_steps, c.tune_lr, c.tune_batch_size, c.tune_seqlen, c.tune_nsamples, c.tune_val_nsamples]}

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

    out = results.cached_tensors(f"prefix-tuning-{ctx.scale}", conf, run)
    return {"prefix": KVPrefix(out["keys"], out["values"], out["token_ids"]), "history": out["history"]}


def prefix_key(prefix: KVPrefix | None) -> str:
    """A cache-key string for a prefix: token ids for token prefixes, a content hash for tuned ones."""
    if prefix is None:
        return "none"
    h = float(sum(k.double().sum() * (i + 1) for i, k in enumerate(prefix.keys)))
    return f"tokens={prefix.token_ids}|kvsum={h:.6e}"


def gap_closed(ppl_q: float, ppl_fp: float, ppl_q_prefix: float, ppl_fp_prefix: float) -> float:
    """Fraction of the quantization gap closed by a prefix, each gap measured against full precision with
    the *same* prefix (bits.md §4.4): ``1 - (q_p - fp_p) / (q - fp)``."""
    return 1.0 - (ppl_q_prefix - ppl_fp_prefix) / (ppl_q - ppl_fp)


__all__ = ["BitsContext", "prefix_key", "gap_closed", "run_search", "search_texts", "search_candidates",
           "greedy_prefix", "frozen_ranges", "tuning_data", "run_tuning"]
