"""The chapter's experiment harnesses: the MiniLM passage set, the encoder and decoder benches (every run a
result record through :func:`shrink.results.cached`), paired statistics and the prefill timer.

Noise: deterministic scores (CLS, WPR, ...) vary only with the passage sample, so they carry the standard
error over passages; ``random`` also varies with its seed, so it is run on every preset seed and reported
as a :class:`shrink.eval.Spread` over seeds. Comparisons are **paired** over passages/windows.

Introduced in: notebooks/03-tokens/03a-budgets-flops-latency.md
"""

from __future__ import annotations

import math
import random
import re
import statistics
import time

import torch

from .. import data, models, results
from ..eval import Spread
from . import decoder as D
from . import encoder as E
from . import flops as F

CHAPTER = "03-tokens"


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def _n_tokens(tokenizer, texts: list[str]) -> list[int]:
    if hasattr(tokenizer, "cls_token_id") and tokenizer.cls_token_id is not None:
        return [len(x) for x in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    return [len(t.encode("utf-8")) + 2 for t in texts]


def passages(tokenizer, corpus: str = "wikitext2", split: str = "test", *, n: int = 150, min_tokens: int = 40,
             max_tokens: int = 128, seed: int = 0) -> list[torch.Tensor]:
    """``n`` passages ``[1, N]`` (ids with [CLS]/[SEP]) of ``min_tokens .. max_tokens`` tokens.

    The corpus text is split into paragraphs (lines; WikiText headings `` = ... = `` skipped) and
    sentences; consecutive sentences of a paragraph are joined until the passage reaches ``min_tokens``;
    passages longer than ``max_tokens`` are dropped. ``n`` of them are drawn with ``random.Random(seed)``
    and returned in corpus order.
    """
    text = "\n".join(data.load_documents(corpus, split))
    sents_all = []
    for line in text.split("\n"):
        line = line.strip()
        if len(line) < 20 or line.startswith("="):
            continue
        sents_all.append(re.split(r"(?<=[.!?])\s+", line))
    flat = [s for para in sents_all for s in para]
    lengths = iter(_n_tokens(tokenizer, flat))
    cands = []
    for para in sents_all:
        cur, cur_len = [], 2
        for s in para:
            ln = next(lengths) - 2
            cur.append(s)
            cur_len += ln
            if cur_len >= min_tokens:
                if cur_len <= max_tokens:
                    cands.append(" ".join(cur))
                cur, cur_len = [], 2
    if len(cands) < n:
        from ..errors import ShrinkError

        raise ShrinkError(f"{corpus}/{split} gives {len(cands)} passages of {min_tokens}-{max_tokens} tokens, "
                          f"fewer than n={n}; lower n or widen the token range")
    pick = sorted(random.Random(seed).sample(range(len(cands)), n))
    return [E.encode_text(tokenizer, cands[i], max_tokens) for i in pick]


def windows(tokenizer, corpus: str, split: str, n: int, length: int) -> list[torch.Tensor]:
    """``n`` evenly spaced windows ``[1, length]`` of the tokenized corpus (deterministic)."""
    toks = data.eval_tokens(tokenizer, corpus, split).flatten()
    if len(toks) < n * length:
        from ..errors import ShrinkError

        raise ShrinkError(f"{corpus}/{split} has {len(toks)} tokens, fewer than {n} windows x {length}; "
                          "lower windows or the window length")
    step = (len(toks) - length) // max(n - 1, 1)
    return [toks[i * step: i * step + length][None].long() for i in range(n)]


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------
def mean_se(xs) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt n) of a list."""
    xs = [float(x) for x in xs]
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def paired(a, b) -> dict:
    """Paired comparison of two per-item lists: mean of ``a - b``, its SE, and the one-sided p-value of
    ``mean(a - b) > 0`` (paired t-test, scipy)."""
    from scipy import stats

    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    m, se = mean_se(d)
    p = float(stats.ttest_rel(a, b, alternative="greater").pvalue) if se > 0 else (0.0 if m > 0 else 1.0)
    return {"diff": m, "se": se, "p_greater": p, "n": len(d)}


def spearman_pairwise(ref: torch.Tensor, emb: torch.Tensor) -> float:
    """Spearman ρ between the pairwise cosine similarities of two embedding sets ``[n, D]`` (an STS
    proxy: does the pruned model rank passage pairs as the unpruned one does?)."""
    from scipy import stats

    def sims(x):
        x = torch.nn.functional.normalize(x.float(), dim=-1)
        s = x @ x.T
        iu = torch.triu_indices(len(x), len(x), 1)
        return s[iu[0], iu[1]].numpy()
    return float(stats.spearmanr(sims(ref), sims(emb)).statistic)


# --------------------------------------------------------------------------------------------------
# Encoder bench
# --------------------------------------------------------------------------------------------------
class EncoderBench:
    """The MiniLM testbed: passages, reference embeddings, one record per (method, keep, options, seed)."""

    def __init__(self, cfg, scale: str):
        self.cfg, self.scale = cfg, scale
        self.model, self.tok = models.load(cfg.model)
        self.ids = passages(self.tok, cfg.corpus, cfg.split, n=cfg.n_sentences, min_tokens=cfg.min_tokens,
                            max_tokens=cfg.max_tokens, seed=cfg.data_seed)
        self.lengths = [int(x.shape[1]) for x in self.ids]
        self.ref = torch.cat([E.encode(self.model, x).embedding for x in self.ids])
        self._states: dict = {}

    def states(self, i: int, prune_at: int):
        """Cached unpruned inputs of blocks ``prune_at - 1`` and ``prune_at`` for passage ``i``."""
        if (i, prune_at) not in self._states:
            self._states[(i, prune_at)] = E.states(self.model, self.ids[i], prune_at)
        return self._states[(i, prune_at)]

    def config(self, method: str, keep: float, seed: int, prune_at: int, opts: dict) -> dict:
        c = self.cfg
        return {"model": c.model, "corpus": c.corpus, "split": c.split, "n": c.n_sentences,
                "min_tokens": c.min_tokens, "max_tokens": c.max_tokens, "data_seed": c.data_seed,
                "method": method, "keep": keep, "prune_at": prune_at, "seed": seed,
                "options": dict(sorted(opts.items()))}

    def run(self, method: str, keep: float, *, seed: int = 0, prune_at: int | None = None, **opts) -> dict:
        """Metrics of one configuration: per-passage ``cos`` to the unpruned embedding, its mean/SE, ``rho``,
        and the FLOPs ratio (``flops_ratio`` with the scoring overhead, ``flops_ratio_blocks`` without)."""
        prune_at = self.cfg.prune_at if prune_at is None else prune_at
        if method != "zero_tprune" and method != "wpr":
            opts.pop("iterations", None)
        if method in ("wpr", "zero_tprune"):
            opts.setdefault("iterations", self.cfg.wpr_iterations)
        seed_used = seed if method == "random" else 0

        def fn():
            g = torch.Generator().manual_seed(seed_used)
            embs, ratios, ratios_b = [], [], []
            for i, x in enumerate(self.ids):
                out = E.encode(self.model, x, method=method, keep=keep, prune_at=(prune_at,), generator=g,
                               start=self.states(i, prune_at), **opts)
                embs.append(out.embedding)
                n = x.shape[1]
                full = F.model_flops(self.model, [n] * len(out.tokens_per_layer))["total"]
                blk = F.model_flops(self.model, out.tokens_per_layer)["total"]
                extra = 0 if method in ("random", "recency", "divprune", "none") else F.scoring_flops(self.model, n)
                ratios.append((blk + extra) / full)
                ratios_b.append(blk / full)
            emb = torch.cat(embs)
            cos = E.embedding_cosine(emb, self.ref).tolist()
            m, se = mean_se(cos)
            return {"cos": cos, "cos_mean": m, "cos_se": se, "rho": spearman_pairwise(self.ref, emb),
                    "flops_ratio": statistics.fmean(ratios), "flops_ratio_blocks": statistics.fmean(ratios_b)}
        return results.cached(f"enc-{method}", self.config(method, keep, seed_used, prune_at, opts), fn,
                              scale=self.scale, chapter=CHAPTER)

    def random_spread(self, keep: float, **kw) -> tuple[Spread, list[dict]]:
        """The random baseline on every preset seed: Spread of the mean cosine, and the per-seed records."""
        runs = [self.run("random", keep, seed=s, **kw) for s in self.cfg.seeds]
        return Spread(tuple(r["cos_mean"] for r in runs), "seeds", tuple(self.cfg.seeds)), runs


# --------------------------------------------------------------------------------------------------
# Decoder bench
# --------------------------------------------------------------------------------------------------
class DecoderBench:
    """SmolLM2 prefill pruning: windows of context + continuation, the states up to block K cached."""

    def __init__(self, cfg, scale: str, model=None, tokenizer=None):
        self.cfg, self.scale = cfg, scale
        if model is None:
            model, tokenizer = models.load(cfg.model)
        self.model, self.tok = model, tokenizer
        self.wins = windows(self.tok, cfg.corpus, cfg.split, cfg.windows, cfg.context + cfg.continuation)
        self._states: dict = {}
        self._base: list[float] | None = None

    @torch.no_grad()
    def states(self, i: int, prune_at: int):
        key = (i, prune_at)
        if key not in self._states:
            x = self.wins[i]
            pos = torch.arange(x.shape[1])[None]
            h0 = self.model.model.embed_tokens(x)
            h_prev = D.run_blocks(self.model, h0, pos, 0, prune_at - 1)
            self._states[key] = (h_prev, D.run_blocks(self.model, h_prev, pos, prune_at - 1, prune_at))
        return self._states[key]

    @torch.no_grad()
    def base_nll(self) -> list[float]:
        if self._base is None:
            c = self.cfg.context
            m = self.cfg.continuation
            n_layers = len(D.blocks(self.model))
            self._base = []
            for x in self.wins:   # the LM head only on the rows that predict the continuation
                pos = torch.arange(x.shape[1])[None]
                h = D.run_blocks(self.model, self.model.model.embed_tokens(x), pos, 0, n_layers)
                self._base.append(float(D.continuation_nll(D.head(self.model, h[:, -m - 1:]), x, c)[0]))
        return self._base

    def config(self, method, keep, seed, prune_at, opts) -> dict:
        c = self.cfg
        return {"model": c.model, "corpus": c.corpus, "split": c.split, "windows": c.windows, "context": c.context,
                "continuation": c.continuation, "method": method, "keep": keep, "prune_at": prune_at,
                "seed": seed, "options": dict(sorted(opts.items()))}

    def run(self, method: str, keep: float, *, seed: int = 0, prune_at: int | None = None, **opts) -> dict:
        """Per-window continuation NLL increase over the unpruned prefill (``delta``), its mean/SE."""
        prune_at = self.cfg.prune_at if prune_at is None else prune_at
        if not 1 <= prune_at < len(D.blocks(self.model)):
            raise D.TokenInputError(f"prune_at={prune_at} must lie in [1, {len(D.blocks(self.model)) - 1}]")
        seed_used = seed if method == "random" else 0
        c = self.cfg.context

        @torch.no_grad()
        def fn():
            g = torch.Generator().manual_seed(seed_used)
            base = self.base_nll()
            deltas = []
            n_layers = len(D.blocks(self.model))
            for i, x in enumerate(self.wins):
                h_prev, h = self.states(i, prune_at)
                idx = D.keep_indices(self.model, prune_at, h_prev, h, c, method, keep, generator=g, **opts)
                hk = D.run_blocks(self.model, D.sel.gather(h, idx), idx, prune_at, n_layers)
                m = self.cfg.continuation
                nll = float(D.continuation_nll(D.head(self.model, hk[:, -m - 1:]), x, c)[0])
                deltas.append(nll - base[i])
            m, se = mean_se(deltas)
            return {"delta": deltas, "delta_mean": m, "delta_se": se, "base_nll_mean": statistics.fmean(base)}
        return results.cached(f"dec-{method}", self.config(method, keep, seed_used, prune_at, opts), fn,
                              scale=self.scale, chapter=CHAPTER)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def time_prefill(model, input_ids: torch.Tensor, *, keeps=(0.5, 0.25), prune_at: int = 3, method: str = "last",
                 repeats: int = 7) -> dict:
    """Wall-clock of the unpruned and pruned prefills **in one run**, interleaved, median of ``repeats``.

    The unpruned forward is the same block loop with ``keep=1`` (so the ratio measures pruning, not a
    different code path). Parts of the pruned forward are timed separately: blocks before K, the scoring
    (attention recomputation + top-k), the gather, blocks from K on (+ head). Threads: whatever
    ``torch.get_num_threads()`` is (the notebook fixes it) — recorded.
    """
    t = input_ids.shape[1]
    n_layers = len(D.blocks(model))
    pos = torch.arange(t)[None]

    def full():
        D.prefill(model, input_ids)

    def pruned(keep, parts):
        t0 = time.perf_counter()
        h0 = model.model.embed_tokens(input_ids)
        h_prev = D.run_blocks(model, h0, pos, 0, prune_at - 1)
        h = D.run_blocks(model, h_prev, pos, prune_at - 1, prune_at)
        t1 = time.perf_counter()
        idx = D.keep_indices(model, prune_at, h_prev, h, t, method, keep)
        t2 = time.perf_counter()
        hk = D.sel.gather(h, idx)
        t3 = time.perf_counter()
        D.head(model, D.run_blocks(model, hk, idx, prune_at, n_layers))
        t4 = time.perf_counter()
        for k, v in zip(("before_K", "scoring", "gather", "after_K"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts.setdefault(k, []).append(v)

    full()  # warm-up
    times = {"full": []}
    parts = {k: {} for k in keeps}
    for k in keeps:
        times[k] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        full()
        times["full"].append(time.perf_counter() - t0)
        for k in keeps:
            t0 = time.perf_counter()
            pruned(k, parts[k])
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"seqlen": t, "prune_at": prune_at, "method": method, "repeats": repeats,
           "threads": torch.get_num_threads(), "full_s": med["full"], "full_all_s": times["full"]}
    for k in keeps:
        out[f"keep{k}"] = {"pruned_s": med[k], "all_s": times[k],
                           "speedup": med["full"] / med[k],
                           "parts_s": {p: statistics.median(v) for p, v in parts[k].items()},
                           "flops_ratio": F.model_flops(model, F.prefill_tokens(n_layers, t, D.sel.kept_count(k, t),
                                                                                prune_at))["total"]
                           / F.model_flops(model, [t] * n_layers)["total"]}
    return out


# --------------------------------------------------------------------------------------------------
# KV-cache eviction bench (03g)
# --------------------------------------------------------------------------------------------------
class KVBench:
    """SmolLM2 windows with a full-cache prompt and decoding under an evicted KV cache (H2O / StreamingLLM /
    recent-only / random), every policy and budget on the same windows (paired).

    One record per ``cfg.chunk`` windows holds, per configuration label and window, the mean decoded NLL,
    the mean KL divergence ``KL(p_full ‖ p_evicted)`` of the next-token distributions and the top-1
    agreement with the full cache (the greedy continuation's next token, teacher-forced). The prompt state
    (:func:`shrink.tokens.kvcache.prompt_state`) is computed once per window and shared by every
    configuration.

    Introduced in: notebooks/03-tokens/03g-kv-eviction.md
    """

    def __init__(self, cfg, scale: str, model=None, tokenizer=None):
        self.cfg, self.scale = cfg, scale
        if model is None:
            model, tokenizer = models.load(cfg.model)
        self.model, self.tok = model, tokenizer
        self.wins = windows(self.tok, cfg.corpus, cfg.split, cfg.windows, cfg.length)

    def configs(self) -> dict[str, dict]:
        """``label -> streaming-policy kwargs`` of every configuration the bench runs."""
        c = self.cfg
        out = {"none": {"policy": "none"}}
        for b in c.budgets:
            heavy = int(round(c.heavy_share * b))
            out[f"streaming-{b}"] = {"policy": "streaming", "budget": b, "sink": c.sink}
            out[f"recent-{b}"] = {"policy": "streaming", "budget": b, "sink": 0}
            out[f"h2o-{b}"] = {"policy": "h2o", "budget": b, "heavy": heavy}
            if b in c.random_budgets:
                for s in c.seeds:
                    out[f"random-{b}-s{s}"] = {"policy": "random", "budget": b, "heavy": heavy, "seed": s}
        return out

    def _chunk(self, j: int) -> dict:
        from . import kvcache as KV

        c = self.cfg
        idx = list(range(j * c.chunk, min((j + 1) * c.chunk, len(self.wins))))
        conf = {"model": c.model, "corpus": c.corpus, "split": c.split, "windows": c.windows, "length": c.length,
                "prefill": c.prefill, "chunk": idx, "configs": self.configs()}

        @torch.no_grad()
        def fn():
            out = {label: {"nll": [], "kl": [], "top1": []} for label in conf["configs"]}
            t0 = time.perf_counter()
            for i in idx:
                x = self.wins[i]
                pr = KV.prompt_state(self.model, x, c.prefill)
                ref = None
                for label, kw in conf["configs"].items():
                    r = KV.simulate_nll(self.model, x, prefill=c.prefill, prompt=pr, return_logp=True, **kw)
                    lp = r["logp"]
                    if ref is None:          # "none" comes first: the full-cache reference
                        ref = lp
                    kl = (ref.exp() * (ref - lp)).sum(-1)
                    out[label]["nll"].append(r["decoded_mean"])
                    out[label]["kl"].append(float(kl.mean()))
                    out[label]["top1"].append(float((lp.argmax(-1) == ref.argmax(-1)).float().mean()))
            return {"per_config": out, "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}
        return results.cached("kv-chunk", conf, fn, scale=self.scale, chapter=CHAPTER)

    def run(self) -> dict:
        """``{label: {"nll": [per window], "kl": [...], "top1": [...]}}`` over all windows, and the compute
        seconds the records took."""
        c = self.cfg
        n_chunks = (len(self.wins) + c.chunk - 1) // c.chunk
        merged: dict = {}
        seconds = 0.0
        for j in range(n_chunks):
            rec = self._chunk(j)
            seconds += rec["seconds"]
            for label, d in rec["per_config"].items():
                m = merged.setdefault(label, {"nll": [], "kl": [], "top1": []})
                for k in m:
                    m[k].extend(d[k])
        return {"per_config": merged, "seconds": seconds}


# --------------------------------------------------------------------------------------------------
# Learned budgets (03h): VFlowOpt-style search on validation windows, evaluation on test windows; ATP
# --------------------------------------------------------------------------------------------------
class BudgetBench:
    """Per-layer keep schedules of SmolLM2's prefill: searched (Optuna TPE, :func:`shrink.tokens.budget.search`,
    one record per search seed) on ``cfg.search_windows`` validation windows, and evaluated — continuation NLL
    increase over the unpruned prefill, paired over windows — on ``cfg.eval_windows`` **test** windows never
    searched on. ATP-style thresholds on the encoder: :meth:`atp`.

    Introduced in: notebooks/03-tokens/03h-learned-budgets.md
    """

    def __init__(self, cfg, scale: str, model=None, tokenizer=None):
        self.cfg, self.scale = cfg, scale
        if model is None:
            model, tokenizer = models.load(cfg.model)
        self.model, self.tok = model, tokenizer
        n = cfg.context + cfg.continuation
        self.search_wins = windows(self.tok, cfg.corpus, cfg.search_split, cfg.search_windows, n)
        self.eval_wins = windows(self.tok, cfg.corpus, cfg.eval_split, cfg.eval_windows, n)
        self.n_layers = len(D.blocks(self.model))

    def _base(self) -> dict:
        c = self.cfg
        return {"model": c.model, "corpus": c.corpus, "context": c.context, "continuation": c.continuation,
                "method": c.method}

    def search(self, seed: int) -> dict:
        from . import budget as B

        c = self.cfg
        conf = {**self._base(), "split": c.search_split, "windows": c.search_windows, "layers": list(c.layers),
                "target": c.target, "n_trials": c.n_trials, "seed": seed}

        def fn():
            t0 = time.perf_counter()
            out = B.search(self.model, self.search_wins, c.context, layers=c.layers, target=c.target,
                           n_trials=c.n_trials, seed=seed, method=c.method)
            out["seconds"] = time.perf_counter() - t0
            return out
        return results.cached("budget-search", conf, fn, scale=self.scale, chapter=CHAPTER)

    def hand_set(self) -> dict[str, list]:
        """The hand-set schedules at the target mean: one pruning point at ``layers[0]``, and two points with
        ``hand_first`` at ``layers[0]`` and the second ratio solved."""
        from . import budget as B

        c = self.cfg
        f1 = B.solve_last(list(c.layers[:1]), [], c.target, self.n_layers)
        out = {f"one point (block {c.layers[0]})": [(c.layers[0], f1)]}
        if len(c.layers) > 1:
            last = B.solve_last(list(c.layers[:2]), [c.hand_first], c.target, self.n_layers)
            out[f"two points, first {c.hand_first}"] = [(c.layers[0], c.hand_first), (c.layers[1], last)]
        return out

    def evaluate(self, schedule: list) -> dict:
        """Per test window: the continuation NLL and the cosine of the last token's final hidden state to the
        unpruned one, for ``schedule`` ``[(K, f), ...]`` (``[]``: the unpruned prefill, cosine 1)."""
        from . import budget as B

        c = self.cfg
        sched = [(int(k), round(float(f), 6)) for k, f in schedule]
        conf = {**self._base(), "split": c.eval_split, "windows": c.eval_windows, "schedule": sched}

        @torch.no_grad()
        def fn():
            nll, cos = [], []
            for i, x in enumerate(self.eval_wins):
                h, _ = B.prefill_schedule(self.model, x, c.context, sched or [(1, 1.0)], method=c.method)
                logits = self.model.lm_head(h[:, -c.continuation - 1:])
                nll.append(float(D.continuation_nll(logits, x, c.context)[0]))
                ref = h[0, -1] if not sched else self._ref_last(i)
                cos.append(float(torch.nn.functional.cosine_similarity(h[0, -1].float(), ref.float(), dim=0)))
            return {"nll": nll, "cos": cos}
        return results.cached("budget-eval", conf, fn, scale=self.scale, chapter=CHAPTER)

    @torch.no_grad()
    def _ref_last(self, i: int) -> torch.Tensor:
        from . import budget as B

        if not hasattr(self, "_refs"):
            self._refs = {}
        if i not in self._refs:
            self._refs[i] = B.prefill_schedule(self.model, self.eval_wins[i], self.cfg.context, [(1, 1.0)])[0][0, -1]
        return self._refs[i]

    def atp(self, seed: int) -> dict:
        """ATP-style thresholds trained (``shrink.train`` via :func:`shrink.tokens.adaptive.train_atp`) on
        validation passages, evaluated hard on the test passages, next to the fixed-ratio top-k with the
        same score, pruning points and per-point mean kept fraction (the non-adaptive baseline)."""
        from . import adaptive as A

        c = self.cfg
        conf = {"encoder": c.encoder, "corpus": c.corpus, "train_split": c.search_split, "test_split": c.eval_split,
                "train_passages": c.train_passages, "test_passages": c.test_passages, "min_tokens": c.min_tokens,
                "max_tokens": c.max_tokens, "layers": list(c.atp_layers), "target": c.atp_target,
                "steps": c.atp_steps, "batch": c.atp_batch, "lr": c.atp_lr, "tau": c.atp_tau, "lambda": c.atp_lambda,
                "hidden": c.atp_hidden, "theta0": c.atp_theta0, "seed": seed}

        def fn():
            enc, tok = models.load(c.encoder)
            tr = passages(tok, c.corpus, c.search_split, n=c.train_passages, min_tokens=c.min_tokens,
                          max_tokens=c.max_tokens, seed=0)
            te = passages(tok, c.corpus, c.eval_split, n=c.test_passages, min_tokens=c.min_tokens,
                          max_tokens=c.max_tokens, seed=0)
            with torch.no_grad():
                ref_tr = torch.cat([E.encode(enc, x).embedding for x in tr])
                ref_te = torch.cat([E.encode(enc, x).embedding for x in te])
            atp = A.ATP(enc, c.atp_layers, hidden=c.atp_hidden, tau=c.atp_tau, seed=seed, theta0=c.atp_theta0)
            t0 = time.perf_counter()
            res = A.train_atp(atp, tr, ref_tr, target=c.atp_target, lam=c.atp_lambda, steps=c.atp_steps,
                              batch=c.atp_batch, lr=c.atp_lr, seed=seed)
            train_s = time.perf_counter() - t0
            with torch.no_grad():
                hard = [atp(x, mode="hard") for x in te]
                lengths = [int(x.shape[1]) for x in te]
                li = [atp.layers[j] for j in range(len(atp.layers))]
                frac = [[o.counts[k] / n for k in li] for o, n in zip(hard, lengths)]
                ratios = [statistics.fmean(f[j] for f in frac) for j in range(len(li))]
                fixed = [atp(x, mode="fixed", ratios=ratios) for x in te]
                cos_h = E.embedding_cosine(torch.cat([o.embedding for o in hard]), ref_te).tolist()
                cos_f = E.embedding_cosine(torch.cat([o.embedding for o in fixed]), ref_te).tolist()
            return {"history": res.history, "train_seconds": train_s, "lengths": lengths,
                    "counts": [o.counts for o in hard], "budget": [o.budget for o in hard],
                    "thresholds": [[float(t) for t in o.thresholds] for o in hard],
                    "fixed_ratios": ratios, "fixed_budget": [o.budget for o in fixed],
                    "cos_atp": cos_h, "cos_fixed": cos_f}
        return results.cached("atp", conf, fn, scale=self.scale, chapter=CHAPTER)

