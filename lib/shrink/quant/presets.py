"""Quantizer presets (conventions of SmoothQuant's code and paper, QLLM-Eval, CushionCache) and the
bits chapter's experiment presets per scale.

Quantizer conventions (bits.md §2.1-2.2, §1.6):

=========================  ======================================  =====================================
preset                     weights                                 activations
=========================  ======================================  =====================================
``smoothquant_code``       sym abs-max per output channel          sym, dynamic per-token or per-tensor
``smoothquant_level`` O1   sym per-tensor (SmoothQuant Table 2)    sym per-token dynamic
``smoothquant_level`` O2   sym per-tensor                          sym per-tensor dynamic
``smoothquant_level`` O3   sym per-tensor                          sym per-tensor static
``qllm_eval``              sym group-wise (``w_group_size``)       asym (zero point) per-token/-tensor dyn
``cushioncache_paper``     sym group-wise ("TF default")           asym; static / dynamic / per-token
=========================  ======================================  =====================================

CushionCache pairs per-tensor static / per-tensor dynamic / per-token dynamic with SmoothQuant O3 / O2 / O1
and its own quantizer setup (not SmoothQuant's per-tensor weights), alpha = 0.8 for all models; the
weight group size is not given (ours: 128 at paper scale; 64 on SmolLM2 whose widths 576/1536 are not
multiples of 128; 32 on the tiny models).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..scales import Preset, PresetError, register
from .quantizer import QuantError, QuantSpec

ACT_MODES = ("static", "dynamic", "token")


def _act(mode: str, bits: int, symmetric: bool, clip_top: float = 0.0) -> QuantSpec:
    if mode not in ACT_MODES:
        raise QuantError(f"activation mode must be one of {ACT_MODES} (per-tensor static, per-tensor dynamic, "
                         f"per-token dynamic), got {mode!r}")
    if mode == "token":
        return QuantSpec(bits, symmetric, "token")
    return QuantSpec(bits, symmetric, "tensor", static=(mode == "static"), clip_top=clip_top)


def smoothquant_code(act: str = "token", bits: int = 8) -> tuple[QuantSpec, QuantSpec]:
    """SmoothQuant ``fake_quant.py``: W sym per-channel abs-max, A sym dynamic (``act``: token|dynamic)."""
    if act == "static":
        raise QuantError("SmoothQuant's fake-quant code has no static path (only its real-INT8 OPT code); use "
                         "smoothquant_level('O3') or cushioncache_paper('static')")
    return QuantSpec(bits, True, "channel"), _act(act, bits, True)


def smoothquant_level(level: str, bits: int = 8, clip_top: float = 0.0) -> tuple[QuantSpec, QuantSpec]:
    """SmoothQuant paper Table 2: O1/O2/O3 = per-token dynamic / per-tensor dynamic / per-tensor static
    activations, per-tensor symmetric weights."""
    modes = {"O1": "token", "O2": "dynamic", "O3": "static"}
    if level not in modes:
        raise QuantError(f"SmoothQuant level must be O1, O2 or O3, got {level!r}")
    return QuantSpec(bits, True, "tensor"), _act(modes[level], bits, True, clip_top)


def qllm_eval(act: str = "token", bits: int = 8, w_bits: int | None = None,
              w_group_size: int = 128) -> tuple[QuantSpec, QuantSpec]:
    """QLLM-Eval (``quant_funcs.py``): W sym group-wise, A asym (zero point) dynamic per-token or per-tensor."""
    if act == "static":
        raise QuantError("QLLM-Eval has no static activation path (CushionCache added the calibration); "
                         "use cushioncache_paper('static')")
    return QuantSpec(w_bits or bits, True, "group", w_group_size), _act(act, bits, False)


def cushioncache_paper(act: str = "static", bits: int = 8, w_bits: int | None = None, w_group_size: int = 128,
                       clip_top: float = 0.0) -> tuple[QuantSpec, QuantSpec]:
    """CushionCache Sec. 5: W sym group-wise, A asym; ``act`` = static (per-tensor, calibrated) | dynamic
    (per-tensor) | token (per-token dynamic). Static ranges exclude prefix positions (by construction)."""
    return QuantSpec(w_bits or bits, True, "group", w_group_size), _act(act, bits, False, clip_top)


@dataclass(frozen=True)
class BitsPreset(Preset):
    """All knobs of the bits chapter (notebooks 02a-02f). Windows are the *first* ``windows`` windows of the
    evaluation stream (deterministic); calibration and search texts come from the seeded sampler."""

    eval_corpus: str = "wikitext2"
    eval_split: str = "test"
    seqlen: int = 512
    windows: int | None = 4
    calib_corpus: str = "wikitext2"
    calib_split: str = "validation"
    calib_nsamples: int = 8
    calib_seqlen: int = 512
    w_group_size: int = 64
    alpha: float = 0.8
    alphas: tuple = (0.5, 0.8, 0.85)
    clip_top: float = 0.02
    probe_seqlen: int = 512
    probe_nsamples: int = 2
    # stage 1
    search_corpus: str = "wikitext2"
    search_split: str = "validation"
    search_nsamples: int = 4
    search_seqlen: int = 96
    shortlist_k: int | None = 32  # None = the full vocabulary (paper)
    tau: float = 0.5
    max_len: int = 4
    search_batch_size: int = 16
    prerank_top: int = 0
    init_tokens: tuple = ()  # the paper's non-empty initial prompt heuristic (e.g. BOS); ids of the model's tokenizer
    # stage 2
    tune_steps: int = 16
    tune_lr: float = 1e-3
    tune_batch_size: int = 2
    tune_seqlen: int = 256
    tune_nsamples: int = 16
    tune_val_nsamples: int = 4
    lambda_q: float = 0.01
    low_bits: tuple = (6, 4)
    # noise probes (issue 9): range perturbations 1 + eps*u (shrink.quant.perturb_ranges), calibration draws
    perturb_eps: float = 1e-6
    perturb_seeds: tuple = (0, 1, 2)
    calib_seeds: tuple = (0,)        # one seed: calibration-draw spread not measured (cpu budget); e.g. (0, 1, 2)
    spread_low_bits: tuple = ()      # 02f: bit widths whose SmoothQuant-O1 rows are measured under perturbations

    def check(self) -> None:
        if not 0.0 < self.tau <= 1.0:
            raise PresetError(f"tau must be in (0, 1], got {self.tau}")
        if not 0.0 <= self.clip_top < 1.0:
            raise PresetError(f"clip_top must be in [0, 1), got {self.clip_top}")
        if any(not 0.0 <= a <= 1.0 for a in (self.alpha, *self.alphas)):
            raise PresetError("SmoothQuant alphas must lie in [0, 1]")
        if self.max_len < 1:
            raise PresetError(f"max_len must be >= 1, got {self.max_len}")
        if not 0.0 <= self.perturb_eps < 0.5:
            raise PresetError(f"perturb_eps is a relative range change in [0, 0.5) (1e-6: float noise), "
                              f"got {self.perturb_eps}")
        if not self.perturb_seeds or not self.calib_seeds:
            raise PresetError("perturb_seeds and calib_seeds need at least one seed each, e.g. (0, 1, 2)")

    def specs(self, act: str, bits: int = 8) -> tuple[QuantSpec, QuantSpec]:
        """The chapter's default quantizers (:func:`cushioncache_paper` with this preset's group size)."""
        return cushioncache_paper(act, bits, w_group_size=self.w_group_size)


#: the paper's models (Table 1 columns run here; BLOOM-7B has no adapter in shrink.models)
PAPER_MODELS = ("meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B", "mistralai/Mistral-7B-v0.1",
                "facebook/opt-6.7b")

_PAPER = BitsPreset(
    model="meta-llama/Llama-2-7b-hf", seqlen=2048, windows=None, calib_corpus="wikitext2", calib_split="train",
    calib_nsamples=64, calib_seqlen=2048, w_group_size=128, alpha=0.8, probe_seqlen=4096, probe_nsamples=10,
    search_corpus="c4", search_split="train", search_nsamples=8, search_seqlen=512, shortlist_k=None,
    max_len=8, search_batch_size=256, tune_steps=128, tune_batch_size=8, tune_seqlen=512, tune_nsamples=512,
    tune_val_nsamples=32)


def paper_preset(model: str) -> BitsPreset:
    """The paper-scale preset for one of :data:`PAPER_MODELS` (same settings, that model)."""
    if model not in PAPER_MODELS:
        raise PresetError(f"{model!r} is not one of the paper's models {PAPER_MODELS}")
    return _PAPER.with_(model=model)


register("bits", {
    "tiny": BitsPreset(model="tiny-llama", seqlen=64, windows=4, calib_nsamples=4, calib_seqlen=64, w_group_size=32,
                       probe_seqlen=64, probe_nsamples=2, search_nsamples=2, search_seqlen=24, shortlist_k=12,
                       max_len=3, search_batch_size=6, prerank_top=4, init_tokens=(256,), tune_steps=3,
                       tune_seqlen=32, tune_nsamples=4,
                       tune_val_nsamples=2, tune_lr=1e-2, perturb_seeds=(0, 1), calib_seeds=(0, 1), spread_low_bits=(4,)),
    "cpu": BitsPreset(model="smollm2-135m"),
    "paper": _PAPER,
})


# ---- weight-only quantization (notebook 02g, issue 15) ---------------------------------------------------------
def _weight_only_presets() -> None:
    from .weightonly import WeightOnlyPreset

    register("weight-only", {
        "tiny": WeightOnlyPreset(model="tiny-llama", seqlen=64, windows=4, ood_corpus="pydocs", calib_nsamples=4,
                                 calib_seqlen=64, bits=(4, 3), grids=("channel", "g32"), calib_seeds=(0, 1),
                                 seeded_cells=((3, "channel"),)),
        # cpu: RTN on 4 bit widths x 3 grids (g32 = the GGUF file's own block size; 128 does not divide 576, so g64
        # stands in for g128); GPTQ per-channel only, 3-bit (the finding) on three calibration draws, 8-, 4- and
        # 2-bit on one (a GPTQ cell took 8-24 min of one thread on the loaded shared machine; ~2-3 min idle)
        "cpu": WeightOnlyPreset(model="smollm2-135m", bits=(8, 4, 3, 2), grids=("channel", "g64", "g32"),
                                seeded_cells=((3, "channel"),), gptq_grids=("channel",)),
        "paper": WeightOnlyPreset(zero_shot=True, model="meta-llama/Llama-2-7b-hf", seqlen=2048, windows=None, ood_corpus="c4",
                                  ood_split="validation", calib_corpus="c4", calib_split="train", calib_nsamples=128,
                                  calib_seqlen=2048, bits=(4, 3), grids=("channel", "g128"),
                                  seeded_cells=((3, "channel"), (4, "channel"), (3, "g128"))),
    })


_weight_only_presets()


# ---- RSQ: token-weighted GPTQ with rotation (notebook 02h, issue 15) -------------------------------------------
def _rsq_presets() -> None:
    from .rsq import RSQPreset

    register("rsq", {
        "tiny": RSQPreset(model="tiny-llama", seqlen=64, windows=4, calib_nsamples=4, calib_seqlen=64, bits=(3,),
                          grids=("channel",), calib_seeds=(0, 1, 2), seeded_cells=((3, "channel"),),
                          cross_seeds=(0,)),
        # cpu: 3-bit per channel, 8 x 256 calibration tokens per draw (02g: 16 x 512), 4 WikiText-2 test windows of
        # 512, no second corpus. uniform (GPTQ) and attncon unrotated on 3 draws, rotated on the first; the firstn
        # heuristic unrotated on the first draw; cross-question on one draw. Pilot: ~70 s of one idle core per
        # cell (stats ~18 s, GPTQ sweep ~22 s, perplexity ~17 s), 11 cells + 3 dense controls ~ 14 min
        "cpu": RSQPreset(model="smollm2-135m", seqlen=512, windows=4, calib_nsamples=8, calib_seqlen=256, bits=(3,),
                         grids=("channel",), seeded_cells=((3, "channel"),), with_ood=False,
                         strategies=("uniform", "attncon", "firstn"), rotated_strategies=("uniform", "attncon"),
                         seeded_strategies=("uniform", "attncon"), seeded_rotations=("none",), cross_seeds=(0,)),
        # paper: RSQ scripts/run_rsq.sh (3-bit, rotation, 256 x 4096 calibration tokens, 3 seeds; min 0.005 max 1),
        # here on WikiText-2 with LLaMA-3-8B (LLaMA-2-7B: paper_preset-style .with_(model=...))
        "paper": RSQPreset(zero_shot=True, model="meta-llama/Meta-Llama-3-8B", seqlen=2048, windows=None, ood_corpus="c4",
                           ood_split="validation", calib_corpus="wikitext2", calib_split="train", calib_nsamples=256,
                           calib_seqlen=4096, bits=(3, 4), grids=("channel", "g128"),
                           seeded_cells=((3, "channel"),), rsq_grid="channel", cross_seeds=(0, 1, 2)),
    })


_rsq_presets()


# ---- FlexRound (notebook 02j, issue 15) ----------------------------------------------------------------------
def _flexround_presets() -> None:
    from .flexround_exp import FlexRoundPreset

    register("flexround", {
        "tiny": FlexRoundPreset(model="tiny-llama", calib_nsamples=4, calib_seqlen=64, calib_seeds=(0, 1),
                                heldout_nsamples=2, heldout_seqlen=64, steps=4, eval_at=(0, 2, 4),
                                budgets=(0, 1, 4), seeded_bits=(3,)),
        # cpu: 8 x 256 calibration tokens (02g's GPTQ had 16 x 512), batch 1, 8 Adam steps per block at lr 1e-2
        # (the official 5 000 steps at 2.5e-3 do not fit a CPU). Pilot (first 4 blocks, W3, seed 0, 8 steps): lr
        # 2.5e-3 left the 4th block's held-out block MSE at 2.22, 1e-2 at 1.55, 3e-2 diverged (5.95). Block MSE
        # logged at steps 0 and 8 only (each evaluation costs about 4 training steps); budget sweep at W3 on seed 0.
        # A cell took 325-820 s of wall clock on the shared machine (load 9-10; 3.6 min of one core for the first)
        "cpu": FlexRoundPreset(model="smollm2-135m", eval_at=(0, 8), budgets=(0, 2, 8)),
        # the official Llama-2-7B W3A16 script: 512 C4 samples (1024 tokens: run_clm.py's default block size),
        # batch 2, 5 000 Adam steps per block at lr 2.5e-3 (3e-3 at W4), cosine to 0
        "paper": FlexRoundPreset(zero_shot=True, model="meta-llama/Llama-2-7b-hf", calib_corpus="c4", calib_split="train",
                                 calib_nsamples=512, calib_seqlen=1024, heldout_nsamples=16, heldout_seqlen=1024,
                                 steps=5000, batch_size=2, lr=2.5e-3, eval_at=(0, 500, 1000, 2500, 5000),
                                 budgets=(0, 500, 5000)),
    })


_flexround_presets()


# ---- PB-LLM: partial binarization (notebook 02i, issue 15) ---------------------------------------------------
def _pbllm_presets() -> None:
    from .pbllm_experiment import PBLLMPreset

    register("pbllm", {
        "tiny": PBLLMPreset(model="tiny-llama", seqlen=64, windows=4, calib_nsamples=4, calib_seqlen=64,
                            fracs=(0.05, 0.5), magnitude_fracs=(0.5,), direct_fracs=(0.05, 0.5), calib_seeds=(0, 1)),
        # cpu: 8 x 256 calibration tokens per draw (02g: 16 x 512), the 4 WikiText-2 test windows of 512 of 02g,
        # no second corpus; GPTQ-PB with the Hessian criterion at 3 fractions and with the magnitude criterion at
        # 0.1, each on 3 calibration draws; direct rounding (magnitude, no data) at every fraction
        "cpu": PBLLMPreset(model="smollm2-135m"),
        # paper: the official run_all.sh (LLaMA-7B, C4 calibration, 128 x 2048 tokens, --low_frac 0.5-0.95 i.e.
        # salient 0.05-0.5, --high_bit 8, Hessian criterion), on LLaMA-2-7B here (LLaMA-3-8B: .with_(model=...))
        "paper": PBLLMPreset(zero_shot=True, model="meta-llama/Llama-2-7b-hf", seqlen=2048, windows=None, calib_corpus="c4",
                             calib_split="train", calib_nsamples=128, calib_seqlen=2048,
                             fracs=(0.05, 0.1, 0.2, 0.5), magnitude_fracs=(0.1, 0.2), direct_fracs=(0.1,)),
    })


_pbllm_presets()


# ---- EoRA compensation of GPTQ / PB-LLM outputs (notebook 02k, issue 15) -------------------------------------
def _eora_presets() -> None:
    from .compensate_experiment import EoRAPreset

    register("eora", {
        "tiny": EoRAPreset(model="tiny-llama", seqlen=64, windows=4, calib_nsamples=4, calib_seqlen=64, ranks=(2, 8),
                           calib_seeds=(0, 1)),
        # cpu: evaluation and calibration as 02i; 3-bit GPTQ and 10 % GPTQ-PB bases, 3 draws, rank 32 only (rank 8 at
        # tiny): 6 base quantizations + 6 base and 12 adapter evaluations, ~15 min of one idle core
        "cpu": EoRAPreset(model="smollm2-135m", ranks=(32,)),
        # paper: the official EoRA/README.md LLaMA-3-8B 3-bit GPTQ run (--eigen_r 128, --eigen_nsamples 64; rank 64 in
        # its kernel benchmark); calibration on C4 here (the README calibrates on the task, MathQA)
        "paper": EoRAPreset(zero_shot=True, model="meta-llama/Meta-Llama-3-8B", seqlen=2048, windows=None, calib_corpus="c4",
                            calib_split="train", calib_nsamples=64, calib_seqlen=2048, ranks=(64, 128)),
    })


_eora_presets()
