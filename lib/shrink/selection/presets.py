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
    # baselines (04c): a smaller pool, because MiniLM embeds ~2 chunks/s on the shared 2-core machine
    baseline_max_per_domain: int | None = 60
    baseline_k: int = 60
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
                       baseline_max_per_domain=20, baseline_k=20, encoder="tiny-bert", n_clusters=8, semdedup_eps=1e-4),
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
    # self-generated sets of 8 x 256 are reused, nothing is generated here). Cost from chapter I's records
    # (one thread, shared machine): Wanda LR ~30 s per cell, SparseGPT LR ~70 s (OBS solve) -> Wanda 3 draws
    # (9 new cells), SparseGPT 2 draws (7 new cells): ~12 min
    "cpu": CalibPreset(model="smollm2-135m", calib_draws=(("wanda", (0, 1, 2)), ("sparsegpt", (0, 1)))),
    # the paper's calibration budget (128 x 1024 C4-sized sets) on the weights chapter's paper model; not run here
    "paper": CalibPreset(model="facebook/opt-125m", calib_nsamples=128, calib_seqlen=1024),
})

