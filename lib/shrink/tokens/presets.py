"""Presets of the tokens chapter per scale (``shrink.scales.get("tokens-encoder", scale)`` ...).

``tokens-encoder`` (03b, 03c): the MiniLM testbed of the paper notes (tokens.md §3.3a): prune once before
block ``prune_at`` (= after block 2 of 6 at cpu), scores from block ``prune_at - 1``, [CLS]/[SEP]
protected, ≥ 150 WikiText-2 test passages of 40-128 WordPiece tokens, cosine of the mean-pooled embedding
to the unpruned one. ``tokens-decoder`` (03a, 03b, 03f): SmolLM2-135M prefill pruned at block ``prune_at``
(FastV's K), windows of ``context`` + ``continuation`` tokens from WikiText-2 test.

``paper``: Zero-TPrune/ToMe on DeiT-S through ``timm`` and FastV/DivPrune on LLaVA-1.5-7B through
``lmms-eval`` need a GPU and downloads; those presets name the models and the command, the CPU code path
is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..scales import Preset, PresetError, register


@dataclass(frozen=True)
class TokensEncoderPreset(Preset):
    """Encoder experiments (MiniLM)."""

    corpus: str = "wikitext2"
    split: str = "test"
    n_sentences: int = 150
    min_tokens: int = 40
    max_tokens: int = 128
    data_seed: int = 0
    prune_at: int = 2
    keeps: tuple = (0.7, 0.5, 0.3)
    seeds: tuple = (0, 1, 2)          # seeds of the random baseline
    wpr_iterations: int = 30
    vhf_range: tuple = (15.0, 60.0)   # VHF head-variance window (variance of N·s_h; MiniLM block 1: 5-95 % = 13-61)
    paper_model: str = "deit_small_patch16_224"
    paper_command: str = ""

    def check(self) -> None:
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise PresetError(f"need 1 <= min_tokens <= max_tokens, got {self.min_tokens}, {self.max_tokens}")
        if not self.keeps or not all(0.0 < k <= 1.0 for k in self.keeps):
            raise PresetError(f"keeps must be ratios in (0, 1], got {self.keeps}")
        if self.n_sentences < 2:
            raise PresetError("n_sentences must be >= 2 (pairwise similarity correlation needs pairs)")
        if not self.seeds:
            raise PresetError("seeds must name at least one seed")


@dataclass(frozen=True)
class TokensDecoderPreset(Preset):
    """Decoder experiments (SmolLM2 prefill)."""

    corpus: str = "wikitext2"
    split: str = "test"
    windows: int = 32
    context: int = 256
    continuation: int = 48
    prune_at: int = 3
    keeps: tuple = (0.5, 0.25)
    seeds: tuple = (0, 1, 2)
    timing_seqlen: int = 1024
    timing_repeats: int = 7
    paper_model: str = "llava-hf/llava-1.5-7b-hf"
    paper_command: str = ""

    def check(self) -> None:
        if self.context < 2 or self.continuation < 1:
            raise PresetError(f"context must be >= 2 and continuation >= 1, got {self.context}, {self.continuation}")
        if not self.keeps or not all(0.0 < k <= 1.0 for k in self.keeps):
            raise PresetError(f"keeps must be ratios in (0, 1], got {self.keeps}")
        if self.timing_repeats < 1:
            raise PresetError("timing_repeats must be >= 1")


_TIMM = ("pip install timm && SHRINK_ONLINE=1 python -c \"from shrink.tokens import vision as V; "
         "m = V.load_vit('deit_small_patch16_224', pretrained=True); "
         "[print(kw, V.evaluate_folder(m, '$SHRINK_IMAGENET', **kw)) for kw in ({}, "
         "dict(method='zero_tprune', keep=0.7, prune_at=(3, 6, 9)), dict(method='cls', keep=0.7, prune_at=(3, 6, 9)), "
         "dict(method='tome', r=13))]\"  # ImageNet-1k val/<wnid>/*.JPEG; accuracy vs GFLOPs (evaluate_folder, "
         "tested on a random-init stand-in in tests/lib/test_tokens_paper.py); the MiniLM path runs on 1000 passages")
_LMMS = ("git clone https://github.com/pkunlp-icler/FastV && (cd FastV/src/transformers && pip install -e .) && "
         "pip install lmms-eval==0.2.4 && python -m lmms_eval --model llava --model_args "
         "pretrained=liuhaotian/llava-v1.5-7b,use_fast_v=True,fast_v_agg_layer=3,fast_v_attention_rank=288 "
         "--tasks gqa,pope,mme --batch_size 1  # FastV K=3 R=50% of 576 visual tokens; DivPrune: "
         "git clone https://github.com/vbdi/divprune and run its lmms-eval scripts at ratio 0.098; GPU only "
         "(not installed here: lmms-eval pulls a CUDA torch). The FastV keys in model_args are FastV's config names "
         "as recalled, unverified: check them against FastV's README before a run")

register("tokens-encoder", {
    "tiny": TokensEncoderPreset(model="tiny-bert", n_sentences=12, min_tokens=24, max_tokens=64, prune_at=1,
                                keeps=(0.7, 0.5), seeds=(0, 1, 2), wpr_iterations=10,
                                vhf_range=(0.0, 1e9)),
    "cpu": TokensEncoderPreset(model="minilm"),
    "paper": TokensEncoderPreset(model="minilm", n_sentences=1000, paper_command=_TIMM),
})

register("tokens-decoder", {
    "tiny": TokensDecoderPreset(model="tiny-llama3", windows=6, context=48, continuation=16, prune_at=1,
                                timing_seqlen=128, timing_repeats=3),
    "cpu": TokensDecoderPreset(model="smollm2-135m"),
    "paper": TokensDecoderPreset(model="smollm2-135m", windows=256, paper_command=_LMMS),
})


# ---- multi-vector retrieval (03i, CRISP analogue) and cluster-then-reconstruct (03j, Expedit) ----------------
@dataclass(frozen=True)
class TokensRetrievalPreset(Preset):
    """Inverse-cloze retrieval with MiniLM token vectors (:mod:`shrink.tokens.retrieval`)."""

    corpus: str = "wikitext2"
    split: str = "test"
    n_docs: int = 1000
    n_queries: int = 400
    max_tokens: int = 128
    query_tokens: tuple = (8, 48)
    data_seed: int = 0
    budgets: tuple = (4, 8, 16, 32)   # vectors kept per document
    seeds: tuple = (0, 1, 2)          # k-means and random seeds
    kmeans_iterations: int = 20
    paper_model: str = "CRISP (Gemma-based encoder, BEIR)"
    paper_command: str = ""

    def check(self) -> None:
        if not 1 <= self.n_queries <= self.n_docs:
            raise PresetError(f"need 1 <= n_queries <= n_docs, got {self.n_queries}, {self.n_docs}")
        if not self.budgets or not all(isinstance(k, int) and k >= 1 for k in self.budgets):
            raise PresetError(f"budgets must be integers >= 1 (vectors per document), got {self.budgets}")
        if len(self.seeds) < 1:
            raise PresetError("seeds must name at least one seed")


@dataclass(frozen=True)
class TokensExpeditPreset(Preset):
    """Expedit-style cluster-then-reconstruct on the encoder (:mod:`shrink.tokens.expedit`)."""

    corpus: str = "wikitext2"
    split: str = "test"
    n_sentences: int = 100
    min_tokens: int = 40
    max_tokens: int = 128
    data_seed: int = 0
    alpha: int = 2                    # main grid: cluster before block alpha (blocks 0..alpha-1 on every token)
    alphas: tuple = (1, 2, 3)         # the alpha sweep (at ratio 0.5)
    ratios: tuple = (0.7, 0.5, 0.3)   # tokens after block alpha / tokens
    iterations: int = 5               # SLIC iterations (Expedit-SAM's n_iters)
    window: int = 5                   # each token sees this many neighbouring centroids (Expedit-SAM: 5); 0 = all
    temperature: float = 0.1          # softmax(-D / tau), D scaled by the tokens' mean squared spread
    knn: int = 5                      # reconstruction neighbours (Expedit: 20 of 28x28 clusters)
    seeds: tuple = (0, 1, 2)          # random-pruning baseline seeds
    paper_model: str = "Segmenter ViT-L/16 (ADE20K)"
    paper_command: str = ""

    def check(self) -> None:
        if not self.ratios or not all(0.0 < r <= 1.0 for r in self.ratios):
            raise PresetError(f"ratios must lie in (0, 1], got {self.ratios}")
        if not self.alphas or min(self.alphas) < 1:
            raise PresetError(f"alphas must be block indices >= 1, got {self.alphas}")
        if self.iterations < 1 or self.window < 0 or self.knn < 1 or self.temperature <= 0:
            raise PresetError("iterations and knn must be >= 1, window >= 0 (0 = all clusters), temperature > 0")


_CRISP = ("not run: CRISP trains a Gemma-based multi-vector encoder on BEIR (no code released); the cpu path "
          "is post-hoc reduction of a frozen encoder")
_EXPEDIT = ("git clone https://github.com/Expedit-LargeScale-Vision-Transformer/Expedit-Segmenter && "
            "python tools/test.py configs/segmenter/... --eval mIoU  # alpha=10, 28x28; GPU + ADE20K")

register("tokens-retrieval", {
    "tiny": TokensRetrievalPreset(model="tiny-bert", n_docs=40, n_queries=16, max_tokens=96,
                                  query_tokens=(20, 200), budgets=(4, 8), seeds=(0, 1, 2), kmeans_iterations=5),
    "cpu": TokensRetrievalPreset(model="minilm"),
    "paper": TokensRetrievalPreset(model="minilm", n_docs=1500, n_queries=1000, paper_command=_CRISP),
})

register("tokens-expedit", {
    "tiny": TokensExpeditPreset(model="tiny-bert", n_sentences=8, min_tokens=24, max_tokens=64, alpha=1,
                                alphas=(1,), ratios=(0.7, 0.5), knn=3),
    "cpu": TokensExpeditPreset(model="minilm"),
    "paper": TokensExpeditPreset(model="minilm", n_sentences=1000, paper_command=_EXPEDIT),
})


@dataclass(frozen=True)
class TokensKVPreset(Preset):
    """KV-cache eviction (03g): ``windows`` WikiText-2 test windows of ``length`` tokens; the first ``prefill``
    run as a prompt with the full cache, the rest decoded with the cache evicted to each of ``budgets``."""

    corpus: str = "wikitext2"
    split: str = "test"
    windows: int = 32
    length: int = 512
    prefill: int = 480                # 31 decoded tokens per window (the CPU budget: decoding dominates)
    budgets: tuple = (64, 128, 256)
    sink: int = 4                     # StreamingLLM's attention sinks
    heavy_share: float = 0.5          # H2O: heavy hitters = share x budget, the rest recent (heavy_ratio = recent_ratio)
    random_budgets: tuple = (128,)    # budgets of the random-eviction baseline (on every seed)
    seeds: tuple = (0, 1, 2)
    chunk: int = 8                    # windows per result record
    paper_command: str = ""

    def check(self) -> None:
        if not 2 <= self.prefill < self.length - 1:
            raise PresetError(f"need 2 <= prefill < length - 1, got prefill={self.prefill}, length={self.length}")
        if not self.budgets or not all(isinstance(b, int) and self.sink < b for b in self.budgets):
            raise PresetError(f"budgets must be integers above sink={self.sink}, got {self.budgets}")
        if not set(self.random_budgets) <= set(self.budgets):
            raise PresetError(f"random_budgets {self.random_budgets} must be among budgets {self.budgets}")
        if not 0.0 <= self.heavy_share < 1.0:
            raise PresetError(f"heavy_share must lie in [0, 1), got {self.heavy_share}")
        if not self.seeds or self.chunk < 1:
            raise PresetError("seeds must name at least one seed and chunk must be >= 1")


_H2O = ("git clone https://github.com/FMInference/H2O && cd H2O/h2o_hf && bash scripts/streaming/eval.sh h2o  "
        "# LLaMA-7B / OPT, GPU; the cpu path here is the same policy on SmolLM2")

register("tokens-kv", {
    "tiny": TokensKVPreset(model="tiny-llama3", windows=4, length=96, prefill=64, budgets=(16, 32),
                           random_budgets=(16,), chunk=2),
    "cpu": TokensKVPreset(model="smollm2-135m"),
    "paper": TokensKVPreset(model="smollm2-135m", windows=128, length=1024, prefill=896, budgets=(64, 128, 256, 512),
                            random_budgets=(128, 256), paper_command=_H2O),
})


@dataclass(frozen=True)
class TokensBudgetPreset(Preset):
    """Learned budgets (03h). Search (VFlowOpt-style) on ``search_windows`` WikiText-2 *validation* windows,
    evaluation of the continuation NLL on ``eval_windows`` *test* windows (``context`` + ``continuation``);
    ATP-style thresholds trained on MiniLM passages of the validation split, evaluated on test passages."""

    corpus: str = "wikitext2"
    search_split: str = "validation"
    eval_split: str = "test"
    search_windows: int = 4
    eval_windows: int = 32
    context: int = 256
    continuation: int = 48
    layers: tuple = (3, 9)            # progressive pruning points (blocks); the last ratio is solved
    target: float = 0.5               # mean kept fraction over all blocks
    hand_first: float = 0.6           # the hand-set two-point schedule's first ratio (the second is solved)
    n_trials: int = 10
    search_seeds: tuple = (0, 1, 2)
    method: str = "last"
    # ATP on the encoder
    encoder: str = "minilm"
    train_passages: int = 256
    test_passages: int = 150
    min_tokens: int = 40
    max_tokens: int = 128
    atp_layers: tuple = (2, 3, 4)     # blocks before which tokens are dropped
    atp_target: float = 0.6           # mean kept fraction over all blocks
    atp_steps: int = 100
    atp_batch: int = 8
    atp_lr: float = 1e-2
    atp_theta0: float = -1.0          # initial threshold (pilot: from 0 the budget term dominated, cos 0.54)
    atp_tau: float = 4.0
    atp_lambda: float = 20.0
    atp_hidden: int = 16
    atp_seeds: tuple = (0, 1, 2)
    paper_command: str = ""

    def check(self) -> None:
        if not 0.0 < self.target < 1.0 or not 0.0 < self.atp_target < 1.0:
            raise PresetError(f"targets must lie in (0, 1), got {self.target}, {self.atp_target}")
        if list(self.layers) != sorted(set(self.layers)) or list(self.atp_layers) != sorted(set(self.atp_layers)):
            raise PresetError(f"layers must be strictly increasing, got {self.layers}, {self.atp_layers}")
        if self.n_trials < 1 or self.atp_steps < 1 or not self.search_seeds or not self.atp_seeds:
            raise PresetError("n_trials, atp_steps must be >= 1 and the seed lists non-empty")


_VFLOW = ("git clone https://github.com/sihany077/VFlowOpt  # LLaVA-OneVision-7B + lmms-eval 0.2.4, GPU; "
          "ATP-LLaVA has no official code")

register("tokens-budget", {
    "tiny": TokensBudgetPreset(model="tiny-llama3", encoder="tiny-bert", search_windows=2, eval_windows=4, context=48,
                               continuation=16, layers=(1,), target=0.75, n_trials=3, train_passages=16,
                               test_passages=12, min_tokens=24, max_tokens=64, atp_layers=(1,), atp_target=0.75,
                               atp_steps=6, atp_batch=4),
    # cpu sizing (pilot build/tokh_pilot.py at load ~2, then the records at load 5-7 on 2 cores, 1 thread):
    # 3 searches x 30 trials x 4 windows 182-219 s each, 6 schedules x 32 test windows 100-205 s each, ATP
    # 3 seeds x 80 steps on 128 passages 187-225 s each: ~33 min of records at load 5-7, ~12 min on an idle core.
    # n_trials 30: TPE's first 10 trials are its random start-up (Optuna's n_startup_trials), 20 are modelled
    "cpu": TokensBudgetPreset(model="smollm2-135m", n_trials=30, train_passages=128, atp_steps=80),
    "paper": TokensBudgetPreset(model="smollm2-135m", search_windows=32, eval_windows=256, n_trials=100,
                                paper_command=_VFLOW),
})
