"""Fine-tuning with sparsity (issue 16, notebook 3; reused by data chapter II): one-shot pruning + recovery
fine-tuning versus gradual pruning during the same fine-tuning run, at equal optimizer steps.

Every method starts from the dense model, runs the **same** :func:`shrink.train.train` loop on the same
batches (``lm_batches`` over the recovery text, seeded by the run's seed) for the same number of steps, and is
evaluated with the one perplexity function on WikiText-2 *test* windows (never trained on):

==============  ==========================================================================================
``none``        one-shot pruning (Wanda or SparseGPT, layer-wise, :func:`~shrink.pruning.prune_model` with
                scheme ``LR``) and nothing else: the baseline every recovery must beat
``fixed``       the one-shot model fine-tuned in full (AdamW on every parameter) with its mask **fixed**:
                ``train(..., masks=MaskSet)`` re-applies the mask after every step (pruned weights stay
                exactly 0; :func:`shrink.train.check_masks` returns 0 at the end)
``lora``        the one-shot model with LoRA adapters on the 7 linears of every block
                (``TrainConfig(lora=...)``), merged at the end and **re-masked**, ``(W + BA) ⊙ M``: the
                merged update is dense, so the pruned positions of ``BA`` are cut; ``lora_masked_fraction``
                is the share of the merged weights' squared norm that the cut removes
``gmp``         gradual magnitude pruning from the dense model during the run (Zhu & Gupta 2017, Eq. 1:
                ``s_t = s_f (1 - t / t_end)^3`` at updates every ``gmp_every`` steps from 0 to ``gmp_end``,
                :class:`~shrink.pruning.training.SparseUpdater` ``"gmp"``), full fine-tuning; the final
                mask is exact (``int(N s)`` pruned per matrix, :meth:`SparseUpdater.check`)
``rigl``        the one-shot mask as RigL's starting point (drop/grow every ``rigl_every`` steps until
                ``gmp_end``; Evci et al. 2020), full fine-tuning
``static``      the one-shot mask kept by a ``"static"`` updater (the ``fixed`` run through the updater
                path; equal to ``fixed`` up to the updater's gradient masking)
``dense-ft``    the dense model fine-tuned the same way (control: how much of a "recovery" is plain
                adaptation to the recovery text)
==============  ==========================================================================================

Targets are the 7 linears x L blocks (``q/k/v/o_proj``, ``gate/up/down_proj``); embeddings (tied with the
LM head) and norms stay dense. The seed fixes the calibration draw of the one-shot pruner, the batch order
and the LoRA initialisation. Records: ``results/<scale>/01-weights/recovery-<hash>.json`` via
:func:`shrink.results.cached`, one per (method, seed); the key holds everything that determines the run and
nothing computed.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field

import torch

from .. import data, eval as shrink_eval, models, results
from ..scales import Preset, PresetError, register
from ..train import TrainConfig, check_masks, lm_batches, train
from .masks import MaskSet, PruningError
from .sequential import PruneSpec, prune_model
from .training import SparseUpdater, default_targets

CHAPTER = "01-weights"
METHODS = ("none", "fixed", "lora", "gmp", "rigl", "static", "dense-ft")
#: methods that start from the one-shot mask
FROM_ONESHOT = ("none", "fixed", "lora", "rigl", "static")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class RecoveryError(PruningError):
    """A recovery experiment that cannot run as asked (the message names the fix)."""


@dataclass(frozen=True)
class RecoveryPreset(Preset):
    """Knobs of the sparse fine-tuning experiment (01h).

    Attributes:
        calib_*: the one-shot pruner's calibration windows (WikiText-2 validation at cpu, as 01b).
        train_corpus, train_split: the recovery text (token windows drawn by :func:`shrink.train.lm_batches`).
        eval_seqlen, eval_windows: WikiText-2 test perplexity windows (01a/01b's 4 x 512 at cpu).
        sparsity, pattern: the target sparsity (``unstructured`` only: GMP/RigL are unstructured).
        pruner: one-shot pruner for the ``none``/``fixed``/``lora``/``rigl``/``static`` runs.
        steps, batch_size, seqlen, lr, warmup, schedule: the fine-tuning run (equal for every method).
        lora_r, lora_alpha, lora_lr: LoRA rank, scale and learning rate (``lora`` method).
        gmp_end, gmp_every: GMP's last update step (~75 % of ``steps``) and update period.
        rigl_every, rigl_drop: RigL's ΔT and α (until ``gmp_end``).
        methods: the methods run for every seed; ``control_methods`` run for the first seed only.
        extra_pruners: one-shot pruners evaluated without recovery, every seed (``none`` rows).
        seeds: batch order + LoRA init, and the calibration draw unless ``calib_seed`` is set.
        calib_seed: one calibration draw (one one-shot mask) for every seed; ``None``: the run's seed.
    """

    calib_corpus: str = "wikitext2"
    calib_split: str = "validation"
    calib_nsamples: int = 16
    calib_seqlen: int = 256
    train_corpus: str = "wikitext2"
    train_split: str = "validation"
    eval_seqlen: int = 512
    eval_windows: int | None = 4
    sparsity: float = 0.5
    pattern: str = "unstructured"
    pruner: str = "wanda"
    steps: int = 32
    batch_size: int = 2
    seqlen: int = 128
    lr: float = 1e-4
    warmup: int = 3
    schedule: str = "cosine"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_lr: float = 1e-3
    gmp_end: int = 24
    gmp_every: int = 4
    rigl_every: int = 8
    rigl_drop: float = 0.1
    methods: tuple = ("none", "fixed", "lora", "gmp")
    control_methods: tuple = ("dense-ft",)
    extra_pruners: tuple = ()
    seeds: tuple = (0, 1, 2)
    calib_seed: int | None = None

    def check(self) -> None:
        bad = [m for m in (*self.methods, *self.control_methods) if m not in METHODS]
        if bad:
            raise PresetError(f"unknown recovery methods {bad}; use some of {METHODS}")
        if self.pattern != "unstructured":
            raise PresetError(f"RecoveryPreset.pattern={self.pattern!r}: GMP and RigL prune unstructured; use "
                              "pattern='unstructured' (N:M recovery would need an N:M updater)")
        if not 0 < self.gmp_end < self.steps or self.gmp_end % self.gmp_every:
            raise PresetError(f"gmp_end={self.gmp_end} must lie in (0, steps={self.steps}) and be a multiple of "
                              f"gmp_every={self.gmp_every} (GMP reaches the final sparsity at an update); e.g. "
                              "gmp_end = 3/4 of steps")
        if self.warmup > self.steps:
            raise PresetError(f"warmup={self.warmup} exceeds steps={self.steps}")
        for name in ("lr", "lora_lr"):
            if not getattr(self, name) > 0:
                raise PresetError(f"{name} must be > 0")
        if not self.seeds:
            raise PresetError("seeds must be non-empty, e.g. (0, 1, 2)")
        from .sequential import PRUNERS

        bad_p = [p for p in (self.pruner, *self.extra_pruners) if p not in PRUNERS]
        if bad_p:
            raise PresetError(f"unknown pruners {bad_p}; use some of {PRUNERS}")


# tiny: random tiny LLaMA, byte tokens, a handful of steps (invariants only)
register("pruning-recovery", {
    "tiny": RecoveryPreset(model="tiny-llama", calib_nsamples=4, calib_seqlen=64, eval_seqlen=64, eval_windows=4,
                           steps=8, batch_size=2, seqlen=32, lr=1e-3, warmup=1, lora_r=4, lora_alpha=8.0,
                           lora_lr=1e-2, gmp_end=6, gmp_every=2, rigl_every=2, seeds=(0, 1, 2),
                           methods=("none", "fixed", "gmp", "rigl"), control_methods=("lora", "dense-ft"),
                           extra_pruners=("sparsegpt",)),
    # cpu: SmolLM2-135M, 50 % unstructured on the 7 linears x 30 blocks; Wanda's calibration as 01b (16 x 256
    # WikiText-2 validation tokens); 16 AdamW steps x 2 x 128 WikiText-2 validation tokens (4,096 tokens) for
    # every method; GMP's updates at steps 0, 2, ..., 12 (75 %); test perplexity on 4 x 512 WikiText-2 test
    # tokens (01a/01b's windows). Three seeds of none / fixed / gmp, LoRA and the dense control on the first
    # seed (an estimated 10 min on an idle core). The records were made on a shared 2-core machine whose load
    # average went from about 15 to 2 during the run: one full AdamW step took 44 s at load 15 and 8 s at load
    # 2 (the records keep seconds, tokens/s and the load average of each run).
    "cpu": RecoveryPreset(model="smollm2-135m", steps=16, warmup=2, gmp_end=12, gmp_every=2, rigl_every=4,
                          seeds=(0, 1, 2), methods=("none", "fixed", "gmp"), control_methods=("lora", "dense-ft")),
    "paper": RecoveryPreset(model="huggyllama/llama-7b", calib_corpus="c4", calib_split="train",
                            calib_nsamples=128, calib_seqlen=2048, train_corpus="c4", train_split="train",
                            eval_seqlen=2048, eval_windows=None, steps=1000, batch_size=8, seqlen=1024, lr=2e-5,
                            warmup=50, gmp_end=750, gmp_every=50, rigl_every=50, seeds=(0, 1, 2),
                            extra_pruners=("sparsegpt",)),
})


# ----------------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------------
@dataclass
class RecoverySetup:
    """Model, tokenizer, evaluation and recovery tokens of a preset, and the one-shot models (memoised)."""

    cfg: RecoveryPreset
    scale: str
    model: torch.nn.Module
    tok: object
    eval_tokens: torch.Tensor
    train_tokens: torch.Tensor
    _oneshot: dict = field(default_factory=dict)


def setup(cfg: RecoveryPreset, scale: str) -> RecoverySetup:
    """Load the preset's model, the WikiText-2 test stream (evaluation) and the recovery token stream."""
    if (cfg.train_corpus, cfg.train_split) == ("wikitext2", "test"):
        raise RecoveryError("the recovery text is the WikiText-2 test split that perplexity is measured on; "
                            "train on train_split='validation' (or another corpus)")
    model, tok = models.load(cfg.model)
    ev = data.eval_tokens(tok, "wikitext2", "test")
    tr = data.eval_tokens(tok, cfg.train_corpus, cfg.train_split)
    return RecoverySetup(cfg, scale, model, tok, ev, tr)


def perplexity(st: RecoverySetup, model: torch.nn.Module) -> shrink_eval.Perplexity:
    """WikiText-2 test perplexity on the preset's windows (the one perplexity function)."""
    c = st.cfg
    return shrink_eval.perplexity(model, st.eval_tokens, c.eval_seqlen, max_windows=c.eval_windows,
                                  dataset="wikitext2", split="test", progress=False)


def prune_spec(cfg: RecoveryPreset, pruner: str | None = None) -> PruneSpec:
    """The one-shot pruner's spec (layer-wise, scheme LR, all 7 linears per block)."""
    return PruneSpec(pruner=pruner or cfg.pruner, sparsity=cfg.sparsity, pattern=cfg.pattern, scheme="LR")


def calib_seed(cfg: RecoveryPreset, seed: int) -> int:
    """The calibration draw of run ``seed``: ``cfg.calib_seed`` when set (one mask for every seed), else ``seed``."""
    return seed if cfg.calib_seed is None else cfg.calib_seed


def oneshot(st: RecoverySetup, seed: int, pruner: str | None = None) -> tuple[torch.nn.Module, MaskSet, dict]:
    """A pruned copy of the dense model: ``(model, masks, info)``; the masks are a :class:`MaskSet` on the copy.

    Memoised per (pruner, calibration seed) in ``st`` (the pruner is deterministic given its calibration windows, so the
    memo changes no result); every call returns a fresh copy.
    """
    c = st.cfg
    pruner = pruner or c.pruner
    key = (pruner, calib_seed(c, seed))
    if key not in st._oneshot:
        calib = data.calibration_set(st.tok, c.calib_corpus, c.calib_split, nsamples=c.calib_nsamples,
                                     seqlen=c.calib_seqlen, seed=calib_seed(c, seed))
        m = copy.deepcopy(st.model)
        t0 = time.perf_counter()
        res = prune_model(m, calib, prune_spec(c, pruner), verbose=False)
        info = {"prune_seconds": round(time.perf_counter() - t0, 2), "sparsity": res.sparsity["__all__"]}
        st._oneshot[key] = ({n: p.detach().clone() for n, p in m.state_dict().items()},
                            {n: mm.clone() for n, mm in res.masks}, info)
    state, masks, info = st._oneshot[key]
    m = copy.deepcopy(st.model)
    m.load_state_dict(state)
    return m, MaskSet(m, {n: mm.clone() for n, mm in masks.items()}), dict(info)


def train_config(cfg: RecoveryPreset, method: str, seed: int) -> TrainConfig:
    """The :class:`TrainConfig` of one method (equal steps, batches and schedule; LoRA its own lr)."""
    lora = None
    lr = cfg.lr
    if method == "lora":
        lora = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "targets": list(LORA_TARGETS), "dropout": 0.0}
        lr = cfg.lora_lr
    return TrainConfig(steps=cfg.steps, lr=lr, warmup=cfg.warmup, schedule=cfg.schedule, seed=seed, lora=lora,
                       log_every=1)


def batches(st: RecoverySetup, seed: int):
    """The recovery batches of ``seed`` (the same for every method): ``t -> {"input_ids", "labels"}``."""
    c = st.cfg
    return lm_batches(st.train_tokens, c.batch_size, c.seqlen, seed=seed)


def updater_for(cfg: RecoveryPreset, method: str, masks: MaskSet | None = None):
    """``(model, optimizer) -> SparseUpdater`` for ``gmp`` / ``rigl`` / ``static`` (None for the others)."""
    if method == "gmp":
        return lambda model, opt: SparseUpdater(model, opt, "gmp", sparsity=cfg.sparsity, start_step=0,
                                                end_step=cfg.gmp_end, update_every=cfg.gmp_every,
                                                targets=default_targets(model))
    if method in ("rigl", "static"):
        if masks is None:
            raise RecoveryError(f"{method} starts from the one-shot mask; pass masks=")
        return lambda model, opt: SparseUpdater(model, opt, method, sparsity=cfg.sparsity, masks=masks,
                                                start_step=cfg.rigl_every, end_step=cfg.gmp_end,
                                                update_every=cfg.rigl_every, drop_fraction=cfg.rigl_drop,
                                                targets=list(masks.masks))
    return None


def flops_per_token(model: torch.nn.Module, method: str, seqlen: int) -> dict:
    """Matmul FLOPs per trained token of one step (the compute that bounds a CPU step).

    Forward ``2 N`` per token for the ``N`` weights used in matmuls (every linear, the LM head) plus attention
    ``4 L T d / 2`` (causal, mean context ``T/2``); backward ``2 N`` for the activation gradients and, for full
    fine-tuning, ``2 N`` more for the weight gradients (LoRA skips the base weights' gradients, adding only its
    adapters'). Returns ``{"forward", "step", "matmul_weights"}``.
    """
    cfg = model.config
    n_lin = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    n_head = cfg.vocab_size * cfg.hidden_size  # tied LM head: a matmul even though it is the embedding
    n = n_lin + n_head
    attn = 4 * cfg.num_hidden_layers * (seqlen / 2) * cfg.hidden_size
    fwd = 2 * n + attn
    if method == "none":
        return {"forward": fwd, "step": 0.0, "matmul_weights": n}
    weight_grads = 0.0 if method == "lora" else 2 * n_lin  # embedding/LM-head gradient counted as activation grad
    return {"forward": fwd, "step": fwd + (2 * n + attn) + weight_grads, "matmul_weights": n}


def _targets_report(model: torch.nn.Module, masks) -> dict:
    """Mask sparsity, actual zeros at the targets and non-zero pruned weights (must be 0)."""
    d = masks.masks if hasattr(masks, "masks") else masks
    numel = sum(m.numel() for m in d.values())
    pruned = sum(int((~m).sum()) for m in d.values())
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in d)
    return {"targets": len(d), "numel": numel, "pruned": pruned, "mask_sparsity": pruned / max(numel, 1),
            "zero_fraction": zeros / max(numel, 1), "violations": check_masks(model, d)}


def run(st: RecoverySetup, method: str, seed: int, *, pruner: str | None = None) -> dict:
    """One (method, seed) run: prune/train/evaluate; a JSON-able record (``_model`` not included).

    Returns ``{"method", "seed", "ppl", "ppl_record", "train": TrainResult.summary() | None, "targets":
    {mask counts, zero fraction, violations}, "oneshot": {...}, "gmp": {updates, exact counts}, "flops": {...},
    "threads", "loadavg"}``.
    """
    c = st.cfg
    if method not in METHODS:
        raise RecoveryError(f"unknown method {method!r}; use one of {METHODS}")
    out: dict = {"method": method, "seed": seed, "threads": torch.get_num_threads(),
                 "loadavg_start": list(os.getloadavg())}
    masks = None
    if method in FROM_ONESHOT:
        m, masks, info = oneshot(st, seed, pruner)
        out["oneshot"] = info
    else:
        m = copy.deepcopy(st.model)
    tc = train_config(c, method, seed)
    out["flops_per_token"] = flops_per_token(m, method, c.seqlen)
    if method == "none":
        out["train"] = None
    else:
        fixed = masks if method in ("fixed", "lora") else None
        upd = updater_for(c, method, masks)
        res = train(m, batches(st, seed), tc, masks=fixed, updater=upd, progress=False)
        m = res.model
        out["train"] = res.summary()
        out["train"]["trainable_params"] = _trainable_count(st.model, tc)
        if res.updater is not None:
            upd = res.updater
            pruned = upd.check()  # exact counts + pruned weights zero (raises otherwise)
            masks = upd.masks
            out["updater"] = {"algorithm": upd.algorithm, "updates": [{"step": h["step"], "sparsity": h["sparsity"],
                                                                       "changed": sum(h["changed"].values())}
                                                                      for h in upd.history],
                              "pruned": sum(pruned.values()),
                              "expected_pruned": sum(int(m_.numel() * c.sparsity) for _, m_ in upd.masks)}
    if masks is not None:
        out["targets"] = _targets_report(m, masks)
        if out["targets"]["violations"]:
            raise RecoveryError(f"{method}: {out['targets']['violations']} pruned weights are non-zero after the "
                                "run (the mask was not kept; a bug)")
    t0 = time.perf_counter()
    p = perplexity(st, m)
    out["ppl"] = p.ppl
    out["ppl_record"] = p.to_dict()
    out["eval_seconds"] = round(time.perf_counter() - t0, 2)
    out["loadavg_end"] = list(os.getloadavg())
    return out


def _trainable_count(model: torch.nn.Module, tc: TrainConfig) -> int:
    """Parameters the run trains: all of them (full fine-tuning) or LoRA's ``r (n_in + n_out)`` per target."""
    if tc.lora is not None:
        r = int(tc.lora["r"])
        return sum(r * (p.shape[0] + p.shape[1]) for n, p in model.named_parameters()
                   if p.dim() == 2 and any(f".{t}." in n for t in tc.lora["targets"]))
    return sum(p.numel() for p in model.parameters())


def config_of(st: RecoverySetup, method: str, seed: int, pruner: str | None = None) -> dict:
    """The cache key of a run: everything that determines it (never a computed number)."""
    c = st.cfg
    cfg = {"model": c.model, "method": method, "seed": seed, "sparsity": c.sparsity, "pattern": c.pattern,
           "eval": [c.eval_seqlen, c.eval_windows]}
    if method in FROM_ONESHOT:
        cfg["oneshot"] = {"spec": prune_spec(c, pruner).to_dict(),
                          "calib": [c.calib_corpus, c.calib_split, c.calib_nsamples, c.calib_seqlen]}
        if calib_seed(c, seed) != seed:  # (absent when equal: the key of a run whose draw is its own seed)
            cfg["oneshot"]["calib_seed"] = calib_seed(c, seed)
    if method != "none":
        cfg["train"] = train_config(c, method, seed).to_dict()
        cfg["data"] = [c.train_corpus, c.train_split, c.batch_size, c.seqlen]
        if method == "gmp":
            cfg["gmp"] = {"end": c.gmp_end, "every": c.gmp_every, "power": 3}
        if method in ("rigl", "static"):
            cfg["rigl"] = {"every": c.rigl_every, "end": c.gmp_end, "drop": c.rigl_drop}
    return cfg


def cached_run(st: RecoverySetup, method: str, seed: int, *, pruner: str | None = None) -> dict:
    """:func:`run` through :func:`shrink.results.cached` (record ``recovery-<hash>.json``)."""
    return results.cached("recovery", config_of(st, method, seed, pruner),
                          lambda: run(st, method, seed, pruner=pruner), scale=st.scale, chapter=CHAPTER)


def dense_ppl(st: RecoverySetup) -> dict:
    """Dense WikiText-2 test perplexity on the preset's windows (cached)."""
    c = st.cfg
    return results.cached("recovery-dense", {"model": c.model, "eval": [c.eval_seqlen, c.eval_windows]},
                          lambda: {"ppl": perplexity(st, st.model).ppl}, scale=st.scale, chapter=CHAPTER)


def grid(st: RecoverySetup) -> dict:
    """Every record of the preset: ``{(method, pruner, seed): record}`` (methods x seeds, controls on the first
    seed, extra one-shot pruners without recovery; with ``calib_seed`` set, ``none`` is the record of that
    draw under every seed). Computes what is missing."""
    c = st.cfg
    out = {}
    for sd in c.seeds:
        for m in c.methods:
            # with one calibration draw for all seeds, `none` is one deterministic model: one record, every seed
            run_sd = calib_seed(c, sd) if m == "none" else sd
            out[(m, c.pruner if m in FROM_ONESHOT else None, sd)] = cached_run(st, m, run_sd)
        for p in c.extra_pruners:
            out[("none", p, sd)] = cached_run(st, "none", calib_seed(c, sd), pruner=p)
    for m in c.control_methods:
        sd = c.seeds[0]
        out[(m, c.pruner if m in FROM_ONESHOT else None, sd)] = cached_run(st, m, sd)
    return out


def _main(argv=None) -> None:
    """``python -m shrink.pruning.recovery --scale cpu``: compute (or read) every record of the preset."""
    import argparse

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("--scale", default="cpu")
    a = ap.parse_args(argv)
    from .. import scales
    from ..errors import env_int

    torch.set_num_threads(env_int("SHRINK_THREADS", minimum=1) or 1)
    cfg = scales.get("pruning-recovery", a.scale)
    st = setup(cfg, a.scale)
    print("dense", dense_ppl(st))
    for k, r in grid(st).items():
        t = r.get("train") or {}
        print(k, f"ppl {r['ppl']:.3f}", f"train {t.get('seconds')} s", f"{t.get('tokens_per_s')} tok/s", flush=True)


if __name__ == "__main__":
    _main()
