"""Presets of the data chapter (notebooks 04a-04e) per scale.

``tiny``  a seeded subset of every offline domain (60 chunks each), k = 40: invariants, minutes.
``cpu``   the whole offline pool (~22k chunks of 128 words; 699 WikiText chunks when ``with_wiki``),
          k = 500 (below the number of WikiText chunks, so precision 1 is attainable), seeds 0-2.
``paper`` the paper's setting needs The Pile (online, ``stream_hf_chunks``) and 10M-100M selections; the
          preset keeps the official hyperparameters (10k buckets, unigrams + bigrams, length >= 100).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..scales import Preset, PresetError, register
from .pools import DOMAINS


@dataclass(frozen=True)
class DataPreset(Preset):
    """Pool, target and DSIR knobs (official defaults: 10,000 buckets, ngrams 2, min length 100)."""

    pool_source: str = "offline"  # "offline" (shrink.data corpora) | a datasets id streamed online
    domains: tuple = DOMAINS
    words: int = 128
    max_per_domain: int | None = None
    target_max_chunks: int | None = None
    num_buckets: int = 10000
    ngrams: int = 2
    min_example_length: int = 100
    k: int = 500
    seeds: tuple = (0, 1, 2)
    kl_alpha: float = 1.0
    # curation baselines (04i): a smaller pool, because SmolLM2's per-chunk NLL (perplexity filtering, first
    # ppl_max_tokens tokens) costs ~1 s per 128-token chunk on one thread (pilot, load ~2; MiniLM ~0.06 s per
    # chunk): 540 chunks x 64 tokens ~ 4.5 min; k below the pool's 60 WikiText chunks
    baseline_max_per_domain: int | None = 60
    baseline_k: int = 50
    ppl_max_tokens: int = 64
    encoder: str = "minilm"
    n_clusters: int = 16
    semdedup_eps: float = 0.05
    dbp_tau: float = 0.5

    def check(self) -> None:
        if self.k <= 0 or self.words <= 0 or self.num_buckets <= 0:
            raise PresetError("DataPreset: k, words and num_buckets must be positive")
        if self.ngrams not in (1, 2):
            raise PresetError(f"DataPreset.ngrams must be 1 or 2, got {self.ngrams}")
        if not self.seeds:
            raise PresetError("DataPreset.seeds must name at least one seed (>= 3 for findings)")
        if self.kl_alpha < 0:
            raise PresetError(f"DataPreset.kl_alpha must be >= 0, got {self.kl_alpha}")


register("data", {
    "tiny": DataPreset(model="tiny-llama", max_per_domain=60, target_max_chunks=200, k=40,
                       baseline_max_per_domain=20, baseline_k=16, encoder="tiny-bert", n_clusters=8, semdedup_eps=1e-4),
    "cpu": DataPreset(model="smollm2-135m", k=500),
    "paper": DataPreset(model="smollm2-135m", pool_source="EleutherAI/pile", k=10_000_000,
                        baseline_max_per_domain=None, baseline_k=10_000_000, n_clusters=500),
})


# ------------------------------------------------------------------------------------------------------------
# Calibration data for pruning (04h): WikiText-2 vs random pool chunks vs DSIR-selected vs self-generated
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibPreset(DataPreset):
    """04h: calibration sets of ``calib_nsamples x calib_seqlen`` tokens from each of ``calib_sources``
    (``shrink.selection.calibration``), pruned with each pruner of ``calib_draws`` (``(pruner, draw seeds)``
    pairs) at ``calib_sparsity``. The model, the held-out windows, the perplexity windows and the pruner spec
    come from the weights chapter's preset ``weights_preset`` (so the WikiText-2 cells are its cells). The pool
    and DSIR knobs are :class:`DataPreset`'s (the pool without WikiText; target: WikiText-2 validation's even
    articles)."""

    weights_preset: str = "pruning-baselines"
    calib_sources: tuple = ("wikitext2", "random-pool", "dsir-pool", "self-generated")
    calib_draws: tuple = (("wanda", (0, 1, 2)), ("sparsegpt", (0, 1, 2)))
    calib_nsamples: int = 8
    calib_seqlen: int = 256
    calib_sparsity: float = 0.5

    def check(self) -> None:
        super().check()
        from .calibration import SOURCES

        bad = [s for s in self.calib_sources if s not in SOURCES]
        if bad or not self.calib_sources:
            raise PresetError(f"CalibPreset.calib_sources {bad or '()'}: use some of {SOURCES}")
        pruners = ("magnitude", "wanda", "sparsegpt")  # the weights chapter's PRUNERS (not imported: axes apart)
        for item in self.calib_draws:
            if (not isinstance(item, tuple) or len(item) != 2 or item[0] not in pruners or not item[1]
                    or any(isinstance(s, bool) or not isinstance(s, int) for s in item[1])):
                raise PresetError(f"CalibPreset.calib_draws item {item!r}: give (pruner, (seed, ...)) with a pruner "
                                  f"of {pruners} and at least one integer seed, e.g. ('wanda', (0, 1, 2))")


register("data-calibration", {
    "tiny": CalibPreset(model="tiny-llama", max_per_domain=60, target_max_chunks=200, calib_nsamples=4,
                        calib_seqlen=64, calib_draws=(("wanda", (0, 1)), ("sparsegpt", (0,)))),
    # 8 x 256 tokens per set: the weights chapter's cpu budget (its WikiText-2 Wanda cells and 01d's three
    # self-generated sets of 8 x 256 are reused, nothing is generated here). Cost: chapter I's records say
    # Wanda LR ~20 s and SparseGPT LR ~55 s of pruning per cell (one thread), plus ~15 s of perplexity; Wanda
    # x 3 draws = 9 new cells ~ 5 min on an idle core. Measured here under an 8-helper load: ~400 s of wall
    # time per Wanda cell, so SparseGPT's cells (~2.5x Wanda's) did not fit and were not part of the cpu
    # preset then; they were computed in the fifth session of 2026-12-01 on a quieter machine (load 1-3)
    "cpu": CalibPreset(model="smollm2-135m", calib_draws=(("wanda", (0, 1, 2)), ("sparsegpt", (0, 1, 2)))),
    # the paper's calibration budget (128 x 1024 C4-sized sets) on the weights chapter's paper model; not run here
    "paper": CalibPreset(model="facebook/opt-125m", calib_nsamples=128, calib_seqlen=1024),
})


# ------------------------------------------------------------------------------------------------------------
# Training a byte-level LM from scratch on a domain-mixed pool (04f loss reweighting, 04g token crisis)
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScratchPreset(Preset):
    """A tiny decoder trained from scratch on a domain-mixed byte pool (``shrink.selection.scratch``).

    ``scratch_domains`` are byte streams cut into ``block_bytes`` blocks; per domain a seeded permutation
    (``pool_seed``) gives ``val_blocks`` held-out blocks and ``train_blocks`` training blocks; the training
    blocks of all domains are shuffled into one stream. Runs take ``steps`` AdamW steps of
    ``batch_size x seqlen`` windows. 04f: ``strategies`` at temperature ``r`` with ``burn_in`` uniform steps.
    04g: a fixed budget ``steps x batch_size x seqlen`` drawn from ``budget / k`` unique tokens (``k`` epochs)
    with residual dropout ``p``, for every ``(k, p)`` of ``points`` on every seed and of ``one_seed_points``
    on the first seed only.
    """

    scratch_domains: tuple = ("shakespeare", "fortunes", "pydocs", "wikitext2", "lima-responses")
    pool_seed: int = 0
    block_bytes: int = 1024
    train_blocks: int = 64
    val_blocks: int = 2
    seqlen: int = 128
    batch_size: int = 8
    steps: int = 150
    lr: float = 3e-3
    warmup: int = 10
    eval_every: int = 25
    wiki_windows: int = 32
    seeds: tuple = (0, 1, 2)
    strategies: tuple = ("uniform", "linupper", "quadratic", "extremes")
    r: float = 1.0
    burn_in: int = 15
    points: tuple = ((1, 0.0), (1, 0.1), (16, 0.0), (16, 0.1))
    one_seed_points: tuple = ()

    def check(self) -> None:
        if len(self.seeds) < 1 or self.burn_in < 0 or self.burn_in > self.steps:
            raise PresetError("ScratchPreset: needs >= 1 seed and 0 <= burn_in <= steps")
        if self.block_bytes % self.seqlen:
            raise PresetError(f"ScratchPreset.block_bytes={self.block_bytes} must be a multiple of seqlen={self.seqlen}")
        for k, p in (*self.points, *self.one_seed_points):
            if not (isinstance(k, int) and k >= 1):
                raise PresetError(f"ScratchPreset.points: repeats must be integers >= 1 (epochs), got {k!r}")
            if not 0.0 <= p < 1.0:
                raise PresetError(f"ScratchPreset.points: dropout rates must lie in [0, 1), got {p!r}")


_SCRATCH_TINY = ScratchPreset(model="tiny-llama", block_bytes=256, train_blocks=32, val_blocks=1, seqlen=64,
                              batch_size=4, steps=16, lr=3e-3, warmup=2, eval_every=8, wiki_windows=8, seeds=(0, 1),
                              burn_in=4, points=((1, 0.0), (1, 0.1), (16, 0.0), (16, 0.1)),
                              one_seed_points=((4, 0.0),))
register("reweight", {
    "tiny": _SCRATCH_TINY,
    # 4 strategies x 3 seeds x 100 steps of 8 x 128 bytes: ~4 min on one idle core (191 ms/step), ~25 min on
    # the shared 2-core machine (1.25 s/step measured under contention)
    "cpu": ScratchPreset(model="byte-llama", steps=100, eval_every=25, burn_in=10),
    # the paper trains GPT-2 (124M) on SlimPajama's 7 domains for 20k steps of 8 x 512 tokens, burn-in 1000: that
    # needs the online corpus (not wired). "paper" here is the offline pool at the paper's sequence length, 2,000
    # steps and its burn-in fraction (5 %): a GPU-sized run of the same code
    "paper": ScratchPreset(model="byte-llama", seqlen=512, block_bytes=4096, train_blocks=100, val_blocks=8,
                           steps=2000, lr=1e-3, warmup=100, eval_every=200, burn_in=100, wiki_windows=256),
})
register("token-crisis", {
    "tiny": _SCRATCH_TINY,
    # budget 40 x 8 x 128 = 40,960 bytes; 1 and 16 epochs without dropout and 16 epochs with dropout 0.1 on 3
    # seeds, the rest on seed 0: ~1.5 min on one idle core (sized down for a machine shared by 8 jobs, ~3 s/step)
    "cpu": ScratchPreset(model="byte-llama", steps=40, eval_every=20, points=((1, 0.0), (16, 0.0), (16, 0.1)),
                         one_seed_points=((1, 0.1), (4, 0.0), (4, 0.1), (32, 0.0), (32, 0.1))),
    # Xue et al. train T5 models on C4 subsets (online); offline: budget 400 x 8 x 512 = 1.6M bytes of the pool
    "paper": ScratchPreset(model="byte-llama", seqlen=512, block_bytes=4096, train_blocks=100, val_blocks=8,
                           steps=400, lr=1e-3, warmup=40, eval_every=100, wiki_windows=256,
                           points=tuple((k, p) for k in (1, 2, 8, 32) for p in (0.0, 0.1))),
})


# ------------------------------------------------------------------------------------------------------------
# Recovery of a pruned model with selected instruction data (04c PASER, 04d Diversify & Conquer)
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecoveryPreset(Preset):
    """04c/04d (``shrink.selection.recovery``): the instruction pool (``per_source`` examples of every source
    of ``sources`` plus ``heldout`` held-out ones, ``heldout_gsm8k`` for GSM8K), the pruned model
    (``prune_pattern`` at ``prune_sparsity``, Wanda on ``calib_nsamples x calib_seqlen`` WikiText-2 windows —
    the notebook composes it with the weights chapter), the budget (a fraction of the pool), LoRA recovery
    (PASER's r=8, alpha=16, dropout 0.05 on every linear; ``recovery_epochs`` over the selection at
    ``batch_size``), and the evaluation (``eval_windows x eval_seqlen`` WikiText-2 test tokens,
    ``nll_per_source`` held-out responses per source, GSM8K exact match on ``em_n`` held-out problems with
    ``em_new_tokens`` greedy tokens). ``full_seeds``: seeds of the full-pool run (it costs 1/budget times a
    selected run); ``ablation_seeds``: seeds of PASER's component ablation (report-only); ``pattern_methods``:
    the selectors run on every pruning pattern after the first of ``prune_patterns`` (04c's 2:4 section)."""

    sources: tuple = ("lima", "gsm8k", "gpteacher-roleplay", "gpteacher-toolformer", "selfinstruct-seed")
    per_source: int | None = 50
    heldout: int = 8
    heldout_gsm8k: int = 24
    pool_seed: int = 0
    prune_sparsity: float = 0.5
    prune_patterns: tuple = ("unstructured",)
    calib_nsamples: int = 16
    calib_seqlen: int = 256
    budget: float = 0.2
    batch_size: int = 4
    recovery_epochs: int = 1
    lr: float = 3e-4
    warmup: int = 2
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    max_prompt: int = 96
    max_response: int = 64
    eval_seqlen: int = 512
    eval_windows: int = 2
    nll_per_source: int = 8
    em_n: int = 24
    em_new_tokens: int = 64
    encoder: str = "minilm"
    n_clusters: int = 8
    kmq_k: int | None = None
    kmq_ks: tuple = (4, 8, 16)
    iter_rounds: int = 3
    seeds: tuple = (0, 1, 2)
    full_seeds: tuple = (0,)
    ablation_seeds: tuple = (0,)
    method_seeds: tuple = ()
    pattern_methods: tuple = ("random", "paser")

    def seeds_for(self, method: str) -> tuple:
        """The seeds a method is run on: its ``method_seeds`` entry ``(method, seeds)`` if any (``()``: not run
        at this scale), else ``full_seeds`` for the full pool, ``ablation_seeds`` for PASER's ``paser-no-*``
        variants, else ``seeds``."""
        if method in dict(self.method_seeds):
            return tuple(dict(self.method_seeds)[method])
        if method == "full":
            return tuple(self.full_seeds)
        if method.startswith("paser-no-"):
            return tuple(self.ablation_seeds)
        return tuple(self.seeds)

    def check(self) -> None:
        if not 0 < self.budget <= 1:
            raise PresetError(f"RecoveryPreset.budget={self.budget} must be a fraction in (0, 1] (PASER: 0.2)")
        if not self.seeds or not set(self.full_seeds) | set(self.ablation_seeds) <= set(self.seeds):
            raise PresetError("RecoveryPreset.seeds must be non-empty and full_seeds / ablation_seeds subsets of seeds")
        for entry in self.method_seeds:
            if (not isinstance(entry, tuple) or len(entry) != 2 or not isinstance(entry[0], str)
                    or not isinstance(entry[1], tuple) or not set(entry[1]) <= set(self.seeds)):
                raise PresetError(f"RecoveryPreset.method_seeds entry {entry!r}: use (method, seeds) with seeds a "
                                  f"subset of seeds={self.seeds} (() = not run), e.g. ('kmq-iter', (0,)).")
        if self.heldout_gsm8k < self.em_n or self.heldout < self.nll_per_source:
            raise PresetError("RecoveryPreset: em_n <= heldout_gsm8k and nll_per_source <= heldout are needed "
                              "(the evaluation draws from the held-out split)")
        if any(p not in ("unstructured", "2:4") for p in self.prune_patterns):
            raise PresetError(f"RecoveryPreset.prune_patterns={self.prune_patterns}: use 'unstructured' and/or '2:4'")
        from .recovery import METHODS

        bad = [m for m in self.pattern_methods if m not in METHODS]
        if bad:
            raise PresetError(f"RecoveryPreset.pattern_methods {bad}: use methods of {list(METHODS)}, e.g. "
                              "('random', 'paser')")


register("recovery", {
    "tiny": RecoveryPreset(model="tiny-llama", per_source=12, heldout=3, heldout_gsm8k=4, budget=0.25,
                           batch_size=2, calib_nsamples=4, calib_seqlen=64, max_prompt=32, max_response=24,
                           eval_seqlen=64, eval_windows=2, nll_per_source=3, em_n=4, em_new_tokens=8,
                           encoder="tiny-bert", n_clusters=3, kmq_ks=(2, 3), iter_rounds=2, warmup=1,
                           prune_patterns=("unstructured", "2:4"), seeds=(0, 1)),  # 2 seeds: spreads exist, CI time
    # 250 pool examples, budget 50 = 13 LoRA steps of 4 x <=160 tokens per run (~1 min of training + ~35 s of
    # evaluation on one idle core, estimated from the 130 tokens/s of full fine-tuning); 5 selectors x 3 seeds,
    # the ablation (3 variants) and the full pool (63 steps) on seed 0, the iterative kMQ on 3 seeds, and the 2:4
    # model (its own pool scores) with random and PASER on 3 seeds. Measured on the shared 2-core machine at load
    # 1-5 (fifth session of 2026-12-01): a selected run 192-691 s of wall time, the full pool 1652 s, scoring the
    # 2:4 pool 1733 s (04c's time table reads the records).
    "cpu": RecoveryPreset(model="smollm2-135m", prune_patterns=("unstructured", "2:4")),
    # PASER: LLaMA-2-7B, Alpaca-cleaned, budget 20 %, LoRA r=8 on every linear, lr 3e-4 (1e-4 for Alpaca in the
    # official comment), batch 128, 3 epochs, cutoff 256; WikiText-2 at 2048 tokens (all windows)
    "paper": RecoveryPreset(model="meta-llama/Llama-2-7b-hf", sources=("hf:yahma/alpaca-cleaned",), per_source=None,
                            heldout=500, heldout_gsm8k=0, em_n=0, batch_size=128, recovery_epochs=3, lr=1e-4,
                            warmup=10, max_prompt=256, max_response=256, eval_seqlen=2048, eval_windows=None,
                            nll_per_source=200, n_clusters=10, kmq_ks=(256, 512, 1024), full_seeds=(0,)),
})

# The Q-Tuning preset (04e) lives beside its experiment functions; importing it here registers it with the rest.
from . import qtuning_experiment  # noqa: E402,F401
# The downstream preset (04k) lives beside its runner, likewise. The dedup (04j) and speed (04l) presets, which
# build on it, are registered through shrink.scales.PRESET_MODULES (importing them here would be circular).
from . import downstream  # noqa: E402,F401
