from dataclasses import dataclass

import pytest

from shrink import scales
from shrink.errors import UnknownNameError


def test_all_registered_presets_validate_at_every_scale():
    names = scales.experiments()
    assert "tour" in names
    for name in names:
        for s in scales.SCALES:
            preset = scales.get(name, s)
            assert preset.validate() is preset


def test_cpu_tour_is_the_embedded_default():
    cfg = scales.get("tour", "cpu")
    assert cfg.model == "smollm2-135m" and cfg.seqlen == 2048 and cfg.windows == 8


def test_unknown_scale_and_experiment():
    with pytest.raises(UnknownNameError, match="tiny, cpu, paper"):
        scales.get("tour", "huge")
    with pytest.raises(UnknownNameError, match="tour"):
        scales.get("nope", "tiny")


@dataclass(frozen=True)
class _P(scales.Preset):
    nsamples: int = 8
    sparsity: float = 0.5


def test_validation_rejects_bad_values():
    with pytest.raises(scales.PresetError, match="nsamples"):
        _P(model="m", nsamples=0).validate()
    with pytest.raises(scales.PresetError, match="sparsity"):
        _P(model="m", sparsity=1.2).validate()
    with pytest.raises(scales.PresetError, match="missing"):
        scales.register("x", {"tiny": _P(model="m")})
    assert _P(model="m").with_(nsamples=4).nsamples == 4


def test_pruning_preset_rejects_unknown_cr_pruner():
    """cr_pruners (01b's BR+GP+CR rows) is checked like pruners: a typo fails before hours of compute."""
    cfg = scales.get("pruning-reconstruction", "cpu")
    assert set(cfg.cr_pruners) <= set(cfg.pruners) and len(cfg.seeds) >= 3
    with pytest.raises(scales.PresetError, match="bogus"):
        cfg.with_(cr_pruners=("bogus",))
