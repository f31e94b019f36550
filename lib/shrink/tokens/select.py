"""Which tokens to keep: exact-count top-k, Zero-TPrune's S-stage, DivPrune's max-min, ToMe merging.

Every selection returns **sorted** int64 indices ``[B, k]`` (original order preserved, so RoPE positions
and causal order survive the gather) with ``k = round(keep · N)`` exactly (half up), protected tokens
always included. Gathering the kept rows goes through :func:`shrink.ops.gather_tokens`.

Introduced in: notebooks/03-tokens/03b-token-scores.md
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from .attention import TokenInputError


def kept_count(keep: float, n: int) -> int:
    """``round(keep · n)`` (half up), at least 1; ``keep`` must lie in (0, 1]."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
        raise TokenInputError(f"keep ratio must lie in (0, 1] (1.0 = no pruning), got {keep!r}; to drop every "
                              "token, skip the model instead")
    return max(1, int(math.floor(float(keep) * n + 0.5)))


def protected_mask(protected, batch: int, n: int, device=None) -> torch.Tensor:
    """Normalise ``protected`` (None, an index list, a bool ``[N]`` or ``[B, N]`` mask) -> bool ``[B, N]``."""
    if protected is None:
        return torch.zeros(batch, n, dtype=torch.bool, device=device)
    if isinstance(protected, torch.Tensor) and protected.dtype == torch.bool:
        m = protected if protected.dim() == 2 else protected[None].expand(batch, n)
        if m.shape != (batch, n):
            raise TokenInputError(f"protected mask must be [B={batch}, N={n}] or [N], got {tuple(protected.shape)}")
        return m.to(device)
    idx = torch.as_tensor(list(protected), dtype=torch.long)
    if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
        raise TokenInputError(f"protected token indices must lie in [-{n}, {n}), got {idx.tolist()}")
    m = torch.zeros(n, dtype=torch.bool)
    m[idx] = True
    return m[None].expand(batch, n).to(device)


def _check_budget(prot: torch.Tensor, k: int) -> None:
    worst = int(prot.sum(-1).max()) if prot.numel() else 0
    if worst > k:
        raise TokenInputError(f"{worst} protected tokens exceed the budget of {k} kept tokens; raise the keep "
                              "ratio or protect fewer tokens (e.g. only the sink, not the whole continuation)")


def topk_keep(scores: torch.Tensor, keep: float | None = None, *, k: int | None = None,
              protected=None) -> torch.Tensor:
    """Exact-count top-k: the ``k`` highest-scoring tokens plus every protected one, sorted.

    Args:
        scores: ``[B, N]`` importance (higher = keep).
        keep: ratio in (0, 1] (``k = round(keep·N)``), or give ``k`` directly.
        protected: tokens that are never dropped (they count towards ``k``).

    Returns:
        int64 ``[B, k]`` ascending indices.
    """
    if scores.dim() != 2:
        raise TokenInputError(f"scores must be [B, N], got {tuple(scores.shape)}")
    b, n = scores.shape
    if k is None:
        k = kept_count(keep, n)
    elif not 1 <= k <= n:
        raise TokenInputError(f"k must lie in [1, N={n}], got {k}")
    prot = protected_mask(protected, b, n, scores.device)
    _check_budget(prot, k)
    s = scores.float().masked_fill(prot, float("inf"))
    idx = s.topk(k, dim=-1).indices
    return idx.sort(dim=-1).values


def gather(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Kept rows: ``h [B, N, ...]``, ``idx [B, k]`` -> ``[B, k, ...]`` (via :func:`shrink.ops.gather_tokens`)."""
    return ops.gather_tokens(h, idx)


# --------------------------------------------------------------------------------------------------
# Zero-TPrune: I-stage (importance) then S-stage (similarity)
# --------------------------------------------------------------------------------------------------
def _cos_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    y = torch.nn.functional.normalize(y.float(), dim=-1)
    return x @ y.T


def zero_tprune_keep(importance: torch.Tensor, features: torch.Tensor, keep: float, *, protected=None,
                     s_share: float = 0.5, partition: str = "seq") -> torch.Tensor:
    """Zero-TPrune's two stages (Wang et al., CVPR 2024, Sec. 3): prune ``r = N - k`` tokens, ``r_I`` of
    them by lowest importance (I-stage) and ``r_S = round(s_share·r)`` by redundancy (S-stage).

    S-stage: the surviving unprotected tokens, sorted by importance, are split into a *source* set (the
    less important ones, ``partition="seq"``: the lower half, or at least ``r_S``; ``"alt"``: every other
    token in importance order) and a *target* set (the rest, protected tokens included). Each source's
    redundancy is its maximum cosine similarity to any target (``features`` = keys by default in the
    paper); the ``r_S`` most redundant sources are pruned. When ``r_S`` reaches the size of the source
    set (``s_share = 1``, or aggressive budgets such as keep 0.3 with ``s_share = 0.5``) every source is
    pruned and the result equals the I-stage alone: the S-stage only acts when it has a choice.

    Args:
        importance: ``[B, N]`` I-stage scores (WPR).
        features: ``[B, N, F]`` similarity features (keys, queries, values or hidden states).
        keep: kept ratio in (0, 1].
        s_share: fraction of the pruned tokens removed by the S-stage (0 = I-stage only).

    Returns:
        int64 ``[B, k]`` sorted indices.
    """
    if not 0.0 <= s_share <= 1.0:
        raise TokenInputError(f"s_share (S-stage share of the pruned tokens) must lie in [0, 1], got {s_share!r}")
    if partition not in ("seq", "alt"):
        raise TokenInputError(f"partition must be 'seq' (importance-guided, the paper's choice) or 'alt', "
                              f"got {partition!r}")
    b, n = importance.shape
    if features.shape[:2] != (b, n):
        raise TokenInputError(f"features must be [B={b}, N={n}, F], got {tuple(features.shape)}")
    k = kept_count(keep, n)
    prot = protected_mask(protected, b, n, importance.device)
    _check_budget(prot, k)
    r = n - k
    r_s = int(math.floor(s_share * r + 0.5))
    idx1 = topk_keep(importance, k=n - (r - r_s), protected=prot)       # I-stage
    if r_s == 0:
        return idx1
    out = []
    for bi in range(b):
        cand = idx1[bi]
        unprot = cand[~prot[bi, cand]]
        order = unprot[importance[bi, unprot].float().argsort(stable=True)]     # ascending importance
        if partition == "seq":
            n_src = max((len(order) + 1) // 2, r_s)
            src, dst_u = order[:n_src], order[n_src:]
        else:
            src, dst_u = order[0::2], order[1::2]
            if len(src) < r_s:
                raise TokenInputError(f"partition 'alt' gives {len(src)} source tokens but the S-stage must prune "
                                      f"{r_s}; lower s_share or use partition='seq'")
        dst = torch.cat([dst_u, cand[prot[bi, cand]]])
        if len(dst) == 0:
            raise TokenInputError("the S-stage has no target tokens; lower s_share")
        red = _cos_matrix(features[bi, src], features[bi, dst]).max(-1).values
        drop = src[red.topk(r_s).indices]
        keep_mask = torch.ones(n, dtype=torch.bool, device=cand.device)
        keep_mask[drop] = False
        pruned_by_i = torch.ones(n, dtype=torch.bool, device=cand.device)
        pruned_by_i[cand] = False
        keep_mask &= ~pruned_by_i
        out.append(keep_mask.nonzero().flatten())
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------
# DivPrune: greedy max-min diversity
# --------------------------------------------------------------------------------------------------
def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x_i, x_j)`` for ``x [N, F]`` -> ``[N, N]`` fp32 (DivPrune's distance)."""
    return 1.0 - _cos_matrix(x, x)


def _first_pick(d: torch.Tensor) -> int:
    n = d.shape[0]
    off = d.masked_fill(torch.eye(n, dtype=torch.bool, device=d.device), float("inf"))
    return int(off.min(-1).values.argmax())


def divprune_keep(features: torch.Tensor, keep: float, *, protected=None, reference: bool = False) -> torch.Tensor:
    """DivPrune (Alvar et al., CVPR 2025, Alg. 1): greedy Max-Min Diversity selection of ``k`` tokens.

    The first pick is the token whose nearest neighbour is farthest (or the protected tokens, if any,
    seed the set); then repeatedly add ``argmax_j min_{i∈S} d(i, j)`` with ``d = 1 - cos``.
    ``reference=False`` keeps a running minimum (O(kN), farthest-point sampling); ``reference=True``
    recomputes the minimum over the selected rows at every step like the released code (O(k²N)). Both
    pick identical indices (min is exact; ties go to the first index).

    Args:
        features: ``[B, N, F]`` token features (hidden states).
    Returns:
        int64 ``[B, k]`` sorted.
    """
    b, n, _ = features.shape
    k = kept_count(keep, n)
    prot = protected_mask(protected, b, n, features.device)
    _check_budget(prot, k)
    out = []
    for bi in range(b):
        d = cosine_distance(features[bi])
        chosen = prot[bi].nonzero().flatten().tolist() or [_first_pick(d)]
        if reference:
            while len(chosen) < k:
                mind = d[chosen].min(0).values
                mind[chosen] = float("-inf")
                chosen.append(int(mind.argmax()))
        else:
            mind = d[chosen].min(0).values
            mind[chosen] = float("-inf")
            while len(chosen) < k:
                j = int(mind.argmax())
                chosen.append(j)
                mind = torch.minimum(mind, d[j])
                mind[j] = float("-inf")
        out.append(torch.tensor(sorted(chosen), dtype=torch.long, device=features.device))
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------
# ToMe: bipartite soft matching with size tracking
# --------------------------------------------------------------------------------------------------
@dataclass
class Merged:
    """Result of one ToMe step: ``x [B, N', D]`` merged tokens, ``sizes [B, N']`` (how many original tokens
    each holds; sums to the original count), ``origin [B, N']`` (index, in the step's input, of the token
    each output row continues: its position), ``assign [B, N]`` (output row of every input token)."""

    x: torch.Tensor
    sizes: torch.Tensor
    origin: torch.Tensor
    assign: torch.Tensor


def tome_merge(x: torch.Tensor, metric: torch.Tensor, r: int, *, sizes: torch.Tensor | None = None,
               protected=None) -> Merged:
    """ToMe bipartite soft matching (Bolya et al., ICLR 2023, Sec. 3): merge ``r`` tokens.

    Tokens alternate into sets A (even positions) and B (odd). Each A token finds its most similar B token
    (cosine of ``metric``, e.g. head-averaged keys); the ``r`` A tokens with the highest similarity are
    merged into their match by a **size-weighted mean**, ``x_b ← (s_b x_b + Σ s_a x_a) / (s_b + Σ s_a)``.
    Protected tokens neither merge nor receive. Output rows keep the original order.

    Args:
        x: ``[B, N, D]`` tokens; metric: ``[B, N, F]``; sizes: ``[B, N]`` (ones if None).
        r: tokens to remove, at most the number of unprotected A tokens (about N/2).
    """
    b, n, _ = x.shape
    if sizes is None:
        sizes = torch.ones(b, n, dtype=x.dtype, device=x.device)
    prot = protected_mask(protected, b, n, x.device)
    a_idx = torch.arange(0, n, 2, device=x.device)
    b_idx = torch.arange(1, n, 2, device=x.device)
    xs, ss, os_, asg = [], [], [], []
    for bi in range(b):
        a_ok = a_idx[~prot[bi, a_idx]]
        b_ok = b_idx[~prot[bi, b_idx]]
        if not 0 <= r <= len(a_ok) or (r > 0 and len(b_ok) == 0):
            raise TokenInputError(f"ToMe can merge at most {len(a_ok)} of {n} tokens in one step (the unprotected "
                                  f"half), asked r={r}; merge over several layers (an r schedule)")
        sim = _cos_matrix(metric[bi, a_ok], metric[bi, b_ok])
        best, match = sim.max(-1)
        src_rank = best.argsort(descending=True, stable=True)[:r]
        src, dst = a_ok[src_rank], b_ok[match[src_rank]]
        w = (x[bi] * sizes[bi, :, None]).float()
        s = sizes[bi].float().clone()
        w.index_add_(0, dst, w[src])
        s.index_add_(0, dst, s[src])
        alive = torch.ones(n, dtype=torch.bool, device=x.device)
        alive[src] = False
        keep = alive.nonzero().flatten()
        new_pos = torch.full((n,), -1, dtype=torch.long, device=x.device)
        new_pos[keep] = torch.arange(len(keep), device=x.device)
        target = torch.arange(n, device=x.device)
        target[src] = dst
        xs.append((w[keep] / s[keep, None]).to(x.dtype))
        ss.append(s[keep].to(sizes.dtype))
        os_.append(keep)
        asg.append(new_pos[target])
    return Merged(torch.stack(xs), torch.stack(ss), torch.stack(os_), torch.stack(asg))
