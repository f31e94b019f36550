"""Recovery of a pruned LM with selected instruction data (notebooks 04c PASER, 04d Diversify & Conquer).

The experiment (PASER, He et al. 2025, Sec. 4; D&C, Yu et al. 2024, Sec. 4): prune a model once, select a
budget ``B`` (a fraction of the instruction pool) with a selector, fine-tune the pruned model on the selection
with LoRA (the masks kept: the merged update is re-masked, :func:`shrink.train.train`), and evaluate

* WikiText-2 test perplexity (the one perplexity function, few windows),
* held-out response NLL per source (:func:`response_nll`: mean NLL of the response tokens given the prompt),
* GSM8K held-out exact match (:func:`gsm8k_exact_match`: greedy generation, last number of the text).

This module never imports :mod:`shrink.pruning` (the axes are independent): the pruned model enters as a
``prune_fn(model) -> masks`` given by the notebook, and :func:`pruned_model` caches its result (weights of
the pruned parameters and masks, ~0.5 GB for SmolLM2) under ``$SHRINK_CACHE``, never in commits; only metric
records go to ``results/<scale>/04-data/``.

Cache keys are configs (pool config, prune key, selector name and knobs, train config, evaluation sizes, seed),
never computed numbers.
"""

from __future__ import annotations

import copy
import math
import re
import time
from typing import Callable, Sequence

import numpy as np
import torch

from .. import results
from ..train import TrainConfig, collate, format_prompt, sft_batches, token_losses, tokenize_sft, train
from .errors import SelectionError
from .instructions import InstructionPool

CHAPTER = "04-data"

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------
def last_number(text: str) -> float | None:
    """The last number in ``text`` (commas dropped: ``"1,234"`` -> 1234.0; ``None`` when there is none).

    GSM8K's convention: the final answer is the last number of the solution (the offline Alpaca copy strips
    the ``#### answer`` line; the online one keeps it, and it is the last number there too).
    """
    found = _NUMBER.findall(text)
    if not found:
        return None
    s = found[-1].replace(",", "").rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def response_nll(model, tok, examples: Sequence[dict], *, max_prompt: int = 128, max_response: int = 128,
                 batch_size: int = 8) -> dict:
    """Mean NLL (nats per response token) of the responses given the Alpaca prompt, per source.

    Each example is tokenised by :func:`shrink.train.tokenize_sft` (prompt tokens not counted, the response's
    first ``max_response`` tokens plus EOS counted). Per source the mean is token-weighted
    ``Σ_i Σ_j ℓ_ij / Σ_i n_i``; ``"macro"`` is the unweighted mean over sources.

    Returns:
        ``{"per_source": {source: {"nll", "tokens", "examples"}}, "macro": float}``.
    """
    if not examples:
        raise SelectionError("response_nll got no examples; pass the held-out split (pool.heldout).")
    was = model.training
    model.eval()
    dev = _device(model)
    tot: dict[str, list[float]] = {}
    pad = getattr(tok, "pad_token_id", None) or 0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        b = collate([tokenize_sft(tok, e, max_prompt=max_prompt, max_response=max_response) for e in chunk],
                    pad_id=pad)
        out = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev))
        tl, m = token_losses(out.logits, b["labels"].to(dev))
        for e, l_, n_ in zip(chunk, tl.sum(1).tolist(), m.sum(1).tolist()):
            acc = tot.setdefault(e.get("source", "all"), [0.0, 0, 0])
            acc[0] += l_
            acc[1] += n_
            acc[2] += 1
    model.train(was)
    per = {k: {"nll": v[0] / max(v[1], 1), "tokens": int(v[1]), "examples": int(v[2])} for k, v in tot.items()}
    return {"per_source": per, "macro": float(np.mean([v["nll"] for v in per.values()]))}


@torch.no_grad()
def generate_greedy(model, tok, prompts: Sequence[str], *, max_new_tokens: int = 96, batch_size: int = 16,
                    max_prompt: int = 192) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches, KV cache; stops at EOS).

    Returns the decoded new text of every prompt (special tokens skipped).
    """
    dev = _device(model)
    eos = getattr(tok, "eos_token_id", None)
    pad = getattr(tok, "pad_token_id", None)
    pad = eos if pad is None else pad
    pad = 0 if pad is None else pad
    was = model.training
    model.eval()
    outs = []
    for s in range(0, len(prompts), batch_size):
        ids = [tok.encode(p, add_special_tokens=False)[-max_prompt:] for p in prompts[s:s + batch_size]]
        T = max(map(len, ids))
        x = torch.full((len(ids), T), pad, dtype=torch.long)
        att = torch.zeros((len(ids), T), dtype=torch.long)
        for j, c in enumerate(ids):
            x[j, T - len(c):] = torch.tensor(c)
            att[j, T - len(c):] = 1
        g = model.generate(input_ids=x.to(dev), attention_mask=att.to(dev), max_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=pad, eos_token_id=eos)
        for row in g[:, T:].tolist():
            if eos is not None and eos in row:
                row = row[:row.index(eos)]
            outs.append(tok.decode(row, skip_special_tokens=True))
    model.train(was)
    return outs


def gsm8k_exact_match(model, tok, examples: Sequence[dict], max_new_tokens: int = 96, *,
                      batch_size: int = 16) -> dict:
    """GSM8K exact match with last-number extraction.

    For each problem the Alpaca prompt is continued greedily for ``max_new_tokens``; the prediction is
    :func:`last_number` of the generated text, the answer the last number of ``output``; a match is
    ``|pred - gold| < 1e-6``. The standard error is the binomial ``sqrt(p (1 - p) / n)`` (0 when p is 0 or 1:
    then say "0 of n", not "no error").

    Returns:
        ``{"em", "se", "n", "correct": [bool], "predictions": [float | None], "answered": fraction with a number}``.
    """
    if not examples:
        raise SelectionError("gsm8k_exact_match got no problems; pass GSM8K held-out examples.")
    gold = [last_number(e["output"]) for e in examples]
    if any(g is None for g in gold):
        raise SelectionError("a GSM8K example has no number in its output: these are not GSM8K solutions.")
    gen = generate_greedy(model, tok, [format_prompt(e) for e in examples], max_new_tokens=max_new_tokens,
                          batch_size=batch_size)
    pred = [last_number(t) for t in gen]
    correct = [p is not None and abs(p - g) < 1e-6 for p, g in zip(pred, gold)]
    n = len(correct)
    p = sum(correct) / n
    return {"em": p, "se": math.sqrt(p * (1 - p) / n), "n": n, "correct": correct, "predictions": pred,
            "answered": sum(x is not None for x in pred) / n, "sample": gen[:2]}


def evaluate(model, tok, pool: InstructionPool, *, eval_tokens: torch.Tensor, eval_seqlen: int,
             eval_windows: int, nll_per_source: int, em_n: int, em_new_tokens: int,
             max_prompt: int = 128, max_response: int = 128) -> dict:
    """The three metrics of a (pruned / recovered) model: ``{"ppl", "nll", "nll_macro", "gsm8k", "seconds"}``.

    ``nll_per_source`` held-out examples per source for the NLL, the first ``em_n`` held-out GSM8K problems
    for exact match (``em_n=0``: not measured).
    """
    from .. import eval as shrink_eval

    t0 = time.perf_counter()
    out = {"ppl": shrink_eval.perplexity(model, eval_tokens, eval_seqlen, max_windows=eval_windows,
                                         dataset="wikitext2", split="test", progress=False).ppl}
    by = pool.heldout_by_source()
    ex = [e for s in by for e in by[s][:nll_per_source]]
    nll = response_nll(model, tok, ex, max_prompt=max_prompt, max_response=max_response)
    out["nll"] = {k: v["nll"] for k, v in nll["per_source"].items()}
    out["nll_macro"] = nll["macro"]
    t1 = time.perf_counter()
    gsm = [e for e in pool.heldout if e["source"] == "gsm8k"][:em_n]
    if em_n and gsm:
        g = gsm8k_exact_match(model, tok, gsm, em_new_tokens)
        out["gsm8k"] = {k: g[k] for k in ("em", "se", "n", "answered", "sample")}
    out["seconds"] = {"ppl_nll": round(t1 - t0, 2), "gsm8k": round(time.perf_counter() - t1, 2)}
    return out


# ----------------------------------------------------------------------------------------------------------
# The pruned model (cached under $SHRINK_CACHE) and one recovery run
# ----------------------------------------------------------------------------------------------------------
def _mask_dict(masks) -> dict[str, torch.Tensor]:
    d = masks.masks if hasattr(masks, "masks") else masks
    if not isinstance(d, dict) or not d:
        raise SelectionError("prune_fn must return the masks ({parameter name: bool tensor} or a MaskSet); "
                             f"got {type(masks).__name__}.")
    return d


def pruned_model(dense, prune_fn: Callable, key: dict) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A pruned copy of ``dense`` and its masks; ``prune_fn(model) -> masks`` prunes a model in place.

    The pruned parameters and masks are cached (``shrink.results.cached_tensors`` without a scale:
    ``$SHRINK_CACHE/tensors/recovery-pruned-<hash(key)>.pt``); ``key`` must name everything the pruning
    depends on (model, pruner, sparsity / pattern, calibration set and seed).
    """
    def run():
        m = copy.deepcopy(dense)
        masks = {k: v.bool().clone() for k, v in _mask_dict(prune_fn(m)).items()}
        return {"weights": {k: m.get_parameter(k).detach().clone() for k in masks}, "masks": masks}

    saved = results.cached_tensors("recovery-pruned", dict(key), run)
    m = copy.deepcopy(dense)
    with torch.no_grad():
        for k, w in saved["weights"].items():
            m.get_parameter(k).copy_(w)
    return m, saved["masks"]


def lora_config(cfg, steps: int, seed: int) -> TrainConfig:
    """The recovery :class:`TrainConfig` of a preset (LoRA on ``cfg.lora_targets``, PASER's r=8, alpha=16)."""
    return TrainConfig(steps=steps, lr=cfg.lr, warmup=min(cfg.warmup, steps), schedule="cosine", seed=seed,
                       lora={"r": cfg.lora_r, "alpha": cfg.lora_alpha, "targets": list(cfg.lora_targets),
                             "dropout": cfg.lora_dropout}, log_every=max(1, steps // 5))


def steps_for(n_selected: int, cfg) -> int:
    """Optimizer steps of a recovery run: ``epochs`` passes over the selection at ``batch_size``."""
    return max(1, math.ceil(cfg.recovery_epochs * n_selected / cfg.batch_size))


def recover(pruned, masks, tok, examples: Sequence[dict], cfg, *, seed: int) -> tuple[torch.nn.Module, dict]:
    """LoRA fine-tuning of a copy of ``pruned`` on ``examples`` with the masks kept; (model, train summary)."""
    if not examples:
        raise SelectionError("recover got an empty selection; select at least one example.")
    toks = [tokenize_sft(tok, e, max_prompt=cfg.max_prompt, max_response=cfg.max_response) for e in examples]
    tc = lora_config(cfg, steps_for(len(examples), cfg), seed)
    pad = getattr(tok, "pad_token_id", None) or 0
    res = train(copy.deepcopy(pruned), sft_batches(toks, cfg.batch_size, seed=seed, pad_id=pad), tc, masks=masks,
                progress=False)
    s = res.summary()
    return res.model, {"steps": tc.steps, "seconds": s["seconds"], "tokens": s["tokens"],
                       "tokens_per_s": s["tokens_per_s"], "history": s["history"],
                       "lora_masked_fraction": s.get("lora_masked_fraction"), "mask_violations": s.get("mask_violations")}


def eval_config(cfg) -> dict:
    return {"eval_seqlen": cfg.eval_seqlen, "eval_windows": cfg.eval_windows, "nll_per_source": cfg.nll_per_source,
            "em_n": cfg.em_n, "em_new_tokens": cfg.em_new_tokens, "max_prompt": cfg.max_prompt,
            "max_response": cfg.max_response}


def train_fields(cfg) -> dict:
    return {"lr": cfg.lr, "warmup": cfg.warmup, "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
            "lora_targets": list(cfg.lora_targets), "lora_dropout": cfg.lora_dropout, "batch_size": cfg.batch_size,
            "recovery_epochs": cfg.recovery_epochs, "max_prompt": cfg.max_prompt, "max_response": cfg.max_response}


def _evaluate(model, tok, pool, cfg, eval_tokens):
    return evaluate(model, tok, pool, eval_tokens=eval_tokens, eval_seqlen=cfg.eval_seqlen,
                    eval_windows=cfg.eval_windows, nll_per_source=cfg.nll_per_source, em_n=cfg.em_n,
                    em_new_tokens=cfg.em_new_tokens, max_prompt=cfg.max_prompt, max_response=cfg.max_response)


def evaluate_cached(name: str, model, tok, pool: InstructionPool, cfg, *, key: dict, eval_tokens, scale: str,
                    lazy: Callable | None = None) -> dict:
    """Evaluate a model without training (dense, pruned = "no recovery"); cached as ``recovery-eval``.

    ``lazy() -> (model, tok, eval_tokens)`` replaces the three arguments, built only on a cache miss.
    """
    config = {"model": cfg.model, "what": name, "key": key, "pool": pool.config, "pool_sha": pool.sha256(),
              "eval": eval_config(cfg)}

    def run():
        m, t, ev = lazy() if lazy is not None else (model, tok, eval_tokens)
        return _evaluate(m, t, pool, cfg, ev)

    return results.cached("recovery-eval", config, run, scale=scale, chapter=CHAPTER)


def recovery_run(method: str, indices_fn: Callable[[], np.ndarray], pruned, masks, tok, pool: InstructionPool, cfg, *,
                 prune_key: dict, seed: int, eval_tokens, scale: str, selector: dict | None = None,
                 lazy: Callable | None = None) -> dict:
    """Select with ``indices_fn()`` (int64 pool indices), recover, evaluate; cached as ``recovery``.

    ``lazy() -> (pruned, masks, tok, eval_tokens)`` replaces those arguments, built only on a cache miss.

    The key holds the method name and its knobs (``selector``), the pool config and sha, the prune key, the
    training and evaluation settings and the seed (the seed of both the selector and the batch order).
    """
    config = {"model": cfg.model, "method": method, "selector": selector or {}, "budget": cfg.budget,
              "pool": pool.config, "pool_sha": pool.sha256(), "prune": prune_key, "train": train_fields(cfg),
              "eval": eval_config(cfg), "seed": seed}

    def run() -> dict:
        pm, mk, tk, ev_tokens = lazy() if lazy is not None else (pruned, masks, tok, eval_tokens)
        t0 = time.perf_counter()
        idx = np.asarray(indices_fn(), np.int64)
        t_sel = time.perf_counter() - t0
        if idx.size == 0 or len(set(idx.tolist())) != idx.size or idx.min() < 0 or idx.max() >= len(pool.train):
            raise SelectionError(f"selector {method!r} returned invalid indices (n={idx.size}, unique "
                                 f"{len(set(idx.tolist()))}, pool {len(pool.train)}): fix the selector.")
        model, tr = recover(pm, mk, tk, [pool.train[i] for i in idx], cfg, seed=seed)
        ev = _evaluate(model, tk, pool, cfg, ev_tokens)
        comp: dict[str, float] = {}
        for i in idx.tolist():
            comp[pool.train[i]["source"]] = comp.get(pool.train[i]["source"], 0) + 1 / idx.size
        import hashlib

        return {"n_selected": int(idx.size), "selection_sha": hashlib.sha256(np.sort(idx).tobytes()).hexdigest()[:12],
                "composition": comp, "select_seconds": round(t_sel, 2), "train": tr, **ev}

    return results.cached("recovery", config, run, scale=scale, chapter=CHAPTER)


def step_cost(pruned, masks, tok, examples: Sequence[dict], cfg, *, steps: int = 4, repeats: int = 3,
              seed: int = 0) -> dict:
    """Where the time of one recovery run goes, measured in one process (ratios are robust to machine load).

    On batches of ``cfg.batch_size`` tokenised ``examples`` (the recovery batches): the median time of a
    no-grad forward of the pruned model, the per-step time of :func:`shrink.train.train` with the preset's LoRA
    (``steps`` steps, the first one excluded as warm-up; timestamps from ``on_step``), the fixed cost outside
    the steps (LoRA wrapping before, merge and re-masking after), and a greedy GSM8K-style generation of
    ``cfg.em_new_tokens`` tokens for ``cfg.batch_size`` prompts (the evaluation's most expensive part).

    Returns:
        ``{"forward_s", "step_s", "step_over_forward", "fixed_s", "gen_s", "gen_s_per_token", "batch_tokens"}``
        (seconds; ``batch_tokens`` = non-padding tokens of the first batch).
    """
    if len(examples) < cfg.batch_size or steps < 2:
        raise SelectionError(f"step_cost needs at least batch_size={cfg.batch_size} examples and steps >= 2 "
                             f"(got {len(examples)} examples, steps={steps}).")
    pad = getattr(tok, "pad_token_id", None) or 0
    toks = [tokenize_sft(tok, e, max_prompt=cfg.max_prompt, max_response=cfg.max_response) for e in examples]
    batches = sft_batches(toks, cfg.batch_size, seed=seed, pad_id=pad)
    b = batches(0)
    m = copy.deepcopy(pruned).eval()
    fwd = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            fwd.append(time.perf_counter() - t0)
    stamps: list[float] = []
    t0 = time.perf_counter()
    train(copy.deepcopy(pruned), batches, lora_config(cfg, steps, seed), masks=masks, progress=False,
          on_step=lambda info: stamps.append(time.perf_counter()))
    t_end = time.perf_counter()
    step_s = float(np.median(np.diff(stamps)))
    fixed = (t_end - t0) - step_s * steps
    prompts = [format_prompt(e) for e in examples[:cfg.batch_size]]
    t1 = time.perf_counter()
    generate_greedy(m, tok, prompts, max_new_tokens=cfg.em_new_tokens, batch_size=cfg.batch_size)
    gen = time.perf_counter() - t1
    f = float(np.median(fwd))
    return {"forward_s": round(f, 4), "step_s": round(step_s, 4), "step_over_forward": round(step_s / f, 3),
            "fixed_s": round(fixed, 3), "gen_s": round(gen, 3), "gen_s_per_token": round(gen / cfg.em_new_tokens, 4),
            "batch_tokens": int(b["attention_mask"].sum()), "steps": steps, "repeats": repeats}


def budget_k(pool: InstructionPool, cfg) -> int:
    """The recovery budget in examples: ``round(budget * |pool|)`` (PASER's 20 % of Alpaca at cpu)."""
    k = int(round(cfg.budget * len(pool.train)))
    if not 0 < k <= len(pool.train):
        raise SelectionError(f"budget={cfg.budget} of a pool of {len(pool.train)} gives k={k}; use 0 < budget <= 1.")
    return k


# ----------------------------------------------------------------------------------------------------------
# The experiment of notebooks 04c / 04d: everything lazy, so a notebook whose records exist loads nothing heavy
# ----------------------------------------------------------------------------------------------------------
#: selectors of the two notebooks (``paser-no-*``: PASER's component ablation, Table 5 of the paper)
METHODS = ("random", "k-center", "ifd", "kmq", "kmq-iter", "paser", "paser-no-s2c", "paser-no-cdars",
           "paser-no-ntem", "full")


def build_pool(cfg) -> InstructionPool:
    """The preset's pool: ``per_source`` per source, ``heldout`` held out (``heldout_gsm8k`` for GSM8K)."""
    from .instructions import build_pool as _build, source_label

    held = {s: (cfg.heldout_gsm8k if source_label(s) == "gsm8k" else cfg.heldout) for s in cfg.sources}
    return _build(cfg.sources, per_source=cfg.per_source, heldout=held, seed=cfg.pool_seed)


class Experiment:
    """Lazy pieces of one preset x prune pattern: pool (cheap, eager), dense model, pruned model, scores.

    ``prune_fn(model) -> masks`` prunes in place (the notebook builds it from ``shrink.pruning``);
    ``prune_key`` is its cache key (model, pruner, pattern, sparsity, calibration).
    """

    def __init__(self, cfg, scale: str, prune_fn: Callable, prune_key: dict):
        self.cfg, self.scale, self.prune_fn, self.prune_key = cfg, scale, prune_fn, dict(prune_key)
        self.pool = build_pool(cfg)
        self.k = budget_k(self.pool, cfg)
        self._dense = self._pruned = self._ev = self._emb = self._scores = None

    # -- lazy heavy pieces
    def dense(self):
        if self._dense is None:
            from .. import models

            self._dense = models.load(self.cfg.model)
        return self._dense

    def tok(self):
        return self.dense()[1]

    def pruned(self):
        if self._pruned is None:
            self._pruned = pruned_model(self.dense()[0], self.prune_fn, {"model": self.cfg.model, **self.prune_key})
        return self._pruned

    def eval_tokens(self):
        if self._ev is None:
            from .. import data

            self._ev = data.eval_tokens(self.tok(), "wikitext2", "test")
        return self._ev

    def embeddings(self) -> np.ndarray:
        """Instruction (+ input) embeddings of the pool ``[N, d]`` float32 (``cfg.encoder``), committed tensor."""
        if self._emb is None:
            from .. import models
            from .baselines import embed

            def run():
                m, t = models.load(self.cfg.encoder)
                return {"emb": torch.from_numpy(embed(self.pool.texts("prompt"), m, t))}

            rec = results.cached_tensors("recovery-emb", {"encoder": self.cfg.encoder, "pool": self.pool.config,
                                                          "pool_sha": self.pool.sha256()}, run,
                                         scale=self.scale, chapter=CHAPTER)
            self._emb = rec["emb"].numpy()
        return self._emb

    def scores(self) -> dict:
        """Per-example scores of the pool (cached record ``recovery-scores``): PASER's response JSD between the
        pruned and dense model (mean per token), IFD and its two NLLs under the pruned model, token lengths."""
        if self._scores is None:
            c = self.cfg
            config = {"model": c.model, "prune": self.prune_key, "pool": self.pool.config,
                      "pool_sha": self.pool.sha256(), "max_prompt": c.max_prompt, "max_response": c.max_response,
                      "jsd": {"on": "response", "reduction": "mean"}, "ifd_model": "pruned"}

            def run():
                from . import paser, quality

                t0 = time.perf_counter()
                dense, tok = self.dense()
                pruned, _ = self.pruned()
                toks = [tokenize_sft(tok, e, max_prompt=c.max_prompt, max_response=c.max_response)
                        for e in self.pool.train]
                jsd = paser.jsd_scores(dense, pruned, toks, on="response", reduction="mean")
                t1 = time.perf_counter()
                ifd, cond, unc = quality.ifd(pruned, tok, self.pool.train, return_parts=True,
                                             max_prompt=c.max_prompt, max_response=c.max_response)
                return {"jsd": jsd.tolist(), "ifd": ifd.tolist(), "nll_cond": cond.tolist(), "nll_uncond": unc.tolist(),
                        "lengths": [int(t["input_ids"].numel()) for t in toks],
                        "seconds": {"jsd": round(t1 - t0, 2), "ifd": round(time.perf_counter() - t1, 2)}}

            self._scores = results.cached("recovery-scores", config, run, scale=self.scale, chapter=CHAPTER)
        return self._scores

    # -- selectors: name -> (indices_fn(seed), selector knobs for the key)
    def selector(self, method: str, seed: int) -> tuple[Callable[[], np.ndarray], dict]:
        c, n, k = self.cfg, len(self.pool.train), self.k
        if method == "random":
            from .baselines import random_select

            return (lambda: random_select(n, k, seed)[0]), {}
        if method == "full":
            return (lambda: np.arange(n, dtype=np.int64)), {}
        if method == "k-center":
            from .baselines import k_center

            return (lambda: k_center(self.embeddings(), k, seed)[0]), {"encoder": c.encoder}
        if method == "ifd":
            def ifd_sel():
                s = np.asarray(self.scores()["ifd"])
                # Cherry-LLM / Superfiltering: the highest IFD among IFD < 1 (IFD >= 1 last, lowest first)
                key = np.where(s < 1, s, -s)
                return np.sort(np.argsort(-key, kind="stable")[:k]).astype(np.int64)

            return ifd_sel, {"rule": "top IFD among IFD<1", "ifd_model": "pruned"}
        if method == "kmq":
            from . import kmq

            return (lambda: kmq.select(self.embeddings(), -np.asarray(self.scores()["ifd"]), k, k=c.kmq_k,
                                       ks=c.kmq_ks, seed=seed)[0]), \
                {"encoder": c.encoder, "quality": "-ifd", "k": c.kmq_k, "ks": list(c.kmq_ks)}
        if method == "kmq-iter":
            from . import kmq

            def it():
                def score_fn(sel, r):  # perplexity reward: train on the selection so far, its response NLL
                    model, _ = recover(*self.pruned(), self.tok(), [self.pool.train[i] for i in sel], c,
                                       seed=seed + 100 * (r + 1))
                    from .quality import response_nll as rn

                    return rn(model, self.tok(), [self.pool.train[i] for i in sel], max_prompt=c.max_prompt,
                              max_response=c.max_response)

                return kmq.iterative(self.embeddings(), -np.asarray(self.scores()["ifd"]), k, score_fn,
                                     rounds=c.iter_rounds, k=c.kmq_k, ks=c.kmq_ks, seed=seed)[0]

            return it, {"encoder": c.encoder, "quality": "-ifd", "k": c.kmq_k, "ks": list(c.kmq_ks),
                        "rounds": c.iter_rounds, "reward": "response nll after training on the selection"}
        if method.startswith("paser"):
            from . import paser

            comps = list(paser.COMPONENTS)
            if method != "paser":
                drop = method.removeprefix("paser-no-")
                if drop not in comps:
                    raise SelectionError(f"unknown PASER ablation {method!r}; use paser-no-s2c / -cdars / -ntem.")
                comps.remove(drop)

            def ps():
                sc = self.scores()
                return paser.select(self.embeddings(), np.asarray(sc["jsd"]), k, n_clusters=c.n_clusters, seed=seed,
                                    components=comps, examples=self.pool.train,
                                    lengths=np.asarray(sc["lengths"]))[0]

            return ps, {"encoder": c.encoder, "components": comps, "n_clusters": c.n_clusters, "jsd": "response mean",
                        "ies_cost": "tokens^2"}
        raise SelectionError(f"unknown recovery method {method!r}; use one of {list(METHODS)}.")

    # -- records
    def cost(self, steps: int = 4) -> dict:
        """:func:`step_cost` on the first pool examples (cached record ``recovery-cost``: a timing record)."""
        c = self.cfg
        config = {"model": c.model, "prune": self.prune_key, "pool": self.pool.config, "pool_sha": self.pool.sha256(),
                  "train": train_fields(c), "em_new_tokens": c.em_new_tokens, "steps": steps}

        def run():
            pruned, masks = self.pruned()
            return step_cost(pruned, masks, self.tok(), self.pool.train[:max(c.batch_size * steps, c.batch_size)], c,
                             steps=steps)

        return results.cached("recovery-cost", config, run, scale=self.scale, chapter=CHAPTER)

    def no_recovery(self) -> dict:
        return evaluate_cached("pruned", None, None, self.pool, self.cfg, key=self.prune_key, eval_tokens=None,
                               scale=self.scale, lazy=lambda: (self.pruned()[0], self.tok(), self.eval_tokens()))

    def dense_eval(self) -> dict:
        return evaluate_cached("dense", None, None, self.pool, self.cfg, key={"model": self.cfg.model}, eval_tokens=None,
                               scale=self.scale, lazy=lambda: (self.dense()[0], self.tok(), self.eval_tokens()))

    def run(self, method: str, seed: int) -> dict:
        fn, knobs = self.selector(method, seed)
        return recovery_run(method, fn, None, None, None, self.pool, self.cfg, prune_key=self.prune_key, seed=seed,
                            eval_tokens=None, scale=self.scale, selector=knobs,
                            lazy=lambda: (*self.pruned(), self.tok(), self.eval_tokens()))
