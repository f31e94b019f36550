"""The instruction pool of the recovery notebooks: deterministic, disjoint held-out split, sources, formats."""

import json

import pytest

from shrink import data
from shrink.selection import instructions as I
from shrink.selection.errors import SelectionError


@pytest.fixture
def pool(data_dir):
    return I.build_pool(per_source=20, heldout={"lima": 4, "gsm8k": 10, "gpteacher-roleplay": 4,
                                                "gpteacher-toolformer": 4, "selfinstruct-seed": 4}, seed=0)


def test_counts_labels_and_disjoint_heldout(pool):
    by = {}
    for e in pool.train:
        by[e["source"]] = by.get(e["source"], 0) + 1
    assert by == {s: 20 for s in I.SOURCES}
    held = {}
    for e in pool.heldout:
        held[e["source"]] = held.get(e["source"], 0) + 1
    assert held == {"lima": 4, "gsm8k": 10, "gpteacher-roleplay": 4, "gpteacher-toolformer": 4,
                    "selfinstruct-seed": 4}
    ids_t, ids_h = {e["id"] for e in pool.train}, {e["id"] for e in pool.heldout}
    assert len(ids_t) == len(pool.train) and len(ids_h) == len(pool.heldout)
    assert not ids_t & ids_h                                          # disjoint by row
    assert not {e["sha256"] for e in pool.train} & {e["sha256"] for e in pool.heldout}  # and by content
    for e in pool.train + pool.heldout:
        assert e["instruction"].strip() and e["output"].strip()
        assert e["id"].startswith(e["source"] + ":")
        assert e["sha256"] == I.example_sha(e)


def test_deterministic_in_seed(pool, data_dir):
    again = I.build_pool(per_source=20, heldout={"lima": 4, "gsm8k": 10, "gpteacher-roleplay": 4,
                                                 "gpteacher-toolformer": 4, "selfinstruct-seed": 4}, seed=0)
    assert again.sha256() == pool.sha256()
    assert [e["id"] for e in again.train] == [e["id"] for e in pool.train]
    other = I.build_pool(per_source=20, heldout={"lima": 4, "gsm8k": 10, "gpteacher-roleplay": 4,
                                                 "gpteacher-toolformer": 4, "selfinstruct-seed": 4}, seed=1)
    assert other.sha256() != pool.sha256()
    # the held-out split of one source does not depend on how many pool examples are drawn
    small = I.build_pool(["gsm8k"], per_source=3, heldout=10, seed=0)
    assert [e["id"] for e in small.heldout] == [e["id"] for e in pool.heldout if e["source"] == "gsm8k"]


def test_rows_match_the_source_files(pool):
    lima = data.load_instructions("lima")
    for e in (x for x in pool.train if x["source"] == "lima"):
        row = lima[int(e["id"].split(":")[1])]
        assert (e["instruction"], e["output"]) == (row["instruction"], row["output"])  # LIMA: first turn pair
    gsm = data.load_instructions("gsm8k")
    for e in (x for x in pool.heldout if x["source"] == "gsm8k"):
        assert e["output"] == gsm[int(e["id"].split(":")[1])]["output"]


def test_local_alpaca_file_and_duplicates(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)]
    rows += [rows[0], {"instruction": "", "input": "", "output": "x"}]  # a duplicate and an empty instruction
    f = tmp_path / "alpaca_data_cleaned.json"
    f.write_text(json.dumps(rows))
    p = I.build_pool([str(f)], per_source=None, heldout=2, seed=3)
    assert len(p.train) == 8 and len(p.heldout) == 2                 # 10 distinct valid rows
    assert {e["source"] for e in p.train} == {"alpaca_data_cleaned"}
    assert len({e["sha256"] for e in p.train + p.heldout}) == 10
    out = I.write_alpaca_json(tmp_path / "back.json", p.train)
    again = I.build_pool([str(out)], per_source=None, heldout=0, seed=0)
    assert sorted(e["sha256"] for e in again.train) == sorted(e["sha256"] for e in p.train)


def test_bad_sources_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(SelectionError, match="unknown instruction source"):
        I.build_pool(["alpaca"], per_source=1, heldout=0)
    with pytest.raises(SelectionError, match="does not exist"):
        I.build_pool([str(tmp_path / "missing.json")], per_source=1, heldout=0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x", "completion": "y"}]))
    with pytest.raises(SelectionError, match="Alpaca format"):
        I.build_pool([str(bad)], per_source=1, heldout=0)
    monkeypatch.delenv("SHRINK_ONLINE", raising=False)
    with pytest.raises(SelectionError, match="SHRINK_ONLINE"):
        I.build_pool(["hf:yahma/alpaca-cleaned"], per_source=1, heldout=0)
    with pytest.raises(SelectionError, match="non-negative"):
        I.build_pool([str(bad)], per_source=-1, heldout=0)
