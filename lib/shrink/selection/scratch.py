"""Training a byte-level LM from scratch on a domain-mixed pool: loss reweighting (04f) and the token crisis (04g).

**Pool** (:func:`build_pool`, a function of the preset only). Each domain of ``cfg.scratch_domains`` is a
UTF-8 byte stream read through :mod:`shrink.data`:

* ``shakespeare``, ``fortunes``, ``pydocs``: the offline text corpora;
* ``wikitext2``: WikiText-2 *validation* (the offline tokenized split; the test split is only evaluated);
* ``lima-responses``: the responses (``output``) of LIMA's training conversations, joined by blank lines.

A stream is cut into ``block_bytes`` blocks; a permutation seeded by ``(pool_seed, domain)`` gives the
domain's ``val_blocks`` held-out blocks (cut into ``seqlen`` windows: the per-domain validation set) and its
``train_blocks`` training blocks. The training blocks of all domains are shuffled together (seed
``(pool_seed, "mix")``) into one stream, so every prefix of the stream is a domain mix: the token-crisis
runs draw their windows from the first ``U`` bytes (``shrink.train.lm_batches(..., unique_tokens=U)``).
Bytes are token ids 0-255 of the byte tokenizer (``byte-llama`` / ``tiny-llama``); a loss in nats per
byte divided by ``ln 2`` is **bits per byte**.

**Runs.** Every run is :func:`shrink.train.train` (the one loop) from a fresh ``models.load(cfg.model,
seed=seed)`` on ``lm_batches(stream, batch_size, seqlen, seed=seed)``, AdamW with linear warm-up and cosine
decay. The seed fixes the initial weights, the window draws and dropout, so two strategies under one seed see
the same batches: differences between them are paired. ``eval_fn`` measures the per-domain validation loss
every ``eval_every`` steps and, at the end, WikiText-2 *test* bits per byte on ``wiki_windows`` evenly spaced
windows (the overall metric). Each run is one record (:func:`shrink.results.cached`): ``reweight-run`` and
``token-crisis-run`` in ``results/<scale>/04-data/``, keyed by the preset's fields and the run's strategy /
unique tokens / dropout / seed.

Introduced in: notebooks/04-data/04f-loss-reweighting.md, notebooks/04-data/04g-token-crisis.md
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from functools import lru_cache

import torch

from .. import data as D
from .. import models, results
from .. import train as T
from .errors import SelectionError
from .reweight import Reweighter

CHAPTER = "04-data"
SCRATCH_DOMAINS = ("shakespeare", "fortunes", "pydocs", "wikitext2", "lima-responses")


def domain_bytes(domain: str) -> bytes:
    """The UTF-8 byte stream of one pool domain (see the module docstring)."""
    if domain == "wikitext2":
        return D.load_text("wikitext2", "validation").encode("utf-8")
    if domain == "lima-responses":
        return "\n\n".join(r["output"] for r in D.load_instructions("lima", "train")).encode("utf-8")
    if domain in ("shakespeare", "fortunes", "pydocs"):
        return D.load_text(domain, "all").encode("utf-8")
    raise SelectionError(f"unknown scratch-pool domain {domain!r}; use some of {', '.join(SCRATCH_DOMAINS)}.")


@dataclass
class ScratchPool:
    """The training stream, the per-domain validation windows and the WikiText-2 test windows.

    Attributes:
        train: ``[N]`` int64 byte ids, the shuffled training blocks of all domains.
        val: ``{domain: [n, seqlen] int64}`` held-out windows per domain.
        wiki: ``[wiki_windows, seqlen]`` int64 windows of WikiText-2 test (raw).
        info: bytes per domain and sha256 of the streams (for the records).
    """

    train: torch.Tensor
    val: dict
    wiki: torch.Tensor
    info: dict


def pool_config(cfg) -> dict:
    return {"domains": list(cfg.scratch_domains), "pool_seed": cfg.pool_seed, "block_bytes": cfg.block_bytes,
            "train_blocks": cfg.train_blocks, "val_blocks": cfg.val_blocks, "seqlen": cfg.seqlen,
            "wiki_windows": cfg.wiki_windows, "wiki": "wikitext2/test raw, evenly spaced windows"}


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.to(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def wiki_test_windows(seqlen: int, n: int, *, normalize_ws: bool = False) -> torch.Tensor:
    """``[n, seqlen]`` int64 byte windows of WikiText-2 *test*, starts evenly spaced over the stream
    (``linspace(0, len - seqlen, n)``). ``normalize_ws``: the stream is first whitespace-normalised
    (``" ".join(text.split())``, newlines become spaces), the form of the 128-word pool chunks of
    :mod:`shrink.selection.pools`; the default is the raw text (04f/04g)."""
    text = D.load_text("wikitext2", "test")
    if normalize_ws:
        text = " ".join(text.split())
    w = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    if w.numel() < seqlen or n < 1:
        raise SelectionError(f"cannot cut {n} windows of {seqlen} bytes from WikiText-2 test ({w.numel()} bytes); "
                             "use n >= 1 and a shorter seqlen.")
    starts = torch.linspace(0, w.numel() - seqlen, n).long().tolist()
    return torch.stack([w[s:s + seqlen] for s in starts])


@lru_cache(maxsize=4)
def _build(domains: tuple, pool_seed: int, block: int, n_train: int, n_val: int, seqlen: int, wiki_windows: int):
    train_blocks, val, info = [], {}, {"domains": {}}
    for d in domains:
        b = domain_bytes(d)
        n_blocks = len(b) // block
        if n_blocks < n_train + n_val:
            raise SelectionError(f"domain {d!r} has {n_blocks} blocks of {block} bytes, fewer than train_blocks + "
                                 f"val_blocks = {n_train + n_val}; lower train_blocks or block_bytes in the preset.")
        order = random.Random(f"{pool_seed}/{d}").sample(range(n_blocks), n_train + n_val)
        blocks = [torch.tensor(list(b[i * block:(i + 1) * block]), dtype=torch.long) for i in order]
        val[d] = torch.cat(blocks[:n_val]).view(-1, seqlen)
        train_blocks += [(d, x) for x in blocks[n_val:]]
        info["domains"][d] = {"bytes": len(b), "blocks": n_blocks, "val_windows": int(val[d].shape[0]),
                              "train_bytes": n_train * block}
    random.Random(f"{pool_seed}/mix").shuffle(train_blocks)
    train = torch.cat([x for _, x in train_blocks])
    wiki = wiki_test_windows(seqlen, wiki_windows)
    info.update(train_bytes=int(train.numel()), train_sha=_sha(train), wiki_sha=_sha(wiki),
                val_sha={d: _sha(v) for d, v in val.items()},
                domain_order_sha=hashlib.sha256("".join(d for d, _ in train_blocks).encode()).hexdigest()[:16])
    return ScratchPool(train, val, wiki, info)


def build_pool(cfg) -> ScratchPool:
    """The pool of a :class:`~shrink.selection.presets.ScratchPreset` (memoised)."""
    return _build(tuple(cfg.scratch_domains), cfg.pool_seed, cfg.block_bytes, cfg.train_blocks, cfg.val_blocks,
                  cfg.seqlen, cfg.wiki_windows)


def window_batches(windows: torch.Tensor, batch_size: int) -> list[dict]:
    """Fixed evaluation batches ``{"input_ids", "labels"}`` of ``[<=batch_size, seqlen]`` windows."""
    return [{"input_ids": w, "labels": w.clone()} for w in windows.split(batch_size)]


def make_eval_fn(pool: ScratchPool, batch_size: int, steps: int):
    """``eval_fn(model, t)``: per-domain validation loss (nats/byte) and their mean; at ``t == steps`` also
    WikiText-2 test bits per byte (``wiki_bpb``)."""
    val_b = {d: window_batches(v, batch_size) for d, v in pool.val.items()}
    wiki_b = window_batches(pool.wiki, batch_size)

    def eval_fn(model, t):
        losses = {d: T.evaluate_loss(model, b)["loss"] for d, b in val_b.items()}
        out = {"val": losses, "val_mean": sum(losses.values()) / len(losses)}
        if t >= steps:
            out["wiki_bpb"] = T.evaluate_loss(model, wiki_b)["loss"] / math.log(2)
        return out

    return eval_fn


def train_config(cfg, seed: int, steps: int | None = None) -> T.TrainConfig:
    steps = cfg.steps if steps is None else steps
    return T.TrainConfig(steps=steps, lr=cfg.lr, warmup=min(cfg.warmup, steps), schedule="cosine", seed=seed,
                         eval_every=cfg.eval_every, log_every=5, weight_decay=0.0)


def _train(cfg, seed: int, *, sample_weights=None, unique_tokens=None, dropout: float = 0.0, steps=None):
    pool = build_pool(cfg)
    model, _ = models.load(cfg.model, seed=seed)
    models.add_dropout(model, dropout)
    tc = train_config(cfg, seed, steps)
    batches = T.lm_batches(pool.train, cfg.batch_size, cfg.seqlen, seed=seed, unique_tokens=unique_tokens)
    return T.train(model, batches, tc, sample_weights=sample_weights,
                   eval_fn=make_eval_fn(pool, cfg.batch_size, tc.steps), progress=False), pool, tc


def _summary(res, pool, extra: dict) -> dict:
    final = res.evals[-1]
    return {"history": res.history, "evals": res.evals, "final": final, "wiki_bpb": final["wiki_bpb"],
            "val_mean": final["val_mean"], "seconds": round(res.seconds, 2), "tokens": res.tokens,
            "seconds_per_step": round(res.seconds / max(res.history[-1]["step"], 1), 4),
            "pool": pool.info, **extra}


def _run_config(cfg, tc: T.TrainConfig) -> dict:
    return {"model": cfg.model, "pool": pool_config(cfg), "batch_size": cfg.batch_size, "seqlen": cfg.seqlen,
            "train": tc.to_dict(), "eval": {"every": cfg.eval_every, "val": "per-domain held-out windows",
                                            "overall": "wikitext2 test bits/byte"}}


def reweight_run(cfg, *, strategy: str, seed: int, scale: str) -> dict:
    """One 04f run: ``strategy`` (a :class:`~shrink.selection.reweight.Reweighter` with ``cfg.r`` and
    ``cfg.burn_in``) on the mixed pool under ``seed``. Cached as ``reweight-run``."""
    rw = Reweighter(strategy, r=cfg.r, burn_in=cfg.burn_in)
    config = {**_run_config(cfg, train_config(cfg, seed)), "reweight": rw.to_dict(), "seed": seed}

    def run() -> dict:
        res, pool, _ = _train(cfg, seed, sample_weights=rw)
        return _summary(res, pool, {"strategy": strategy})

    return results.cached("reweight-run", config, run, scale=scale, chapter=CHAPTER)


def budget(cfg) -> int:
    """Tokens (bytes) seen by one run: ``steps x batch_size x seqlen``."""
    return cfg.steps * cfg.batch_size * cfg.seqlen


def unique_tokens_for(cfg, repeats: int) -> int:
    """Unique tokens giving ``repeats`` epochs over the budget: ``budget // repeats`` (raises when the pool
    is smaller than the budget or a window does not fit)."""
    u = budget(cfg) // int(repeats)
    if budget(cfg) > build_pool(cfg).train.numel():
        raise SelectionError(f"the budget {budget(cfg)} exceeds the {build_pool(cfg).train.numel()}-byte training "
                             "stream: raise train_blocks or lower steps in the preset (1 epoch needs budget <= stream).")
    if u < cfg.seqlen + 1:
        raise SelectionError(f"{repeats} epochs leave {u} unique tokens, fewer than seqlen+1 = {cfg.seqlen + 1}; "
                             "use fewer repeats or a larger budget.")
    return u


def token_crisis_run(cfg, *, repeats: int, dropout: float, seed: int, scale: str) -> dict:
    """One 04g run: the fixed budget drawn from ``budget // repeats`` unique tokens (the stream's prefix),
    residual dropout ``dropout`` (:func:`shrink.models.add_dropout`). Cached as ``token-crisis-run``."""
    u = unique_tokens_for(cfg, repeats)
    config = {**_run_config(cfg, train_config(cfg, seed)), "unique_tokens": u, "repeats": int(repeats),
              "budget": budget(cfg), "dropout": float(dropout), "dropout_kind": "residual (attention and MLP outputs)",
              "seed": seed}

    def run() -> dict:
        res, pool, _ = _train(cfg, seed, unique_tokens=u, dropout=dropout)
        return _summary(res, pool, {"unique_tokens": u, "repeats": int(repeats), "dropout": float(dropout),
                                    "epochs": budget(cfg) / u})

    return results.cached("token-crisis-run", config, run, scale=scale, chapter=CHAPTER)


def token_crisis_grid(cfg) -> list[tuple[int, float, int]]:
    """``(repeats, dropout, seed)`` of every 04g run, in run order: ``points`` seed by seed, then
    ``one_seed_points`` on the first seed only."""
    grid = [(k, p, s) for s in cfg.seeds for k, p in cfg.points]
    grid += [(k, p, cfg.seeds[0]) for k, p in cfg.one_seed_points if (k, p) not in cfg.points]
    return grid


def uniform_identity(cfg, steps: int = 4, seed: int = 0) -> dict:
    """The exact gate of 04f, live (not cached): ``steps`` steps with the loop's default weights, with
    ``Reweighter("uniform")`` and with a non-uniform strategy whose burn-in covers every step. Returns the
    three loss trajectories and whether the final weights are bitwise equal."""
    runs = {}
    for name, sw in (("default", None), ("uniform", Reweighter("uniform")),
                     ("linupper-burn-in", Reweighter("linupper", burn_in=steps)),
                     ("linupper", Reweighter("linupper"))):
        pool = build_pool(cfg)
        model, _ = models.load(cfg.model, seed=seed)
        tc = T.TrainConfig(steps=steps, lr=cfg.lr, seed=seed, log_every=1, warmup=0)
        res = T.train(model, T.lm_batches(pool.train, cfg.batch_size, cfg.seqlen, seed=seed), tc,
                      sample_weights=sw, progress=False)
        runs[name] = {"losses": [h["loss"] for h in res.history],
                      "params": [p.detach().clone() for p in res.model.parameters()]}
    base = runs["default"]["params"]
    same = {k: all(torch.equal(a, b) for a, b in zip(base, v["params"])) for k, v in runs.items()}
    return {"losses": {k: v["losses"] for k, v in runs.items()}, "params_equal": same}
