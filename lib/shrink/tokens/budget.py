"""Learned token budgets: a VFlowOpt-style search of per-layer keep ratios under a mean-budget constraint.

VFlowOpt (Yang et al., ICCV 2025; ``llava_ov_opt_all.py``) prunes progressively at several LLM layers and
picks the ratios by Bayesian optimisation; the last ratio is *solved* from the constraint that the mean
kept fraction over all layers equals a target, and the objective is the cosine similarity between the
last layer's hidden state at the last token with and without pruning ("visual information flow"). Here
the same loop runs on a decoder's context tokens with Optuna's TPE sampler (VFlowOpt uses
scikit-optimize; any sequential model-based optimiser fits).

Introduced in: (planned) notebooks/03-tokens/03h-learned-budgets.md
"""

from __future__ import annotations

import torch
from torch import nn

from . import decoder as D
from . import scores as S
from . import select as sel
from .attention import TokenInputError, blocks, layer_qkv, probs_from_qk


def mean_kept_fraction(schedule: list[tuple[int, float]], n_layers: int) -> float:
    """Mean over the ``n_layers`` blocks of the fraction of context tokens each block runs on, for a schedule
    ``[(K_1, f_1), ...]`` (from block ``K_j`` on, a fraction ``f_j`` of the original context is kept)."""
    total, prev_k, prev_f = 0.0, 0, 1.0
    for k, f in schedule:
        total += (k - prev_k) * prev_f
        prev_k, prev_f = k, f
    return (total + (n_layers - prev_k) * prev_f) / n_layers


def solve_last(layers: list[int], ratios: list[float], target: float, n_layers: int) -> float:
    """The last ratio that makes :func:`mean_kept_fraction` equal ``target`` (VFlowOpt's constraint)."""
    head = list(zip(layers[:-1], ratios))
    part = mean_kept_fraction(head + [(layers[-1], 0.0)], n_layers)
    return (target - part) * n_layers / (n_layers - layers[-1])


def _check_schedule(schedule, n_layers):
    ks = [k for k, _ in schedule]
    fs = [f for _, f in schedule]
    if not schedule or ks != sorted(set(ks)) or not all(1 <= k < n_layers for k in ks):
        raise TokenInputError(f"schedule layers must be strictly increasing in [1, {n_layers - 1}], got {ks}")
    if not all(0.0 < f <= 1.0 for f in fs) or any(b > a for a, b in zip(fs, fs[1:])):
        raise TokenInputError(f"schedule ratios must lie in (0, 1] and not increase (tokens cannot come back), got {fs}")


@torch.no_grad()
def prefill_schedule(model: nn.Module, input_ids: torch.Tensor, n_context: int, schedule: list[tuple[int, float]], *,
                     method: str = "last", protect_sink: bool = True, **score_options) -> tuple[torch.Tensor, torch.Tensor]:
    """Progressive prefill pruning: at each ``(K, f)`` the context is cut to ``round(f · C)`` tokens, scored
    by block ``K-1``'s attention over the **current** context tokens (original RoPE positions). Returns the
    final normed hidden states ``[B, T', D]`` and the kept original indices ``[B, T']``."""
    layers = blocks(model)
    _check_schedule(schedule, len(layers))
    b, t = input_ids.shape
    h = model.model.embed_tokens(input_ids)
    pos = torch.arange(t)[None].expand(b, t)
    c_cur, start = n_context, 0
    for k, f in schedule:
        h_prev = D.run_blocks(model, h, pos, start, k - 1)
        h = D.run_blocks(model, h_prev, pos, k - 1, k)
        target = sel.kept_count(f, n_context)
        if target < c_cur:
            qk = layer_qkv(model, k - 1, h_prev[:, :c_cur], pos[:, :c_cur], values=False)
            sc = S.score(method, probs_from_qk(qk) if method not in ("random", "recency") else None, n=c_cur,
                         batch=b, query=c_cur - 1, **score_options)
            idx_c = sel.topk_keep(sc, k=target, protected=[0] if protect_sink else None)
            idx = torch.cat([idx_c, torch.arange(c_cur, h.shape[1])[None].expand(b, -1)], dim=1)
            h, pos = sel.gather(h, idx), torch.gather(pos, 1, idx)
            c_cur = target
        start = k
    h = D.run_blocks(model, h, pos, start, len(layers))
    return model.model.norm(h), pos


def last_token_cosine(model, windows, n_context, schedule, *, method="last", reference=None) -> float:
    """Mean over windows of cos(last-token final hidden state pruned, unpruned) — VFlowOpt's objective."""
    total = 0.0
    for i, x in enumerate(windows):
        ref = reference[i] if reference is not None else prefill_schedule(model, x, n_context, [(1, 1.0)])[0][:, -1]
        h, _ = prefill_schedule(model, x, n_context, schedule, method=method)
        total += float(torch.nn.functional.cosine_similarity(h[:, -1].float(), ref.float(), dim=-1).mean())
    return total / len(windows)


def search(model: nn.Module, windows: list[torch.Tensor], n_context: int, *, layers: tuple[int, ...] = (3, 9),
           target: float = 0.5, n_trials: int = 20, seed: int = 0, method: str = "last") -> dict:
    """Optuna TPE search of the free ratios ``f_1 .. f_{m-1}`` (the last one solved from ``target``).

    The hand-set schedule — one pruning point at ``layers[0]`` with the ratio that meets the budget — is
    enqueued as the first trial, so the best schedule is at least as good as it on these windows.

    Returns ``{"best": {"schedule", "cos", "mean_kept"}, "baseline": {...}, "trials": [...]}``.
    """
    import optuna

    n_layers = len(blocks(model))
    layers = list(layers)
    if not 0.0 < target < 1.0:
        raise TokenInputError(f"target mean kept fraction must lie in (0, 1), got {target!r}")
    reference = [prefill_schedule(model, x, n_context, [(1, 1.0)])[0][:, -1] for x in windows]
    f_single = solve_last(layers[:1], [], target, n_layers)
    if not 0.0 < f_single <= 1.0:
        raise TokenInputError(f"target {target} cannot be met by pruning from block {layers[0]} (needs ratio "
                              f"{f_single:.3f}); prune earlier or raise the target")
    base_sched = [(layers[0], f_single)]
    baseline = {"schedule": base_sched, "cos": last_token_cosine(model, windows, n_context, base_sched, method=method,
                                                                  reference=reference),
                "mean_kept": mean_kept_fraction(base_sched, n_layers)}
    trials = []

    def objective(trial):
        ratios = []
        for j in range(len(layers) - 1):
            hi = ratios[-1] if ratios else 1.0
            ratios.append(trial.suggest_float(f"r{j}", 0.05, 1.0) * hi)
        last = solve_last(layers, ratios, target, n_layers)
        if not 0.0 < last <= (ratios[-1] if ratios else 1.0):
            trials.append({"ratios": ratios, "feasible": False})
            return -1.0
        sched = list(zip(layers, [*ratios, last]))
        cos = last_token_cosine(model, windows, n_context, sched, method=method, reference=reference)
        trials.append({"ratios": [*ratios, last], "feasible": True, "cos": cos})
        return cos

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    # the hand-set single-point schedule in this search space: f at layers[0], then nothing more pruned
    # (the solved last ratio is then f again)
    if len(layers) > 1:
        study.enqueue_trial({f"r{j}": (f_single if j == 0 else 1.0) for j in range(len(layers) - 1)})
    study.optimize(objective, n_trials=n_trials)
    feas = [t for t in trials if t["feasible"]]
    best = max(feas, key=lambda t: t["cos"]) if feas else None
    out_best = None
    if best is not None:
        sched = list(zip(layers, best["ratios"]))
        out_best = {"schedule": sched, "cos": best["cos"], "mean_kept": mean_kept_fraction(sched, n_layers)}
    return {"best": out_best, "baseline": baseline, "trials": trials}
