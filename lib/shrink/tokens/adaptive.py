"""ATP-style instance-adaptive token thresholds on a BERT encoder (MiniLM), trained with a budget loss.

ATP-LLaVA (Ye et al., CVPR 2025; no official code — tokens.md §1.3) inserts small modules between decoder
layers that predict, **per instance and per layer**, a pruning threshold from pooled statistics of the token
scores; training uses soft masks ``σ((s − θ)·τ)`` and a budget constraint, inference hard thresholds that
physically drop tokens. Here, on the encoder of the chapter:

* score of token ``j`` before block ``l`` (LTP's score, the 1-iteration WPR): the attention it receives in
  block ``l-1``, averaged over heads and over the (kept) queries, normalised to a log-ratio to uniform,
  ``z_j = log(N_eff · s_j)``, ``s_j = Σ_i m_i A_ij / Σ_i m_i`` (``m`` the current mask, ``N_eff = Σ m``);
* threshold ``θ_l = MLP_l(f)``, ``f`` = (weighted mean, std, max of ``z``, fraction with ``z > 0``,
  ``log N / 5``, kept fraction so far) — detached statistics, the gradient reaches θ through the mask;
* soft mask (training) ``m^l = m^{l-1} · σ((z − θ_l)·τ)``, protected tokens ([CLS], [SEP]) at 1; the mask
  enters every later block as the key bias ``log m`` and the pooling as weights ``m``;
* hard (inference): tokens with ``z ≤ θ_l`` are dropped (gathered out), so the kept count varies per passage;
  ``mode="masked"`` runs the soft code with a step function and equals the hard forward (tested);
* ``mode="fixed"``: the same score and layers with a fixed kept fraction ``ratios[l]`` of the original
  tokens for every passage (the non-adaptive baseline at the same per-layer mean budget).

The loss of a passage is ``1 − cos(e_pruned, e_full) + λ (ρ − target)²`` with ``ρ`` the mean over all
blocks of the fraction of tokens each block runs on (soft: ``Σ m / N``) — the budget loss. Training runs
through :func:`shrink.train.train` with its ``loss_fn=`` hook (:func:`train_atp`); only the MLPs train,
the encoder stays frozen and in eval mode.

Introduced in: notebooks/03-tokens/03h-learned-budgets.md
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import select as sel
from .attention import TokenInputError, blocks, is_encoder, layer_qkv, probs_from_qk
from .encoder import _run_layer

MODES = ("soft", "masked", "hard", "fixed")
N_FEATURES = 6


@dataclass
class AdaptiveOut:
    """``embedding [1, D]`` (mask-weighted mean of the last hidden states); ``counts`` the number of tokens
    each block runs on (soft modes: the mask sum, a float); ``budget`` their mean fraction ``ρ``;
    ``thresholds`` θ per pruning point; ``kept`` original indices of the surviving tokens (hard modes)."""

    embedding: torch.Tensor
    counts: list = field(default_factory=list)
    budget: torch.Tensor | float = 1.0
    thresholds: list = field(default_factory=list)
    kept: torch.Tensor | None = None


def log_ratio_scores(probs: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``probs [1, H, N, N]``, query weights ``m [N]`` -> ``z [N] = log(N_eff · s)``, ``s`` the head-mean of the
    ``m``-weighted mean attention received (sums to 1 over the ``m``-weighted keys)."""
    w = m / m.sum()
    s = (w[:, None] * probs[0].mean(0)).sum(0)
    return torch.log(s.clamp_min(1e-12) * m.sum())


def features(z: torch.Tensor, m: torch.Tensor, n: int) -> torch.Tensor:
    """The MLP input ``[N_FEATURES]`` (detached): m-weighted mean, std, max of ``z``, weighted fraction with
    ``z > 0``, ``log n / 5``, kept fraction ``Σ m / n``."""
    z, m = z.detach(), m.detach()
    w = m / m.sum()
    mean = (w * z).sum()
    std = ((w * (z - mean) ** 2).sum()).clamp_min(0).sqrt()
    zmax = z.masked_fill(m <= 1e-6, float("-inf")).max()
    pos = (w * (z > 0).float()).sum()
    return torch.stack([mean, std, zmax, pos, torch.tensor(float(n)).log() / 5, m.sum() / n]).float()


class ATP(nn.Module):
    """Per-layer threshold MLPs around a frozen BERT encoder (see the module docstring).

    Args:
        encoder: a BERT model (minilm, tiny-bert); frozen, kept in eval mode.
        layers: block indices before which tokens are dropped (each in ``1 .. L-1``).
        hidden: MLP width (``N_FEATURES -> hidden -> 1``, tanh).
        tau: soft-mask temperature.
        protected: original token indices never dropped ([CLS] = 0, [SEP] = -1).
        seed: seeds the MLPs' first-layer initialisation.
        theta0: initial threshold (the last layer starts at 0 weight and this bias): below 0 keeps more
            than the above-uniform tokens at the start, so the budget loss does not dominate the first steps.
    """

    def __init__(self, encoder: nn.Module, layers=(2, 3, 4), *, hidden: int = 16, tau: float = 4.0,
                 protected=(0, -1), seed: int = 0, theta0: float = 0.0):
        super().__init__()
        if not is_encoder(encoder):
            raise TokenInputError("ATP thresholds run on a BERT encoder (minilm, tiny-bert)")
        n_layers = len(blocks(encoder))
        layers = tuple(int(x) for x in layers)
        if not layers or list(layers) != sorted(set(layers)) or not all(1 <= x < n_layers for x in layers):
            raise TokenInputError(f"layers must be strictly increasing block indices in [1, {n_layers - 1}], got "
                                  f"{layers}")
        if tau <= 0:
            raise TokenInputError(f"tau must be > 0 (the soft mask's temperature), got {tau}")
        self.encoder = encoder
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.layers, self.tau, self.protected = layers, float(tau), tuple(protected)
        self.thresholds = nn.ModuleList()
        g = torch.Generator().manual_seed(seed)
        for _ in layers:
            mlp = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            with torch.no_grad():
                mlp[0].weight.copy_((torch.rand(hidden, N_FEATURES, generator=g) * 2 - 1) / N_FEATURES ** 0.5)
                mlp[0].bias.zero_()
            nn.init.zeros_(mlp[2].weight)
            nn.init.constant_(mlp[2].bias, float(theta0))   # θ = theta0 for every input at the start
            self.thresholds.append(mlp)

    def train(self, mode: bool = True):
        """Train mode for the MLPs only: the frozen encoder keeps its dropout off."""
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, input_ids: torch.Tensor, *, mode: str = "soft", ratios=None) -> AdaptiveOut:
        """Pruned forward of one passage ``input_ids [1, N]``; see :data:`MODES` (``ratios``: one kept fraction of
        the original ``N`` per pruning point, ``mode="fixed"`` only)."""
        if mode not in MODES:
            raise TokenInputError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise TokenInputError(f"ATP runs one passage [1, N] at a time (kept counts differ), got "
                                  f"{tuple(input_ids.shape)}")
        if mode == "fixed" and (ratios is None or len(ratios) != len(self.layers)):
            raise TokenInputError(f"mode='fixed' needs ratios= with one kept fraction per pruning point "
                                  f"{self.layers}, got {ratios!r}")
        if mode in ("hard", "fixed"):
            return self._hard(input_ids, mode, ratios)
        return self._soft(input_ids, step=(mode == "masked"))

    def _soft(self, ids, step: bool) -> AdaptiveOut:
        enc = self.encoder
        n = ids.shape[1]
        prot = sel.protected_mask(self.protected, 1, n, ids.device)[0]
        m = torch.ones(n)
        h = enc.embeddings(input_ids=ids)
        h_prev, bias_prev = None, None
        counts, thetas = [], []
        for i, layer in enumerate(blocks(enc)):
            if i in self.layers:
                j = self.layers.index(i)
                with torch.no_grad():
                    probs = probs_from_qk(layer_qkv(enc, i - 1, h_prev, values=False), bias_prev)
                    z = log_ratio_scores(probs, m.detach())
                theta = self.thresholds[j](features(z, m, n))[0]
                gate = (z > theta).float() if step else torch.sigmoid((z - theta) * self.tau)
                m = torch.where(prot, m, m * gate)
                thetas.append(theta)
            bias = None if (m == 1).all() else torch.log(m.clamp_min(1e-30))
            if step and bias is not None:
                bias = torch.where(m > 0, torch.zeros_like(m), torch.full_like(m, torch.finfo(h.dtype).min))
            counts.append(m.sum())
            h_prev, bias_prev = h, (bias[None] if bias is not None else None)
            h = _run_layer(layer, h, bias_prev)
        w = m / m.sum()
        emb = torch.einsum("n,nd->d", w, h[0].float())[None]
        budget = torch.stack(counts).mean() / n
        return AdaptiveOut(emb, counts, budget, thetas, torch.nonzero(m > 0.5)[:, 0][None] if step else None)

    @torch.no_grad()
    def _hard(self, ids, mode: str, ratios) -> AdaptiveOut:
        enc = self.encoder
        n = ids.shape[1]
        prot_orig = sel.protected_mask(self.protected, 1, n, ids.device)
        kept = torch.arange(n)[None]
        h = enc.embeddings(input_ids=ids)
        h_prev = None
        counts, thetas = [], []
        for i, layer in enumerate(blocks(enc)):
            if i in self.layers:
                j = self.layers.index(i)
                cur = h.shape[1]
                probs = probs_from_qk(layer_qkv(enc, i - 1, h_prev, values=False))
                z = log_ratio_scores(probs, torch.ones(cur))
                prot = torch.gather(prot_orig, 1, kept)[0]
                if mode == "hard":
                    theta = self.thresholds[j](features(z, torch.ones(cur), n))[0]
                    keep = (z > theta) | prot
                    thetas.append(theta)
                    idx = torch.nonzero(keep)[:, 0][None]
                else:
                    k = min(cur, max(int(prot.sum()), sel.kept_count(float(ratios[j]), n)))
                    idx = sel.topk_keep(z[None], k=k, protected=prot[None])
                h, kept = sel.gather(h, idx), torch.gather(kept, 1, idx)
            counts.append(h.shape[1])
            h_prev = h
            h = _run_layer(layer, h, None)
        emb = h[0].float().mean(0)[None]
        return AdaptiveOut(emb, counts, sum(counts) / (len(counts) * n), thetas, kept)


def passage_loss(atp: ATP, ids: torch.Tensor, ref: torch.Tensor, target: float, lam: float) -> tuple:
    """``1 − cos(e, e_full) + λ (ρ − target)²`` of one passage (soft masks) and the output."""
    out = atp(ids, mode="soft")
    cos = torch.nn.functional.cosine_similarity(out.embedding, ref, dim=-1)[0]
    return 1 - cos + lam * (out.budget - target) ** 2, out


def train_atp(atp: ATP, train_ids: list[torch.Tensor], refs: torch.Tensor, *, target: float, lam: float = 20.0,
              steps: int = 150, batch: int = 8, lr: float = 3e-3, seed: int = 0, progress: bool = False):
    """Train the threshold MLPs with :func:`shrink.train.train` (``loss_fn=`` hook, AdamW, cosine schedule):
    each step draws ``batch`` passages (seeded by ``seed`` and the step) and averages :func:`passage_loss`.
    ``refs [n, D]`` are the unpruned embeddings of ``train_ids``. Returns the :class:`~shrink.train.TrainResult`
    (``history`` holds the loss)."""
    from .. import train as T

    if not 0.0 < target < 1.0:
        raise TokenInputError(f"target mean kept fraction must lie in (0, 1), got {target!r}")
    if len(train_ids) < batch:
        raise TokenInputError(f"{len(train_ids)} training passages, fewer than batch={batch}; lower batch")

    def batches(t):
        g = torch.Generator().manual_seed(seed * 100003 + t)
        return {"idx": torch.randperm(len(train_ids), generator=g)[:batch]}

    def loss_fn(model, b, t):
        losses = [passage_loss(model, train_ids[int(i)], refs[int(i)][None], target, lam)[0] for i in b["idx"]]
        return torch.stack(losses).mean(), sum(int(train_ids[int(i)].shape[1]) for i in b["idx"])

    cfg = T.TrainConfig(steps=steps, lr=lr, warmup=max(1, steps // 10), schedule="cosine", seed=seed,
                        trainable=("thresholds",), log_every=max(1, steps // 10))
    return T.train(atp, batches, cfg, loss_fn=loss_fn, progress=progress)
