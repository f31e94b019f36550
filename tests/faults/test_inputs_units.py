"""Unit checks of the validation layer behind the fault catalogue: the verdict caches cost nothing the second
time and notice a change, temporary notebook names never look like outputs, the validators are exact."""

import fnmatch
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import shrink.data as D
import shrink.models as M
from shrink import cli
from shrink.errors import BadInputError, CacheCorruptError, DataCorruptError, EnvError, check_int, env_int
from shrink.notebook import sanity_cells


def _data_copy(tmp_path, monkeypatch, data_dir):
    root = tmp_path / "data"
    (root / "text").mkdir(parents=True)
    shutil.copy(Path(data_dir) / "MANIFEST.md", root / "MANIFEST.md")
    shutil.copy(Path(data_dir) / "text" / "fortunes.txt", root / "text" / "fortunes.txt")
    monkeypatch.setenv("SHRINK_DATA", str(root))
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    D._VERIFIED.clear()
    return root / "text" / "fortunes.txt"


def test_data_verdict_is_cached_by_size_and_mtime(tmp_path, monkeypatch, data_dir):
    path = _data_copy(tmp_path, monkeypatch, data_dir)
    calls = []
    real = D.sha256_file
    monkeypatch.setattr(D, "sha256_file", lambda p: calls.append(p) or real(p))
    D.load_documents("fortunes")
    D.load_documents("fortunes")
    assert len(calls) == 1, "the second load must not hash again (in-process verdict)"
    D._VERIFIED.clear()
    D.load_documents("fortunes")
    assert len(calls) == 1, "a new process reuses the verdict stored under SHRINK_CACHE"
    stored = json.loads((tmp_path / "cache" / "data-verified.json").read_text())
    assert list(stored.values())[0][2] == hashlib.sha256(path.read_bytes()).hexdigest()
    with open(path, "r+b") as f:  # same size, one byte changed, new mtime
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 1]))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(DataCorruptError, match="fortunes.txt"):
        D.load_documents("fortunes")
    assert len(calls) == 2


def test_model_cache_hashes_once_per_change(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path))
    folder = M.smollm2_cache_path()
    model, _ = M.load("tiny-llama")
    model.save_pretrained(folder)
    (folder / "DONE").write_text(json.dumps({"from": M.SMOLLM2_GGUF, "files": M.content_manifest(folder)}))
    calls = []
    real = M._sha256
    monkeypatch.setattr(M, "_sha256", lambda p: calls.append(p.name) or real(p))
    assert M.verify_cache(folder) and len(calls) == len(json.loads((folder / "DONE").read_text())["files"])
    n = len(calls)
    assert M.verify_cache(folder) and len(calls) == n, "unchanged files are not hashed again"
    w = folder / "model.safetensors"
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))
    assert M.verify_cache(folder) and calls[n:] == ["model.safetensors"], "only the touched file is re-hashed"
    with open(w, "r+b") as f:
        f.seek(w.stat().st_size - 8)
        f.write(b"\0" * 8)
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 2 * 10**9))
    with pytest.raises(CacheCorruptError, match="model.safetensors"):
        M.verify_cache(folder)


def test_legacy_cache_marker_means_rebuild(tmp_path):
    (tmp_path / "DONE").write_text("from SmolLM2-135M-Instruct.Q4_1.gguf\n")
    assert M.verify_cache(tmp_path) is False


def test_partial_names_never_match_ipynb(tmp_path):
    out = tmp_path / "00-tour.ipynb"
    assert not fnmatch.fnmatch(cli.partial_path(out).name, "*.ipynb")
    assert cli.partial_path(out).name.startswith(".")


def test_validators_are_exact(monkeypatch):
    assert check_int("n", 1) == 1 and check_int("n", None, allow_none=True) is None
    for bad in (0, -1, True, 1.0, "3", None):
        with pytest.raises(BadInputError, match="n must be"):
            check_int("n", bad)
    assert check_int("seqlen", 2, minimum=2) == 2
    with pytest.raises(BadInputError):
        check_int("seqlen", 1, minimum=2)
    monkeypatch.setenv("SHRINK_THREADS", " 3 ")
    assert env_int("SHRINK_THREADS") == 3
    monkeypatch.setenv("SHRINK_THREADS", "")
    assert env_int("SHRINK_THREADS", default=7) == 7
    for bad in ("abc", "0", "-1", "1.5"):
        monkeypatch.setenv("SHRINK_THREADS", bad)
        with pytest.raises(EnvError, match="SHRINK_THREADS"):
            env_int("SHRINK_THREADS")


def test_sanity_cells_follow_the_heading():
    md = lambda s: {"cell_type": "markdown", "source": s}  # noqa: E731
    code = lambda tags=(): {"cell_type": "code", "source": "x", "metadata": {"tags": list(tags)}}  # noqa: E731
    cells = [md("# T"), code(), md("## Sanity checks"), code(), md("### detail"), code(), md("## Summary"), code(),
             code(["sanity"])]
    assert sanity_cells(cells) == [3, 5, 8]
    assert sanity_cells([md("# T"), code()]) == []
