"""Hashed n-gram features of DSIR, two ways: **exact** (the official package's buckets) and **fast**.

The official ``data-selection`` 1.0.3 (``hashed_ngram_dsir.get_ngram_counts``) lower-cases a text, splits
it with nltk's ``WordPunctTokenizer`` — exactly the regex ``\\w+|[^\\w\\s]+`` (Unicode, see
:data:`TOKEN_PATTERN`; compiled with the ``regex`` module by nltk >= 3.9.3, with ``re`` before, which
matters for combining marks: :data:`ENGINES`) — and hashes every unigram and every bigram (the two words joined by one space)
into ``num_buckets`` buckets with

.. math::  b(s) = \\mathrm{int}(\\mathrm{sha256}(s)) \\bmod m,\\qquad m = 10^4 .

An example becomes the count vector :math:`z \\in \\mathbb{N}^m`. Building a Python string and a SHA-256
per n-gram is where the official code spends its time; the two modes here never build one per n-gram:

``exact``  tokens get integer ids (one dict look-up per token); unigram buckets are SHA-256 of each
           *distinct* token, bigram buckets SHA-256 of each *distinct* bigram, memoised in a sorted NumPy
           table keyed by ``id_1 << 32 | id_2``; every occurrence is a vectorised look-up. Same buckets
           as the official package, bit for bit.
``fast``   a token's 64-bit hash is BLAKE2b-64 of its UTF-8 bytes (once per distinct token); a bigram's
           bucket is a splitmix64 mix of the two token hashes, in NumPy ``uint64`` over whole batches.
           Different buckets from the official ones (a different hash function, so different collisions),
           same model and same features otherwise; how much the weights agree is measured, not assumed.

Both are functions of the text alone (not of the order in which a pool is processed), so shards hashed in
different processes agree. Output: :class:`Features`, the flat bucket ids of all n-grams of a batch of
examples and the example each belongs to (no dense ``[n, m]`` matrix).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from itertools import chain, islice
from typing import Iterable, Sequence

import numpy as np

from .errors import SelectionError

#: nltk ``WordPunctTokenizer._pattern`` (flags re.UNICODE | re.MULTILINE | re.DOTALL).
TOKEN_PATTERN = r"\w+|[^\w\s]+"
#: Regex engines: nltk >= 3.9.3 compiles tokenizer patterns with the third-party ``regex`` module
#: (``nltk.redos``), older nltk with the stdlib ``re``. They differ on combining marks (U+0303 in "ɪ̃" is
#: ``\w`` for ``regex``, not for ``re``), so the official package's features depend on the nltk version.
ENGINES = ("regex", "re")
MODES = ("exact", "fast")


def _compile(engine: str):
    if engine == "regex":
        import regex

        return regex.compile(TOKEN_PATTERN, regex.UNICODE | regex.MULTILINE | regex.DOTALL)
    if engine == "re":
        return re.compile(TOKEN_PATTERN, re.UNICODE | re.MULTILINE | re.DOTALL)
    raise SelectionError(f"unknown regex engine {engine!r}: use 'regex' (nltk >= 3.9.3, the default) or 're' "
                         "(older nltk).")


def nltk_engine() -> str:
    """The engine the installed nltk uses for ``WordPunctTokenizer`` (``"regex"`` or ``"re"``)."""
    import importlib.util

    return "regex" if importlib.util.find_spec("nltk.redos") is not None else "re"


_TOKEN = _compile("regex")
_K1 = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def tokenize(text: str, engine: str = "regex") -> list[str]:
    """``WordPunctTokenizer().tokenize(text.lower())`` without nltk (``engine``: see :data:`ENGINES`)."""
    return (_TOKEN if engine == "regex" else _compile(engine)).findall(text.lower())


def sha256_bucket(s: str, num_buckets: int = 10000) -> int:
    """The official bucket of one n-gram string: ``int(sha256(s).hexdigest(), 16) % num_buckets``."""
    return int.from_bytes(hashlib.sha256(s.encode("utf-8")).digest(), "big") % num_buckets


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


@dataclass
class Features:
    """Hashed n-grams of ``n`` examples.

    Attributes:
        buckets: int32 ``[M]``, the bucket of every n-gram occurrence (unigrams, then bigrams, per batch).
        example: int32 ``[M]``, the example (0..n-1) each occurrence belongs to.
        n_tokens: int64 ``[n]``, WordPunct tokens per example (the official "length" metadata equals this
            for ``ngrams=2``: ``(sum(z) + 1) // 2``).
        num_buckets: ``m``.
    """

    buckets: np.ndarray
    example: np.ndarray
    n_tokens: np.ndarray
    num_buckets: int

    def __len__(self) -> int:
        return int(self.n_tokens.shape[0])

    def counts(self, mask: np.ndarray | None = None) -> np.ndarray:
        """Summed count vector ``sum_i z_i`` (int64 ``[m]``) over all examples or a boolean ``mask [n]``."""
        b = self.buckets if mask is None else self.buckets[np.asarray(mask, bool)[self.example]]
        return np.bincount(b, minlength=self.num_buckets).astype(np.int64)

    def score(self, log_diff: np.ndarray) -> np.ndarray:
        """``z_i · log_diff`` for every example: float64 ``[n]`` (DSIR's log importance weight)."""
        return np.bincount(self.example, weights=np.asarray(log_diff, np.float64)[self.buckets],
                           minlength=len(self))

    def dense(self, i: int) -> np.ndarray:
        """The official dense count vector ``z_i`` (int64 ``[m]``) of one example."""
        return np.bincount(self.buckets[self.example == i], minlength=self.num_buckets).astype(np.int64)

    def ngram_totals(self) -> np.ndarray:
        """``sum(z_i)`` per example (int64 ``[n]``)."""
        return np.bincount(self.example, minlength=len(self)).astype(np.int64)

    @staticmethod
    def concat(parts: Sequence["Features"]) -> "Features":
        if not parts:
            raise SelectionError("no features to concatenate: the pool is empty; build a pool with "
                                 "shrink.selection.pools.build_pool or check the shard glob.")
        offs = np.cumsum([0] + [len(p) for p in parts[:-1]])
        return Features(np.concatenate([p.buckets for p in parts]),
                        np.concatenate([p.example + np.int32(o) for p, o in zip(parts, offs)]).astype(np.int32),
                        np.concatenate([p.n_tokens for p in parts]), parts[0].num_buckets)


class Featurizer:
    """Hashed unigram(+bigram) features in ``mode`` ``"exact"`` or ``"fast"`` (module docstring).

    Args:
        mode: ``"exact"`` (official SHA-256 buckets) or ``"fast"`` (BLAKE2b/splitmix64 buckets).
        ngrams: 1 (unigrams) or 2 (unigrams + bigrams, the official default).
        num_buckets: ``m`` (official default 10,000; at most 2**31).
        batch_size: examples hashed per vectorised batch.
        engine: the tokenizer's regex engine, ``"regex"`` (as nltk >= 3.9.3) or ``"re"`` (older nltk).
        salt: fast mode only: a key for BLAKE2b, giving an independent hash family (``salt=1`` is the
            handbook's *held-out* metric space, in which neither mode's selection was optimised).

    The object keeps its memo tables (token ids, bucket tables) between calls; it is picklable.
    """

    def __init__(self, mode: str = "exact", ngrams: int = 2, num_buckets: int = 10000, batch_size: int = 2048,
                 salt: int = 0, engine: str = "regex"):
        if mode not in MODES:
            raise SelectionError(f"unknown featurizer mode {mode!r}; use 'exact' (official SHA-256 buckets) "
                                 "or 'fast' (vectorised hashing).")
        if ngrams not in (1, 2):
            raise SelectionError(f"ngrams={ngrams} is not implemented: use 1 (unigrams) or 2 (unigrams + bigrams, "
                                 "the official default).")
        if not 1 <= num_buckets < 2**31:
            raise SelectionError(f"num_buckets={num_buckets} must be in [1, 2**31): use 10000 (the DSIR default).")
        if salt and mode != "fast":
            raise SelectionError("salt applies to mode='fast' only (exact mode is the official SHA-256): use "
                                 "mode='fast' with a salt, or drop the salt.")
        self.mode, self.ngrams, self.num_buckets, self.batch_size = mode, ngrams, int(num_buckets), batch_size
        self.salt = int(salt)
        self.engine = engine
        self._re = _compile(engine)
        self._key = self.salt.to_bytes(8, "little") if self.salt else b""
        self._vocab: dict[str, int] = {}
        self._tokens: list[str] = []
        self._tok_val = np.zeros(0, np.uint64)  # exact: unigram bucket; fast: 64-bit token hash
        self._bi_keys = np.zeros(0, np.int64)  # exact: sorted memo of bigram keys
        self._bi_vals = np.zeros(0, np.int32)

    def __call__(self, texts: Iterable[str]) -> Features:
        parts, batch = [], []
        for t in texts:
            batch.append(t)
            if len(batch) == self.batch_size:
                parts.append(self._batch(batch))
                batch = []
        if batch or not parts:
            parts.append(self._batch(batch))
        return Features.concat(parts)

    # ------------------------------------------------------------------------------------------------
    def _ids(self, toks: list[list[str]]) -> np.ndarray:
        vocab = self._vocab
        n0 = len(vocab)
        ids = np.fromiter([vocab.setdefault(t, len(vocab)) for t in chain.from_iterable(toks)], np.int64)
        if len(vocab) > n0:
            new = list(islice(vocab, n0, None))
            self._tokens.extend(new)
            if self.mode == "exact":
                m = self.num_buckets
                vals = np.fromiter((sha256_bucket(t, m) for t in new), np.uint64, len(new))
            else:
                key = self._key
                vals = np.fromiter((int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8, key=key).digest(),
                                                   "little") for t in new), np.uint64, len(new))
            self._tok_val = np.concatenate([self._tok_val, vals])
        return ids

    def _batch(self, texts: list[str]) -> Features:
        m = self.num_buckets
        findall = self._re.findall
        toks = [findall(t.lower()) for t in texts]
        lens = np.fromiter(map(len, toks), np.int64, len(toks))
        ids = self._ids(toks)
        ex = np.repeat(np.arange(len(toks), dtype=np.int32), lens)
        tv = self._tok_val[ids]
        uni = (tv % np.uint64(m)).astype(np.int32) if self.mode == "fast" else tv.astype(np.int32)
        if self.ngrams == 1 or ids.size < 2:
            return Features(uni, ex, lens, m)
        valid = np.ones(ids.size - 1, bool)
        last = np.cumsum(lens) - 1
        last = last[(last >= 0) & (last < ids.size - 1)]
        valid[last] = False
        a, b = ids[:-1][valid], ids[1:][valid]
        if self.mode == "fast":
            h = _splitmix((self._tok_val[a] * _K1) ^ self._tok_val[b])
            bi = (h % np.uint64(m)).astype(np.int32)
        else:
            bi = self._exact_bigrams((a << 32) | b)
        return Features(np.concatenate([uni, bi]), np.concatenate([ex, ex[:-1][valid]]), lens, m)

    def _exact_bigrams(self, keys: np.ndarray) -> np.ndarray:
        uk, inv = np.unique(keys, return_inverse=True)
        pos = np.searchsorted(self._bi_keys, uk)
        found = np.zeros(uk.size, bool)
        inside = pos < self._bi_keys.size
        found[inside] = self._bi_keys[pos[inside]] == uk[inside]
        vals = np.empty(uk.size, np.int32)
        vals[found] = self._bi_vals[pos[found]]
        if not found.all():
            new = uk[~found]
            tk, m = self._tokens, self.num_buckets
            hv = np.fromiter((sha256_bucket(f"{tk[k >> 32]} {tk[k & 0xFFFFFFFF]}", m) for k in new.tolist()),
                             np.int32, new.size)
            vals[~found] = hv
            self._bi_keys = np.insert(self._bi_keys, pos[~found], new)
            self._bi_vals = np.insert(self._bi_vals, pos[~found], hv)
        return vals[inv.reshape(-1)]


def featurize(texts: Iterable[str], mode: str = "exact", ngrams: int = 2, num_buckets: int = 10000,
              salt: int = 0, engine: str = "regex") -> Features:
    """One-shot :class:`Featurizer` call."""
    return Featurizer(mode, ngrams, num_buckets, salt=salt, engine=engine)(texts)


def heldout_featurize(texts: Iterable[str], ngrams: int = 2, num_buckets: int = 10000) -> Features:
    """The held-out metric space: fast-mode features under ``salt=1`` (independent of both selectors)."""
    return featurize(texts, "fast", ngrams, num_buckets, salt=1)
