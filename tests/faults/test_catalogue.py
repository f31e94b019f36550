"""The fault catalogue as a test: every row of :mod:`catalogue` must come out ``clear`` (a ShrinkError, or
JSON + exit 2 on the CLI, whose message names the problem and the fix; nothing left looking done; nothing
lost). Rows are independent (own tmp folder and environment), so the test runs under pytest-xdist."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from catalogue import ROWS  # noqa: E402
from harness import CLASSES, observe  # noqa: E402


def test_catalogue_size_and_ids():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), "row ids must be unique"
    assert len(ROWS) >= 80, f"the catalogue has {len(ROWS)} rows; issue 10 asks for at least 80"
    assert {r.layer for r in ROWS} >= {"cli", "library", "make", "signals", "disk"}


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_fault_is_clear(row, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))  # no row touches the real caches
    ctx = SimpleNamespace(tmp=tmp_path, mp=monkeypatch, expect_interrupt=False)
    out = observe(row, ctx)
    assert out.cls in CLASSES
    assert out.cls == "clear", f"{row.id} ({row.layer}): {row.what}\n -> {out.cls}: {out.detail}"
