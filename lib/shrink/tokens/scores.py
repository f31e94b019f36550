"""Token importance scores behind one interface: attention ``[B, H, N, N]`` -> importance ``[B, N]``.

==============  ===========================================================  ==============================
name            score of key token j                                         paper
==============  ===========================================================  ==============================
``cls``         mean over heads of ``A[h, 0, j]`` (attention from [CLS])      EViT (Liang et al., ICLR 2022)
``mean``        mean over heads and queries of ``A[h, i, j]`` (column mean)  LTP (Kim et al., KDD 2022)
``last``        mean over heads of ``A[h, q, j]``, ``q`` = last (query) token  FastV (Chen et al., ECCV 2024)
``h2o``         sum over heads and queries of ``A[h, i, j]`` (accumulated)    H2O (Zhang et al., NeurIPS 2023)
``wpr``         Weighted PageRank per head, heads by EIR (RMS) or mean, VHF  Zero-TPrune I-stage (CVPR 2024)
``random``      i.i.d. uniform (seeded ``generator``)                        baseline
``recency``     position ``j`` (later = more important); protect the sink    StreamingLLM-style sink + window
==============  ===========================================================  ==============================

Protected tokens ([CLS]/[SEP], the attention sink, a continuation) are not a score matter: the selection
(:func:`shrink.tokens.select.topk_keep`) keeps them whatever their score. In one forward pass the H2O score
(column sum) ranks tokens exactly as the LTP column mean does; H2O differs only when it accumulates over
generation steps (KV-cache eviction).

Introduced in: notebooks/03-tokens/03b-token-scores.md
"""

from __future__ import annotations

import torch

from .attention import TokenInputError

SCORES = ("cls", "mean", "last", "h2o", "wpr", "random", "recency")


def _check_attn(attn: torch.Tensor) -> None:
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise TokenInputError("attention must be a tensor [B, H, N, N] of row-stochastic probabilities "
                              "(shrink.tokens.attention.attention_probs computes it); got "
                              f"{tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__}")


def wpr_heads(attn: torch.Tensor, iterations: int = 30, *, exclude_sink: bool = False,
              damping: float = 1.0) -> torch.Tensor:
    """Weighted PageRank of every head (Zero-TPrune Eq. 3): ``s⁽⁰⁾ = 1/N``, ``s ← d·Aᵀs + (1-d)/N``.

    Args:
        attn: ``[B, H, N, N]`` attention, rows sum to 1 (row i = query i, column j = key j).
        iterations: power iterations (1 gives the column mean of A, the LTP score).
        exclude_sink: drop token 0 from the graph (its row and column; rows renormalised) and give it
            score 0: in a causal graph token 0 attends only to itself and absorbs all mass.
        damping: ``d`` in (0, 1]; ``d < 1`` adds PageRank's uniform teleport.

    Returns:
        ``[B, H, N]`` fp32 (iterated in fp64), each head's scores sum to 1 (mass conservation).
    """
    _check_attn(attn)
    if not isinstance(iterations, int) or iterations < 1:
        raise TokenInputError(f"WPR iterations must be an integer >= 1 (1 = column mean), got {iterations!r}")
    if not 0.0 < damping <= 1.0:
        raise TokenInputError(f"WPR damping must lie in (0, 1] (1 = no teleport), got {damping!r}")
    # float64 with rows renormalised (a no-op in exact arithmetic): fp32 softmax rows sum to 1 only to ~1e-7,
    # and that error compounds over the iterations (2e-5 of lost mass after 50 on MiniLM)
    a = attn.double()
    n = a.shape[-1]
    if exclude_sink:
        if n < 2:
            raise TokenInputError("exclude_sink needs at least 2 tokens")
        a = a[..., 1:, 1:]
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-300)
    m = a.shape[-1]
    s = torch.full(a.shape[:-1], 1.0 / m, dtype=torch.float64, device=a.device)   # [B, H, m]
    for _ in range(iterations):
        s = damping * torch.einsum("bhij,bhi->bhj", a, s) + (1.0 - damping) / m
    if exclude_sink:
        s = torch.cat([torch.zeros_like(s[..., :1]), s], dim=-1)
    return s.float()


def head_variance(s_heads: torch.Tensor) -> torch.Tensor:
    """VHF statistic: variance over tokens of ``N · s_h`` (0 for a uniform head, N-independent) -> ``[B, H]``."""
    n = s_heads.shape[-1]
    return (n * s_heads).var(dim=-1, unbiased=False)


def aggregate_heads(s_heads: torch.Tensor, how: str = "eir", vhf: tuple[float, float] | None = None) -> torch.Tensor:
    """Heads -> one score ``[B, N]``: ``"eir"`` (Zero-TPrune's Emphasizing Informative Region,
    ``sqrt(mean_h s_h²)``) or ``"mean"``; ``vhf=(v_min, v_max)`` keeps only heads whose
    :func:`head_variance` lies in the range (Variance-based Head Filter)."""
    if how not in ("eir", "mean"):
        raise TokenInputError(f"head aggregation must be 'eir' or 'mean', got {how!r}")
    w = torch.ones(s_heads.shape[:2], device=s_heads.device)
    if vhf is not None:
        lo, hi = vhf
        var = head_variance(s_heads)
        w = ((var >= lo) & (var <= hi)).float()
        if bool((w.sum(-1) == 0).any()):
            raise TokenInputError(f"VHF range {vhf} filters out every head of some sample (head variances "
                                  f"{var.min().item():.3g}..{var.max().item():.3g}); widen the range or pass vhf=None")
    w = w / w.sum(-1, keepdim=True)
    if how == "eir":
        return torch.einsum("bh,bhn->bn", w, s_heads.pow(2)).sqrt()
    return torch.einsum("bh,bhn->bn", w, s_heads)


def score(name: str, attn: torch.Tensor | None = None, *, n: int | None = None, query: int = -1,
          iterations: int = 30, heads: str = "eir", vhf: tuple[float, float] | None = None,
          exclude_sink: bool = False, damping: float = 1.0,
          generator: torch.Generator | None = None, batch: int | None = None) -> torch.Tensor:
    """Importance of every token, ``[B, N]`` fp32 (higher = keep).

    Args:
        name: one of :data:`SCORES`.
        attn: ``[B, H, N, N]`` attention probabilities (not needed for ``random``/``recency``: give
            ``n`` and ``batch`` instead).
        query: the query row used by ``last`` (FastV: the last prompt token).
        iterations, heads, vhf, exclude_sink, damping: ``wpr`` options (see :func:`wpr_heads`).
        generator: seeded generator for ``random`` (required, so runs are reproducible).
    """
    if name not in SCORES:
        raise TokenInputError(f"unknown token score {name!r}; scores: {', '.join(SCORES)} "
                              "(DivPrune, ToMe and Zero-TPrune's S-stage are selections: see shrink.tokens.select)")
    if name in ("random", "recency"):
        if attn is not None:
            _check_attn(attn)
            batch, n = attn.shape[0], attn.shape[-1]
        if n is None or batch is None:
            raise TokenInputError(f"score {name!r} without attention needs n= (tokens) and batch=")
        if name == "recency":
            return torch.arange(n, dtype=torch.float32)[None].expand(batch, n).clone()
        if generator is None:
            raise TokenInputError("score 'random' needs generator=torch.Generator().manual_seed(seed) "
                                  "(results must be reproducible)")
        return torch.rand(batch, n, generator=generator)
    if attn is None:
        raise TokenInputError(f"score {name!r} needs the attention probabilities attn=[B, H, N, N]")
    _check_attn(attn)
    a = attn.float()
    if name == "cls":
        return a[:, :, 0, :].mean(1)
    if name == "last":
        return a[:, :, query, :].mean(1)
    if name == "mean":
        return a.mean(2).mean(1)
    if name == "h2o":
        return a.sum(2).sum(1)
    return aggregate_heads(wpr_heads(a, iterations, exclude_sink=exclude_sink, damping=damping), heads, vhf)
