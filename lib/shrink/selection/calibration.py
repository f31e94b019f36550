"""Calibration sets for pruning from four sources, as token windows (notebook 04h, issue 13 item 6).

A calibration set is an int64 tensor ``[nsamples, seqlen]`` of token ids for one tokenizer: what Wanda's
activation norms and SparseGPT's Hessian are summed over. Every source gives exactly
``nsamples * seqlen`` tokens, so the pruners' statistics are sums over the same number of tokens (the
weights chapter's step-count control, 01c/01d: the same data budget and, if a reconstruction followed, the
same number of optimisation steps per block):

``wikitext2``       THE calibration sampler of the weights chapter (:func:`shrink.data.calibration_set`):
                    random windows of the tokenized WikiText-2 validation file (the in-domain baseline; the
                    weights chapter's cpu calibration data).
``random-pool``     ``k`` pool chunks drawn uniformly without replacement (the pool of :mod:`.pools`, no
                    WikiText in it), packed into windows (:func:`pack_texts`).
``dsir-pool``       ``k`` pool chunks drawn by DSIR (:class:`~shrink.selection.DSIR`, hashed n-grams, Gumbel
                    top-k with the official seed stream) with WikiText-2 validation's even articles as the
                    target, packed the same way: the selected text is closer to WikiText in n-gram space
                    although no WikiText is in the pool.
``self-generated``  sequences the dense model sampled itself ("Rethinking Pruning LLMs", App. C; the weights
                    chapter generates them, :func:`shrink.pruning.experiment.self_generated`). This module
                    only turns them into windows (:func:`generated_windows`), re-tokenizing when the target
                    tokenizer differs from the generating one. It does not import :mod:`shrink.pruning`: the
                    axes never import each other.

Packing (:func:`pack_texts`): the chunks are put in a seeded random order, joined with a blank line (how
:mod:`.pools` joins documents), tokenized once without special tokens, and the first
``nsamples * seqlen`` tokens are cut into consecutive windows. Every whitespace-separated word is at least
one token for byte-level BPE and byte tokenizers, so :func:`chunks_needed` ``= ceil(nsamples * seqlen /
words)`` chunks of ``words`` words always suffice (the short check raises otherwise).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import data as D
from .errors import SelectionError

SOURCES = ("wikitext2", "random-pool", "dsir-pool", "self-generated")
SEP = "\n\n"


class CalibrationError(SelectionError):
    """A calibration set cannot be built as asked (unknown source, too little text, wrong shape)."""


@dataclass
class CalibSet:
    """One calibration draw: ``ids`` int64 ``[nsamples, seqlen]``, where it came from and what it holds.

    ``chunk_ids``: pool chunk ids in packing order (pool sources; empty otherwise); ``composition``: share of
    each pool domain among those chunks (pool sources), or ``{source: 1.0}``.
    """

    source: str
    seed: int
    ids: torch.Tensor
    chunk_ids: list = field(default_factory=list)
    composition: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())

    def sha(self) -> str:
        """First 12 hex of the sha256 of the token ids (int64, row-major): a fingerprint of the draw."""
        return hashlib.sha256(self.ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:12]

    def info(self) -> dict:
        """JSON-able description (source, seed, shape, fingerprint, composition, chunk ids)."""
        return {"source": self.source, "seed": self.seed, "shape": list(self.ids.shape), "sha": self.sha(),
                "composition": self.composition, "chunk_ids": list(self.chunk_ids)}


def _check_shape(nsamples, seqlen) -> None:
    for name, v, lo in (("nsamples", nsamples, 1), ("seqlen", seqlen, 2)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise CalibrationError(f"{name}={v!r} must be an integer >= {lo}; e.g. nsamples=8, seqlen=256 (the "
                                   "weights chapter's cpu calibration budget).")


def chunks_needed(nsamples: int, seqlen: int, words: int) -> int:
    """Chunks of ``words`` words that always hold ``nsamples * seqlen`` tokens (a word is >= 1 token)."""
    _check_shape(nsamples, seqlen)
    if words <= 0:
        raise CalibrationError(f"words per chunk must be positive, got {words}; use the pool's (128).")
    return -(-nsamples * seqlen // words)


def pack_texts(tokenizer, texts: list[str], nsamples: int, seqlen: int) -> torch.Tensor:
    """Join ``texts`` (in the given order) with a blank line, tokenize once (no special tokens) and cut the
    first ``nsamples * seqlen`` tokens into consecutive windows: int64 ``[nsamples, seqlen]``."""
    _check_shape(nsamples, seqlen)
    if not texts:
        raise CalibrationError("pack_texts got no texts; select at least chunks_needed(nsamples, seqlen, words) "
                               "chunks.")
    stream = D.tokenize_documents(tokenizer, [SEP.join(texts)])[0]
    need = nsamples * seqlen
    if stream.numel() < need:
        raise CalibrationError(f"{len(texts)} texts give {stream.numel()} tokens < nsamples x seqlen = {need}; "
                               "select more chunks (chunks_needed) or lower nsamples/seqlen.")
    return stream[:need].reshape(nsamples, seqlen).clone()


def _composition(domains: list[str]) -> dict:
    n = Counter(domains)
    return {d: n[d] / len(domains) for d in sorted(n)}


def _packed(source, tokenizer, pool, idx, nsamples, seqlen, seed) -> CalibSet:
    order = [int(i) for i in idx]
    random.Random(seed).shuffle(order)  # the pool is grouped by domain; pack in a seeded random order
    ids = pack_texts(tokenizer, [pool[i]["text"] for i in order], nsamples, seqlen)
    return CalibSet(source, seed, ids, [pool[i]["id"] for i in order], _composition([pool[i]["domain"] for i in order]))


def wikitext_windows(tokenizer, nsamples: int, seqlen: int, seed: int) -> CalibSet:
    """``nsamples`` random windows of WikiText-2 validation (:func:`shrink.data.calibration_set`, the weights
    chapter's sampler: the same seed gives the same windows as its notebooks)."""
    _check_shape(nsamples, seqlen)
    ids = D.calibration_set(tokenizer, "wikitext2", "validation", nsamples=nsamples, seqlen=seqlen, seed=seed)
    return CalibSet("wikitext2", seed, ids, [], {"wikitext2": 1.0})


def random_pool_windows(tokenizer, pool: list[dict], nsamples: int, seqlen: int, seed: int, *,
                        words: int = 128) -> CalibSet:
    """``chunks_needed`` chunks drawn uniformly without replacement (``np.random.default_rng(seed)``, as the
    chapter's random baseline), packed into windows."""
    k = chunks_needed(nsamples, seqlen, words)
    if k > len(pool):
        raise CalibrationError(f"the pool has {len(pool)} chunks < {k} needed for {nsamples} x {seqlen} tokens; "
                               "use a larger pool (max_per_domain=None) or fewer windows.")
    idx = np.sort(np.random.default_rng(seed).choice(len(pool), size=k, replace=False))
    return _packed("random-pool", tokenizer, pool, idx, nsamples, seqlen, seed)


def dsir_pool_windows(tokenizer, pool: list[dict], dsir, nsamples: int, seqlen: int, seed: int, *,
                      words: int = 128) -> CalibSet:
    """``chunks_needed`` chunks drawn by a fitted :class:`~shrink.selection.DSIR` (``dsir.fit(pool texts,
    target texts)``; Gumbel top-k, ``seed`` = the official ``np.random.seed``), packed into windows."""
    if getattr(dsir, "log_diff", None) is None or getattr(dsir, "raw_features", None) is None:
        raise CalibrationError("dsir_pool_windows needs a fitted DSIR: DSIR(...).fit([c['text'] for c in pool], "
                               "target_texts).")
    if len(dsir.raw_features) != len(pool):
        raise CalibrationError(f"the DSIR was fitted on {len(dsir.raw_features)} texts but the pool has {len(pool)} "
                               "chunks; fit it on this pool's texts.")
    idx = dsir.select(chunks_needed(nsamples, seqlen, words), seed=seed)
    return _packed("dsir-pool", tokenizer, pool, idx, nsamples, seqlen, seed)


def _same_vocab(a, b) -> bool:
    if a is b:
        return True
    try:
        return a.get_vocab() == b.get_vocab()
    except AttributeError:  # e.g. the byte tokenizer of the tiny models
        return type(a) is type(b) and getattr(a, "vocab_size", None) == getattr(b, "vocab_size", None)


def generated_windows(ids: torch.Tensor, nsamples: int, seqlen: int, *, seed: int = 0, tokenizer=None,
                      source_tokenizer=None) -> CalibSet:
    """Self-generated sequences as calibration windows.

    Args:
        ids: int64 ``[m, t]`` sequences the dense model generated (its tokenizer = ``source_tokenizer``).
        nsamples, seqlen: the window shape wanted.
        seed: recorded (the generation seed).
        tokenizer, source_tokenizer: when both are given and differ in vocabulary, every sequence is decoded
            with ``source_tokenizer`` and the texts are packed with ``tokenizer`` (:func:`pack_texts`);
            otherwise the ids are used as they are and must hold ``m >= nsamples`` rows of ``t >= seqlen``
            tokens (the first ``nsamples`` rows, first ``seqlen`` tokens).
    """
    _check_shape(nsamples, seqlen)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        raise CalibrationError("self-generated ids must be an int64 tensor [m, t] (shrink.pruning.self_generate), "
                               f"got {type(ids).__name__} {getattr(ids, 'dtype', '')} {tuple(getattr(ids, 'shape', ()))}.")
    if tokenizer is not None and source_tokenizer is not None and not _same_vocab(tokenizer, source_tokenizer):
        texts = [source_tokenizer.decode(row.tolist()) for row in ids]
        return CalibSet("self-generated", seed, pack_texts(tokenizer, texts, nsamples, seqlen), [],
                        {"self-generated": 1.0})
    if ids.shape[0] < nsamples or ids.shape[1] < seqlen:
        raise CalibrationError(f"{tuple(ids.shape)} self-generated tokens cannot give {nsamples} windows of {seqlen}; "
                               "generate at least nsamples sequences of seqlen tokens (self_generate(model, tok, "
                               f"{nsamples}, {seqlen})).")
    return CalibSet("self-generated", seed, ids[:nsamples, :seqlen].clone(), [], {"self-generated": 1.0})


def build(source: str, tokenizer, nsamples: int, seqlen: int, seed: int, *, pool: list[dict] | None = None,
          dsir=None, generated: torch.Tensor | None = None, words: int = 128, source_tokenizer=None) -> CalibSet:
    """One calibration draw of ``source`` (see the module docstring); ``seed`` picks the draw.

    Pool sources need ``pool`` (and ``dsir`` fitted on it for ``dsir-pool``); ``self-generated`` needs
    ``generated`` (the sequences of draw ``seed``).
    """
    if source not in SOURCES:
        raise CalibrationError(f"unknown calibration source {source!r}; use one of {SOURCES}.")
    if source == "wikitext2":
        return wikitext_windows(tokenizer, nsamples, seqlen, seed)
    if source == "self-generated":
        if generated is None:
            raise CalibrationError("source 'self-generated' needs generated= (int64 [m, t] from "
                                   "shrink.pruning.experiment.self_generated or self_generate).")
        return generated_windows(generated, nsamples, seqlen, seed=seed, tokenizer=tokenizer,
                                 source_tokenizer=source_tokenizer)
    if pool is None:
        raise CalibrationError(f"source {source!r} needs pool= (shrink.selection.pools.build_pool()).")
    if source == "random-pool":
        return random_pool_windows(tokenizer, pool, nsamples, seqlen, seed, words=words)
    if dsir is None:
        raise CalibrationError("source 'dsir-pool' needs dsir= (a DSIR fitted on the pool's texts and the target).")
    return dsir_pool_windows(tokenizer, pool, dsir, nsamples, seqlen, seed, words=words)
