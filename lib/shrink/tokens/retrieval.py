"""Multi-vector retrieval with fewer vectors per document (the CRISP analogue, notebook 03i).

A multi-vector (ColBERT-style) retriever represents a query by its token vectors ``Q = {q_1..q_a}`` and a
document by ``X = {x_1..x_n}`` and scores them with **Chamfer / MaxSim** (Khattab & Zaharia, SIGIR 2020,
Eq. 3; CRISP, Veneroso et al. 2025, Sec. 2)::

    s(Q, X) = Σ_i max_j ⟨q_i, x_j⟩

Storage and scoring cost grow with ``n``, so CRISP shrinks a document to ``k`` vectors. It *trains* the
encoder with k-means inside the forward pass; here the encoder is frozen (all-MiniLM-L6-v2 token vectors,
L2-normalised) and the reductions are the post-hoc ones CRISP compares against:

=============  ===================================================================================
``all``        every token vector (the unpruned scorer)
``kmeans``     k-means (k-means++ init, Lloyd, seeded) of the document's vectors; the k centroids
``first``      the first k tokens ([CLS] and the start of the text)
``spacing``    k evenly spaced tokens (``round(linspace(0, n-1, k))``; CRISP's k-spacing keeps every
               (n/k)-th token)
``random``     k tokens drawn uniformly (seeded)
=============  ===================================================================================

Every reduction keeps ``min(k, n)`` vectors; with ``k >= n`` each returns the document's own vectors (k-means:
every point its own centroid), so the pruned scorer equals full Chamfer exactly.

The retrieval set (:func:`cloze_set`) is built from offline text with known relevance, the *inverse cloze
task* (Lee et al., ACL 2019): from each paragraph one sentence is taken out as the query; the paragraph
without it is its relevant document; the other paragraphs are the distractors. Metrics: recall@k, MRR and
nDCG@10 with one relevant document per query (:func:`rank_metrics`).

Introduced in: notebooks/03-tokens/03i-multivector-crisp.md
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import torch

from .. import data
from ..errors import ShrinkError
from .encoder import encode_text

REDUCTIONS = ("all", "kmeans", "first", "spacing", "random")


class RetrievalInputError(ShrinkError, ValueError):
    """Bad input to the retrieval helpers (shapes, budgets, method names)."""


# --------------------------------------------------------------------------------------------------
# Retrieval set
# --------------------------------------------------------------------------------------------------
@dataclass
class ClozeSet:
    """``docs`` texts; ``queries`` texts; ``relevant[i]`` the index in ``docs`` of query i's document."""

    docs: list[str]
    queries: list[str]
    relevant: list[int]


def _sentences(para: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", para.strip()) if s]


def cloze_set(tokenizer, corpus: str = "wikitext2", split: str = "test", *, n_docs: int = 1000,
              n_queries: int = 400, min_sentences: int = 3, query_tokens: tuple[int, int] = (8, 48),
              query_from_first: int = 3, seed: int = 0) -> ClozeSet:
    """An inverse-cloze retrieval set from ``corpus/split`` (read through :mod:`shrink.data`).

    Paragraphs (lines of at least 20 characters, WikiText headings skipped) with at least
    ``min_sentences`` sentences are candidates. ``n_docs`` of them are drawn with ``random.Random(seed)``;
    from each, one sentence among the first ``query_from_first`` whose length (WordPiece tokens incl. [CLS]
    and [SEP]) lies in ``query_tokens`` is removed (the query); the rest of the paragraph is the document.
    The first ``n_queries`` drawn paragraphs contribute their queries; every paragraph contributes its
    document (the others are distractors built the same way).
    """
    if n_queries > n_docs or n_queries < 1:
        raise RetrievalInputError(f"need 1 <= n_queries <= n_docs, got n_queries={n_queries}, n_docs={n_docs}; "
                                  "every query's document must be in the collection")
    text = "\n".join(data.load_documents(corpus, split))
    paras = [ln.strip() for ln in text.split("\n") if len(ln.strip()) >= 20 and not ln.strip().startswith("=")]
    cands = [p for p in paras if len(_sentences(p)) >= min_sentences]
    rng = random.Random(seed)
    order = list(range(len(cands)))
    rng.shuffle(order)
    lo, hi = query_tokens
    docs, queries, relevant = [], [], []
    for i in order:
        sents = _sentences(cands[i])
        first = sents[:query_from_first]
        lens = [int(encode_text(tokenizer, x, 10**6).shape[1]) for x in first]
        ok = [j for j, ln in enumerate(lens) if lo <= ln <= hi]
        if not ok:
            continue
        j = ok[rng.randrange(len(ok))]
        doc = " ".join(s for t, s in enumerate(sents) if t != j)
        if len(queries) < n_queries:
            queries.append(sents[j])
            relevant.append(len(docs))
        docs.append(doc)
        if len(docs) == n_docs:
            break
    if len(docs) < n_docs:
        raise ShrinkError(f"{corpus}/{split} gives {len(docs)} paragraphs with >= {min_sentences} sentences and a "
                          f"query sentence of {lo}-{hi} tokens, fewer than n_docs={n_docs}; lower n_docs")
    return ClozeSet(docs, queries, relevant)


# --------------------------------------------------------------------------------------------------
# Token vectors
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def token_vectors(model, tokenizer, texts: list[str], *, max_tokens: int = 128, batch_size: int = 32,
                  normalize: bool = True) -> list[torch.Tensor]:
    """Last-layer token vectors of every text: a list of fp32 ``[n_i, D]`` (special tokens included, padding
    dropped), L2-normalised per token if ``normalize`` (ColBERT's convention, so ⟨q, x⟩ is a cosine).

    Texts are batched by length (padding only within a batch, attention mask applied), so the vectors equal
    those of one text at a time up to float rounding."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[torch.Tensor | None] = [None] * len(texts)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        ids = [encode_text(tokenizer, texts[i], max_tokens)[0] for i in idx]
        length = max(len(x) for x in ids)
        batch = torch.zeros(len(ids), length, dtype=torch.long)
        mask = torch.zeros(len(ids), length, dtype=torch.long)
        for r, x in enumerate(ids):
            batch[r, : len(x)] = x
            mask[r, : len(x)] = 1
        h = model(input_ids=batch, attention_mask=mask).last_hidden_state.float()
        for r, i in enumerate(idx):
            v = h[r, : len(ids[r])]
            out[i] = torch.nn.functional.normalize(v, dim=-1) if normalize else v
    return out  # type: ignore[return-value]


@torch.no_grad()
def mean_pooled(model, tokenizer, texts: list[str], *, max_tokens: int = 128, batch_size: int = 32) -> torch.Tensor:
    """all-MiniLM-L6-v2's own single-vector embedding (mean of the unnormalised last hidden states) ``[n, D]``."""
    vecs = token_vectors(model, tokenizer, texts, max_tokens=max_tokens, batch_size=batch_size, normalize=False)
    return torch.stack([v.mean(0) for v in vecs])


# --------------------------------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------------------------------
def kmeans(x: torch.Tensor, k: int, *, generator: torch.Generator, iterations: int = 20) -> torch.Tensor:
    """k-means of ``x [n, D]`` (fp32) -> centroids ``[min(k, n), D]`` (not re-normalised).

    Initialisation: k-means++ (Arthur & Vassilvitskii, 2007): the first centre uniformly, each next one with
    probability ∝ squared distance to the nearest chosen centre (uniform among unchosen points if all those
    distances are zero). Then ``iterations`` Lloyd steps (assign to the nearest centre, move each centre to
    its members' mean; an empty cluster keeps its centre), stopping early when assignments stop changing.
    With ``k >= n`` every point becomes its own centre, so the centroids are the points (in k-means++ order).
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise RetrievalInputError(f"kmeans needs a non-empty [n, D] tensor, got {tuple(x.shape)}")
    if not isinstance(k, int) or k < 1:
        raise RetrievalInputError(f"k (vectors kept per document) must be an integer >= 1, got {k!r}")
    x = x.float()
    n = x.shape[0]
    k = min(k, n)
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    d2 = (x - x[chosen[0]]).pow(2).sum(-1)
    for _ in range(1, k):
        w = d2.clone()
        w[chosen] = 0.0
        if float(w.sum()) <= 0.0:
            w = torch.ones(n)
            w[chosen] = 0.0
        j = int(torch.multinomial(w, 1, generator=generator))
        chosen.append(j)
        d2 = torch.minimum(d2, (x - x[j]).pow(2).sum(-1))
    c = x[chosen].clone()
    assign = None
    for _ in range(iterations):
        new = torch.cdist(x, c, compute_mode="donot_use_mm_for_euclid_dist").argmin(-1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        nonempty = counts > 0
        c[nonempty] = sums[nonempty] / counts[nonempty, None]
    return c


def reduce(x: torch.Tensor, method: str, k: int | None, *, generator: torch.Generator | None = None,
           iterations: int = 20, normalize_centroids: bool = False) -> torch.Tensor:
    """One document's vectors ``x [n, D]`` reduced to at most ``k`` vectors by ``method`` (:data:`REDUCTIONS`).

    ``k=None`` (or ``method="all"``) keeps every vector. ``kmeans`` and ``random`` need a seeded
    ``generator``; ``normalize_centroids`` L2-normalises the k-means centroids (CRISP-style centroids are
    used as they are by default)."""
    if method not in REDUCTIONS:
        raise RetrievalInputError(f"unknown reduction {method!r}; choose one of {', '.join(REDUCTIONS)}")
    n = x.shape[0]
    if method == "all" or k is None or k >= n:
        if method == "kmeans" and k is not None:
            if generator is None:
                raise RetrievalInputError("kmeans needs generator=torch.Generator().manual_seed(seed)")
            c = kmeans(x, k, generator=generator, iterations=iterations)
            return torch.nn.functional.normalize(c, dim=-1) if normalize_centroids else c
        return x
    if not isinstance(k, int) or k < 1:
        raise RetrievalInputError(f"k (vectors kept per document) must be an integer >= 1 or None, got {k!r}")
    if method == "first":
        return x[:k]
    if method == "spacing":
        idx = torch.linspace(0, n - 1, k).round().long().unique()
        return x[idx]
    if generator is None:
        raise RetrievalInputError(f"{method} needs generator=torch.Generator().manual_seed(seed) (reproducible)")
    if method == "random":
        return x[torch.randperm(n, generator=generator)[:k].sort().values]
    c = kmeans(x, k, generator=generator, iterations=iterations)
    return torch.nn.functional.normalize(c, dim=-1) if normalize_centroids else c


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------
def pad(vectors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of ``[n_i, D]`` -> padded ``[N, L, D]`` fp32 and bool mask ``[N, L]`` (True = a real vector)."""
    if not vectors:
        raise RetrievalInputError("no vectors to pad")
    d = vectors[0].shape[-1]
    if any(v.dim() != 2 or v.shape[-1] != d or v.shape[0] == 0 for v in vectors):
        raise RetrievalInputError(f"every entry must be a non-empty [n_i, {d}] tensor")
    length = max(v.shape[0] for v in vectors)
    out = torch.zeros(len(vectors), length, d)
    mask = torch.zeros(len(vectors), length, dtype=torch.bool)
    for i, v in enumerate(vectors):
        out[i, : v.shape[0]] = v
        mask[i, : v.shape[0]] = True
    return out, mask


def chamfer(queries: list[torch.Tensor], docs: list[torch.Tensor] | tuple[torch.Tensor, torch.Tensor], *,
            chunk_tokens: int = 256) -> torch.Tensor:
    """Chamfer / MaxSim scores ``[n_queries, n_docs]`` (fp32): ``s(Q, X) = Σ_{q∈Q} max_{x∈X} ⟨q, x⟩``.

    Vectorised: the query tokens (in chunks of about ``chunk_tokens``) are multiplied with every document
    vector at once (``[T, D] @ [D, N·L]``), padded slots are set to ``-inf`` before the max over a document's
    vectors, and the per-token maxima are summed per query. ``docs`` is a list of ``[n_i, D]`` or the output
    of :func:`pad`."""
    dpad, dmask = pad(docs) if isinstance(docs, list) else docs
    n_docs, length, d = dpad.shape
    flat = dpad.reshape(n_docs * length, d).T.contiguous()
    out = torch.empty(len(queries), n_docs)
    start = 0
    while start < len(queries):
        stop, tok = start, 0
        while stop < len(queries) and (tok == 0 or tok + queries[stop].shape[0] <= chunk_tokens):
            tok += queries[stop].shape[0]
            stop += 1
        q = torch.cat(queries[start:stop]).float()
        sims = (q @ flat).view(-1, n_docs, length).masked_fill(~dmask[None], float("-inf")).amax(-1)
        owner = torch.repeat_interleave(torch.arange(stop - start), torch.tensor([x.shape[0] for x in queries[start:stop]]))
        out[start:stop] = torch.zeros(stop - start, n_docs).index_add_(0, owner, sims)
        start = stop
    return out


def chamfer_naive(queries: list[torch.Tensor], docs: list[torch.Tensor]) -> torch.Tensor:
    """The same scores by explicit loops over queries, query tokens and document vectors (tests only)."""
    out = torch.empty(len(queries), len(docs))
    for a, q in enumerate(queries):
        for b, x in enumerate(docs):
            total = 0.0
            for qi in q:
                total += max(float(torch.dot(qi, xj)) for xj in x)
            out[a, b] = total
    return out


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------
def ranks(scores: torch.Tensor, relevant: list[int]) -> list[int]:
    """1-based rank of each query's relevant document; ties count against it (``1 + #{j ≠ r: s_j >= s_r}``)."""
    rel = torch.as_tensor(relevant, dtype=torch.long)
    if scores.dim() != 2 or len(rel) != scores.shape[0]:
        raise RetrievalInputError(f"scores must be [n_queries, n_docs] with one relevant index per query; got "
                                  f"{tuple(scores.shape)} and {len(rel)} indices")
    s_rel = scores.gather(1, rel[:, None])
    ge = (scores >= s_rel).sum(-1) - 1
    return (1 + ge).tolist()


def rank_metrics(rank: list[int], ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """recall@k, MRR (mean 1/rank) and nDCG@10 (one relevant document: ``1/log2(1 + rank)`` if rank <= 10,
    else 0; the ideal DCG is 1), each averaged over queries, plus the per-query values for paired tests."""
    n = len(rank)
    if n == 0:
        raise RetrievalInputError("rank_metrics needs at least one query")
    ndcg = [1.0 / math.log2(1 + r) if r <= 10 else 0.0 for r in rank]
    rr = [1.0 / r for r in rank]
    out = {f"recall@{k}": sum(r <= k for r in rank) / n for k in ks}
    out.update({"mrr": sum(rr) / n, "ndcg@10": sum(ndcg) / n, "ndcg_per_query": ndcg, "rr_per_query": rr})
    return out


# --------------------------------------------------------------------------------------------------
# Bench (one result record per reduction, budget and seed)
# --------------------------------------------------------------------------------------------------
class RetrievalBench:
    """The cloze retrieval set of a ``tokens-retrieval`` preset, its token vectors (computed on first use),
    and :meth:`run` (one :func:`shrink.results.cached` record per method, budget, seed)."""

    def __init__(self, cfg, scale: str, model=None, tokenizer=None):
        from .. import models

        self.cfg, self.scale = cfg, scale
        if model is None:
            model, tokenizer = models.load(cfg.model)
        self.model, self.tok = model, tokenizer
        self.set = cloze_set(tokenizer, cfg.corpus, cfg.split, n_docs=cfg.n_docs, n_queries=cfg.n_queries,
                             query_tokens=tuple(cfg.query_tokens), seed=cfg.data_seed)
        self._vecs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._pooled: tuple[torch.Tensor, torch.Tensor] | None = None

    def vectors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(document vectors, query vectors)``, lists of L2-normalised fp32 ``[n_i, D]``."""
        if self._vecs is None:
            raw_d = token_vectors(self.model, self.tok, self.set.docs, max_tokens=self.cfg.max_tokens, normalize=False)
            raw_q = token_vectors(self.model, self.tok, self.set.queries, max_tokens=self.cfg.max_tokens,
                                  normalize=False)
            # one forward per text: the encoder's own mean pooling comes from the same raw vectors
            self._pooled = (torch.stack([v.mean(0) for v in raw_d]), torch.stack([v.mean(0) for v in raw_q]))
            norm = torch.nn.functional.normalize
            self._vecs = ([norm(v, dim=-1) for v in raw_d], [norm(v, dim=-1) for v in raw_q])
        return self._vecs

    def config(self, method: str, k, seed: int, opts: dict) -> dict:
        c = self.cfg
        return {"model": c.model, "corpus": c.corpus, "split": c.split, "n_docs": c.n_docs,
                "n_queries": c.n_queries, "max_tokens": c.max_tokens, "query_tokens": list(c.query_tokens),
                "data_seed": c.data_seed, "method": method, "k": k, "seed": seed,
                "options": dict(sorted(opts.items()))}

    def run(self, method: str, k: int | None = None, *, seed: int = 0, **opts) -> dict:
        """Metrics of documents reduced by ``method`` to ``k`` vectors (``None``: all), queries unreduced:
        recall@1/5/10, MRR, nDCG@10 (+ per query), mean vectors per document, the stored fraction."""
        if method == "all":
            k = None
        seed_used = seed if method in ("kmeans", "random") else 0
        if method == "kmeans":
            opts.setdefault("iterations", self.cfg.kmeans_iterations)

        def fn():
            docs, qs = self.vectors()
            g = torch.Generator().manual_seed(seed_used)
            red = [reduce(x, method, k, generator=g, **opts) for x in docs]
            m = rank_metrics(ranks(chamfer(qs, red), self.set.relevant))
            m["vectors_per_doc"] = sum(r.shape[0] for r in red) / len(red)
            m["stored_fraction"] = sum(r.shape[0] for r in red) / sum(x.shape[0] for x in docs)
            m["tokens_per_doc"] = sum(x.shape[0] for x in docs) / len(docs)
            return m
        from .. import results

        return results.cached(f"retr-{method}", self.config(method, k, seed_used, opts), fn, scale=self.scale,
                              chapter="03-tokens")

    def single_vector(self) -> dict:
        """The encoder's own single-vector retrieval (mean pooling, cosine): the reference multi-vector beats?"""
        def fn():
            self.vectors()
            d = torch.nn.functional.normalize(self._pooled[0], dim=-1)
            q = torch.nn.functional.normalize(self._pooled[1], dim=-1)
            m = rank_metrics(ranks(q @ d.T, self.set.relevant))
            m["vectors_per_doc"] = 1.0
            return m
        from .. import results

        return results.cached("retr-single", self.config("single", 1, 0, {}), fn, scale=self.scale,
                              chapter="03-tokens")
