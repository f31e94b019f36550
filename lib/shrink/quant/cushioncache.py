"""CushionCache (Son et al., EMNLP 2024): a key/value prefix that absorbs the attention sink so that
per-tensor activation quantization of the text tokens works.

Stage 1 — greedy prefix search (paper Sec. 4.1, Algorithm 1)::

    L_q(t_{1:n} | p) = sum_blocks sum_i || X_i - q(X_i) ||^2          (Eq. 5-6; s, z computed on t_{1:n} only)
    p*  = argmin_{p in candidates} L_q(t | p_{1:k}, p)
    accept p* iff L_q(t | p_{1:k}, p*) < tau * L_q(t | p_{1:k})      (tau = 0.5), stop otherwise or at m tokens

Stage 2 — quantization-aware prefix tuning (Sec. 4.2): the per-layer prefix keys/values are trained with
the model frozen, ``L = L_pred + lambda * L_q`` (lambda = 0.01), stop-gradient on ``s, z``.

Gaps the paper leaves open, each a parameter here (defaults = the handbook's choices, bits.md §1.3-1.4, §6):

* ``target``: which activations enter ``L_q`` — ``"linear_inputs"`` (default: the inputs of every
  quantized decoder linear, where the massive activation actually gets quantized) or ``"block_inputs"``
  (the residual stream entering each block, a literal reading of "activation of a transformer block").
* ``spec``: the quantizer inside ``L_q`` — default INT8 asymmetric per-tensor, scales per sample over the
  text positions (the paper's activation quantizer, Sec. 5).
* ``max_len``: the cap ``m`` on the prefix length (not given in the paper).
* candidates: the full vocabulary (paper) or a shortlist (:func:`shortlist`, CPU) optionally re-ranked by
  a cheap one-token probe of the whole vocabulary (:func:`prerank_vocab`, a handbook proposal).
* stage 2: ``rounding_grad`` ("detach": ``q(X)`` treated as a constant, gradient ``2(X - q(X))`` — the
  handbook's interpretation; "ste": straight-through rounding, which leaves only clipped values with a
  gradient), ``ranges`` (frozen static ranges calibrated with the stage-1 prefix, ours; or per-sample
  dynamic), ``lq_reduction`` (``"token_mean"``: sum over linears and features, mean over text tokens —
  ours, so that lambda = 0.01 balances the two terms; ``"sum"``: the paper's formula taken literally), lr,
  steps, batch, data (all unstated in the paper).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CacheCorruptError, ShrinkError
from ..models import KVPrefix, decoder_blocks
from .fakequant import decoder_linears
from .quantizer import QuantError, QuantSpec, qparams, range_of

#: the quantizer inside L_q: the paper's activation quantizer (INT8 asymmetric per-tensor; Sec. 5)
LQ_SPEC = QuantSpec(bits=8, symmetric=False, granularity="tensor")
TARGETS = ("linear_inputs", "block_inputs")
ROUNDING_GRADS = (None, "detach", "ste")


def _q_with_grad(x: torch.Tensor, spec: QuantSpec, s: torch.Tensor, z: torch.Tensor, mode: str | None):
    """q(x) with stop-grad scales; ``mode`` decides how round() is differentiated (see module doc)."""
    xs = x / s
    if mode == "ste":
        r = xs + (torch.round(xs) - xs).detach()
    else:
        r = torch.round(xs)
    q = (torch.clamp(r + z, spec.qmin, spec.qmax) - z) * s
    return q.detach() if mode == "detach" else q


class LqRecorder:
    """Context manager that accumulates ``L_q`` per sample over the hooked activations.

    Args:
        model: causal LM (full precision; hooks are read-only unless ``grad`` is set).
        spec: quantizer used inside ``L_q`` (per-tensor specs are evaluated per sample).
        target: ``"linear_inputs"`` | ``"block_inputs"``.
        skip_first: positions at the start of each sequence excluded (prefix tokens in the sequence).
        grad: ``None`` (no graph), ``"detach"`` or ``"ste"`` (stage 2).
        ranges: ``{linear name: (lo, hi)}`` frozen static ranges (stage 2, ours); None = per-sample dynamic.

    After the forward: ``rec.lq`` ``[B]`` (sum over hooked tensors of the squared error over text positions),
    ``rec.maxabs`` ``[B]`` (largest |x| seen), ``rec.n_tokens`` (text positions per sample).
    """

    def __init__(self, model: nn.Module, spec: QuantSpec = LQ_SPEC, *, target: str = "linear_inputs",
                 skip_first: int = 0, grad: str | None = None, ranges: dict | None = None):
        if target not in TARGETS:
            raise QuantError(f"target must be one of {TARGETS}, got {target!r}")
        if grad not in ROUNDING_GRADS:
            raise QuantError(f"grad must be one of {ROUNDING_GRADS}, got {grad!r}")
        if spec.static:
            raise QuantError("L_q computes its scales from the text (or from `ranges`); pass a dynamic spec")
        self.model, self.spec, self.target = model, spec, target
        self.skip, self.grad, self.ranges = skip_first, grad, ranges
        self.lq: torch.Tensor | float = 0.0
        self.maxabs: torch.Tensor | float = 0.0
        self.n_tokens = 0
        self._hooks: list = []
        self._last = None
        self._batch = 1

    def _measure(self, name: str, x: torch.Tensor) -> None:
        if self._last is not None and self._last[0] is x and self._last[1] is None:  # q/k/v share one input
            self.lq = self.lq + self._last[2]
            return
        if x.dim() == 3:
            self._batch = x.shape[0]
        else:  # OPT flattens [B, T, D] -> [B*T, D] before its FFN
            x = x.reshape(self._batch, -1, x.shape[-1])
        xt = x[:, self.skip:]
        if self.grad is None:
            xt = xt.detach()
        self.n_tokens = xt.shape[1]
        with torch.set_grad_enabled(self.grad is not None and torch.is_grad_enabled()):
            xf = xt.float()
            if self.ranges is not None:
                if name not in self.ranges:
                    raise QuantError(f"no frozen range for {name}; calibrate ranges on the same model")
                lo, hi = (t.to(xf.device) for t in self.ranges[name])
                s, z = qparams(lo, hi, self.spec)
            else:
                lo, hi = range_of(xf.detach(), self.spec, per_sample=True)
                s, z = qparams(lo, hi, self.spec)
            q = _q_with_grad(xf, self.spec, s.detach(), z.detach(), self.grad)
            val = (xf - q).pow(2).flatten(1).sum(1)
        self.lq = self.lq + val
        mx = xf.detach().abs().flatten(1).amax(1)
        self.maxabs = mx if isinstance(self.maxabs, float) else torch.maximum(self.maxabs, mx)
        self._last = (x, None if self.ranges is None else name, val)

    def __enter__(self) -> "LqRecorder":
        if self.target == "linear_inputs":
            for name, lin in decoder_linears(self.model).items():
                self._hooks.append(lin.register_forward_pre_hook(
                    lambda _m, args, name=name: self._measure(name, args[0])))
        else:
            for i, blk in enumerate(decoder_blocks(self.model)):
                def hook(_m, args, kwargs, i=i):
                    self._measure(f"block{i}", args[0] if args else kwargs["hidden_states"])
                self._hooks.append(blk.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._last = [], None


def _base(model: nn.Module) -> nn.Module:
    """The decoder without ``lm_head`` (L_q needs no logits; saves the vocabulary projection)."""
    return model.model


def _forward(model: nn.Module, ids: torch.Tensor, prefix: KVPrefix | None, base: bool = True):
    kw = {} if prefix is None else {"past_key_values": prefix.cache(ids.shape[0]), "use_cache": True}
    return (_base(model) if base else model)(input_ids=ids, **kw)


@torch.no_grad()
def text_lq(model: nn.Module, text_ids: torch.Tensor, prefix: KVPrefix | None = None, *, spec: QuantSpec = LQ_SPEC,
            target: str = "linear_inputs") -> dict:
    """``L_q(t | prefix)`` of one text ``[n]`` (int64): ``{"lq": float, "maxabs": float}``."""
    ids = text_ids.reshape(1, -1).to(next(model.parameters()).device)
    with LqRecorder(model, spec, target=target) as rec:
        _forward(model, ids, prefix)
    return {"lq": float(rec.lq[0]), "maxabs": float(rec.maxabs[0])}


@torch.no_grad()
def candidate_lq(model: nn.Module, text_ids: torch.Tensor, candidates: torch.Tensor, prefix: KVPrefix | None = None,
                 *, spec: QuantSpec = LQ_SPEC, target: str = "linear_inputs", batch_size: int = 16) -> dict:
    """``L_q(t | prefix, c)`` for every candidate token ``c`` (Algorithm 1, inner argmin), batched.

    Each batch row is ``[c, t_1 .. t_n]`` started from a fresh copy of the shared prefix cache (the prefix is
    computed once per step, not per candidate); ``L_q`` is taken on the ``n`` text positions only, with
    per-sample (per-row) scales, so rows are independent and batching does not change the result.

    Args:
        text_ids: int64 ``[n]``; candidates: int64 ``[K]``.

    Returns:
        ``{"lq": fp32 [K], "maxabs": fp32 [K], "token_forwards": K * (n + 1)}``.
    """
    if candidates.dim() != 1 or candidates.numel() == 0:
        raise QuantError("candidates must be a non-empty 1-D int64 tensor of token ids")
    dev = next(model.parameters()).device
    text = text_ids.reshape(1, -1).to(dev)
    lq, mx = [], []
    for chunk in candidates.to(dev).split(batch_size):
        b = chunk.numel()
        ids = torch.cat([chunk[:, None], text.expand(b, -1)], 1)
        with LqRecorder(model, spec, target=target, skip_first=1) as rec:
            _forward(model, ids, prefix)
        lq.append(rec.lq.cpu()); mx.append(rec.maxabs.cpu())
    return {"lq": torch.cat(lq), "maxabs": torch.cat(mx), "token_forwards": candidates.numel() * (text.shape[1] + 1)}


@torch.no_grad()
def prerank_vocab(model: nn.Module, pool: torch.Tensor, prefix: KVPrefix | None = None, *,
                  batch_size: int = 256, layers: slice | None = None) -> torch.Tensor:
    """Cheap pre-ranking (handbook proposal, bits.md §4.2): one-token forward of each candidate after the
    prefix; score = the candidate's own largest residual |h| over ``layers`` (default: middle half).
    Sink-like tokens (massive activation on themselves) score high. ``pool`` int64 ``[K]`` -> fp32 ``[K]``."""
    dev = next(model.parameters()).device
    scores = []
    for chunk in pool.to(dev).split(batch_size):
        kw = {} if prefix is None else {"past_key_values": prefix.cache(chunk.numel()), "use_cache": True}
        hs = _base(model)(input_ids=chunk[:, None], output_hidden_states=True, **kw).hidden_states
        sel = hs[layers] if layers is not None else hs[len(hs) // 4: 3 * len(hs) // 4 + 1]
        scores.append(torch.stack([h[:, 0].abs().amax(-1) for h in sel]).amax(0).float().cpu())
    return torch.cat(scores)


def shortlist(tok, text_ids: torch.Tensor | None = None, k: int = 64, *, extra: tuple[str, ...] = ()) -> torch.Tensor:
    """CPU candidate shortlist (a handbook deviation from the full vocabulary, bits.md §4.2), in order:
    special tokens, whitespace/newline/punctuation ("non-semantic" tokens the paper calls useful), ``extra``
    strings, then the most frequent tokens of ``text_ids``; deduplicated, at most ``k``. int64 ``[<=k]``."""
    ids: list[int] = []
    for t in (getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None),
              getattr(tok, "pad_token_id", None)):
        if t is not None:
            ids.append(int(t))
    for s in (" ", "\n", "\n\n", ".", ",", ":", ";", "!", "?", "-", "'", '"', "(", ")", " the", "The", " ",
              "\t", "#", "*", "=", "/", *extra):
        enc = tok.encode(s, add_special_tokens=False)
        if len(enc) == 1:
            ids.append(int(enc[0]))
    if text_ids is not None:
        vals, counts = text_ids.unique(return_counts=True)
        ids += [int(v) for v in vals[counts.argsort(descending=True, stable=True)]]
    out = list(dict.fromkeys(ids))[:k]
    return torch.tensor(out, dtype=torch.long)


@dataclass
class SearchResult:
    """Outcome of :func:`greedy_search`: the accepted tokens and one record per step."""

    tokens: list[int]
    history: list[dict] = field(default_factory=list)
    done: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _resume(ck: Path, settings: dict, fresh: SearchResult) -> SearchResult:
    """The search state stored in checkpoint ``ck`` if its settings match (else ``fresh``); a checkpoint
    that does not parse is a :class:`CacheCorruptError` naming the file (nothing is overwritten)."""
    try:
        state = json.loads(ck.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        if state.get("settings") != settings:
            return fresh
        res = SearchResult([int(t) for t in state["tokens"]], list(state["history"]), bool(state["done"]))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CacheCorruptError(f"the CushionCache search checkpoint {ck} cannot be read ({type(exc).__name__}: "
                                f"{exc}); it was truncated or edited. Delete it (`rm {ck}`) to restart the search "
                                "from step 0.") from None
    return res


def greedy_search(model: nn.Module, texts: torch.Tensor, candidates: torch.Tensor, *, tau: float = 0.5,
                  max_len: int = 4, init_tokens: tuple[int, ...] = (), batch_size: int = 16,
                  spec: QuantSpec = LQ_SPEC, target: str = "linear_inputs", checkpoint: str | Path | None = None,
                  prerank_pool: torch.Tensor | None = None, prerank_top: int = 0, log=None) -> SearchResult:
    """Algorithm 1 of CushionCache: greedy token-by-token prefix search.

    Args:
        texts: int64 ``[S, n]``; step ``k`` uses ``texts[k % S]`` (the paper draws one fresh C4 text of 512
            tokens per step).
        candidates: int64 ``[K]`` token ids scored exactly every step (full vocabulary in the paper).
        tau: acceptance ratio (paper: 0.5): accept iff ``L_q(new) < tau * L_q(current)``.
        max_len: cap ``m`` on the total prefix length (paper: unstated).
        init_tokens: non-empty initial prompt (the paper's heuristic: ``<bos>``, ``\\n``).
        batch_size: candidates per forward (they share the prefix cache).
        prerank_pool, prerank_top: if given, each step also scores the ``prerank_top`` best tokens of
            ``prerank_pool`` by :func:`prerank_vocab` exactly (added to ``candidates``).
        checkpoint: JSON file written after every step; an existing file with the same settings resumes.

    Returns:
        :class:`SearchResult` (history per step: best token, ``lq_before``, ``lq_best``, ratio, accepted,
        top-5 candidates, token-forwards, seconds).
    """
    if texts.dim() != 2:
        raise QuantError(f"texts must be int64 [S, n], got shape {tuple(texts.shape)}")
    if not 0.0 < tau <= 1.0:
        raise QuantError(f"tau must be in (0, 1], got {tau}")
    if max_len < len(init_tokens) + 1:
        raise QuantError(f"max_len={max_len} leaves no room after {len(init_tokens)} initial tokens")
    settings = {"tau": tau, "max_len": max_len, "init": list(init_tokens), "candidates": candidates.tolist(),
                "texts": texts.shape[0], "n": texts.shape[1], "text_sum": int(texts.sum()), "spec": spec.to_dict(),
                "target": target, "prerank_top": prerank_top}
    res = SearchResult(list(init_tokens))
    ck = Path(checkpoint) if checkpoint else None
    if ck is not None and ck.exists():
        res = _resume(ck, settings, res)
    while not res.done and len(res.tokens) < max_len:
        step, t0 = len(res.history), time.perf_counter()
        text = texts[step % texts.shape[0]]
        prefix = KVPrefix.from_tokens(model, res.tokens) if res.tokens else None
        before = text_lq(model, text, prefix, spec=spec, target=target)
        cands = candidates
        if prerank_pool is not None and prerank_top > 0:
            sc = prerank_vocab(model, prerank_pool, prefix)
            top = prerank_pool[sc.argsort(descending=True)[:prerank_top]]
            cands = torch.tensor(list(dict.fromkeys(candidates.tolist() + top.tolist())), dtype=torch.long)
        out = candidate_lq(model, text, cands, prefix, spec=spec, target=target, batch_size=batch_size)
        order = out["lq"].argsort()
        best = int(order[0])
        ratio = float(out["lq"][best]) / before["lq"]
        accepted = ratio < tau
        rec = {"step": step, "text_index": step % texts.shape[0], "lq_before": before["lq"],
               "maxabs_before": before["maxabs"], "best_token": int(cands[best]), "lq_best": float(out["lq"][best]),
               "maxabs_best": float(out["maxabs"][best]), "ratio": ratio, "accepted": accepted,
               "top5": [[int(cands[i]), float(out["lq"][i])] for i in order[:5]],
               "n_candidates": int(cands.numel()), "token_forwards": out["token_forwards"] + text.numel(),
               "seconds": round(time.perf_counter() - t0, 2)}
        res.history.append(rec)
        if accepted:
            res.tokens.append(int(cands[best]))
        else:
            res.done = True
        if len(res.tokens) >= max_len:
            res.done = True
        if log:
            log(rec)
        if ck is not None:
            ck.parent.mkdir(parents=True, exist_ok=True)
            tmp = ck.with_name(f".{ck.name}.{os.getpid()}.tmp")  # unique: concurrent searches never mix
            tmp.write_text(json.dumps({"settings": settings, **res.to_dict()}))
            os.replace(tmp, ck)
    return res


@torch.no_grad()
def search_throughput(model: nn.Module, text_ids: torch.Tensor, candidates: torch.Tensor,
                      prefix: KVPrefix | None = None, *, batch_size: int = 16, repeats: int = 1) -> dict:
    """Token-forwards per second of the batched candidate evaluation (with L_q hooks) vs a plain forward
    of the decoder on the same ``[batch, n+1]`` shapes without hooks (bits.md §4.2, issue "Speed")."""
    dev = next(model.parameters()).device
    text = text_ids.reshape(1, -1).to(dev)
    n_tok = candidates.numel() * (text.shape[1] + 1)
    t0 = time.perf_counter()
    for _ in range(repeats):
        candidate_lq(model, text_ids, candidates, prefix, batch_size=batch_size)
    t_search = (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for _ in range(repeats):
        for chunk in candidates.to(dev).split(batch_size):
            _forward(model, torch.cat([chunk[:, None], text.expand(chunk.numel(), -1)], 1), prefix)
    t_plain = (time.perf_counter() - t0) / repeats
    return {"token_forwards": n_tok, "search_tok_per_s": n_tok / t_search, "plain_tok_per_s": n_tok / t_plain,
            "cost_ratio": t_search / t_plain}


@torch.no_grad()
def prefixquant_tokens(model: nn.Module, calib_ids: torch.Tensor, *, eta: float = 64.0, top: int = 3,
                       skip_first: int = 1, linear: str = "down_proj") -> dict:
    """PrefixQuant-style frequency baseline (Chen et al. 2024, ``utils/stat_utils.py`` idea, re-implemented):
    a token is an *outlier token* when the token-wise max |x| of a ``linear`` input exceeds ``eta`` x the
    median token-wise max of that input; the ``top`` most frequent outlier token ids (positions
    ``>= skip_first``: position 0 is an outlier whatever its token) form the prefix.

    Returns ``{"tokens": [ids], "counts": {id: count}, "n_outlier_positions": int}``.
    """
    counts: dict[int, int] = {}
    n_pos = 0
    lins = {n: m for n, m in decoder_linears(model).items() if n.endswith(linear)}
    if not lins:
        raise QuantError(f"no decoder linear named *{linear}; use e.g. down_proj (LLaMA) or fc2 (OPT)")
    flags = []
    hooks = [m.register_forward_pre_hook(lambda _m, a: flags.append(a[0].detach().abs().amax(-1).reshape(1, -1)))
             for m in lins.values()]
    try:
        for row in calib_ids:
            flags.clear()
            _forward(model, row[None].to(next(model.parameters()).device), None)
            tokmax = torch.stack(flags)[:, 0]  # [layers, T]
            out = (tokmax > eta * tokmax.median(dim=1, keepdim=True).values).any(0)
            out[:skip_first] = False
            for t in row[out.cpu()].tolist():
                counts[t] = counts.get(t, 0) + 1
            n_pos += int(out.sum())
    finally:
        for h in hooks:
            h.remove()
    ranked = sorted(counts, key=lambda t: (-counts[t], t))
    return {"tokens": ranked[:top], "counts": {int(t): counts[t] for t in ranked[:20]}, "n_outlier_positions": n_pos}


class TuningDiverged(ShrinkError):
    """Prefix tuning produced a non-finite loss; lower lr or lambda_q."""


# ------------------------------------------------------------------------------------------------------
# Stage 2: quantization-aware prefix tuning
# ------------------------------------------------------------------------------------------------------
def _objective(model, ids, prefix, lambda_q, spec, target, ranges, grad, reduction):
    with LqRecorder(model, spec, target=target, grad=grad, ranges=ranges) as rec:
        kw = {"past_key_values": prefix.cache(ids.shape[0]), "use_cache": True}
        logits = model(input_ids=ids, **kw).logits
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    lq = rec.lq.mean() / (rec.n_tokens if reduction == "token_mean" else 1)
    return ce + lambda_q * lq, ce, lq


def tune_prefix(model: nn.Module, prefix: KVPrefix, train_ids: torch.Tensor, *, steps: int = 20, lr: float = 1e-3,
                lambda_q: float = 0.01, batch_size: int = 2, spec: QuantSpec = LQ_SPEC,
                target: str = "linear_inputs", ranges: dict | None = None, rounding_grad: str = "detach",
                lq_reduction: str = "token_mean", val_ids: torch.Tensor | None = None, eval_every: int = 5,
                log=None) -> tuple[KVPrefix, list[dict]]:
    """Stage 2 of CushionCache (Sec. 4.2): train the per-layer prefix keys/values, model frozen.

    ``L = CE(next token) + lambda_q * L_q`` with stop-gradient on the quantizer's scale/zero point.
    The forward is in full precision; quantization enters through ``L_q`` (handbook reading of Sec. 4.2).

    Args:
        prefix: stage-1 prefix (initialisation: its intermediate K/V, as the paper says).
        train_ids: int64 ``[N, L]`` windows, visited in order, cycling (``steps * batch_size / N`` epochs;
            paper: 2 epochs of unstated data).
        rounding_grad: ``"detach"`` (ours, default) or ``"ste"`` (see module docstring).
        ranges: frozen static ranges ``{linear: (lo, hi)}`` (ours: calibrated with the stage-1 prefix);
            ``None``: per-sample dynamic scales.
        lq_reduction: ``"token_mean"`` (ours) or ``"sum"`` (the paper's formula as printed).
        val_ids: held-out windows; if given the objective is evaluated every ``eval_every`` steps and the
            best prefix (step 0 included) is returned — so tuning can never return a prefix that is worse
            on held-out data than its initialisation.

    Returns:
        ``(tuned KVPrefix (detached), history)``. Model parameters are not modified (asserted by tests).
    """
    if rounding_grad not in ("detach", "ste"):
        raise QuantError(f"rounding_grad must be 'detach' or 'ste', got {rounding_grad!r}")
    if lq_reduction not in ("token_mean", "sum"):
        raise QuantError(f"lq_reduction must be 'token_mean' or 'sum', got {lq_reduction!r}")
    if train_ids.dim() != 2:
        raise QuantError(f"train_ids must be int64 [N, L], got {tuple(train_ids.shape)}")
    dev = next(model.parameters()).device
    keys = [k.detach().clone().requires_grad_(True) for k in prefix.keys]
    vals = [v.detach().clone().requires_grad_(True) for v in prefix.values]
    trainable = KVPrefix(keys, vals, prefix.token_ids)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    opt = torch.optim.Adam(keys + vals, lr=lr)
    args = (lambda_q, spec, target, ranges)
    history: list[dict] = []

    def validate(step):
        if val_ids is None:
            return None
        tot = ce_t = lq_t = 0.0
        with torch.no_grad():
            for s in range(0, val_ids.shape[0], batch_size):
                loss, ce, lq = _objective(model, val_ids[s:s + batch_size].to(dev), trainable, *args, None,
                                          lq_reduction)
                w = min(batch_size, val_ids.shape[0] - s)
                tot += float(loss) * w; ce_t += float(ce) * w; lq_t += float(lq) * w
        n = val_ids.shape[0]
        return {"step": step, "val_loss": tot / n, "val_ce": ce_t / n, "val_lq": lq_t / n}

    best = trainable.detach()
    v0 = validate(0)
    best_val = v0["val_loss"] if v0 else math.inf
    if v0:
        history.append(v0)
    try:
        model_was_training = model.training
        model.eval()
        for step in range(1, steps + 1):
            s = ((step - 1) * batch_size) % train_ids.shape[0]
            ids = train_ids[s:s + batch_size].to(dev)
            loss, ce, lq = _objective(model, ids, trainable, *args, rounding_grad, lq_reduction)
            if not torch.isfinite(loss):
                raise TuningDiverged(f"prefix tuning loss is {float(loss)} at step {step}; lower lr (now {lr}) "
                                     f"or lambda_q (now {lambda_q})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec = {"step": step, "loss": float(loss.detach()), "ce": float(ce.detach()), "lq": float(lq.detach())}
            if val_ids is not None and (step % eval_every == 0 or step == steps):
                v = validate(step)
                rec.update(v)
                if v["val_loss"] < best_val:
                    best_val, best = v["val_loss"], trainable.detach()
            history.append(rec)
            if log:
                log(rec)
        if val_ids is None:
            best = trainable.detach()
        model.train(model_was_training)
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    return best, history
