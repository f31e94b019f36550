"""Presets of the weights chapter (notebooks/01-weights), one per experiment and scale.

``paper`` follows "Rethinking Pruning LLMs" App. A and the official configs: C4 shard 0, 256 x 1024-token
calibration windows, seed 0, AdamW lr 2e-4 (linear decay), betas (0.9, 0.95), batch 8, **10 epochs** (the paper;
the official LLaMA config says 5), evaluation at 2048 tokens on all of WikiText-2 test; OPT-125M (Table 3)
and LLaMA-7B (Table 1). ``cpu``: SmolLM2-135M with the offline WikiText-2 validation text as calibration
data and the raw test split held out, budgets sized for a shared 2-core CPU (stated in each notebook).
``tiny``: random tiny models, invariants only.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..scales import Preset, PresetError, register
from .sequential import PRUNERS, SCHEMES


@dataclass(frozen=True)
class PruningPreset(Preset):
    """Knobs of the chapter's experiments (unused knobs are ignored by a notebook)."""

    calib_corpus: str = "wikitext2"
    calib_split: str = "validation"
    calib_nsamples: int = 16
    calib_seqlen: int = 256
    heldout_corpus: str = "wikitext2"
    heldout_split: str = "test"
    heldout_nsamples: int = 8           # windows for the held-out reconstruction error
    heldout_seqlen: int = 256
    eval_seqlen: int = 512              # perplexity windows (the one perplexity function)
    eval_windows: int | None = 8
    eval2_corpus: str | None = "pydocs"  # second held-out corpus for perplexity
    eval2_split: str = "all"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    pruners: tuple = PRUNERS
    schemes: tuple = ("LR", "BR", "BR+GP")   # the seeds x pruners x schemes grid
    cr_pruners: tuple = PRUNERS         # BR+GP+CR (costs ~2x BR+GP) runs for these, first seed only
    patterns: tuple = ("unstructured", "2:4", "4:8")
    sweep_sparsities: tuple = (0.3, 0.5, 0.7)
    sweep_pruners: tuple = PRUNERS
    epochs: int = 10
    batch_size: int = 8
    lr: float = 2e-4
    seeds: tuple = (0,)
    # overfitting (01c): (calibration windows, epochs) pairs, and a batch size for them
    budgets: tuple = ((4, 20), (16, 5))
    budget_batch_size: int = 1
    # self-generated data (01d)
    selfgen_sizes: tuple = (0, 16, 32)
    selfgen_seqlen: int = 256
    selfgen_min_alpha: float = 0.8      # offline language filter (0 = off; random tiny models need 0)
    zero_shot: bool = False
    # replicas under other kernel sets (issue 9 §2; experiment.KERNEL_SETS): (kernel set, pruner, scheme, seed)
    replicas: tuple = ()

    def check(self) -> None:
        bad = ([p for p in (*self.pruners, *self.cr_pruners) if p not in PRUNERS]
               + [s for s in self.schemes if s not in SCHEMES])
        if bad:
            raise PresetError(f"unknown pruners/schemes {bad}; pruners {PRUNERS}, schemes {SCHEMES}")
        from .experiment import KERNEL_SETS

        bad_rep = [r for r in self.replicas if len(r) != 4 or r[0] not in KERNEL_SETS or r[1] not in PRUNERS
                   or r[2] not in SCHEMES or r[3] not in self.seeds]
        if bad_rep:
            raise PresetError(f"replicas {bad_rep}: each is (kernel set, pruner, scheme, seed) with a kernel set "
                              f"of experiment.KERNEL_SETS {sorted(KERNEL_SETS)} and a seed of seeds {self.seeds}")
        if self.lr <= 0 or not self.seeds:
            raise PresetError("lr must be > 0 and seeds non-empty")
        from .masks import PruningError, parse_pattern

        for field_name, pats in (("pattern", (self.pattern,)), ("patterns", self.patterns)):
            for pat in pats:
                try:
                    parse_pattern(pat, self.sparsity)
                except PruningError as exc:
                    raise PresetError(f"{type(self).__name__}.{field_name}: {exc}") from None
        for s in self.sweep_sparsities:
            if isinstance(s, (str, bool)) or not 0.0 <= float(s) < 1.0:
                raise PresetError(f"{type(self).__name__}.sweep_sparsities must be fractions in [0, 1), got {s!r}")


_TINY = dict(model="tiny-llama", sweep_sparsities=(0.3, 0.5, 0.7), calib_corpus="shakespeare", calib_split="all", calib_nsamples=8, calib_seqlen=64,
             heldout_corpus="fortunes", heldout_split="all", heldout_nsamples=4, heldout_seqlen=64,
             eval_seqlen=64, eval_windows=4, eval2_corpus=None, epochs=2, batch_size=2, lr=1e-3, seeds=(0,),
             budgets=((2, 4), (8, 1)), budget_batch_size=1, selfgen_sizes=(0, 4), selfgen_seqlen=64,
             selfgen_min_alpha=0.0)
# cpu budget shared by the notebooks (so records are shared): SmolLM2-135M, 8 x 256 WikiText-2 validation
# tokens, 4 x 256 held-out error windows from the end of WikiText-2 test, perplexity on the first 4 x 512 test
# tokens and on the first 4 x 512 tokens of the second held-out corpus (CPython docs, out of domain); reconstruction 2 epochs x batch 2 (8 Adam steps per block) at lr 1e-3 -- sized for a shared 2-core
# CPU (the paper: 320 steps per block at lr 2e-4)
_CPU = dict(model="smollm2-135m", calib_nsamples=8, calib_seqlen=256, heldout_nsamples=4, heldout_seqlen=256,
            eval_seqlen=512, eval_windows=4, eval2_corpus="pydocs", eval2_split="all", epochs=2, batch_size=2, lr=1e-3)
_PAPER_OPT = dict(model="facebook/opt-125m", calib_corpus="c4", calib_split="train", calib_nsamples=256,
                  calib_seqlen=1024, heldout_corpus="wikitext2", heldout_split="test", heldout_nsamples=64,
                  heldout_seqlen=1024, eval_seqlen=2048, eval_windows=None, eval2_corpus="c4",
                  eval2_split="validation", epochs=10, batch_size=8, lr=2e-4, seeds=(0,), zero_shot=True,
                  budgets=((32, 80), (256, 10)), budget_batch_size=8, selfgen_sizes=(0, 256, 512, 1024),
                  selfgen_seqlen=1024)

# 01a: LR baselines (Tables 1/3 LR rows; SparseGPT/Wanda tables' layout)
register("pruning-baselines", {
    "tiny": PruningPreset(**_TINY),
    "cpu": PruningPreset(**_CPU, patterns=("unstructured", "2:4", "4:8"), sweep_sparsities=(0.5, 0.7),
                         sweep_pruners=("magnitude", "wanda"), seeds=(0,)),
    "paper": PruningPreset(**_PAPER_OPT),
})

# 01b: LR -> BR -> BR+GP -> BR+GP+CR (Tables 1/3, Fig. 3/5/6). Its own cpu budget, the weights pilot's
# `default` profile (shared/papers/weights.md 4.1.1/4.1.4): 16 x 256 calibration windows, the paper's lr 2e-4
# (AdamW, linear decay, betas 0.9/0.95), batch 2, 5 epochs = 40 Adam steps per block. The shared `_CPU` budget
# (8 windows, 8 steps at lr 1e-3) overfits SparseGPT's BR+GP and barely moves magnitude's BR error. Held-out
# and perplexity settings are `_CPU`'s, so the LR rows are comparable with 01a's (not shared: other windows).
# Three seeds (calibration windows and batch order) for the LR/BR/BR+GP grid; BR+GP+CR for Wanda and SparseGPT,
# seed 0 only (about 10 min each on one core).
_CPU_RECON = {**_CPU, "calib_nsamples": 16, "epochs": 5, "batch_size": 2, "lr": 2e-4}
# Replicas (issue 9 §2; experiment.replica): cells of the grid recomputed under another kernel set, each its
# own record beside the original. Measured on a shared 2-core machine where one LR replica took 15-20 min of
# wall time (ATen's scalar kernels are slower), so only the cells listed here were replicated.
_REPLICAS = (("default-1t", "sparsegpt", "LR", 0), ("default-1t", "sparsegpt", "LR", 1))
register("pruning-reconstruction", {
    "tiny": PruningPreset(**_TINY, replicas=(("default-1t", "wanda", "LR", 0),)),
    "cpu": PruningPreset(**_CPU_RECON, seeds=(0, 1, 2), cr_pruners=("wanda", "sparsegpt"), replicas=_REPLICAS),
    "paper": PruningPreset(**_PAPER_OPT),
})

# 01c: overfitting (Tables 2/4) -- calibration vs held-out error under budgets
register("pruning-overfitting", {
    "tiny": PruningPreset(**_TINY),
    "cpu": PruningPreset(**_CPU, pruners=("wanda",), schemes=("LR", "BR", "BR+GP"), budgets=((2, 8), (8, 2)),
                         budget_batch_size=1, seeds=(0, 1, 2)),
    "paper": PruningPreset(**{**_PAPER_OPT, "model": "huggyllama/llama-7b"}),
})

# 01d: self-generated calibration data (Fig. 1b/4/7, App. C)
register("pruning-selfgen", {
    "tiny": PruningPreset(**_TINY),
    "cpu": PruningPreset(**{**_CPU, "epochs": 1}, pruners=("wanda",), selfgen_sizes=(0, 8), selfgen_seqlen=256,
                         seeds=(0, 1, 2)),
    "paper": PruningPreset(**{**_PAPER_OPT, "model": "huggyllama/llama-7b"}),
})

# 01e: attention-only vs FFN-only vs all (Table 7), time/memory per scheme (Table 6)
register("pruning-where", {
    "tiny": PruningPreset(**_TINY),
    "cpu": PruningPreset(**_CPU, pruners=("sparsegpt",), schemes=("LR",), seeds=(0,)),
    "paper": PruningPreset(**_PAPER_OPT),
})

# 01f / 01g (sparse-training zoo; one-shot vs pruning while training): presets registered by their module
from . import sparse_experiments  # noqa: E402,F401

# 01h (fine-tuning with sparsity on SmolLM2: one-shot + recovery vs GMP during the run): registered by its module
from . import recovery  # noqa: E402,F401
