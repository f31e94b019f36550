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


_TIMM = ("NOT IMPLEMENTED YET: Zero-TPrune/ToMe on timm deit_small_patch16_224 over ImageNet-1k validation "
         "(needs a GPU, the timm weights and the dataset); the paper scale runs the MiniLM path on 1000 passages")
_LMMS = ("pip install lmms-eval==0.2.4 && python -m lmms_eval --model llava --model_args "
         "pretrained=liuhaotian/llava-v1.5-7b --tasks gqa,pope,mme --batch_size 1  # FastV K=3 R=50%; GPU only")

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
