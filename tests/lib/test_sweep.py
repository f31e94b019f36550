"""``shrink sweep`` on a local Ray instance with 2 workers at tiny scale (the dsir-kl grid of notebook 04b):
records identical to the sequential path, a second run computes nothing, a worker killed mid-sweep loses no
finished cell and the rerun computes only the lost ones. One Ray session for the module."""

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from shrink import cli, distributed, sweep  # noqa: E402
from shrink.selection.experiment import dsir_kl_run  # noqa: E402

VOLATILE = ("created", "seconds")  # when and how long: the only fields allowed to differ


@pytest.fixture(scope="module")
def session():
    if ray.is_initialized():
        ray.shutdown()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the crashing cell below ships by value
    distributed.init_local(2)
    yield ray
    ray.shutdown()


def _records(root: Path) -> dict:
    return {p.name: {k: v for k, v in json.loads(p.read_text()).items() if k not in VOLATILE}
            for p in sorted(root.rglob("*.json"))}


def _mtimes(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*.json")}


def test_ray_sweep_equals_sequential_and_resumes(session, tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_RESULTS", str(tmp_path / "seq"))
    seq = sweep.sweep("dsir-kl", "tiny")
    assert (seq["computed"], seq["reused"], seq["failed"]) == (6, 0, 0)
    monkeypatch.setenv("SHRINK_RESULTS", str(tmp_path / "ray"))
    par = sweep.sweep("dsir-kl", "tiny", ray=session, max_in_flight=2)
    assert (par["computed"], par["reused"], par["failed"]) == (6, 0, 0)
    assert all(c["pid"] != os.getpid() for c in par["cells"])
    a, b = _records(tmp_path / "seq"), _records(tmp_path / "ray")
    assert len(a) == 6 and a == b  # same files, same configs, metrics, versions, code and kernel set
    before = _mtimes(tmp_path / "ray")
    again = sweep.sweep("dsir-kl", "tiny", ray=session, max_in_flight=2)
    assert (again["computed"], again["reused"], again["failed"]) == (0, 6, 0)
    assert _mtimes(tmp_path / "ray") == before


def _crash_on_seed_1(cfg, *, scale, with_wiki, seed):
    if seed == 1:
        os._exit(1)  # the worker process dies mid-cell, as when a node is preempted or OOM-killed
    return dsir_kl_run(cfg, scale=scale, with_wiki=with_wiki, seed=seed)


def test_killed_worker_loses_nothing_finished(session, tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_RESULTS", str(tmp_path / "res"))
    crashing = replace(sweep.get("dsir-kl"), run=_crash_on_seed_1)
    out = sweep.sweep(crashing, "tiny", ray=session, max_in_flight=2, max_retries=0)
    assert (out["computed"], out["failed"]) == (4, 2)
    failed = [c for c in out["cells"] if c["status"] == "failed"]
    assert {c["cell"]["seed"] for c in failed} == {1} and all(c["message"] or c["error"] for c in failed)
    kept = _mtimes(tmp_path / "res")
    assert len(kept) == 4
    rerun = sweep.sweep("dsir-kl", "tiny", ray=session, max_in_flight=2)
    assert (rerun["computed"], rerun["reused"], rerun["failed"]) == (2, 4, 0)
    assert {c["cell"]["seed"] for c in rerun["cells"] if c["status"] == "computed"} == {1}
    after = _mtimes(tmp_path / "res")
    assert all(after[p] == t for p, t in kept.items())  # finished records untouched


def test_cli_sweep_only_and_bad_input(session, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHRINK_RESULTS", str(tmp_path / "res"))
    cli.main(["sweep", "dsir-kl", "--scale", "tiny", "--only", "seed=0", "--only", "with_wiki=false"])
    out = json.loads(capsys.readouterr().out)
    assert [c["cell"] for c in out["cells"]] == [{"with_wiki": False, "seed": 0}] and out["computed"] == 1
    for argv, words in ((["sweep", "nope", "--scale", "tiny"], "dsir-kl"),
                        (["sweep", "dsir-kl", "--scale", "tiny", "--only", "lr=1"], "dimension"),
                        (["sweep", "dsir-kl", "--scale", "tiny", "--only", "seed=9"], "matches no cell"),
                        (["sweep", "dsir-kl", "--scale", "huge"], "huge")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        msg = json.loads(capsys.readouterr().out)
        assert e.value.code == 2 and words in msg["message"], msg


@pytest.mark.parametrize("scale", ["tiny", "cpu", "paper"])
def test_weight_only_sweep_cells_are_exactly_what_02g_reads(scale, monkeypatch):
    """The ``weight-only`` sweep's cells equal the measurements notebook 02g reads (its loops, replayed against a
    context whose cached functions only log their arguments), so a sweep leaves nothing for the notebook to compute
    and computes nothing it does not read. No model is loaded."""
    from shrink import scales
    from shrink.quant import weightonly as W

    cfg = scales.get("weight-only", scale)
    read = []
    monkeypatch.setattr(W.WeightOnlyContext, "dense", lambda self: read.append({"kind": "dense"}) or {"ppl": 1.0})
    monkeypatch.setattr(W.WeightOnlyContext, "measure", lambda self, method, bits, grid, seed=0: read.append(
        {"kind": "measure", "method": method, "bits": bits, "grid": grid, "seed": seed}) or {"ppl": 1.0})
    monkeypatch.setattr(W.WeightOnlyContext, "export_round_trip", lambda self, bits, grid, seed=0: read.append(
        {"kind": "export", "bits": bits, "grid": grid, "seed": seed}) or {})
    ctx = W.WeightOnlyContext(cfg, scale)
    ctx.dense()
    for b in cfg.bits:  # 02g's table loop, its sanity checks and its export cell
        for g in cfg.grids:
            ctx.measure("rtn", b, g)
            if ctx.has_gptq(g):
                ctx.gptq_spread(b, g)
                ctx.measure("gptq", b, g, ctx.seeds_for(b, g)[0])
    ctx.export_round_trip(*cfg.export_cell)
    key = lambda c: tuple(sorted(c.items()))  # noqa: E731
    assert {key(c) for c in sweep.get("weight-only").cells(cfg)} == {key(c) for c in read}
    out = sweep.sweep("weight-only", scale, only={"kind": "dense"})  # through run_cell, sequential
    assert out["failed"] == 0 and len(out["cells"]) == 1


@pytest.mark.parametrize("scale", ["tiny", "cpu", "paper"])
def test_pruning_sweep_cells_are_exactly_what_01b_reads(scale, monkeypatch):
    """The ``pruning-reconstruction`` sweep's cells equal 01b's main grid (its two comprehensions replayed against
    logging stand-ins of the cached functions; the kernel-set replicas run in their own processes, not here)."""
    from shrink import scales
    from shrink.pruning import experiment as E

    cfg = scales.get("pruning-reconstruction", scale)
    read = []
    monkeypatch.setattr(E, "dense_reference", lambda st: read.append({"kind": "dense"}) or {})
    monkeypatch.setattr(E, "cached_measure", lambda st, name, spec, seed, **kw: read.append(
        {"kind": "measure", "pruner": spec.pruner, "scheme": spec.scheme, "seed": seed}) or {})
    monkeypatch.setattr(E, "setup", lambda cfg, scale: None)
    st = E.setup(cfg, scale)
    E.dense_reference(st)
    for sd in cfg.seeds:  # 01b: runs = {...}, then cr = {...}
        for p in cfg.pruners:
            for s in cfg.schemes:
                E.cached_measure(st, "measure", E.spec_for(cfg, p, s, seed=sd), sd)
    for p in cfg.cr_pruners:
        E.cached_measure(st, "measure", E.spec_for(cfg, p, "BR+GP+CR", seed=cfg.seeds[0]), cfg.seeds[0])
    key = lambda c: tuple(sorted(c.items()))  # noqa: E731
    assert [key(c) for c in sweep.get("pruning-reconstruction").cells(cfg)] == [key(c) for c in read]
    out = sweep.sweep("pruning-reconstruction", scale, only={"kind": "measure", "seed": str(cfg.seeds[0])})
    assert out["failed"] == 0 and len(out["cells"]) == len(cfg.pruners) * len(cfg.schemes) + len(cfg.cr_pruners)
