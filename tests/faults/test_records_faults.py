"""Fault table of the results cache (issue 10 §3-4): every fault raises a ShrinkError whose message names the
fix, and no computed result is lost (it is returned, kept in a fallback file, or on the exception).

One row per fault; each row is a function ``(env) -> None`` that provokes the fault and asserts the message
and what survives. ``env`` gives the isolated folders (results, cache, system temp).
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from shrink import env as shrink_env
from shrink import results
from shrink.errors import CacheCorruptError, EnvError, RecordWriteError, ShrinkError, UnstorableError


@pytest.fixture
def box(tmp_path, monkeypatch):
    """Isolated results folder, cache and system temp folder (fallbacks and locks go there)."""
    res, cache, tmp = tmp_path / "results", tmp_path / "cache", tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("SHRINK_RESULTS", str(res))
    monkeypatch.setenv("SHRINK_CACHE", str(cache))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.delenv("SHRINK_RESULTS_MODE", raising=False)
    return SimpleNamespace(results=res, cache=cache, tmp=tmp, path=tmp_path, monkeypatch=monkeypatch)


def _counting(value):
    calls = []

    def fn():
        calls.append(1)
        return value

    return fn, calls


# ---------------------------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------------------------
def unwritable_results_folder(b):
    real = tempfile.mkstemp

    def refuse(*a, dir=None, **k):  # root ignores chmod, so the refusal is injected where the probe writes
        if dir is not None and str(dir).startswith(str(b.results)):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*a, dir=dir, **k)

    b.monkeypatch.setattr(tempfile, "mkstemp", refuse)
    fn, calls = _counting({"v": 1})
    with pytest.raises(EnvError, match="SHRINK_RESULTS") as e:
        results.cached("r", {"a": 1}, fn, scale="cpu", chapter="t")
    assert calls == [], "must fail before the compute"
    assert "free space" in str(e.value) and "writable" in str(e.value)


def disk_full_on_write(b):
    real = results.atomic_write_text
    state = {"full": True}

    def full(path, text):
        if state["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, text)

    b.monkeypatch.setattr(results, "atomic_write_text", full)
    fn, calls = _counting({"ppl": 34.46, "curve": [1.0, 2.0]})
    with pytest.raises(RecordWriteError, match="SHRINK_RESULTS") as e:
        results.cached("r", {"a": 1}, fn, scale="cpu", chapter="t")
    err = e.value
    assert "No space left" in str(err) and "free space" in str(err) and str(err.fallback) in str(err)
    assert err.result == {"ppl": 34.46, "curve": [1.0, 2.0]} and err.fallback.is_file()
    state["full"] = False  # space freed: the next run adopts the fallback instead of recomputing
    again, calls2 = _counting({"ppl": -1.0})
    assert results.cached("r", {"a": 1}, again, scale="cpu", chapter="t") == {"ppl": 34.46, "curve": [1.0, 2.0]}
    assert calls == [1] and calls2 == [] and not err.fallback.exists()
    assert results.record_path("r", {"a": 1}, scale="cpu", chapter="t").is_file()


def non_storable_metric(b):
    fn, calls = _counting({"ok": 1.0, "obj": object()})
    with pytest.raises(UnstorableError, match=r"metrics\['obj'\]") as e:
        results.cached("r", {"a": 1}, fn, scale="cpu", chapter="t")
    assert "convert it" in str(e.value) and e.value.result["ok"] == 1.0
    assert e.value.fallback.is_file() and torch.load(e.value.fallback, weights_only=False)["ok"] == 1.0
    # unambiguous conversions are stored, not refused
    assert results.cached("s", {}, lambda: {"set": {2, 1}}, scale="cpu", chapter="t") == {"set": [1, 2]}


def non_storable_config(b):
    fn, calls = _counting({"v": 1})
    with pytest.raises(UnstorableError, match=r"config\['model'\]"):
        results.cached("r", {"model": object()}, fn, scale="cpu", chapter="t")
    assert calls == [], "an unstorable config fails before the compute"


def concurrent_writers(b):
    counter = b.path / "computed.txt"
    script = textwrap.dedent(f"""
        import json, os, time
        from pathlib import Path
        from shrink import results
        ready = Path({str(b.path)!r}) / f"ready-{{os.getpid()}}"
        ready.touch()
        while len(list(ready.parent.glob("ready-*"))) < 2:  # start both calls together
            time.sleep(0.02)
        def fn():
            with open({str(counter)!r}, "a") as f:
                f.write("x\\n")
            time.sleep(1.5)
            return {{"v": 7}}
        print(json.dumps(results.cached("c", {{"a": 1}}, fn, scale="cpu", chapter="t")))
    """)
    envv = {**os.environ, "SHRINK_RESULTS": str(b.results), "TMPDIR": str(b.tmp)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=envv, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert [json.loads(o.strip().splitlines()[-1]) for o in outs] == [{"v": 7}, {"v": 7}]
    assert counter.read_text().count("x") == 1, "the second writer must wait and read the first one's record"


def _corrupt(b, content):
    path = results.record_path("r", {"a": 1}, scale="cpu", chapter="t")
    path.parent.mkdir(parents=True, exist_ok=True)
    results.cached("other", {"a": 1}, lambda: {"v": 1}, scale="cpu", chapter="t")
    if content == "DIR":
        path.mkdir()
    else:
        path.write_text(content)
    fn, calls = _counting({"v": 2})
    with pytest.raises(CacheCorruptError, match=path.name) as e:
        results.cached("r", {"a": 1}, fn, scale="cpu", chapter="t")
    assert ("rm -r" if content == "DIR" else "Delete that one file") in str(e.value) and calls == []
    assert results.cached("other", {"a": 1}, lambda: {"v": 9}, scale="cpu", chapter="t") == {"v": 1}


def corrupt_record_list(b):
    _corrupt(b, "[]")


def corrupt_record_null(b):
    _corrupt(b, "null")


def corrupt_record_truncated(b):
    _corrupt(b, "{")


def corrupt_record_without_metrics(b):
    _corrupt(b, '{"config": {}}')


def record_is_a_directory(b):
    _corrupt(b, "DIR")


def tensor_file_hash_mismatch(b):
    value = {"w": torch.arange(4.0), "history": [1, 2]}
    results.cached_tensors("p", {"a": 1}, lambda: value, scale="cpu", chapter="t")
    file, rec = results.tensor_paths("p", {"a": 1}, scale="cpu", chapter="t")
    blob = bytearray(file.read_bytes())
    blob[-1] ^= 0xFF  # one flipped bit in the data: safetensors would load it silently
    file.write_bytes(bytes(blob))
    fn, calls = _counting(value)
    with pytest.raises(CacheCorruptError, match=file.name) as e:
        results.cached_tensors("p", {"a": 1}, fn, scale="cpu", chapter="t")
    assert "git checkout" in str(e.value) and "sha256" in str(e.value) and calls == []


def tensor_file_without_record(b):
    results.cached_tensors("p", {"a": 1}, lambda: {"w": torch.ones(2)}, scale="cpu", chapter="t")
    file, rec = results.tensor_paths("p", {"a": 1}, scale="cpu", chapter="t")
    rec.unlink()
    with pytest.raises(CacheCorruptError, match=rec.name):
        results.cached_tensors("p", {"a": 1}, lambda: {"w": torch.ones(2)}, scale="cpu", chapter="t")


def local_tensor_cache_corrupt(b):
    results.cached_tensors("w", {"k": 1}, lambda: {"w": torch.ones(3)})
    path = next((b.cache / "tensors").glob("w-*.pt"))
    path.write_bytes(b"garbage")
    with pytest.raises(CacheCorruptError, match=path.name):
        results.cached_tensors("w", {"k": 1}, lambda: {})


def cache_is_a_file(b):
    b.cache.write_text("not a folder")
    with pytest.raises(EnvError, match="SHRINK_CACHE") as e:
        shrink_env.cache_dir("tensors")
    assert "Point SHRINK_CACHE at a folder" in str(e.value)
    fn, calls = _counting({"w": torch.ones(1)})
    with pytest.raises(EnvError, match="SHRINK_CACHE"):
        results.cached_tensors("w", {}, fn)
    assert calls == []
    out = subprocess.run([sys.executable, "-m", "shrink.cli", "info"], capture_output=True, text=True,
                         env={**os.environ, "SHRINK_CACHE": str(b.cache)}, timeout=120)
    assert "Traceback" not in out.stderr and "SHRINK_CACHE" in (out.stdout + out.stderr)


def results_is_a_file(b):
    b.results.write_text("not a folder")
    fn, calls = _counting({"v": 1})
    with pytest.raises(EnvError, match="SHRINK_RESULTS") as e:
        results.cached("r", {}, fn, scale="cpu", chapter="t")
    assert "Point SHRINK_RESULTS at a folder" in str(e.value) and calls == []


def killed_cache_build_leftovers(b):
    models = b.cache / "models"
    models.mkdir(parents=True)
    script = ("import os, signal, sys; from shrink import env; "
              "t = env.temp_dir(sys.argv[1], '.tmp-'); (t / 'model.safetensors').write_bytes(b'x' * 1000); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    p = subprocess.run([sys.executable, "-c", script, str(models)], timeout=120)
    assert p.returncode == -9
    (left,) = list(models.glob(".tmp-*"))
    assert re.fullmatch(r"\.tmp-\d+-.+", left.name) and left.stat().st_mode & 0o777 == shrink_env.dir_mode()
    live = shrink_env.temp_dir(models, ".tmp-")  # this process is alive: its build folder must survive
    removed = shrink_env.clean_stale_temps(models, ".tmp-")
    assert removed == [left] and not left.exists() and live.exists()


def normal_permissions(b):
    old = os.umask(0o022)
    try:
        path = results.save("r", {}, {"v": 1}, scale="cpu", chapter="t")
        results.cached_tensors("p", {}, lambda: {"w": torch.ones(1)}, scale="cpu", chapter="t")
        results.cached_tensors("q", {}, lambda: {"w": torch.ones(1)})
        file, rec = results.tensor_paths("p", {}, scale="cpu", chapter="t")
        local = next((b.cache / "tensors").glob("q-*.pt"))
        for p in (path, file, rec, local):
            assert p.stat().st_mode & 0o777 == 0o644, p
        assert shrink_env.temp_dir(b.path, ".x-").stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(old)


ROWS = [unwritable_results_folder, disk_full_on_write, non_storable_metric, non_storable_config,
        concurrent_writers, corrupt_record_list, corrupt_record_null, corrupt_record_truncated,
        corrupt_record_without_metrics, record_is_a_directory, tensor_file_hash_mismatch,
        tensor_file_without_record, local_tensor_cache_corrupt, cache_is_a_file, results_is_a_file,
        killed_cache_build_leftovers, normal_permissions]


@pytest.mark.parametrize("row", ROWS, ids=[r.__name__ for r in ROWS])
def test_records_fault(row, box):
    row(box)


def test_every_fault_error_is_a_shrink_error():
    for cls in (CacheCorruptError, EnvError, RecordWriteError, UnstorableError):
        assert issubclass(cls, ShrinkError)
