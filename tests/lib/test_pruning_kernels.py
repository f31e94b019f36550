"""Replicas of a weights-chapter measurement under another kernel set (issue 9 §2)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shrink import results, scales
from shrink.errors import BadInputError, EnvError
from shrink.pruning import experiment
from shrink.pruning.presets import PruningPreset
from shrink.scales import PresetError

pytestmark = pytest.mark.usefixtures("one_thread")


def _kernels_in_child(env_vars: dict, threads: int) -> str:
    code = ("import torch; torch.set_num_threads(%d); from shrink.pruning import experiment; "
            "print(experiment.current_kernels())" % threads)
    env = {**os.environ, **env_vars}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("name", sorted(experiment.KERNEL_SETS))
def test_kernel_set_environment_is_what_the_process_reports(name):
    env_vars, threads = experiment.KERNEL_SETS[name]
    assert _kernels_in_child(env_vars, threads) == name


def test_replica_record_sits_beside_the_original(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_RESULTS", str(tmp_path))
    cfg = scales.get("pruning-reconstruction", "tiny")
    st = experiment.setup(cfg, "tiny")
    spec = experiment.spec_for(cfg, "wanda", "LR", seed=0)
    orig = experiment.cached_measure(st, "measure", spec, 0)
    rep = experiment.replica(st, "measure", spec, 0, "default-1t")
    files = sorted(p.name for p in (tmp_path / "tiny" / "01-weights").glob("measure-*.json"))
    assert len(files) == 2  # its own key: the config differs by the kernels field only
    recs = [results.load(tmp_path / "tiny" / "01-weights" / f) for f in files]
    (r,) = [r for r in recs if "kernels" in r["config"]]
    (o,) = [r for r in recs if "kernels" not in r["config"]]
    assert {k: v for k, v in r["config"].items() if k != "kernels"} == o["config"]
    # the child really ran under ATen's scalar kernels with one thread
    assert rep["kernels_run"]["set"] == "default-1t" and rep["kernels_run"]["capability"] == "DEFAULT"
    assert rep["kernels_run"]["threads"] == 1
    # same masks and sparsity; the numbers agree to float32 rounding, not necessarily bit for bit
    assert rep["sparsity"] == orig["sparsity"]
    assert rep["ppl"] == pytest.approx(orig["ppl"], rel=1e-3)
    # a second call reads the record (no child process: the same dict comes back)
    assert experiment.replica(st, "measure", spec, 0, "default-1t")["ppl"] == rep["ppl"]
    # computing a replica in a process under another kernel set is refused, with the fix named
    with pytest.raises(EnvError, match="replica"):
        experiment.cached_measure(st, "measure", experiment.spec_for(cfg, "wanda", "LR", seed=1), 1,
                                  kernels="default-1t")


def test_unknown_kernel_set_and_bad_replicas_are_rejected():
    cfg = scales.get("pruning-reconstruction", "tiny")
    with pytest.raises(BadInputError, match="KERNEL_SETS"):
        experiment.replica(None, "measure", experiment.spec_for(cfg, "wanda", "LR"), 0, "avx512-1t")
    with pytest.raises(PresetError, match="kernel set"):
        PruningPreset(model="tiny-llama", replicas=(("avx512-1t", "wanda", "LR", 0),)).validate()
    with pytest.raises(PresetError, match="seeds"):
        PruningPreset(model="tiny-llama", seeds=(0,), replicas=(("default-1t", "wanda", "LR", 3),)).validate()


def test_cpu_preset_replicates_every_lr_cell():
    cfg = scales.get("pruning-reconstruction", "cpu")
    for k in ("default-1t", "mklcompat-1t"):
        lr = {(p, sd) for kk, p, s, sd in cfg.replicas if kk == k and s == "LR"}
        assert lr == {(p, sd) for p in cfg.pruners for sd in cfg.seeds}
