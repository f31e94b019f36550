"""Typed presets per experiment and scale.

Three scales, one code path:

``tiny``   CI: random tiny models (``tiny-llama`` ...), a few short windows; checks invariants; <= 2 min.
``cpu``    the embedded default: SmolLM2-135M-Instruct and the offline data; the paper's finding must show.
``paper``  the paper's own models and data on a GPU with internet (``SHRINK_ONLINE=1``).

Each experiment registers one frozen dataclass instance per scale with :func:`register`; notebooks call
``cfg = shrink.scales.get("<experiment>", scale)``. Chapter packages keep their presets in
``shrink/<package>/presets.py``; :func:`get` imports those modules on first use (no import-order magic).

Introduced in: notebooks/00-start/00-tour.md
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass, fields, replace

from .errors import ShrinkError, UnknownNameError

SCALES = ("tiny", "cpu", "paper")
#: modules that register chapter presets (imported by :func:`get` when present)
PRESET_MODULES = ("shrink.pruning.presets", "shrink.quant.presets", "shrink.tokens.presets",
                  "shrink.selection.presets", "shrink.selection.dedup", "shrink.selection.speed",
                  "shrink.quant.int8_speed")

_REGISTRY: dict[str, dict[str, "Preset"]] = {}
_POSITIVE_SUFFIXES = ("seqlen", "nsamples", "windows", "batch_size", "epochs", "steps", "group_size")


class PresetError(ShrinkError, ValueError):
    """A preset field has an invalid value."""


@dataclass(frozen=True)
class Preset:
    """Base of every preset: the model and the seed. Subclasses add their experiment's knobs.

    Validation (:meth:`validate`, run when a preset is registered and by :meth:`with_`): integer fields whose names end in ``seqlen``, ``nsamples``,
    ``windows``, ``batch_size``, ``epochs``, ``steps`` or ``group_size`` must be positive (``None`` allowed
    for "all"); fields ending in ``bits`` are integers in [2, 16] (tuples: each); fractions named
    ``sparsity`` lie in [0, 1); a field ``X_corpus`` (or ``corpus``) names a registered corpus and its
    ``X_split`` one of that corpus's splits; for registry models every ``*seqlen`` fits the model's context.
    Subclasses add checks in :meth:`check`.
    """

    model: str
    seed: int = 0

    def validate(self) -> "Preset":
        from . import data, models

        cls = type(self).__name__
        if not isinstance(self.model, str) or not self.model:
            raise PresetError(f"{cls}.model must be a model name, got {self.model!r}")
        context = models.known_context(self.model)
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith(_POSITIVE_SUFFIXES) and v is not None:
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise PresetError(f"{cls}.{f.name} must be a positive integer, got {v!r}")
            if f.name.endswith("bits") and v is not None:
                for b in (v if isinstance(v, tuple) else (v,)):
                    if not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 16:
                        raise PresetError(f"{cls}.{f.name} must be integer bit widths in [2, 16], got {v!r}")
            if f.name.endswith("sparsity") and v is not None:
                try:
                    ok = 0.0 <= float(v) < 1.0
                except (TypeError, ValueError):
                    ok = False
                if not ok or isinstance(v, (str, bool)):
                    raise PresetError(f"{cls}.{f.name} must be a number in [0, 1), got {v!r}")
            if (f.name == "corpus" or f.name.endswith("_corpus")) and v is not None:
                if v not in data.CORPORA:
                    raise PresetError(f"{cls}.{f.name}={v!r} is not a corpus; known corpora: {', '.join(data.CORPORA)}")
                split_field = f.name[: -len("corpus")] + "split"
                split = getattr(self, split_field, None)
                c = data.CORPORA[v]
                splits = sorted(set(c.offline) | set(c.online))
                if split is not None and split not in splits:
                    raise PresetError(f"{cls}.{split_field}={split!r} is not a split of {v!r}; splits: "
                                      f"{', '.join(splits)}")
            if context and f.name.endswith("seqlen") and isinstance(v, int) and v > context:
                raise PresetError(f"{cls}.{f.name}={v} exceeds the {context}-position context of {self.model}; "
                                  f"use {f.name} <= {context}.")
        self.check()
        return self

    def check(self) -> None:
        """Experiment-specific validation; raise :class:`PresetError`."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_(self, **changes) -> "Preset":
        """A validated copy with some fields changed (e.g. a notebook parameter override).

        An unknown field name (a typo such as ``seqlenn``) raises :class:`PresetError` naming the closest field.
        """
        names = [f.name for f in fields(self)]
        unknown = [k for k in changes if k not in names]
        if unknown:
            import difflib

            hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            hint = "; ".join(f"{k!r}: did you mean {h[0]!r}?" if h else f"{k!r}: no such field" for k, h in hints.items())
            raise PresetError(f"{type(self).__name__} has no field(s) {', '.join(map(repr, unknown))} ({hint}). "
                              f"Fields: {', '.join(names)}.")
        return replace(self, **changes).validate()


def register(experiment: str, presets: dict[str, Preset]) -> None:
    """Register the presets of ``experiment``; all three scales are required and validated now."""
    missing = [s for s in SCALES if s not in presets]
    extra = [s for s in presets if s not in SCALES]
    if missing or extra:
        raise PresetError(f"experiment {experiment!r}: presets needed for exactly {SCALES}; "
                          f"missing {missing}, unknown {extra}")
    _REGISTRY[experiment] = {s: p.validate() for s, p in presets.items()}


def _import_chapters() -> None:
    for mod in PRESET_MODULES:
        parent = mod.rsplit(".", 1)[0]
        if importlib.util.find_spec(parent) is not None and importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise UnknownNameError(f"unknown scale {scale!r}; scales: {', '.join(SCALES)} "
                               "(tiny = CI invariants, cpu = SmolLM2 default, paper = GPU + internet)")
    return scale


def get(experiment: str, scale: str) -> Preset:
    """The preset of ``experiment`` at ``scale``."""
    check_scale(scale)
    if experiment not in _REGISTRY:
        _import_chapters()
    if experiment not in _REGISTRY:
        raise UnknownNameError(f"unknown experiment {experiment!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[experiment][scale]


def experiments() -> list[str]:
    """Names of all registered experiments."""
    _import_chapters()
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------------------------------
# Chapter 00 presets (the tour)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TourPreset(Preset):
    """Chapter 00: load a model, evaluate perplexity, probe activations."""

    eval_corpus: str = "wikitext2"
    eval_split: str = "test"
    seqlen: int = 2048
    windows: int | None = 8
    probe_seqlen: int = 512


register("tour", {
    "tiny": TourPreset(model="tiny-llama", seqlen=128, windows=4, probe_seqlen=64),
    "cpu": TourPreset(model="smollm2-135m", seqlen=2048, windows=8, probe_seqlen=512),
    "paper": TourPreset(model="meta-llama/Llama-2-7b-hf", seqlen=2048, windows=None, probe_seqlen=2048),
})
