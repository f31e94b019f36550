"""Cluster-then-reconstruct on the encoder (Expedit: Liang, Yuan et al., NeurIPS 2022; notebook 03j).

Dense prediction needs an output for **every** token, so pruning alone is not enough: Expedit runs the
first ``α`` blocks on all ``N`` tokens, *clusters* them into ``m`` tokens, runs the remaining blocks on the
clusters, and *reconstructs* ``N`` per-token outputs. The paper does it on a ViT's 2-D patch grid; here on
a BERT encoder's 1-D token sequence (all-MiniLM-L6-v2), with [CLS] and [SEP] kept as their own tokens.

**Clustering** (1-D SLIC-style soft k-means, Expedit's ``TokenClusteringBlock``), on the hidden states
``h [N', D]`` of the ``N' = N - 2`` ordinary tokens entering block ``α``:

1. centroids ``c_j`` (``j < m' = m - 2``) start as the adaptive average pool of ``h`` along the sequence,
   and token ``i``'s home cluster is ``⌊i·m'/N'⌋`` (the pooling cell it falls in);
2. ``iterations`` times: ``D_ij = ‖h_i - c_j‖² / s`` (``s`` = mean squared distance of the tokens to their
   mean, so the temperature is scale-free), restricted to the ``window`` clusters nearest token i's home
   (others ``+∞``); soft assignment ``A_ij = softmax_j(-D_ij / τ)``; ``c_j = Σ_i A_ij h_i / Σ_i A_ij``;
3. hard labels ``argmin_j D_ij`` (for naive unpooling).

**Reconstruction** (Expedit's ``TokenReconstructionBlock``): with the distances ``D_ij`` between token i's
features and the final centroids, both at block ``α`` (before the remaining blocks), token i's output is
``Σ_{j ∈ kNN(i)} w_ij z_j`` with ``w_ij ∝ exp(-D_ij / τ)`` over its ``knn`` nearest clusters, normalised to
sum 1, and ``z_j`` the cluster's output after the last block. (The official code L2-normalises the weights
instead of summing them to 1 and uses ``exp(-τ·D)`` on raw distances; token cosine is scale-free, the
mixing is the same up to the normalisation.)

Methods compared at the same token count after block ``α`` (:data:`METHODS`):

===============  ==========================================================================================
``expedit``      SLIC clustering + k-NN reconstruction
``unpool``       the same clusters, each token copies its hard cluster's output (Expedit's naive unpooling)
``pool``         adaptive average pooling (no SLIC iterations) + k-NN reconstruction
``tome``         ToMe bipartite merging to ``m`` tokens (keys of block ``α-1``), unmerge by copying
``evit``         keep the ``m`` tokens with the highest [CLS] attention; every dropped token is
                 reconstructed by k-NN over the kept tokens (weights from block-``α`` features)
``random``       keep ``m`` random tokens, then the same k-NN reconstruction (seeded)
===============  ==========================================================================================

Fidelity: the cosine between each reconstructed token output and the unpruned model's last hidden state,
averaged over the ordinary tokens of a passage. FLOPs: :func:`flops` (blocks on ``N`` then ``m`` tokens,
plus clustering and reconstruction, counted densely as the official code computes them).

Introduced in: notebooks/03-tokens/03j-expedit.md
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn

from . import flops as FL
from . import select as sel
from .attention import TokenInputError, blocks, is_encoder, layer_qkv, probs_from_qk
from .encoder import _run_layer

METHODS = ("expedit", "unpool", "pool", "tome", "evit", "random")


@dataclass
class Clusters:
    """``centroids [m', D]``, soft ``assign [N', m']`` (rows sum to 1), ``labels [N']`` hard, ``dist
    [N', m']`` scaled squared distances (``+inf`` outside the window) of the final iteration's input."""

    centroids: torch.Tensor
    assign: torch.Tensor
    labels: torch.Tensor
    dist: torch.Tensor


def _scaled_dist(h: torch.Tensor, c: torch.Tensor, scale: float) -> torch.Tensor:
    return (h[:, None, :] - c[None, :, :]).pow(2).sum(-1) / scale


def slic_1d(h: torch.Tensor, m: int, *, iterations: int = 5, window: int = 5, temperature: float = 0.05) -> Clusters:
    """1-D SLIC-style soft clustering of ``h [N, D]`` (fp32) into ``m`` centroids (see the module docstring).

    ``iterations=0`` returns the adaptive-average-pool initialisation (hard labels = pooling cells)."""
    if h.dim() != 2:
        raise TokenInputError(f"slic_1d clusters one sequence [N, D], got {tuple(h.shape)}")
    n = h.shape[0]
    if not 1 <= m <= n:
        raise TokenInputError(f"number of clusters m must lie in [1, N={n}], got {m}; raise the ratio")
    if window < 0 or temperature <= 0 or iterations < 0:
        raise TokenInputError(f"need window >= 0 (0 = every cluster), temperature > 0, iterations >= 0; got "
                              f"{window}, {temperature}, {iterations}")
    h = h.float()
    c = Fn.adaptive_avg_pool1d(h.T[None], m)[0].T.contiguous()            # [m, D]
    home = (torch.arange(n) * m) // n                                       # pooling cell of each token
    r = window // 2
    w_eff = m if window == 0 else min(window, m)
    # the window is centred on the home cluster, shifted inward at the ends (every token sees w_eff clusters)
    lo = (home - r).clamp(min=0, max=m - w_eff)
    hi = lo + w_eff - 1
    j = torch.arange(m)[None]
    outside = (j < lo[:, None]) | (j > hi[:, None])
    scale = float((h - h.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12))
    if iterations == 0:
        d = _scaled_dist(h, c, scale).masked_fill(outside, float("inf"))
        a = torch.zeros(n, m).scatter_(1, home[:, None], 1.0)
        return Clusters(c, a, home, d)
    for _ in range(iterations):
        d = _scaled_dist(h, c, scale).masked_fill(outside, float("inf"))
        a = torch.softmax(-d / temperature, dim=1)                          # over clusters
        w = a.sum(0)
        c = torch.where(w[:, None] > 1e-12, (a.T @ h) / w.clamp_min(1e-12)[:, None], c)
    d = _scaled_dist(h, c, scale).masked_fill(outside, float("inf"))
    return Clusters(c, torch.softmax(-d / temperature, dim=1), d.argmin(1), d)


def knn_weights(dist: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Reconstruction weights ``[N, m]`` from scaled distances ``[N, m]``: ``exp(-D/τ)`` on each row's ``k``
    nearest entries (finite ones), zero elsewhere, rows summing to 1 (computed as a softmax, stable)."""
    k = min(k, dist.shape[1])
    idx = dist.topk(k, dim=1, largest=False).indices
    keep = torch.zeros_like(dist, dtype=torch.bool).scatter_(1, idx, True) & torch.isfinite(dist)
    logits = (-dist / temperature).masked_fill(~keep, float("-inf"))
    return torch.softmax(logits, dim=1)


@dataclass
class ExpeditOut:
    """``tokens [N, D]`` reconstructed last hidden states (every original token); ``tokens_per_layer``;
    ``overhead_flops`` of clustering + reconstruction; ``m`` tokens after block ``α``."""

    tokens: torch.Tensor
    tokens_per_layer: list[int]
    overhead_flops: int
    m: int


@torch.no_grad()
def forward(model, input_ids: torch.Tensor, *, method: str = "expedit", alpha: int = 2, ratio: float = 0.5,
            iterations: int = 5, window: int = 5, temperature: float = 0.05, knn: int = 5,
            generator: torch.Generator | None = None, start: tuple[torch.Tensor, torch.Tensor] | None = None
            ) -> ExpeditOut:
    """Cluster (or merge, or prune) the tokens of ``input_ids [1, N]`` before block ``alpha`` to
    ``m = round(ratio·N)`` tokens ([CLS] and [SEP] included, kept as themselves), run the remaining blocks,
    reconstruct all ``N`` outputs. ``ratio = 1`` reproduces the unpruned last hidden state exactly.

    ``start``: the unpruned inputs of blocks ``alpha-1`` and ``alpha`` (:func:`shrink.tokens.encoder.states`)."""
    if not is_encoder(model):
        raise TokenInputError("expedit.forward runs BERT encoders (minilm, tiny-bert)")
    if method not in METHODS:
        raise TokenInputError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    layers = blocks(model)
    n_layers = len(layers)
    if not 1 <= alpha < n_layers:
        raise TokenInputError(f"alpha={alpha} must lie in [1, {n_layers - 1}] (cluster before a block that has a "
                              "predecessor)")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise TokenInputError(f"expedit.forward takes one sequence [1, N], got {tuple(input_ids.shape)}")
    n = input_ids.shape[1]
    m = sel.kept_count(ratio, n)
    if m < 3 and m < n:
        raise TokenInputError(f"ratio {ratio} leaves {m} tokens of {n}; [CLS], [SEP] and at least one cluster need 3")
    if start is None:
        h = model.embeddings(input_ids=input_ids)
        for layer in layers[: alpha - 1]:
            h = _run_layer(layer, h, None)
        h_prev = h
        h = _run_layer(layers[alpha - 1], h, None)
    else:
        h_prev, h = start
    per_layer = [n] * alpha + [m] * (n_layers - alpha)
    d = h.shape[-1]
    if m == n:
        for layer in layers[alpha:]:
            h = _run_layer(layer, h, None)
        return ExpeditOut(h[0], per_layer, 0, m)
    body = h[0, 1:-1].float()                           # ordinary tokens [N', D]
    nb, mb = n - 2, m - 2
    overhead = 0
    bias = None
    if method in ("expedit", "unpool", "pool"):
        cl = slic_1d(body, mb, iterations=0 if method == "pool" else iterations, window=window,
                     temperature=temperature)
        mid = cl.centroids
        overhead += (max(iterations, 0) + 1) * 2 * 2 * nb * mb * d if method != "pool" else 2 * nb * mb * d
        if method == "unpool":
            weights = torch.zeros(nb, mb).scatter_(1, cl.labels[:, None], 1.0)
        else:
            weights = knn_weights(cl.dist, knn, temperature)
            overhead += 2 * nb * min(knn, mb) * d
    elif method == "tome":
        qk = layer_qkv(model, alpha - 1, h_prev)
        metric = qk.k.mean(1)[0, 1:-1]
        x, met, sizes = body[None], metric[None], torch.ones(1, nb)
        assign = torch.arange(nb)
        while x.shape[1] > mb:
            r = min(x.shape[1] - mb, x.shape[1] // 2)
            mm = sel.tome_merge(x, met, r, sizes=sizes)
            met = sel.tome_merge(met, met, r, sizes=sizes).x
            assign = mm.assign[0][assign]
            x, sizes = mm.x, mm.sizes
        mid = x[0]
        weights = torch.zeros(nb, mb).scatter_(1, assign[:, None], 1.0)
        bias = torch.log(torch.cat([torch.ones(1, 1), sizes, torch.ones(1, 1)], dim=1))  # proportional attention
        overhead += 2 * (nb // 2) * ((nb + 1) // 2) * qk.k.shape[-1]
    else:
        if method == "evit":
            a = probs_from_qk(layer_qkv(model, alpha - 1, h_prev))
            sc = a[0, :, 0, 1:-1].mean(0)
            overhead += FL.scoring_flops(model, n)
        else:
            if generator is None:
                raise TokenInputError("method 'random' needs generator=torch.Generator().manual_seed(seed)")
            sc = torch.rand(nb, generator=generator)
        idx = sc.topk(mb).indices.sort().values
        mid = body[idx]
        scale = float((body - body.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12))
        dist = _scaled_dist(body, mid, scale)
        weights = knn_weights(dist, knn, temperature)
        weights[idx] = torch.zeros(mb, mb).scatter_(1, torch.arange(mb)[:, None], 1.0)   # kept tokens are exact
        overhead += 2 * nb * mb * d + 2 * nb * min(knn, mb) * d
    x = torch.cat([h[:, :1].float(), mid[None], h[:, -1:].float()], dim=1).to(h.dtype)
    for layer in layers[alpha:]:
        x = _run_layer(layer, x, bias)
    z = x[0, 1:-1].float()
    body_out = weights @ z
    out = torch.cat([x[0, :1].float(), body_out, x[0, -1:].float()])
    return ExpeditOut(out, per_layer, int(overhead), m)


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over the ordinary tokens (rows ``1 .. N-2``) of two ``[N, D]`` token-output tensors."""
    return float(Fn.cosine_similarity(a[1:-1].float(), b[1:-1].float(), dim=-1).mean())


def flops_ratio(model, out: ExpeditOut) -> float:
    """(blocks on the kept token counts + clustering/reconstruction overhead) / unpruned blocks, FLOPs of
    :func:`shrink.tokens.flops.model_flops` (pooling head left out: every token is an output)."""
    n = out.tokens_per_layer[0]
    full = FL.model_flops(model, [n] * len(out.tokens_per_layer), head_tokens=0)["total"]
    return (FL.model_flops(model, out.tokens_per_layer, head_tokens=0)["total"] + out.overhead_flops) / full


class ExpeditBench:
    """Passages of a ``tokens-expedit`` preset, their unpruned token outputs, one record per configuration."""

    def __init__(self, cfg, scale: str, model=None, tokenizer=None):
        from .. import models
        from . import experiments as X

        self.cfg, self.scale = cfg, scale
        if model is None:
            model, tokenizer = models.load(cfg.model)
        self.model, self.tok = model, tokenizer
        self.ids = X.passages(tokenizer, cfg.corpus, cfg.split, n=cfg.n_sentences, min_tokens=cfg.min_tokens,
                              max_tokens=cfg.max_tokens, seed=cfg.data_seed)
        self._ref: list[torch.Tensor] | None = None
        self._states: dict = {}

    def reference(self) -> list[torch.Tensor]:
        """Unpruned last hidden states ``[N, D]`` of every passage."""
        if self._ref is None:
            with torch.no_grad():
                self._ref = [self.model(input_ids=x).last_hidden_state[0].float() for x in self.ids]
        return self._ref

    def states(self, i: int, alpha: int):
        from . import encoder as E

        if (i, alpha) not in self._states:
            self._states[(i, alpha)] = E.states(self.model, self.ids[i], alpha)
        return self._states[(i, alpha)]

    def config(self, method, alpha, ratio, seed, opts) -> dict:
        c = self.cfg
        return {"model": c.model, "corpus": c.corpus, "split": c.split, "n": c.n_sentences,
                "min_tokens": c.min_tokens, "max_tokens": c.max_tokens, "data_seed": c.data_seed,
                "method": method, "alpha": alpha, "ratio": ratio, "seed": seed, "options": dict(sorted(opts.items()))}

    def run(self, method: str, alpha: int, ratio: float, *, seed: int = 0, **opts) -> dict:
        """Per-passage token cosine to the unpruned outputs (``cos``), its mean/SE, the FLOPs ratio."""
        from .. import results
        from . import experiments as X

        c = self.cfg
        o = {"iterations": c.iterations, "window": c.window, "temperature": c.temperature, "knn": c.knn}
        o.update(opts)
        seed_used = seed if method == "random" else 0

        def fn():
            g = torch.Generator().manual_seed(seed_used)
            ref = self.reference()
            cos, fl = [], []
            for i, x in enumerate(self.ids):
                out = forward(self.model, x, method=method, alpha=alpha, ratio=ratio, generator=g,
                              start=self.states(i, alpha), **o)
                cos.append(token_cosine(out.tokens, ref[i]))
                fl.append(flops_ratio(self.model, out))
            m, se = X.mean_se(cos)
            return {"cos": cos, "cos_mean": m, "cos_se": se, "flops_ratio": statistics.fmean(fl)}
        return results.cached(f"expedit-{method}", self.config(method, alpha, ratio, seed_used, o), fn,
                              scale=self.scale, chapter="03-tokens")
