"""Glue for the chapter's notebooks: data of a preset, one pruned-model measurement, cached records.

A measurement = prune a fresh copy of the dense model with a :class:`~shrink.pruning.PruneSpec`, then record
the per-block normalised errors (calibration and held-out, App. A), the final-block error, perplexity with the
one perplexity function on WikiText-2 test (and a second held-out corpus), sparsity and times. Records go
through :func:`shrink.results.cached` so a re-run of a notebook is fast.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from .. import data, eval as shrink_eval, models, results
from ..errors import BadInputError, EnvError, ShrinkError
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # presets.py imports KERNEL_SETS from here to validate the replicas
    from .presets import PruningPreset
from .reconstruct import ReconConfig
from .sequential import PruneSpec, dense_streams, prune_model

CHAPTER = "01-weights"

#: Kernel sets a measurement can be replicated under (issue 9 §2): name -> environment variables set before
#: ``torch`` is imported, and the thread count. ``avx2-1t`` is what made the committed cpu records (ATen's AVX2
#: kernels, MKL's default dispatch, one thread); the others change the floating-point summation order of
#: ATen's vectorised kernels (``ATEN_CPU_CAPABILITY=default``), of MKL's GEMMs (``MKL_CBWR=COMPATIBLE``, MKL's
#: conditional-numerical-reproducibility code path) or of the thread split of reductions (2 threads).
#: Measured on the AMD EPYC (AVX2) machine: ``MKL_ENABLE_INSTRUCTIONS=SSE4_2`` and ``DNNL_MAX_CPU_ISA=SSE41``
#: change no bit of a SmolLM2 forward or a Cholesky factor, so they are not kernel sets here.
KERNEL_SETS = {
    "avx2-1t": ({}, 1),
    "default-1t": ({"ATEN_CPU_CAPABILITY": "default"}, 1),
    "mklcompat-1t": ({"MKL_CBWR": "COMPATIBLE"}, 1),
    "avx2-2t": ({}, 2),
}
#: The kernel set of the committed records that lack a ``kernels`` config field (their ``device`` field says
#: ``cpu (1 threads, x86_64)``; the machine was AVX2 and a seed-0 cell recomputed here matches bit for bit).
ORIGINAL_KERNELS = "avx2-1t"


#: The deviation issue 9 reports for the SparseGPT LR seed-0 cell of 01b recomputed on an AVX512 machine with
#: 2 threads (perplexity 63.03 vs 61.26, final-block calibration error 145.5 vs 146.3). Not a record (there is
#: no AVX512 machine here); margins are compared with it as well as with the replicas measured here.
REPORTED_DEVIATION = {"ppl": 63.03 / 61.26 - 1, "err_calib": 1 - 145.5 / 146.3}


def kernel_status(margin: float, metric: str, measured: float | None, *, replicated: bool = False) -> str:
    """Verdict on a condition ``ratio < threshold`` with relative ``margin = threshold / ratio - 1``:

    ``"fails"`` (margin <= 0); ``"within 2× the measured kernel-set deviation"`` when its cells were not
    replicated and the margin is at most twice ``measured`` (the largest relative deviation of ``metric`` over
    the replicas; a ratio of two cells moves by up to both cells' deviations); ``"within 2× the AVX512
    deviation of issue 9"`` when the margin is at most twice :data:`REPORTED_DEVIATION` of ``metric``; else
    ``"holds"``.
    """
    if margin <= 0:
        return "fails"
    if not replicated and measured is not None and margin <= 2 * measured:
        return "within 2× the measured kernel-set deviation"
    if metric in REPORTED_DEVIATION and margin <= 2 * REPORTED_DEVIATION[metric]:
        return "within 2× the AVX512 deviation of issue 9"
    return "holds"


def current_kernels() -> str:
    """The kernel set this process runs under, named as in :data:`KERNEL_SETS` (``"<isa>[-mklcompat]-<n>t"``)."""
    isa = torch.backends.cpu.get_cpu_capability().lower()
    if os.environ.get("MKL_CBWR", "").upper().startswith("COMPATIBLE"):
        isa = "mklcompat" if isa == "avx2" else f"{isa}-mklcompat"
    return f"{isa}-{torch.get_num_threads()}t"


@dataclass
class Setup:
    """Model, tokenizer and data of a preset (and caches of the dense streams per calibration set)."""

    cfg: PruningPreset
    scale: str
    model: torch.nn.Module
    tok: object
    eval_tokens: torch.Tensor
    eval2_tokens: torch.Tensor | None
    heldout: torch.Tensor
    _dense: dict = field(default_factory=dict)

    def calib(self, seed: int, nsamples: int | None = None) -> torch.Tensor:
        """Calibration windows int64 ``[n, calib_seqlen]`` for ``seed`` (THE sampler)."""
        c = self.cfg
        return data.calibration_set(self.tok, c.calib_corpus, c.calib_split, nsamples=nsamples or c.calib_nsamples,
                                    seqlen=c.calib_seqlen, seed=seed)

    def dense(self, key, ids: torch.Tensor) -> list[torch.Tensor]:
        """Dense-stream activations of ``ids`` (memoised in memory under ``key``)."""
        if key not in self._dense:
            self._dense[key] = dense_streams(self.model, ids)
        return self._dense[key]


def setup(cfg: PruningPreset, scale: str) -> Setup:
    """Load the preset's model and evaluation data."""
    model, tok = models.load(cfg.model)
    ev = data.eval_tokens(tok, "wikitext2", "test")
    ev2 = data.eval_tokens(tok, cfg.eval2_corpus, cfg.eval2_split) if cfg.eval2_corpus else None
    held_tokens = data.eval_tokens(tok, cfg.heldout_corpus, cfg.heldout_split)
    # held-out error windows: taken from the END of the held-out stream so they do not overlap the
    # perplexity windows, which start at the beginning
    n, t = cfg.heldout_nsamples, cfg.heldout_seqlen
    if held_tokens.numel() < n * t:
        raise ValueError(f"held-out corpus has {held_tokens.numel()} tokens < {n}x{t}")
    held = held_tokens[-n * t:].view(n, t)
    return Setup(cfg, scale, model, tok, ev, ev2, held)


def spec_for(cfg: PruningPreset, pruner: str, scheme: str, *, seed: int = 0, epochs: int | None = None,
             batch_size: int | None = None, **kw) -> PruneSpec:
    """The :class:`PruneSpec` of a preset cell (``kw`` overrides fields such as ``targets``, ``pattern``)."""
    recon = ReconConfig(epochs=epochs or cfg.epochs, batch_size=batch_size or cfg.batch_size, lr=cfg.lr, seed=seed)
    base = dict(pruner=pruner, sparsity=cfg.sparsity, pattern=cfg.pattern, scheme=scheme, recon=recon)
    base.update(kw)
    return PruneSpec(**base)


def measure(st: Setup, spec: PruneSpec, calib: torch.Tensor, *, extra: torch.Tensor | None = None,
            dense_key=None, ppl: bool = True, keep_model: bool = False) -> dict:
    """Prune a copy of the dense model and measure it (see module docstring). Returns a JSON-able dict."""
    m = copy.deepcopy(st.model)
    ids = calib if extra is None else torch.cat([calib, extra])
    dense = st.dense(dense_key, ids) if dense_key is not None else None
    dh = st.dense("heldout", st.heldout)
    t0 = time.perf_counter()
    res = prune_model(m, calib, spec, heldout_ids=st.heldout, extra_ids=extra, dense=dense, dense_heldout=dh,
                      verbose=False)
    out = res.to_dict()
    out["prune_seconds"] = round(time.perf_counter() - t0, 2)
    c = st.cfg
    if ppl:
        p = shrink_eval.perplexity(m, st.eval_tokens, c.eval_seqlen, max_windows=c.eval_windows,
                                   dataset="wikitext2", split="test")
        out["ppl"] = p.ppl
        out["ppl_record"] = p.to_dict()
        if st.eval2_tokens is not None:
            p2 = shrink_eval.perplexity(m, st.eval2_tokens, c.eval_seqlen, max_windows=c.eval_windows,
                                        dataset=c.eval2_corpus, split=c.eval2_split)
            out["ppl2"] = p2.ppl
        calib_tokens = calib.reshape(-1)
        out["ppl_calib"] = shrink_eval.perplexity(m, calib_tokens, calib.shape[1], dataset=c.calib_corpus,
                                                  split=c.calib_split).ppl
    if c.zero_shot and st.scale == "paper":  # the paper's 7 tasks through lm-eval (needs internet)
        out["zero_shot"] = shrink_eval.paper_zero_shot(m, st.tok)
    if keep_model:
        out["_model"] = m
    return out


def _measure_config(st: Setup, spec: PruneSpec, seed: int, nsamples, extra_tag, ppl, kernels) -> dict:
    c = st.cfg
    # key = only what determines the measurement, so notebooks share records (01a's LR cells are 01b's)
    config = {"model": c.model, "calib": [c.calib_corpus, c.calib_split, nsamples or c.calib_nsamples, c.calib_seqlen],
              "heldout": [c.heldout_corpus, c.heldout_split, c.heldout_nsamples, c.heldout_seqlen],
              "eval": [c.eval_seqlen, c.eval_windows, c.eval2_corpus, c.eval2_split], "spec": spec.to_dict(),
              "seed": seed, "extra": extra_tag, "ppl": ppl}
    if kernels is not None:  # a replica: its own record beside the original (which has no such field)
        config["kernels"] = kernels
    return config


def cached_measure(st: Setup, name: str, spec: PruneSpec, seed: int, *, nsamples: int | None = None,
                   extra: torch.Tensor | None = None, extra_tag: str | None = None, ppl: bool = True,
                   kernels: str | None = None) -> dict:
    """:func:`measure` through :func:`shrink.results.cached` (key: preset, spec, seed, calibration size, extra).

    ``kernels`` (a :data:`KERNEL_SETS` name) makes the record a replica under that kernel set; it is computed
    only by a process that runs under it (see :func:`replica`, which starts one) and raises otherwise.
    """
    c = st.cfg
    config = _measure_config(st, spec, seed, nsamples, extra_tag, ppl, kernels)

    def fn():
        if kernels is not None and current_kernels() != kernels:
            raise EnvError(f"the replica under kernel set {kernels!r} cannot be computed in this process, which "
                           f"runs under {current_kernels()!r}; use experiment.replica(...) (it starts a process "
                           f"with {KERNEL_SETS.get(kernels)}) or `python -m shrink.pruning.experiment --help`.")
        calib = st.calib(seed, nsamples)
        key = ("calib", seed, nsamples or c.calib_nsamples, extra_tag)
        out = measure(st, spec, calib, extra=extra, dense_key=key, ppl=ppl)
        if kernels is not None:  # what the process measured under, not what it was asked for
            out["kernels_run"] = {"set": current_kernels(), "capability": torch.backends.cpu.get_cpu_capability(),
                                  "threads": torch.get_num_threads(), "MKL_CBWR": os.environ.get("MKL_CBWR")}
        return out
    return results.cached(name, config, fn, scale=st.scale, chapter=CHAPTER)


def _experiment_of(st: Setup) -> str:
    """The registered experiment whose preset at ``st.scale`` is ``st.cfg`` (a child process rebuilds it)."""
    from .. import scales

    scales.get("pruning-reconstruction", st.scale)  # imports the chapter presets
    names = [e for e in scales.experiments() if e.startswith("pruning-") and scales.get(e, st.scale) == st.cfg]
    if not names:
        raise BadInputError("replica(): the setup's preset is not a registered pruning preset at scale "
                            f"{st.scale!r}; replicas rebuild the preset in a child process, so register it first.")
    return names[0]


def replica(st: Setup, name: str, spec: PruneSpec, seed: int, kernels: str, *, nsamples: int | None = None,
            timeout: float | None = None) -> dict:
    """The metrics of ``cached_measure(st, name, spec, seed, nsamples=nsamples)`` replicated under the kernel
    set ``kernels`` (:data:`KERNEL_SETS`): read from its record, or computed in a child process started with
    that kernel set's environment and thread count (``python -m shrink.pruning.experiment``), which writes the
    record. Same config as the original plus ``"kernels": kernels``."""
    if kernels not in KERNEL_SETS:
        raise BadInputError(f"unknown kernel set {kernels!r}; use one of {sorted(KERNEL_SETS)} (KERNEL_SETS).")
    config = _measure_config(st, spec, seed, nsamples, None, True, kernels)
    path = results.record_path(name, config, scale=st.scale, chapter=CHAPTER)
    if not path.exists() or os.environ.get("SHRINK_RECOMPUTE") == "1":
        env_vars, threads = KERNEL_SETS[kernels]
        env = {**os.environ, **env_vars, "SHRINK_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
        args = [sys.executable, "-m", "shrink.pruning.experiment", "--experiment", _experiment_of(st),
                "--scale", st.scale, "--name", name, "--seed", str(seed), "--kernels", kernels,
                "--spec", json.dumps(spec.to_dict())] + (["--nsamples", str(nsamples)] if nsamples else [])
        # the child's log goes to a file, not a pipe: the child finishes (and writes its record) even if
        # this process dies meanwhile
        import tempfile

        with tempfile.TemporaryFile("w+") as log:
            proc = subprocess.run(args, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, timeout=timeout)
            if proc.returncode != 0:
                log.seek(0)
                raise ShrinkError(f"the replica under {kernels} failed (exit {proc.returncode}):\n"
                                  f"{log.read()[-3000:]}\nRerun `{' '.join(args[:3])} ...` by hand to see the whole log.")
    record = results.load(path)
    return {**record["metrics"], "_device": record.get("device"), "_kernels": kernels}


def record_of(st: Setup, name: str, spec: PruneSpec, seed: int, *, nsamples: int | None = None,
              kernels: str | None = None) -> dict | None:
    """The whole stored record (config, metrics, device, kernels, ...) of a :func:`cached_measure` cell, or None."""
    path = results.record_path(name, _measure_config(st, spec, seed, nsamples, None, True, kernels),
                               scale=st.scale, chapter=CHAPTER)
    return results.load(path) if path.exists() else None


def kernels_of(record: dict | None) -> str:
    """The kernel set that made ``record``, named as in :data:`KERNEL_SETS`: a replica's ``kernels`` config
    field; else the record's ``kernels`` field (written by newer code: ATen capability, ISA variables, threads);
    else, for the committed cpu records that predate that field, :data:`ORIGINAL_KERNELS` (their ``device``
    says one thread; recomputing SparseGPT LR seed 0 on the AVX2 machine reproduced every digit)."""
    if record is None:
        return "no record"
    if "kernels" in record.get("config", {}):
        return record["config"]["kernels"]
    k = record.get("kernels")
    if isinstance(k, dict) and k.get("cpu_capability"):
        isa = str(k["cpu_capability"]).lower()
        if str(k.get("env", {}).get("MKL_CBWR", "")).upper().startswith("COMPATIBLE"):
            isa = "mklcompat" if isa == "avx2" else f"{isa}-mklcompat"
        return f"{isa}-{k.get('threads', '?')}t"
    if record.get("scale") in ("cpu", "paper") and str(record.get("device", "")).startswith("cpu (1 threads"):
        return ORIGINAL_KERNELS
    return "unrecorded"


def kernel_deviations(scale: str, name: str = "measure") -> list[dict]:
    """Every replica record of the chapter at ``scale`` beside its original: one row per replica with
    ``pruner, scheme, seed, kernels, original`` (the original's kernel set) and, for ``ppl``, ``ppl2``,
    ``ppl_calib``, ``err_calib``, ``err_test`` (final block): ``<key>`` (original), ``<key>_rep`` and
    ``<key>_dev = |replica / original - 1|``. Read-only: replicas are made by :func:`replica`."""
    recs = results.records(scale, CHAPTER)
    by_key = {r["key"]: r for r in recs}
    rows = []
    for r in recs:
        c = r["config"]
        if r["name"] != name or "kernels" not in c:
            continue
        o = by_key.get(results.config_key({k: v for k, v in c.items() if k != "kernels"}))
        if o is None:
            continue
        row = {"pruner": c["spec"]["pruner"], "scheme": c["spec"]["scheme"], "seed": c["seed"],
               "kernels": c["kernels"], "original": kernels_of(o)}
        for key in ("ppl", "ppl2", "ppl_calib", "err_calib", "err_test"):
            a = o["metrics"]["final"][key] if key.startswith("err") else o["metrics"].get(key)
            b = r["metrics"]["final"][key] if key.startswith("err") else r["metrics"].get(key)
            if a is None or b is None:
                continue
            row[key], row[key + "_rep"], row[key + "_dev"] = a, b, abs(b / a - 1)
        rows.append(row)
    return sorted(rows, key=lambda d: (d["kernels"], d["pruner"], d["scheme"], d["seed"]))


def dense_reference(st: Setup) -> dict:
    """Dense perplexities (cached)."""
    c = st.cfg

    def fn():
        out = {"ppl": shrink_eval.perplexity(st.model, st.eval_tokens, c.eval_seqlen, max_windows=c.eval_windows,
                                             dataset="wikitext2", split="test").ppl}
        if st.eval2_tokens is not None:
            out["ppl2"] = shrink_eval.perplexity(st.model, st.eval2_tokens, c.eval_seqlen,
                                                 max_windows=c.eval_windows).ppl
        return out
    return results.cached("dense", {"model": c.model, "eval_seqlen": c.eval_seqlen, "eval_windows": c.eval_windows,
                                    "eval2": c.eval2_corpus}, fn, scale=st.scale, chapter=CHAPTER)


def self_generated(st: Setup, n: int, seed: int) -> torch.Tensor:
    """``n`` self-generated sequences of ``selfgen_seqlen`` tokens from the dense model: int64 ``[n, seqlen]``,
    stored with the results (``results/<scale>/01-weights/tensors/``, sha256 checked)."""
    from .selfgen import self_generate

    c = st.cfg
    key = {"model": c.model, "n": n, "seqlen": c.selfgen_seqlen, "seed": seed, "min_alpha": c.selfgen_min_alpha}

    def generate():  # the $SHRINK_CACHE copy is read first: it migrates sequences generated before they travelled
        return {"ids": results.cached_tensors("selfgen", key, lambda: self_generate(
            st.model, st.tok, n, c.selfgen_seqlen, seed=seed, min_alpha=c.selfgen_min_alpha))}

    # committed with the results (small int64 [n, seqlen]): 01d's records depend on them (issue 9)
    return results.cached_tensors("selfgen", key, generate, scale=st.scale, chapter=CHAPTER)["ids"]


def cached_compensated(st: Setup, pruner: str, seed: int, *, rank: int = 0, bias: bool = False) -> dict:
    """LR-pruned model + EoRA (``rank``) and/or FLAP-style bias compensation; perplexities and extra parameters
    (cached record)."""
    from .compensate import compensate_model

    c = st.cfg
    spec = spec_for(c, pruner, "LR", seed=seed)
    config = {"model": c.model, "calib": [c.calib_corpus, c.calib_split, c.calib_nsamples, c.calib_seqlen],
              "eval": [c.eval_seqlen, c.eval_windows], "spec": spec.to_dict(), "seed": seed, "rank": rank,
              "bias": bias}

    def fn():
        calib = st.calib(seed)
        m = copy.deepcopy(st.model)
        prune_model(m, calib, spec, verbose=False)
        t0 = time.perf_counter()
        info = compensate_model(m, st.model, calib, rank=rank, bias=bias)
        info["compensate_seconds"] = round(time.perf_counter() - t0, 2)
        info["ppl"] = shrink_eval.perplexity(m, st.eval_tokens, c.eval_seqlen, max_windows=c.eval_windows,
                                             dataset="wikitext2", split="test").ppl
        info["ppl_calib"] = shrink_eval.perplexity(m, calib.reshape(-1), calib.shape[1]).ppl
        return info
    return results.cached("compensated", config, fn, scale=st.scale, chapter=CHAPTER)


def sweep_cells(cfg: PruningPreset) -> list[dict]:
    """The grid notebook 01b reads, as keyword dicts for :func:`sweep_cell` (``shrink sweep pruning-reconstruction``):
    the dense reference, pruners x schemes x seeds, and BR+GP+CR for ``cr_pruners`` at the first seed. The
    kernel-set replicas are not in it: each runs in a process started under its own kernel environment
    (:func:`replica`)."""
    cells = [{"kind": "dense"}]
    cells += [{"kind": "measure", "pruner": p, "scheme": s, "seed": sd}
              for sd in cfg.seeds for p in cfg.pruners for s in cfg.schemes]
    cells += [{"kind": "measure", "pruner": p, "scheme": "BR+GP+CR", "seed": cfg.seeds[0]} for p in cfg.cr_pruners]
    return cells


def sweep_cell(cfg: PruningPreset, *, scale: str, kind: str, pruner: str | None = None, scheme: str | None = None,
               seed: int = 0) -> dict:
    """One cell of :func:`sweep_cells` through 01b's own cached functions (same records, same keys)."""
    st = setup(cfg, scale)
    if kind == "dense":
        return dense_reference(st)
    if kind == "measure":
        return cached_measure(st, "measure", spec_for(cfg, pruner, scheme, seed=seed), seed)
    raise ValueError(f"unknown pruning sweep cell kind {kind!r}: dense | measure")


def _main(argv=None) -> None:
    """``python -m shrink.pruning.experiment``: compute one replica record in this process (started by
    :func:`replica` with the kernel set's environment; by hand, set that environment yourself)."""
    import argparse

    from .. import scales
    from .reconstruct import ReconConfig

    p = argparse.ArgumentParser(description=_main.__doc__)
    p.add_argument("--experiment", required=True, help="registered preset, e.g. pruning-reconstruction")
    p.add_argument("--scale", required=True)
    p.add_argument("--name", default="measure")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--kernels", required=True, choices=sorted(KERNEL_SETS))
    p.add_argument("--spec", required=True, help="PruneSpec.to_dict() as JSON")
    p.add_argument("--nsamples", type=int, default=None)
    a = p.parse_args(argv)
    threads = KERNEL_SETS[a.kernels][1]
    torch.set_num_threads(threads)
    d = json.loads(a.spec)
    spec = PruneSpec(**{**d, "recon": ReconConfig(**{**d["recon"], "betas": tuple(d["recon"]["betas"])})})
    st = setup(scales.get(a.experiment, a.scale), a.scale)
    t0 = time.perf_counter()
    cached_measure(st, a.name, spec, a.seed, nsamples=a.nsamples, kernels=a.kernels)
    print(f"replica {a.kernels} {spec.pruner} {spec.scheme} seed {a.seed}: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    _main()
