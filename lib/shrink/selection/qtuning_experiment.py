"""Q-Tuning experiments of notebook 04e (preset ``"qtuning"``): the EU plane of an instruction pool under a
causal LM, and SFT on GSM8K with Q-Tuning's dynamic sample + token pruning vs full data at matched steps.

Every run is a :func:`shrink.results.cached` record in ``results/<scale>/04-data/`` keyed by the preset
fields it uses, the cell and the seed (never a computed number).

Data. GSM8K train (``shrink.data.load_instructions("gsm8k")``; the chapter's instruction pool
``shrink.selection.instructions`` was not committed when this was written): a permutation seeded by
``pool_seed`` gives ``heldout`` held-out problems, then ``train_n`` training problems. The EU plane scores
``eu_per_source`` examples of each of ``eu_sources`` (forward passes only).

Training. :func:`shrink.train.train`, full fine-tuning of the parameters named by ``trainable`` (at ``cpu``:
SmolLM2-135M's last two blocks, so the backward pass stops there; ``trainable=None`` uses LoRA on
``lora_targets`` instead), ``steps`` AdamW steps of
``batch_size`` examples from :func:`shrink.train.sft_batches` (seeded by the run's seed: every cell of a
seed sees the same batch stream, so the cells differ only by what Q-Tuning drops from each batch). A Q-Tuning
cell passes :class:`shrink.selection.qtuning.QTuningHook` as ``batch_hook``. Metric: the mean response-token
NLL on the held-out problems (:func:`shrink.train.evaluate_loss`), before and after training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import results
from ..scales import Preset, PresetError, register

CHAPTER = "04-data"


@dataclass(frozen=True)
class QTuningPreset(Preset):
    """04e knobs (see the module docstring). ``cells``: ``(r_sample, r_token)`` pairs run against full data."""

    source: str = "gsm8k"
    pool_seed: int = 0
    heldout: int = 16
    train_n: int = 400
    eu_sources: tuple = ("gsm8k", "lima")
    eu_per_source: int = 48
    max_prompt: int = 64
    max_response: int = 32
    batch_size: int = 8
    steps: int = 4
    lr: float = 2e-4
    warmup: int = 1
    trainable: tuple | None = ("layers.28.", "layers.29.")
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple = ("q_proj", "v_proj")
    cells: tuple = ((0.25, 0.5), (0.5, 0.7))
    lam: float = 0.5
    entropy_over: str = "attention"
    seeds: tuple = (0, 1, 2)

    def check(self) -> None:
        for rs, rt in self.cells:
            if not (0 < rs <= 1 and 0 < rt <= 1):
                raise PresetError(f"QTuningPreset.cells: ratios must lie in (0, 1], got {(rs, rt)}")
        if self.entropy_over not in ("attention", "response"):
            raise PresetError(f"QTuningPreset.entropy_over={self.entropy_over!r}: 'attention' or 'response'")
        if not self.seeds:
            raise PresetError("QTuningPreset.seeds: at least one seed (>= 3 for a finding)")


register("qtuning", {
    "tiny": QTuningPreset(model="tiny-llama", heldout=4, train_n=24, eu_per_source=8, max_prompt=48,
                          max_response=24, batch_size=4, steps=4, warmup=1, trainable=None, seeds=(0, 1)),
    # sized for the shared machine (8 jobs on 2 cores: this run got ~1/8 of a core): 2 x 48 EU examples, 9 runs
    # of 4 steps x 8 problems (<= 97 tokens), backward through the last two blocks only; the measured train CPU
    # seconds per run are in the records (04e's grid table)
    "cpu": QTuningPreset(model="smollm2-135m"),
    # the paper: LLaMA2-7B / Mistral-7B / SmolLM2-1.7B, full GSM8K train etc., grids of r_sample x r_token
    "paper": QTuningPreset(model="HuggingFaceTB/SmolLM2-1.7B", heldout=500, train_n=6973, eu_per_source=1000,
                           max_prompt=512, max_response=512, batch_size=64, steps=300, lr=1e-4, warmup=10,
                           trainable=None,
                           cells=((0.125, 0.5), (0.25, 0.5), (0.25, 0.7), (0.5, 0.7))),
})


_BASE: dict = {}


def _load(cfg):
    """A fresh copy of the preset's model (loaded once per process, then ``copy.deepcopy``: runs never share
    weights) and its tokenizer."""
    import copy

    from .. import models

    key = (cfg.model, cfg.seed)
    if key not in _BASE:
        _BASE.clear()
        _BASE[key] = models.load(cfg.model, seed=cfg.seed)
    model, tok = _BASE[key]
    return copy.deepcopy(model), tok


def data_config(cfg) -> dict:
    return {"model": cfg.model, "source": cfg.source, "pool_seed": cfg.pool_seed, "heldout": cfg.heldout,
            "train_n": cfg.train_n, "max_prompt": cfg.max_prompt, "max_response": cfg.max_response}


def split(cfg) -> tuple[list[dict], list[dict]]:
    """``(train, heldout)`` example dicts of ``cfg.source`` (disjoint by construction)."""
    from .. import data as D

    rows = D.load_instructions(cfg.source, "train")
    need = cfg.heldout + cfg.train_n
    if need > len(rows):
        from .errors import SelectionError

        raise SelectionError(f"heldout + train_n = {need} exceeds the {len(rows)} rows of {cfg.source!r}; lower them.")
    perm = np.random.default_rng(cfg.pool_seed).permutation(len(rows))
    return [rows[i] for i in perm[cfg.heldout:need]], [rows[i] for i in perm[:cfg.heldout]]


def _tokenized(cfg, tok, examples):
    from ..train import tokenize_sft

    return [tokenize_sft(tok, e, max_prompt=cfg.max_prompt, max_response=cfg.max_response) for e in examples]


def eu_plane(cfg, *, scale: str) -> dict:
    """Per-example PPL and entropy (``entropy_over``) of ``eu_per_source`` examples per source under the
    untrained model: ``{"source", "ppl", "entropy", "tokens"}`` (lists)."""
    config = {"model": cfg.model, "sources": list(cfg.eu_sources), "per_source": cfg.eu_per_source,
              "entropy_over": cfg.entropy_over,
              "pool_seed": cfg.pool_seed, "max_prompt": cfg.max_prompt, "max_response": cfg.max_response,
              "heldout_excluded": cfg.heldout}

    def run():
        import torch

        from .. import data as D
        from ..train import collate
        from .qtuning import eu_scores

        model, tok = _load(cfg)
        model.eval()
        out = {"source": [], "ppl": [], "entropy": [], "tokens": []}
        for src in cfg.eu_sources:
            rows = [r for r in D.load_instructions(src, "train") if str(r.get("output", "")).strip()]
            perm = np.random.default_rng(cfg.pool_seed).permutation(len(rows))
            skip = cfg.heldout if src == cfg.source else 0  # never score the held-out problems
            ex = [rows[i] for i in perm[skip:skip + cfg.eu_per_source]]
            tk = _tokenized(cfg, tok, ex)
            for s in range(0, len(tk), 8):
                b = collate(tk[s:s + 8])
                with torch.no_grad():
                    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                p, e, _, m = eu_scores(logits, b["labels"], b["attention_mask"], entropy_over=cfg.entropy_over)
                out["ppl"] += p.tolist()
                out["entropy"] += e.tolist()
                out["tokens"] += m.sum(1).tolist()
                out["source"] += [src] * len(p)
        return out

    return results.cached("qtuning-eu", config, run, scale=scale, chapter=CHAPTER)


def _train_config(cfg, seed):
    from ..train import TrainConfig

    lora = None if cfg.trainable else {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "targets": list(cfg.lora_targets)}
    return TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, schedule="cosine", seed=seed,
                       log_every=1, lora=lora, trainable=tuple(cfg.trainable) if cfg.trainable else None)


def heldout_nll(model, tok, cfg, heldout) -> dict:
    from ..train import collate, evaluate_loss

    tk = _tokenized(cfg, tok, heldout)
    return evaluate_loss(model, [collate(tk[s:s + 8]) for s in range(0, len(tk), 8)])


def base_run(cfg, *, scale: str) -> dict:
    """Held-out NLL of the untrained model."""
    def run():

        model, tok = _load(cfg)
        _, heldout = split(cfg)
        return heldout_nll(model, tok, cfg, heldout)

    return results.cached("qtuning-base", data_config(cfg), run, scale=scale, chapter=CHAPTER)


def sft_run(cfg, cell, seed: int, *, scale: str) -> dict:
    """One SFT run: ``cell = None`` (full data) or ``(r_sample, r_token)``; held-out NLL after training,
    the history and (Q-Tuning) per-step kept samples / tokens."""
    cell = None if cell is None else (float(cell[0]), float(cell[1]))
    config = {**data_config(cfg), "train": _train_config(cfg, seed).to_dict(), "batch_size": cfg.batch_size,
              "cell": None if cell is None else list(cell), "lam": cfg.lam, "entropy_over": cfg.entropy_over,
              "seed": int(seed)}

    def run():
        import time

        from ..train import sft_batches, train
        from .qtuning import QTuningHook

        model, tok = _load(cfg)
        tr, heldout = split(cfg)
        batches = sft_batches(_tokenized(cfg, tok, tr), cfg.batch_size, seed=seed)
        hook = None if cell is None else QTuningHook(cell[0], cell[1], lam=cfg.lam, entropy_over=cfg.entropy_over)
        t0 = time.process_time()
        res = train(model, batches, _train_config(cfg, seed), batch_hook=hook, progress=False)
        cpu_s = time.process_time() - t0
        out = {"heldout": heldout_nll(res.model, tok, cfg, heldout), "history": res.history,
               "tokens_trained": res.tokens, "train_cpu_s": round(cpu_s, 2)}
        if hook is not None:
            log = hook.log
            out["qtuning"] = {"kept": [h["kept"] for h in log], "q2": [h["q2"] for h in log],
                              "q4": [h["q4"] for h in log], "topped_up": [h["topped_up"] for h in log],
                              "trimmed": [h["trimmed"] for h in log], "tokens_before": [h["tokens_before"] for h in log],
                              "tokens_kept": [h["tokens_kept"] for h in log], "batch": [h["batch"] for h in log]}
        return out

    return results.cached("qtuning-sft", config, run, scale=scale, chapter=CHAPTER)
