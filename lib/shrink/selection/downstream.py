"""Downstream value of a selection: a byte-level decoder trained from scratch on the selected chunks (04k).

DSIR (Xie et al., NeurIPS 2023, Table 2 / the README's GLUE table) trains BERT-base from scratch on each
selection and reports downstream accuracy; its KL-reduction figure correlates KL reduction with that accuracy
across selection methods (r = 0.82 in arXiv v1, 0.89 in the final abstract). Here, offline and at toy scale:

**Selection** (:func:`shrink.selection.experiment.select`): int64 indices into the 128-word chunks of
``experiment.setting(cfg, with_wiki=False).pool`` (the paper's setting: the target's domain is not in the
pool; the target is WikiText-2 validation's even articles).

**Stream** (:func:`selection_stream`): the UTF-8 bytes of the selected chunks in ascending pool order,
joined by ``cfg.separator`` (one space: a chunk is words joined by one space, so the stream is one long
word sequence). Byte ids 0-255 are the byte tokenizer's tokens (``byte-llama`` / ``tiny-llama``).

**Run** (:func:`train_on_selection`): :func:`shrink.train.train` (the one loop) from a fresh
``models.load(cfg.model, seed=seed)`` on ``lm_batches(stream, batch_size, seqlen, seed=seed)``: the **same
token budget** ``steps x batch_size x seqlen`` for every selection (a small selection is seen for more
epochs), AdamW with linear warm-up and cosine decay (``scratch.train_config``). Under one seed two
selections start from the same initial weights and draw windows at the same positions of their own
streams: differences between them are paired by seed.

**Evaluation**: WikiText-2 *test* bits per byte on ``wiki_windows`` fixed, evenly spaced windows of
``seqlen`` bytes (``scratch.wiki_test_windows``), on the whitespace-normalised text (``wiki_bpb``, the
chunks' form: the pool has no newlines) and on the raw text (``wiki_raw_bpb``, the windows of 04f/04g).
Perplexity per byte is ``2 ** bpb``; the word-level equivalent is ``2 ** (bpb * bytes_per_word)`` with
bytes per word of the normalised test text (``bytes_per_word`` in the record).

One record per run (``downstream-run`` in ``results/<scale>/04-data/``), keyed by the pool config, the
selection's ``tag``, size and sha256 (indices are data, not computed floats), the training config and the seed.
The record also carries the selection's KL reduction in both metric spaces of 04b and its composition.

Introduced in: notebooks/04-data/04k-downstream-from-scratch.md
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .. import models, results
from .. import train as T
from ..scales import PresetError, register
from . import experiment as E
from . import scratch as S
from .errors import SelectionError
from .presets import DataPreset

CHAPTER = "04-data"
#: The selections of the 04k grid (all cheap: see ``experiment.select``).
METHODS = ("dsir-exact", "random", "heuristic-cls", "full-pool")


@dataclass(frozen=True)
class DownstreamPreset(DataPreset):
    """:class:`~shrink.selection.presets.DataPreset`'s pool, target and DSIR knobs (``k`` chunks per selection,
    ``seeds``) plus the from-scratch run: ``model`` trained ``steps`` AdamW steps of ``batch_size x seqlen``
    bytes at peak ``lr`` (``warmup`` linear steps, cosine decay), evaluated every ``eval_every`` steps and at
    the end on ``wiki_windows`` WikiText-2 test windows; ``methods`` are the selections run on every seed,
    ``one_seed_methods`` those run on the first seed only (shown as one-seed points, never in a verdict)."""

    methods: tuple = ("dsir-exact", "random", "heuristic-cls")
    one_seed_methods: tuple = ("full-pool",)
    separator: str = " "
    steps: int = 300
    batch_size: int = 8
    seqlen: int = 128
    lr: float = 3e-3
    warmup: int = 20
    eval_every: int = 100
    wiki_windows: int = 64

    def check(self) -> None:
        super().check()
        bad = [m for m in (*self.methods, *self.one_seed_methods) if m not in E.SELECT_METHODS]
        if bad or not self.methods:
            raise PresetError(f"DownstreamPreset.methods {bad or '()'}: use some of {E.SELECT_METHODS}")
        if not 0 <= self.warmup <= self.steps:
            raise PresetError(f"DownstreamPreset.warmup={self.warmup} must lie in [0, steps={self.steps}]")
        if self.eval_every < 0:
            raise PresetError(f"DownstreamPreset.eval_every={self.eval_every} must be >= 0 (0: only at the end)")


register("data-downstream", {
    "tiny": DownstreamPreset(model="tiny-llama", max_per_domain=60, target_max_chunks=200, k=40, seeds=(0, 1),
                             steps=12, batch_size=4, seqlen=64, warmup=2, eval_every=6, wiki_windows=8),
    # 3 selections x 3 seeds + the full pool on seed 0, 300 steps of 8 x 128 bytes = 307,200 bytes per run (~0.8
    # epoch of a 500-chunk selection, ~390 KB): 10 x 300 x 191 ms ~ 9.5 min on one idle core (byte-llama at
    # 8 x 128), plus ~20 s for the pool's features and the DSIR / classifier fits. Measured on the shared machine
    # (load 13 on 2 cores): ~15 % of a core, so ~1 h of wall clock
    "cpu": DownstreamPreset(model="byte-llama", k=500),
    # DSIR trains BERT-base 50k steps x 4096 x 128 tokens on 51.2M Pile chunks; offline, the same code at the
    # paper's sequence length on a GPU-sized budget of the offline pool (not run here)
    "paper": DownstreamPreset(model="byte-llama", k=5000, steps=5000, seqlen=512, batch_size=32, lr=1e-3, warmup=200,
                              eval_every=500, wiki_windows=512),
})


def selection_stream(texts, idx, separator: str = " ") -> torch.Tensor:
    """``[N]`` int64 byte ids of ``separator.join(texts[i] for i in sorted(idx))`` (UTF-8).

    Raises when an index is out of range, repeated, or the selection is empty.
    """
    idx = np.asarray(idx)
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise SelectionError(f"a selection must be a non-empty 1-D array of integer chunk indices, got shape "
                             f"{idx.shape} dtype {idx.dtype}; pass experiment.select(...) output.")
    if idx.min() < 0 or idx.max() >= len(texts):
        raise SelectionError(f"selection indices must lie in [0, {len(texts)}) (the pool size), got "
                             f"[{int(idx.min())}, {int(idx.max())}]; select from experiment.setting(cfg).pool.")
    order = np.sort(idx)
    if np.any(order[1:] == order[:-1]):
        raise SelectionError("a chunk is selected more than once; a selection is a set of chunks: pass "
                             "np.unique(idx) (or resample without replacement).")
    data = separator.join(texts[i] for i in order.tolist()).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def selection_sha(idx) -> str:
    """sha256 (16 hex) of the sorted int64 indices: the selection's identity in cache keys."""
    return hashlib.sha256(np.sort(np.asarray(idx, np.int64)).tobytes()).hexdigest()[:16]


def budget(cfg) -> int:
    """Bytes seen by every run: ``steps x batch_size x seqlen`` (the same for every selection)."""
    return cfg.steps * cfg.batch_size * cfg.seqlen


@lru_cache(maxsize=4)
def _wiki(seqlen: int, n: int) -> dict:
    norm = S.wiki_test_windows(seqlen, n, normalize_ws=True)
    raw = S.wiki_test_windows(seqlen, n)
    from .. import data as D

    text = " ".join(D.load_text("wikitext2", "test").split())
    return {"norm": norm, "raw": raw, "bytes_per_word": len(text.encode("utf-8")) / len(text.split())}


def eval_config(cfg) -> dict:
    return {"every": cfg.eval_every, "windows": cfg.wiki_windows, "seqlen": cfg.seqlen,
            "wiki": "wikitext2/test, evenly spaced windows; wiki_bpb: whitespace-normalised, wiki_raw_bpb: raw"}


def make_eval_fn(cfg):
    """``eval_fn(model, t)`` of the runs: WikiText-2 test bits per byte (normalised and raw windows)."""
    w = _wiki(cfg.seqlen, cfg.wiki_windows)
    norm_b, raw_b = S.window_batches(w["norm"], cfg.batch_size), S.window_batches(w["raw"], cfg.batch_size)

    def eval_fn(model, t):
        return {"wiki_bpb": T.evaluate_loss(model, norm_b)["loss"] / math.log(2),
                "wiki_raw_bpb": T.evaluate_loss(model, raw_b)["loss"] / math.log(2)}

    return eval_fn


def run_config(cfg, idx, *, seed: int, tag: str, with_wiki: bool = False) -> dict:
    """The cache key of one run (pool, selection identity, training, evaluation, seed)."""
    return {"model": cfg.model, "pool": E.pool_config(cfg, with_wiki),
            "selection": {"tag": str(tag), "n": int(np.asarray(idx).size), "sha": selection_sha(idx)},
            "separator": cfg.separator, "batch_size": cfg.batch_size, "seqlen": cfg.seqlen, "budget": budget(cfg),
            "train": S.train_config(cfg, seed).to_dict(), "eval": eval_config(cfg), "seed": int(seed)}


def train_on_selection(cfg, idx, *, seed: int, scale: str, tag: str, with_wiki: bool = False) -> dict:
    """Train ``cfg.model`` from scratch on the chunks ``idx`` of ``experiment.setting(cfg, with_wiki).pool``
    for the fixed budget and evaluate WikiText-2 test (see the module docstring). Cached as ``downstream-run``.

    Args:
        cfg: a :class:`DownstreamPreset` (``shrink.scales.get("data-downstream", scale)``); for indices into
            the curation baselines' smaller pool pass ``cfg.with_(max_per_domain=cfg.baseline_max_per_domain)``
            (the pool's config is part of the record's key).
        idx: int64 chunk indices (any order, no repeats).
        seed: initial weights, window draws.
        scale: results scale.
        tag: the selection's name in the record (``"dsir-exact"``, ``"semdedup-eps0.05"``...).
        with_wiki: ``idx`` indexes the pool with WikiText's odd validation articles (04b's second setting).

    Returns:
        the record's metrics: ``wiki_bpb`` / ``wiki_raw_bpb`` / ``wiki_ppl_byte`` / ``wiki_ppl_word``, ``evals``,
        ``history``, ``selection`` (KL reduction in both spaces, composition, n, unique bytes, epochs),
        ``tokens``, ``seconds``.
    """
    if not isinstance(tag, str) or not tag:
        raise SelectionError(f"tag={tag!r}: name the selection (e.g. 'dsir-exact'); it is part of the record.")
    st = E.setting(cfg, with_wiki)
    stream = selection_stream(st.texts, idx, cfg.separator)  # validates idx before anything is cached
    if stream.numel() < cfg.seqlen + 1:
        raise SelectionError(f"the selection has {stream.numel()} bytes, fewer than seqlen+1 = {cfg.seqlen + 1}; "
                             "select more chunks.")
    config = run_config(cfg, idx, seed=seed, tag=tag, with_wiki=with_wiki)

    def run() -> dict:
        tc = S.train_config(cfg, seed)
        model, _ = models.load(cfg.model, seed=seed)
        res = T.train(model, T.lm_batches(stream, cfg.batch_size, cfg.seqlen, seed=seed), tc,
                      eval_fn=make_eval_fn(cfg), progress=False)
        final = res.evals[-1]
        bpw = _wiki(cfg.seqlen, cfg.wiki_windows)["bytes_per_word"]
        sel = E.describe(st, np.sort(np.asarray(idx, np.int64)), cfg.kl_alpha)
        sel.update(tag=tag, n=int(np.asarray(idx).size), unique_bytes=int(stream.numel()),
                   epochs=budget(cfg) / int(stream.numel()))
        return {"wiki_bpb": final["wiki_bpb"], "wiki_raw_bpb": final["wiki_raw_bpb"],
                "wiki_ppl_byte": 2.0 ** final["wiki_bpb"], "wiki_ppl_word": 2.0 ** (final["wiki_bpb"] * bpw),
                "bytes_per_word": bpw, "evals": res.evals, "history": res.history, "final_train_loss":
                res.history[-1]["loss"], "tokens": res.tokens, "seconds": round(res.seconds, 2),
                "seconds_per_step": round(res.seconds / tc.steps, 4), "selection": sel,
                "stream_sha": hashlib.sha256(stream.to(torch.uint8).numpy().tobytes()).hexdigest()[:16]}

    return results.cached("downstream-run", config, run, scale=scale, chapter=CHAPTER)


def method_run(cfg, method: str, *, seed: int, scale: str) -> dict:
    """One cell of the 04k grid: ``experiment.select(cfg, method, seed)`` then :func:`train_on_selection`."""
    return train_on_selection(cfg, E.select(cfg, method, seed), seed=seed, scale=scale, tag=method)


def grid(cfg) -> list[tuple[str, int]]:
    """``(method, seed)`` of every 04k run in run order: ``methods`` seed by seed (so an interrupted run has
    whole seeds), then ``one_seed_methods`` on the first seed."""
    out = [(m, s) for s in cfg.seeds for m in cfg.methods]
    return out + [(m, cfg.seeds[0]) for m in cfg.one_seed_methods if m not in cfg.methods]
