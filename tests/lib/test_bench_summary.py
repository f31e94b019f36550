"""benchmarks/summary.py (the ratio table of ``make bench``) and ``shrink.results.load_bench``: targets are judged
in the right direction, every committed benchmark record has its rows, and a missing GPU record is reported as
not measured rather than as met."""

import json
import sys
from pathlib import Path

import pytest

from shrink import results
from shrink.errors import CacheCorruptError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import summary  # noqa: E402


def test_target_direction():
    assert summary._row("a", 1.42, 1.5)["status"] == "not met"
    assert summary._row("a", 1.5, 1.5)["status"] == "met"
    assert summary._row("a", 1.07, 1.2, "lower")["status"] == "met"
    assert summary._row("a", 1.36, 1.2, "lower")["status"] == "not met"
    assert summary._row("a", None, 1.5)["status"] == "not measured"
    assert summary._row("a", 0.9)["status"] == "no target"


def test_rows_cover_the_committed_records():
    rows = summary.rows()
    names = " | ".join(r["benchmark"] for r in rows)
    bench = {p.stem for p in (ROOT / "results" / "bench").glob("*.json")}
    if "pruning-block" in bench:
        assert "wanda whole block" in names and "sparsegpt whole block" in names
    if "forward" in bench:
        assert "causal GEMM floor" in names
    if "gpu" not in bench:
        assert any(r["status"] == "not measured" and "GPU" in r["benchmark"] for r in rows)
    hb = [r for r in rows if r["benchmark"].startswith("cpu handbook")]
    assert len(hb) == 1 and float(hb[0]["ratio"]) > 0


def test_load_bench(monkeypatch, tmp_path):
    from shrink import env

    assert results.load_bench("no-such-benchmark") is None
    (tmp_path / "results" / "bench").mkdir(parents=True)
    monkeypatch.setattr(env, "repo_root", lambda: tmp_path)
    (tmp_path / "results" / "bench" / "x.json").write_text(json.dumps({"a": 1}))
    assert results.load_bench("x") == {"a": 1}
    (tmp_path / "results" / "bench" / "y.json").write_text("{trunc")
    with pytest.raises(CacheCorruptError, match="bench_y.py"):
        results.load_bench("y")
