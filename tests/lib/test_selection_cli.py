"""`shrink select dsir` over generated shards equals the in-process DSIR selection."""

import json

import numpy as np
import pytest

from shrink import cli
from shrink.selection import DSIR, pools


def _corpus(seed=0, n=80):
    rng = np.random.default_rng(seed)
    vocab_a = "the river sea town old bridge story water boat".split()
    vocab_b = "def return import class self value list print".split()
    recs = []
    for i in range(n):
        v = vocab_a if i % 3 == 0 else vocab_b
        recs.append({"id": f"c/{i}", "text": " ".join(rng.choice(v, size=120))})
    target = [" ".join(rng.choice(vocab_a, size=120)) for _ in range(10)]
    return recs, target


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code, json.loads(capsys.readouterr().out)


def test_select_dsir_matches_in_process(tmp_path, capsys):
    recs, target = _corpus()
    pools.write_shards(recs, tmp_path / "pool", 3)
    pools.write_shards([{"id": f"t/{i}", "text": t} for i, t in enumerate(target)], tmp_path / "tgt", 1, compress=False)
    argv = ["select", "dsir", "--pool", str(tmp_path / "pool" / "*.jsonl.zst"), "--target",
            str(tmp_path / "tgt" / "*.jsonl"), "--k", "12", "--seed", "3", "--ids"]
    try:
        cli.main(argv)
        code = 0
        out = json.loads(capsys.readouterr().out)
    except SystemExit as e:  # main() exits only on errors
        code, out = e.code, json.loads(capsys.readouterr().out)
    assert code == 0, out
    ref = DSIR().fit([r["text"] for r in recs], target).select(12, seed=3)
    assert out["indices"] == ref.tolist()
    assert out["ids"] == [recs[i]["id"] for i in ref]
    assert sum(recs[i]["id"].split("/")[1].isdigit() and int(recs[i]["id"].split("/")[1]) % 3 == 0 for i in ref) == 12


def test_select_ray_bad_address_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("ray")
    recs, target = _corpus()
    pools.write_shards(recs, tmp_path, 1)
    (tmp_path / "t.txt").write_text("\n".join(target))
    code, out = _run(["select", "dsir", "--pool", str(tmp_path / "*.jsonl.zst"), "--target", str(tmp_path / "t.txt"),
                      "--k", "5", "--ray", "127.0.0.1:1"], capsys)  # nothing listens on port 1
    assert code == 2 and "ray start --head" in out["message"] and "RAY_ADDRESS" in out["message"]
    code, out = _run(["select", "dsir", "--pool", str(tmp_path / "*.jsonl.zst"), "--target", str(tmp_path / "t.txt"),
                      "--k", "500"], capsys)
    assert code == 2 and "k=500" in out["message"]
