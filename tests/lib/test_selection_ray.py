"""DSIR over shards as Ray tasks (``shrink.selection.scaleout``) on a local Ray instance with 2 workers:
the same indices as the in-process DSIR (deterministic and Gumbel top-k), bit-identical log-weights, a second
run computes nothing, a deleted or truncated shard output is recomputed for that shard only, a failing shard
is reported without losing the others. One Ray session for the module."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from shrink import cli, distributed  # noqa: E402
from shrink.selection import DSIR, pools  # noqa: E402
from shrink.selection.errors import ShardError  # noqa: E402
from shrink.selection.scaleout import select_sharded  # noqa: E402

K = 40


@pytest.fixture(scope="module")
def session():
    if ray.is_initialized():
        ray.shutdown()
    distributed.init_local(2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 records of two vocabularies and varying length (some below the length filter), in 5 shards."""
    rng = np.random.default_rng(0)
    va = "the river sea town old bridge story water boat".split()
    vb = "def return import class self value list print".split()
    recs = [{"id": f"c/{i}", "text": " ".join(rng.choice(va if i % 3 == 0 else vb, size=int(rng.integers(60, 160))))}
            for i in range(300)]
    target = [" ".join(rng.choice(va, size=120)) for _ in range(10)]
    root = tmp_path_factory.mktemp("ray-pool")
    pools.write_shards(recs, root / "pool", 5)
    return recs, target, str(root / "pool" / "*.jsonl.zst")


def _files(out):
    return {p: p.stat().st_mtime_ns for p in Path(out).rglob("*.np[yz]")}


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_ray_path_equals_in_process(session, corpus, tmp_path, mode):
    recs, target, pool = corpus
    ref = DSIR(mode=mode).fit([r["text"] for r in recs], target)
    out = tmp_path / "out"
    for top_k in (False, True):
        for seed in (0, 3):
            res = select_sharded(pool, target, K, seed=seed, top_k=top_k, mode=mode, out_dir=out, ray=session,
                                 max_in_flight=2, with_ids=True)
            want = ref.select(K, seed=seed, top_k=top_k)
            assert res["indices"] == want.tolist(), (mode, top_k, seed)
            assert res["ids"] == [recs[i]["id"] for i in want]
            assert not res["boundary_tie"]
            assert res["eligible"] == int(ref.eligible().sum()) < len(recs)
    # the log-weights of the shards, concatenated, are the in-process ones bit for bit
    lw = np.concatenate([np.load(p) for p in sorted((out / "score").glob("*.npy"))])
    assert np.array_equal(lw, ref.log_weights())
    assert res["stages"]["fit"]["computed"] == 0 and res["stages"]["score"]["computed"] == 0


def test_second_run_computes_nothing_and_partial_outputs_are_redone(session, corpus, tmp_path):
    recs, target, pool = corpus
    out = tmp_path / "out"
    first = select_sharded(pool, target, K, out_dir=out, ray=session, max_in_flight=2)
    assert first["stages"]["fit"]["computed"] == 5 and first["stages"]["score"]["computed"] == 5
    assert len(first["stages"]["fit"]["pids"]) >= 1 and all(p != os.getpid() for p in first["stages"]["fit"]["pids"])
    before = _files(out)
    assert len(before) == 10
    second = select_sharded(pool, target, K, out_dir=out, ray=session, max_in_flight=2)
    assert second["indices"] == first["indices"]
    assert (second["stages"]["fit"]["computed"], second["stages"]["score"]["computed"]) == (0, 0)
    assert _files(out) == before  # not rewritten
    # one fit output truncated (a bad copy), one score output deleted: those two are recomputed, nothing else
    fit2 = sorted((out / "fit").glob("*.npz"))[2]
    fit2.write_bytes(fit2.read_bytes()[:100])
    score4 = sorted((out / "score").glob("*.npy"))[4]
    score4.unlink()
    third = select_sharded(pool, target, K, out_dir=out, ray=session, max_in_flight=2)
    assert (third["stages"]["fit"]["computed"], third["stages"]["score"]["computed"]) == (1, 1)
    assert third["indices"] == first["indices"]
    after = _files(out)
    changed = {p for p in after if after[p] != before.get(p)}
    assert changed == {fit2, score4}


def test_failing_shard_is_reported_and_the_others_are_kept(session, corpus, tmp_path):
    recs, target, _ = corpus
    paths = pools.write_shards(recs[:90], tmp_path / "pool", 3)
    bad = paths[1]
    bad.write_bytes(bad.read_bytes()[:-20])  # truncated zstd frame
    with pytest.raises(ShardError) as e:
        select_sharded(str(tmp_path / "pool" / "*.zst"), target, 5, out_dir=tmp_path / "out", ray=session,
                       max_in_flight=2, min_example_length=0)
    assert "1 of 3 fit tasks failed" in str(e.value) and bad.name in str(e.value) and "rerun" in str(e.value)
    assert len(list((tmp_path / "out" / "fit").glob("*.npz"))) == 2
    pools.write_shards(recs[:90], tmp_path / "pool", 3)  # regenerated: the rerun does the missing shard only
    res = select_sharded(str(tmp_path / "pool" / "*.zst"), target, 5, out_dir=tmp_path / "out", ray=session,
                         max_in_flight=2, min_example_length=0)
    # write_shards rewrote all three files (new mtimes), so all three are new shards to the cache
    assert res["stages"]["fit"]["computed"] == 3
    ref = DSIR(min_example_length=0).fit([r["text"] for r in recs[:90]], target).select(5, seed=0)
    assert res["indices"] == ref.tolist()


def test_cli_ray_local_prints_the_in_process_indices(session, corpus, tmp_path, capsys):
    recs, target, pool = corpus
    (tmp_path / "t.txt").write_text("\n".join(target))
    base = ["select", "dsir", "--pool", pool, "--target", str(tmp_path / "t.txt"), "--k", str(K), "--seed", "2"]
    cli.main(base)
    inproc = json.loads(capsys.readouterr().out)
    cli.main(base + ["--ray", "local", "--workers", "2", "--out", str(tmp_path / "out"), "--ids"])
    out = json.loads(capsys.readouterr().out)
    assert out["indices"] == inproc["indices"]
    assert out["ids"] == [recs[i]["id"] for i in inproc["indices"]]
    assert out["cluster_cpus"] == 2 and out["stages"]["fit"]["computed"] == 5


def test_run_tasks_reports_failures_per_task(session):
    res = distributed.run_tasks(math.sqrt, [(4.0,), (-1.0,), (9.0,)], ray=session, max_in_flight=2)
    assert res[0] == 2.0 and res[2] == 3.0
    assert isinstance(res[1], distributed.TaskFailure) and res[1].index == 1 and "domain" in res[1].message
    res = distributed.run_tasks(math.sqrt, [(4.0,), (-1.0,)])  # in-process path, same contract
    assert res[0] == 2.0 and isinstance(res[1], distributed.TaskFailure) and res[1].index == 1
