import json
import os

import pytest
import torch

from shrink import results
from shrink.errors import CacheCorruptError


def test_cached_computes_once_and_keys_by_config():
    calls = []

    def fn():
        calls.append(1)
        return {"ppl": 12.5, "curve": torch.tensor([1.0, 2.0])}

    a = results.cached("exp", {"lr": 1e-3}, fn, scale="tiny", chapter="t")
    b = results.cached("exp", {"lr": 1e-3}, fn, scale="tiny", chapter="t")
    c = results.cached("exp", {"lr": 2e-3}, fn, scale="tiny", chapter="t")
    assert len(calls) == 2 and a == b == c == {"ppl": 12.5, "curve": [1.0, 2.0]}
    rec = results.load(results.record_path("exp", {"lr": 1e-3}, scale="tiny", chapter="t"))
    for key in ("config", "metrics", "versions", "git_sha", "device", "created", "seconds", "key"):
        assert key in rec
    folder = results.results_root() / "tiny" / "t"
    assert sorted(p.name.startswith(".") for p in folder.iterdir()) == [False, False]  # no temp files left


def test_interrupted_run_leaves_no_record_and_keeps_others():
    results.cached("done", {"a": 1}, lambda: {"x": 1}, scale="tiny", chapter="t")

    def boom():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        results.cached("broken", {"a": 1}, boom, scale="tiny", chapter="t")
    names = [p.name for p in (results.results_root() / "tiny" / "t").iterdir()]
    assert len(names) == 1 and names[0].startswith("done-")


def test_corrupt_record_names_the_file_and_spares_the_rest():
    results.cached("good", {"a": 1}, lambda: {"x": 1}, scale="tiny", chapter="t")
    bad = results.record_path("bad", {"a": 2}, scale="tiny", chapter="t")
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("{not json")
    with pytest.raises(CacheCorruptError, match=bad.name):
        results.cached("bad", {"a": 2}, lambda: {"x": 2}, scale="tiny", chapter="t")
    assert results.cached("good", {"a": 1}, lambda: {"x": 99}, scale="tiny", chapter="t") == {"x": 1}


def test_recompute_flag(monkeypatch):
    results.cached("e", {}, lambda: {"v": 1}, scale="tiny", chapter="t")
    monkeypatch.setenv("SHRINK_RECOMPUTE", "1")
    assert results.cached("e", {}, lambda: {"v": 2}, scale="tiny", chapter="t") == {"v": 2}


def test_bad_scale_and_unstorable_values():
    with pytest.raises(ValueError, match="scale"):
        results.cached("e", {}, lambda: {}, scale="huge", chapter="t")
    with pytest.raises(TypeError, match="cannot store"):
        results.save("e", {}, {"obj": object()}, scale="tiny", chapter="t")


def test_cached_tensors(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    calls = []
    x = results.cached_tensors("w", {"k": 1}, lambda: calls.append(1) or {"w": torch.ones(3)})
    y = results.cached_tensors("w", {"k": 1}, lambda: calls.append(1) or {"w": torch.zeros(3)})
    assert len(calls) == 1 and torch.equal(x["w"], y["w"])
    path = next((tmp_path / "tensors").glob("w-*.pt"))
    path.write_bytes(b"garbage")
    with pytest.raises(CacheCorruptError, match=path.name):
        results.cached_tensors("w", {"k": 1}, lambda: {})


def test_config_key_is_order_independent():
    assert results.config_key({"a": 1, "b": 2}) == results.config_key({"b": 2, "a": 1})
    assert results.config_key({"a": 1}) != results.config_key({"a": 2})


def test_record_from_other_code_is_recomputed(monkeypatch, capsys):
    results.cached("c", {"a": 1}, lambda: {"v": 1}, scale="tiny", chapter="t")
    path = results.record_path("c", {"a": 1}, scale="tiny", chapter="t")
    rec = json.loads(path.read_text())
    rec["code"] = "000000000000"
    path.write_text(json.dumps(rec))
    monkeypatch.setenv("SHRINK_REUSE_STALE", "1")
    assert results.cached("c", {"a": 1}, lambda: {"v": 2}, scale="tiny", chapter="t") == {"v": 1}
    monkeypatch.delenv("SHRINK_REUSE_STALE")
    assert results.cached("c", {"a": 1}, lambda: {"v": 2}, scale="tiny", chapter="t") == {"v": 2}
    assert "recomputing" in capsys.readouterr().out


def test_stale_cpu_record_is_reused_and_announced(monkeypatch, capsys):
    results.cached("c", {"a": 1}, lambda: {"v": 1}, scale="cpu", chapter="t")
    path = results.record_path("c", {"a": 1}, scale="cpu", chapter="t")
    rec = json.loads(path.read_text())
    rec["code"] = "000000000000"
    path.write_text(json.dumps(rec))
    assert results.cached("c", {"a": 1}, lambda: {"v": 2}, scale="cpu", chapter="t") == {"v": 1}
    assert "reused" in capsys.readouterr().out
    monkeypatch.setenv("SHRINK_STALE", "recompute")
    assert results.cached("c", {"a": 1}, lambda: {"v": 2}, scale="cpu", chapter="t") == {"v": 2}


def test_code_hash_is_scoped_per_chapter():
    from shrink import env

    weights, bits = results.chapter_code_hash("01-weights"), results.chapter_code_hash("02-bits")
    assert weights != bits and len(weights) == 12
    assert env.code_hash(("pruning",)) == weights and env.code_hash(None) == results.chapter_code_hash("99-new")
