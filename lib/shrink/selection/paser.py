"""PASER (He et al., arXiv 2502.12594, 2025): post-training data selection for the recovery of a pruned LLM.

Three components, each can be switched off for the paper's component ablation (``components=``):

1. **S2C, semantic-structural clustering** (paper §3.1). Instruction embeddings ``e_i`` (all-MiniLM-L6-v2,
   :func:`shrink.selection.baselines.embed`), a diffusion kernel on the data manifold, spectral embedding,
   then NMF clustering:

   .. math::  A_{ij} = \\exp(-\\|e_i - e_j\\|^2 / 2\\sigma^2),\\quad L = I - D^{-1} A,\\quad
              V = \\text{eigenvectors of the } K \\text{ smallest eigenvalues of } L,\\quad
              S = |V V^\\top| \\approx W H,\\ c_i = \\arg\\max_k W_{ik}.

   **Sparse, not dense.** The official code (BokwaiHo/PASER ``paser.py``) builds ``A``, ``D``, ``L`` and
   ``np.linalg.inv(D)`` as dense ``N x N`` matrices (≈22 GB each for Alpaca's 52k examples) and ``S`` too.
   Here ``A`` lives on the symmetrised ``k_neighbors``-nearest-neighbour graph (scikit-learn
   ``kneighbors_graph``; ``nnz <= 2 N k``), ``sigma`` is the median of the graph's edge lengths (the official
   code: the median of all pairwise distances), the spectrum is taken from the symmetric normalised
   ``D^{-1/2} A D^{-1/2}`` (same eigenvalues as ``D^{-1} A``; its eigenvectors are mapped back with
   ``V = D^{-1/2} U``; the ``K`` *largest* of it are the ``K`` smallest of ``L``) with ``scipy``'s ``eigsh``,
   and ``S = |V V^T|`` is evaluated only on the graph's edges (a sparse non-negative matrix that
   scikit-learn's ``NMF`` factorises directly). Memory is ``O(N k)``; :func:`s2c_affinity` exposes the
   intermediate matrices for the test against a naive dense implementation.

2. **CDARS, capability-degradation-aware recovery selection** (§3.2). Per sample, the Jensen–Shannon
   divergence between the next-token distributions of the pruned and the dense model,

   .. math::  \\mathrm{JSD}(P\\|Q) = \\tfrac12 \\mathrm{KL}(P\\|M) + \\tfrac12 \\mathrm{KL}(Q\\|M),\\ M = (P+Q)/2
              \\in [0, \\ln 2] \\text{ nats},

   averaged over the sample's response tokens (:func:`token_jsd`, ``reduction="mean"``). **The official
   ``compute_jsd`` sums over all positions and the vocabulary** (``reduction="sum"`` mirrors it): a sum grows
   with the sample's length, so long samples look more degraded and the per-cluster score
   ``CDS_c = mean_{i in c} JSD_i`` favours clusters of long samples. The official code also scores the
   *instruction* tokens; :func:`jsd_scores` takes ``on="response"`` (default, the project's choice for a
   recovery set) or ``on="instruction"`` (official). Budget: ``n_c ∝ CDS_c`` with ``Σ n_c <= B``
   (:func:`allocate`: capped by cluster sizes, the excess redistributed, largest-remainder rounding; the
   official ``int(B * CDS_c / Σ CDS)`` floors and never redistributes). Within a cluster samples are ranked
   by the individual efficiency score ``IES_i = JSD_i / log(cost_i)``, ``cost_i = n_i^2`` for a sample of
   ``n_i`` tokens (the official code: ``(#input tokens + #output characters)^2``; ``lengths=None`` ranks by
   ``JSD`` alone).

3. **NTEM, negative-tuning-effect mitigation** (§3.3). A concept-consistency graph over key phrases
   (RAKE, :func:`rake_phrases`, a small re-implementation of Rose et al. 2010 with scikit-learn's English
   stop words; the official code uses ``rake_nltk``, which needs an NLTK download). Walking the ranked
   candidates, a sample is **rejected** when two of its concepts are already nodes of the graph but not
   connected (it would pair known concepts inconsistently); otherwise it is accepted and its concepts are
   added as a clique. The official code uses *all* RAKE phrases of instruction + input + output, which
   rejects almost everything after a few hundred samples; ``max_concepts`` (default 8: the top-ranked
   phrases) bounds it, ``max_concepts=None`` is the official rule. Clusters are visited in decreasing
   ``CDS`` (the official: cluster-id order, arbitrary after NMF), so the most degraded capabilities claim
   concepts first. A cluster that runs out of consistent samples stays below its quota (as the official).

Ablation (``components``): without ``"s2c"`` the clusters are plain k-means on the embeddings
(:func:`shrink.selection.baselines.kmeans`; our choice, the paper's exact substitute is not stated);
without ``"cdars"`` every cluster gets an equal share (:func:`allocate` with equal weights) and samples are
taken in a seeded random order instead of by IES; without ``"ntem"`` no sample is rejected.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from .errors import SelectionError

COMPONENTS = ("s2c", "cdars", "ntem")
LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------- budget
def allocate(weights: np.ndarray, sizes: np.ndarray, budget: int) -> np.ndarray:
    """Integer quotas ``n_c ∝ weights_c`` (int64 ``[C]``), capped by ``sizes``, summing to at most ``budget``.

    Water-filling: the real-valued share ``x_c = B' w_c / Σ_{uncapped} w`` is computed over the clusters
    that are not yet capped (``B'`` = budget left after the capped ones get their full size), repeated until
    no share exceeds its size; then ``floor`` and the remainder goes to the largest fractional parts that
    still have room (largest-remainder / Hamilton rounding). Hence ``Σ n_c = min(B, Σ_{w_c > 0} size_c)``
    (``<= B``), ``n_c <= size_c``, and every uncapped cluster is within 1 of its real share.

    Args:
        weights: ``[C]`` non-negative floats (PASER: CDS per cluster; kMQ: ones).
        sizes: ``[C]`` non-negative integers (cluster sizes, or what is left of them).
        budget: total ``B >= 0``.
    """
    w = np.asarray(weights, np.float64)
    s = np.asarray(sizes)
    if w.ndim != 1 or w.shape != s.shape or w.size == 0:
        raise SelectionError(f"weights {w.shape} and sizes {s.shape} must be 1-D arrays of one length (one per "
                             "cluster).")
    if not np.isfinite(w).all() or (w < 0).any():
        raise SelectionError("cluster weights must be finite and >= 0 (degradation scores are JSDs in "
                             "[0, ln 2]); check the scores for NaN.")
    if (s < 0).any() or not np.all(np.asarray(s) == np.floor(s)):
        raise SelectionError("cluster sizes must be non-negative integers.")
    if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool) or budget < 0:
        raise SelectionError(f"budget={budget!r} must be a non-negative integer number of samples, e.g. 200.")
    s = s.astype(np.int64)
    if budget > 0 and w[s > 0].sum() <= 0:
        raise SelectionError("every non-empty cluster has weight 0 (e.g. the pruned model equals the dense one: "
                             "all JSDs are 0); check that the two models differ, or use equal weights.")
    x = np.zeros(w.size)
    capped = np.zeros(w.size, bool)
    active = (w > 0) & (s > 0)
    while True:
        free = active & ~capped
        left = budget - s[capped].sum()
        tot = w[free].sum()
        x[free] = left * w[free] / tot if (tot > 0 and left > 0) else 0.0
        over = free & (x > s)
        if not over.any():
            break
        capped |= over  # these get their full size; the rest is shared again among the others
    x[capped] = s[capped]
    q = np.minimum(np.floor(x + 1e-9).astype(np.int64), s)
    target = min(int(budget), int(s[active].sum()))
    frac = x - q
    rest = target - int(q.sum())
    if rest > 0:
        room = np.flatnonzero(active & (q < s))
        order = room[np.argsort(-frac[room], kind="stable")]
        q[order[:rest]] += 1
    return q


# ------------------------------------------------------------------------------------------- JSD
def token_jsd(p_logits, q_logits, mask=None, *, reduction: str | None = "mean"):
    """Jensen–Shannon divergence between two models' next-token distributions, in nats, ``[0, ln 2]``.

    Args:
        p_logits, q_logits: ``[..., T, V]`` float tensors (dense and pruned model, same positions).
        mask: ``[..., T]`` bool, positions that count (``None``: all).
        reduction: ``"mean"`` (per-sample mean over counted positions, ``[...]``; 0 for a sample with no
            counted position), ``"sum"`` (per-sample sum: the official PASER ``compute_jsd``, length-biased)
            or ``None`` (the ``[..., T]`` per-token values, 0 where not counted).

    Computed in float64 from ``log_softmax`` (``log M = logaddexp(log P, log Q) - ln 2``), clamped to
    ``[0, ln 2]`` against round-off.
    """
    import torch

    if reduction not in ("mean", "sum", None):
        raise SelectionError(f"reduction={reduction!r}: use 'mean' (per-token mean, default), 'sum' (the official "
                             "PASER code) or None (per-token values).")
    if tuple(p_logits.shape) != tuple(q_logits.shape):
        raise SelectionError(f"the two models' logits differ in shape: {tuple(p_logits.shape)} vs "
                             f"{tuple(q_logits.shape)}; run both on the same batch and tokenizer.")
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    lm = torch.logaddexp(lp, lq) - LN2
    jsd = 0.5 * (lp.exp() * (lp - lm)).sum(-1) + 0.5 * (lq.exp() * (lq - lm)).sum(-1)
    jsd = jsd.clamp(0.0, LN2)
    if mask is None:
        mask = torch.ones(jsd.shape, dtype=torch.bool, device=jsd.device)
    mask = mask.to(jsd.device).bool()
    if tuple(mask.shape) != tuple(jsd.shape):
        raise SelectionError(f"mask shape {tuple(mask.shape)} does not match the logits' positions "
                             f"{tuple(jsd.shape)}.")
    jsd = jsd * mask
    if reduction is None:
        return jsd
    if reduction == "sum":
        return jsd.sum(-1)
    return jsd.sum(-1) / mask.sum(-1).clamp_min(1)


def jsd_scores(dense, pruned, examples: Sequence[dict], *, on: str = "response", reduction: str = "mean",
               batch_size: int = 8) -> np.ndarray:
    """Per-sample JSD between ``pruned`` and ``dense`` next-token distributions: float64 ``[N]``.

    Args:
        dense, pruned: causal LMs with the same tokenizer (``model(input_ids=, attention_mask=).logits``).
        examples: tokenized examples ``{"input_ids", "labels"}`` (:func:`shrink.train.tokenize_sft`).
        on: ``"response"`` (positions predicting response tokens, ``labels != -100``) or ``"instruction"``
            (positions predicting prompt tokens: the official code, which feeds the instruction alone).
        reduction: see :func:`token_jsd`.
    """
    import torch

    from ..train import collate

    if on not in ("response", "instruction"):
        raise SelectionError(f"on={on!r}: use 'response' or 'instruction'.")
    if not examples:
        raise SelectionError("no examples to score; pass tokenized examples (shrink.train.tokenize_sft).")
    out = np.empty(len(examples))
    dev_d = next(dense.parameters()).device
    dev_p = next(pruned.parameters()).device
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            b = collate(list(examples[s:s + batch_size]))
            ld = dense(input_ids=b["input_ids"].to(dev_d), attention_mask=b["attention_mask"].to(dev_d)).logits
            lp = pruned(input_ids=b["input_ids"].to(dev_p), attention_mask=b["attention_mask"].to(dev_p)).logits
            lab = b["labels"][:, 1:]
            att = b["attention_mask"][:, 1:].bool()
            mask = (lab != -100) if on == "response" else (att & (lab == -100))
            if not mask.any(1).all():
                raise SelectionError(f"an example has no {on} token to score; drop empty examples first.")
            out[s:s + len(b["labels"])] = token_jsd(ld[:, :-1].cpu(), lp[:, :-1].cpu(), mask,
                                                    reduction=reduction).numpy()
    return out


# ------------------------------------------------------------------------------------------- S2C
def _unit(emb) -> np.ndarray:
    x = np.asarray(emb, np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or not np.isfinite(x).all():
        raise SelectionError(f"embeddings must be a finite non-empty [N, d] array, got shape {x.shape}; pass "
                             "shrink.selection.baselines.embed(...) output.")
    return x


def s2c_affinity(emb: np.ndarray, *, n_clusters: int, k_neighbors: int = 10, seed: int = 0) -> dict:
    """The sparse diffusion-kernel pipeline of S2C up to the NMF input (all matrices ``O(N k)``).

    Returns ``{"graph": kNN distance graph (csr, symmetrised), "sigma", "A": affinity (csr), "V": [N, K]
    eigenvectors of L = I - D^-1 A for its K smallest eigenvalues, "eigenvalues": [K] of L, "S": |V V^T| on
    the graph's edges plus the diagonal (csr)}``.
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh
    from sklearn.neighbors import kneighbors_graph

    x = _unit(emb)
    n = len(x)
    if not isinstance(n_clusters, (int, np.integer)) or not 2 <= n_clusters < n:
        raise SelectionError(f"n_clusters={n_clusters!r} must be an integer in [2, {n - 1}] (N={n}); PASER's "
                             "default is 10.")
    if not isinstance(k_neighbors, (int, np.integer)) or not 1 <= k_neighbors < n:
        raise SelectionError(f"k_neighbors={k_neighbors!r} must be an integer in [1, {n - 1}]; e.g. 10.")
    G = kneighbors_graph(x, k_neighbors, mode="distance", include_self=False)
    G = G.maximum(G.T).tocsr()  # symmetrise: i~j if either is among the other's neighbours
    d = G.data
    sigma = float(np.median(d[d > 0])) if (d > 0).any() else 1.0
    A = G.copy()
    A.data = np.exp(-(A.data ** 2) / (2 * sigma ** 2))
    A = (A + sp.identity(n, format="csr")).tocsr()  # exp(0) = 1 on the diagonal, as the dense kernel
    deg = np.asarray(A.sum(1)).ravel()
    dm = sp.diags(1.0 / np.sqrt(deg))
    Msym = (dm @ A @ dm).tocsr()
    v0 = np.random.default_rng(seed).random(n)
    vals, U = eigsh(Msym, k=n_clusters, which="LA", v0=v0, tol=1e-10)
    order = np.argsort(-vals)
    vals, U = vals[order], U[:, order]
    V = U / np.sqrt(deg)[:, None]
    V /= np.linalg.norm(V, axis=0, keepdims=True)  # unit columns (eigsh of L would return unit vectors)
    pattern = (G + sp.identity(n, format="csr")).tocoo()
    vals_s = np.abs(np.einsum("ij,ij->i", V[pattern.row], V[pattern.col]))
    S = sp.csr_matrix((vals_s, (pattern.row, pattern.col)), shape=(n, n))
    return {"graph": G, "sigma": sigma, "A": A, "V": V, "eigenvalues": 1.0 - vals, "S": S}


def nmf_labels(S, n_clusters: int, seed: int = 0) -> np.ndarray:
    """``argmax`` of scikit-learn ``NMF(n_components=K, init="nndsvda")`` weights of ``S``: int64 ``[N]``,
    relabelled ``0..C-1`` in order of first appearance (empty components dropped)."""
    from sklearn.decomposition import NMF

    W = NMF(n_components=n_clusters, init="nndsvda", random_state=seed, max_iter=500).fit_transform(S)
    raw = np.argmax(W, axis=1)
    _, first = np.unique(raw, return_index=True)
    remap = {int(raw[i]): j for j, i in enumerate(sorted(first))}
    return np.array([remap[int(r)] for r in raw], np.int64)


def s2c(emb: np.ndarray, *, n_clusters: int = 10, k_neighbors: int = 10, seed: int = 0) -> np.ndarray:
    """S2C cluster labels (int64 ``[N]``): :func:`s2c_affinity` then :func:`nmf_labels`."""
    return nmf_labels(s2c_affinity(emb, n_clusters=n_clusters, k_neighbors=k_neighbors, seed=seed)["S"],
                      n_clusters, seed)


# ------------------------------------------------------------------------------------------- NTEM
_WORD = re.compile(r"[a-z0-9][a-z0-9'+\-]*")
_SPLIT = re.compile(r"[^\w\s'+\-]|\n")


def rake_phrases(text: str, max_phrases: int | None = None) -> list[str]:
    """RAKE key phrases (Rose et al. 2010), best first: candidate phrases are maximal runs of non-stop words
    between stop words / punctuation; word score ``deg(w) / freq(w)``; phrase score = sum of its words'."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    phrases: list[list[str]] = []
    for chunk in _SPLIT.split(str(text).lower()):
        cur: list[str] = []
        for w in _WORD.findall(chunk):
            if w in ENGLISH_STOP_WORDS or w.isdigit():
                if cur:
                    phrases.append(cur)
                cur = []
            else:
                cur.append(w)
        if cur:
            phrases.append(cur)
    freq: dict[str, int] = {}
    deg: dict[str, int] = {}
    for p in phrases:
        for w in p:
            freq[w] = freq.get(w, 0) + 1
            deg[w] = deg.get(w, 0) + len(p)
    scored: dict[str, float] = {}
    for p in phrases:
        key = " ".join(p)
        scored[key] = sum(deg[w] / freq[w] for w in p)
    ranked = sorted(scored, key=lambda k: (-scored[k], k))
    return ranked if max_phrases is None else ranked[:max_phrases]


class ConceptGraph:
    """NTEM's concept-consistency graph: nodes are concepts, edges join concepts seen in one accepted sample."""

    def __init__(self):
        self.nodes: set[str] = set()
        self.edges: set[frozenset] = set()

    def consistent(self, concepts) -> bool:
        """False when two of ``concepts`` are known nodes that are not connected (the official rule)."""
        known = sorted(c for c in set(concepts) if c in self.nodes)
        return all(frozenset((a, b)) in self.edges for i, a in enumerate(known) for b in known[i + 1:])

    def add(self, concepts) -> None:
        cs = sorted(set(concepts))
        self.nodes.update(cs)
        self.edges.update(frozenset((a, b)) for i, a in enumerate(cs) for b in cs[i + 1:])


def concepts_of(example: dict, max_concepts: int | None = 8) -> list[str]:
    """RAKE concepts of instruction + input + output (the official text)."""
    text = " ".join(str(example.get(k, "")) for k in ("instruction", "input", "output"))
    return rake_phrases(text, max_concepts)


# ------------------------------------------------------------------------------------------- select
def select(emb: np.ndarray, jsd: np.ndarray, budget: int, *, n_clusters: int = 10, k_neighbors: int = 10,
           seed: int = 0, ntem: bool = True, components: Sequence[str] = COMPONENTS,
           concepts: Sequence[Sequence[str]] | None = None, examples: Sequence[dict] | None = None,
           lengths: np.ndarray | None = None, max_concepts: int | None = 8) -> tuple[np.ndarray, dict]:
    """PASER selection of at most ``budget`` samples.

    Args:
        emb: ``[N, d]`` float32 instruction embeddings.
        jsd: ``[N]`` float, per-sample mean per-token JSD between the pruned and the dense model
            (:func:`jsd_scores`).
        budget: ``B``, 1 <= B <= N.
        n_clusters: K of S2C (the official default 10). k_neighbors: of the sparse kNN graph.
        seed: NMF / eigensolver start / k-means and the random order of the ``cdars`` ablation.
        ntem: apply the NTEM filter (same as having ``"ntem"`` in ``components``; both must be on).
        components: subset of ``("s2c", "cdars", "ntem")`` (the ablation; see the module docstring).
        concepts: per-sample concept lists for NTEM, or ``examples`` (dicts with instruction/input/output)
            from which RAKE extracts them.
        lengths: ``[N]`` token counts for ``IES = JSD / log(n^2)`` (``None``: rank by JSD).

    Returns:
        ``(indices, info)``: sorted int64 indices; ``info`` with ``labels`` [N], ``cds`` [C], ``quotas`` [C],
        ``taken`` [C] (≤ quotas; below it when NTEM rejected too many), ``rejected`` (count) and ``ies`` [N].
    """
    x = _unit(emb)
    n = len(x)
    jsd = np.asarray(jsd, np.float64)
    if jsd.shape != (n,) or not np.isfinite(jsd).all() or (jsd < 0).any():
        raise SelectionError(f"jsd must be a finite non-negative [N]={n} array (per-sample JSD), got shape "
                             f"{jsd.shape}; compute it with paser.jsd_scores.")
    if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool) or not 1 <= budget <= n:
        raise SelectionError(f"budget={budget!r} must be an integer in [1, {n}] (the pool size).")
    comps = set(components)
    bad = comps - set(COMPONENTS)
    if bad:
        raise SelectionError(f"unknown PASER components {sorted(bad)}; use a subset of {list(COMPONENTS)}.")
    use_ntem = ntem and "ntem" in comps
    if use_ntem and concepts is None:
        if examples is None:
            raise SelectionError("NTEM needs the samples' concepts: pass examples= (instruction/input/output dicts) "
                                 "or concepts=, or switch it off with ntem=False.")
        if len(examples) != n:
            raise SelectionError(f"examples has {len(examples)} entries, embeddings {n}; pass the same pool.")
        concepts = [concepts_of(e, max_concepts) for e in examples]
    if concepts is not None and len(concepts) != n:
        raise SelectionError(f"concepts has {len(concepts)} entries, embeddings {n}; pass one list per sample.")

    if "s2c" in comps:
        labels = s2c(x, n_clusters=n_clusters, k_neighbors=k_neighbors, seed=seed)
    else:
        from .baselines import kmeans

        raw, _ = kmeans(x, n_clusters, seed)
        _, labels = np.unique(raw, return_inverse=True)
        labels = labels.astype(np.int64)
    C = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=C)
    cds = np.array([jsd[labels == c].mean() for c in range(C)])
    if lengths is not None:
        ln = np.asarray(lengths, np.float64)
        if ln.shape != (n,):
            raise SelectionError(f"lengths must be [N]={n} token counts, got shape {ln.shape}.")
        ies = jsd / np.log(np.maximum(ln, 2.0) ** 2)
    else:
        ies = jsd.copy()
    rng = np.random.default_rng(seed)
    if "cdars" in comps:
        quotas = allocate(cds, sizes, int(budget))
        order_key = -ies
        visit = np.argsort(-cds, kind="stable")
    else:
        quotas = allocate(np.ones(C), sizes, int(budget))
        order_key = rng.random(n)
        visit = np.arange(C)
    graph = ConceptGraph()
    chosen: list[int] = []
    taken = np.zeros(C, np.int64)
    rejected = 0
    for c in visit:
        idx = np.flatnonzero(labels == c)
        for i in idx[np.argsort(order_key[idx], kind="stable")]:
            if taken[c] >= quotas[c]:
                break
            if use_ntem:
                if not graph.consistent(concepts[i]):
                    rejected += 1
                    continue
                graph.add(concepts[i])
            chosen.append(int(i))
            taken[c] += 1
    info = {"labels": labels, "cds": cds, "sizes": sizes, "quotas": quotas, "taken": taken, "rejected": rejected,
            "ies": ies, "components": sorted(comps if use_ntem else comps - {"ntem"})}
    return np.sort(np.array(chosen, np.int64)), info
