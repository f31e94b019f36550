"""Q-Tuning — "Winning the Pruning Gamble: A Unified Approach to Joint Sample and Token Pruning for Efficient
SFT" (Wang et al., arXiv 2509.23873): dynamic per-batch sample pruning on the Error–Uncertainty plane, then
token pruning inside the "misconception" samples only.

**Sources and where they disagree.** The paper's code was never released; an implementation exists in the
early history of Q-tuning/Q-tuning (commit ``dd6eba5``, ``LLaMA-Factory/src/llamafactory/train/sft/trainer.py``,
``compute_loss`` with ``plug == "wisely"``). The project page (``docs/index.html``) disagrees with it in
places; **we follow the code** and say so:

* *Quadrants.* The page says the kept "misconception" samples and the dropped "harmful noise" are both
  "high error, low uncertainty". The code keeps
  ``Q2 = {PPL > Q_{1-α}(PPL), Ent <= Q_β(Ent)}`` (high error, low uncertainty) and
  ``Q4 = {PPL <= Q_α(PPL), Ent > Q_{1-β}(Ent)}`` (low error, high uncertainty: "calibration"), dropping the
  rest (Q1 high/high, Q3 low/low, and the band between the thresholds).
* *Entropy.* The code averages the predictive entropy over every attended position (prompt included);
  ``entropy_over="attention"`` (default) mirrors it, ``"response"`` averages over the response positions
  only (the notes' reading of the formulas). PPL is ``exp`` of the mean response-token NLL in both.
* *Token rule direction.* The page keeps "the top-r_token fraction" ranked by
  ``s_i = (1-λ) PPL_i + λ (PPL_{i-1} + PPL_{i+1})``; the code (``token_method="wise"``) **drops the highest**
  ``s_i`` (locally noisy tokens) and keeps the rest. We keep the ``⌈r_token · T⌉`` tokens with the lowest
  ``s_i``. Neighbours outside the response count 0 (as the code); ``λ = 0.5`` (``wise_lambda``).
* *Token budget.* The code drops tokens until the *batch* keeps ``round(total · r_sample · r_token)``
  tokens (after the dropped samples' tokens are counted); the paper's rule, and this module, keeps exactly
  ``⌈r_token · T_i⌉`` of the ``T_i`` response tokens of *each* Q2 sample.

**Sample rule** (:func:`sample_rule`). As the code: one bisection moves α and β together over
``[0, 0.49]`` (``|Q2 ∪ Q4|`` is non-decreasing in it), here to the step closest to ``K = max(1,
round(r_sample · B))``; if fewer qualify, the code tops up with the largest ``max(s2, s4)`` where
``s2 = p̂ - ê``, ``s4 = ê - p̂`` (min–max normalised PPL and entropy) and treats a top-up as Q2 when
``s2 >= s4``; if more qualify (the code keeps them all), we drop the smallest ``max(s2, s4)`` — so exactly
``K`` samples are kept, within ±1 of ``r_sample · B``.

**Hook** (:class:`QTuningHook`). ``shrink.train.train(batch_hook=QTuningHook(r_sample, r_token))``: at each
step a no-grad forward of the *current* model scores the batch (the code reuses the training forward's
logits; :func:`shrink.train.train` calls hooks before its forward, so this costs one extra forward), keeps
the chosen rows (``input_ids``, ``labels``, ``attention_mask``, ``index``) and sets ``labels = -100`` on the
dropped response tokens of Q2 samples. The per-step counts are appended to ``hook.log``.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import SelectionError

ENTROPY_OVER = ("attention", "response")
Q_NAMES = {1: "Q1 harmful noise (high PPL, high Ent)", 2: "Q2 misconception (high PPL, low Ent)",
           3: "Q3 redundant (low PPL, low Ent)", 4: "Q4 calibration (low PPL, high Ent)"}


def _ratio(name: str, r) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < float(r) <= 1:
        raise SelectionError(f"{name}={r!r} must be a fraction in (0, 1], e.g. {name}=0.25 (1: keep all).")
    return float(r)


# ------------------------------------------------------------------------------------------- EU plane
def eu_scores(logits, labels, attention_mask=None, *, entropy_over: str = "attention"):
    """Error–uncertainty coordinates of a batch (no grad).

    Args:
        logits: ``[B, T, V]``. labels: ``[B, T]`` int64 (``-100``: not a response token).
        attention_mask: ``[B, T]`` (``None``: all ones).
        entropy_over: ``"attention"`` (the code: all attended positions) or ``"response"``.

    Returns:
        ``(ppl [B] float64 numpy, entropy [B] float64 numpy, token_nll [B, T-1] torch float32, mask [B, T-1]
        bool)``: PPL = ``exp`` of the mean NLL over counted response positions; entropy (nats) of the
        predictive distribution averaged over the chosen positions; per-token NLL (0 off the mask).
    """
    import torch

    if entropy_over not in ENTROPY_OVER:
        raise SelectionError(f"entropy_over={entropy_over!r}: use 'attention' (the official code) or 'response'.")
    with torch.no_grad():
        lg = logits[:, :-1].float()
        tgt = labels[:, 1:]
        mask = tgt != -100
        if not mask.any(1).all():
            raise SelectionError("a sample has no response token (all labels -100); drop it before Q-Tuning.")
        lp = torch.log_softmax(lg, -1)
        nll = -lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
        ppl = torch.exp(nll.sum(1) / mask.sum(1))
        ent_tok = -(lp.exp() * lp).sum(-1)
        if entropy_over == "response":
            em = mask
        else:
            em = (attention_mask[:, 1:] > 0) if attention_mask is not None else torch.ones_like(mask)
        ent = (ent_tok * em).sum(1) / em.sum(1).clamp_min(1)
    return ppl.double().cpu().numpy(), ent.double().cpu().numpy(), nll, mask


def quadrants(ppl: np.ndarray, ent: np.ndarray, ppl_split: float | None = None,
              ent_split: float | None = None) -> np.ndarray:
    """Quadrant 1..4 of each sample (int64 ``[N]``) split at ``ppl_split`` / ``ent_split`` (default: the
    medians): Q1 high/high, Q2 high PPL low Ent, Q3 low/low, Q4 low PPL high Ent (:data:`Q_NAMES`)."""
    p, e = np.asarray(ppl, float), np.asarray(ent, float)
    ps = float(np.median(p)) if ppl_split is None else ppl_split
    es = float(np.median(e)) if ent_split is None else ent_split
    hi_p, hi_e = p > ps, e > es
    return np.where(hi_p, np.where(hi_e, 1, 2), np.where(hi_e, 4, 3)).astype(np.int64)


# ------------------------------------------------------------------------------------------- sample rule
def _q24(ppl, ent, a):
    q2 = (ppl > np.quantile(ppl, 1 - a)) & (ent <= np.quantile(ent, a))
    q4 = (ppl <= np.quantile(ppl, a)) & (ent > np.quantile(ent, 1 - a))
    return q2, q4


def _norm(x):
    lo, hi = float(np.min(x)), float(np.max(x))
    return np.zeros_like(x) if hi - lo < 1e-12 else (x - lo) / (hi - lo)


def sample_rule(ppl: np.ndarray, ent: np.ndarray, ratio: float, *, max_iter: int = 60) -> tuple[np.ndarray, dict]:
    """Q-Tuning's per-batch sample triage: ``(keep [B] bool, info)``.

    ``info``: ``"q2"`` / ``"q4"`` bool ``[B]`` (final roles, top-ups included; Q2 rows get token pruning),
    ``"alpha"`` (the bisection's quantile level), ``"bisect_count"`` (``|Q2 ∪ Q4|`` before the top-up/trim),
    ``"target"`` ``K``, ``"topped_up"`` / ``"trimmed"`` (counts).
    """
    ppl, ent = np.asarray(ppl, np.float64), np.asarray(ent, np.float64)
    r = _ratio("r_sample", ratio)
    if ppl.ndim != 1 or ppl.shape != ent.shape or ppl.size == 0 or not (np.isfinite(ppl).all()
                                                                        and np.isfinite(ent).all()):
        raise SelectionError(f"ppl and entropy must be finite 1-D arrays of one length (one per sample), got "
                             f"{ppl.shape} and {ent.shape}.")
    B = ppl.size
    K = min(B, max(1, int(round(B * r))))
    lo, hi = 0.0, 0.49
    c_lo = int(np.sum(np.logical_or(*_q24(ppl, ent, lo))))
    c_hi = int(np.sum(np.logical_or(*_q24(ppl, ent, hi))))
    if c_hi <= K:
        lo = hi
    elif c_lo < K:
        for _ in range(max_iter):  # invariant: count(lo) < K < = count(hi)
            mid = (lo + hi) / 2
            c = int(np.sum(np.logical_or(*_q24(ppl, ent, mid))))
            if c < K:
                lo = mid
            else:
                hi = mid
        c_lo = int(np.sum(np.logical_or(*_q24(ppl, ent, lo))))
        c_hi = int(np.sum(np.logical_or(*_q24(ppl, ent, hi))))
        if abs(c_hi - K) < abs(c_lo - K):
            lo = hi
    alpha = lo
    q2, q4 = _q24(ppl, ent, alpha)
    keep = q2 | q4
    count = int(keep.sum())
    pn, en = _norm(ppl), _norm(ent)
    s2, s4 = pn - en, en - pn
    wise = np.maximum(s2, s4)
    added = trimmed = 0
    if count < K:  # the code's top-up by max(s2, s4); a top-up is Q2-like when s2 >= s4
        rest = np.flatnonzero(~keep)
        extra = rest[np.argsort(-wise[rest], kind="stable")[: K - count]]
        keep[extra] = True
        q2[extra] = s2[extra] >= s4[extra]
        q4[extra] = ~q2[extra]
        added = len(extra)
    elif count > K:  # our trim (the code keeps the surplus): drop the least quadrant-like
        cur = np.flatnonzero(keep)
        drop = cur[np.argsort(wise[cur], kind="stable")[: count - K]]
        keep[drop] = q2[drop] = q4[drop] = False
        trimmed = len(drop)
    return keep, {"q2": q2 & keep, "q4": q4 & keep & ~q2, "alpha": alpha, "bisect_count": count, "target": K,
                  "topped_up": added, "trimmed": trimmed}


# ------------------------------------------------------------------------------------------- token rule
def n_keep_tokens(T: int, ratio: float) -> int:
    """``⌈ratio · T⌉`` (with a 1e-9 guard against ``0.7 * 10 = 7.000000000000001``)."""
    return int(math.ceil(ratio * T - 1e-9))


def token_scores(token_nll, mask, lam: float = 0.5):
    """Neighbour-aware score ``s_i = (1-λ) PPL_i + λ (PPL_{i-1} + PPL_{i+1})`` with ``PPL_i = exp(nll_i)``,
    neighbours outside the mask counting 0: ``[B, T]`` float (0 off the mask)."""
    import torch

    if not 0 <= lam <= 1:
        raise SelectionError(f"lambda={lam!r} must be in [0, 1] (the code's wise_lambda = 0.5).")
    m = mask.to(torch.float32)
    p = torch.exp(token_nll.float()) * m
    left = torch.nn.functional.pad(p[:, :-1], (1, 0))
    right = torch.nn.functional.pad(p[:, 1:], (0, 1))
    return ((1 - lam) * p + lam * (left + right)) * m


def token_rule(token_nll, mask, rows, ratio: float, lam: float = 0.5):
    """Keep mask ``[B, T]`` bool: in each of ``rows`` (Q2 samples) the ``⌈ratio · T_i⌉`` counted tokens with
    the *lowest* :func:`token_scores` (ties: earlier position first); other rows keep all counted tokens."""
    import torch

    r = _ratio("r_token", ratio)
    s = token_scores(token_nll, mask, lam)
    keep = mask.clone()
    for i in np.asarray(rows, dtype=np.int64).tolist():
        pos = torch.nonzero(mask[i]).squeeze(-1)
        k = n_keep_tokens(int(pos.numel()), r)
        order = pos[torch.sort(s[i, pos], stable=True).indices]
        keep[i] = False
        keep[i, order[:k]] = True
    return keep


# ------------------------------------------------------------------------------------------- hook
class QTuningHook:
    """``batch_hook`` for :func:`shrink.train.train` applying the sample rule, then the token rule to Q2 rows.

    Args:
        r_sample: fraction of each batch kept (``1.0``: no sample pruning).
        r_token: fraction of each Q2 sample's response tokens kept (``1.0``: no token pruning).
        lam: the neighbour weight λ. entropy_over: see :func:`eu_scores`.
    """

    def __init__(self, r_sample: float, r_token: float, *, lam: float = 0.5, entropy_over: str = "attention"):
        self.r_sample = _ratio("r_sample", r_sample)
        self.r_token = _ratio("r_token", r_token)
        if not 0 <= lam <= 1:
            raise SelectionError(f"lam={lam!r} must be in [0, 1] (the code's wise_lambda = 0.5).")
        if entropy_over not in ENTROPY_OVER:
            raise SelectionError(f"entropy_over={entropy_over!r}: use 'attention' (the code) or 'response'.")
        self.lam, self.entropy_over = lam, entropy_over
        self.log: list[dict] = []

    def __call__(self, model, batch: dict, t: int) -> dict:
        import torch

        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        ppl, ent, nll, mask = eu_scores(logits, batch["labels"], batch.get("attention_mask"),
                                        entropy_over=self.entropy_over)
        keep, info = sample_rule(ppl, ent, self.r_sample)
        rows = np.flatnonzero(keep)
        q2_rows = np.flatnonzero(info["q2"][rows])  # positions within the kept sub-batch
        sub_nll, sub_mask = nll[rows], mask[rows]
        tok_keep = token_rule(sub_nll, sub_mask, q2_rows, self.r_token, self.lam) if self.r_token < 1 else sub_mask
        idx = torch.as_tensor(rows, dtype=torch.long)
        out = {k: (v[idx] if torch.is_tensor(v) and v.shape[:1] == batch["input_ids"].shape[:1] else v)
               for k, v in batch.items()}
        labels = out["labels"].clone()
        labels[:, 1:][sub_mask & ~tok_keep] = -100
        out["labels"] = labels
        self.log.append({"step": int(t), "batch": int(len(ppl)), "kept": int(len(rows)),
                         "q2": int(info["q2"].sum()), "q4": int(info["q4"].sum()),
                         "topped_up": info["topped_up"], "trimmed": info["trimmed"],
                         "tokens_before": int(mask.sum()), "tokens_kept": int(tok_keep.sum())})
        return out
