"""Fault catalogue, data chapter: every bad input raises a ShrinkError whose message names the problem and
the fix (classified with the catalogue's harness)."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import assert_clear as _clear  # noqa: E402

from shrink.selection import DSIR, Featurizer, gumbel_topk, metrics, pools, topk  # noqa: E402

TEXTS = [("the cat sat on the mat . " * 30), ("a dog ran in the park ! " * 30), ("one two three four " * 40)]




def test_k_larger_than_pool():
    d = DSIR(min_example_length=0).fit(TEXTS, TEXTS[:1])
    _clear(lambda: d.select(10), "k=10", "eligible")
    _clear(lambda: topk(np.zeros(3), 4), "k=4")


def test_k_larger_than_eligible_after_length_filter():
    d = DSIR(min_example_length=100).fit(TEXTS + ["too short"], TEXTS[:1])
    _clear(lambda: d.select(4, top_k=True), "k=4", "min_example_length")


@pytest.mark.parametrize("k", [-1, 2.5, True])
def test_k_not_a_count(k):
    _clear(lambda: gumbel_topk(np.zeros(3), k, 0), "k=")


def test_empty_target():
    _clear(lambda: DSIR().fit(TEXTS, []), "target", "empty")
    _clear(lambda: DSIR().fit(TEXTS, ["", "  "]), "target")
    _clear(lambda: metrics.kl_reduction(np.zeros(4), np.ones(4), np.ones(4)), "target", "empty")


def test_empty_pool():
    _clear(lambda: DSIR().fit([], TEXTS), "pool")


def test_not_fitted():
    _clear(lambda: DSIR().log_weights(), "not fitted", "fit")


@pytest.mark.parametrize("kw,names", [({"mode": "sha1"}, ("mode", "exact")), ({"ngrams": 3}, ("ngrams=3",)),
                                      ({"num_buckets": 0}, ("num_buckets",)),
                                      ({"mode": "exact", "salt": 3}, ("salt",))])
def test_bad_featurizer_options(kw, names):
    _clear(lambda: Featurizer(**kw), *names)


def test_nan_weights():
    _clear(lambda: topk(np.array([0.0, np.nan, 1.0]), 1), "NaN")


def test_unknown_pool_domain():
    _clear(lambda: pools.build_pool(["shakespeare", "the-pile"]), "the-pile", "known")


def test_bad_chunk_length():
    _clear(lambda: pools.chunk_words("a b c", 0), "words")


def test_corrupt_zstd_shard(tmp_path):
    recs = [{"id": str(i), "text": t} for i, t in enumerate(TEXTS)]
    [p] = pools.write_shards(recs, tmp_path, 1)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])  # truncated
    _clear(lambda: list(pools.iter_shard(p)), p.name, "corrupt")
    p.write_bytes(b"not zstd at all" * 10)
    _clear(lambda: list(pools.iter_shard(p)), p.name)


def test_shard_with_a_broken_line_or_missing_text(tmp_path):
    p = tmp_path / "pool-00000-of-00001.jsonl"
    p.write_text(json.dumps({"id": "0", "text": "ok"}) + "\n{not json\n")
    _clear(lambda: list(pools.iter_shard(p, "text")), "pool-00000-of-00001.jsonl:2", "regenerate")
    p.write_text(json.dumps({"id": "0", "body": "no text field"}) + "\n")
    _clear(lambda: list(pools.iter_shard(p, "text")), "'text'")


def test_no_shard_matches(tmp_path):
    _clear(lambda: list(pools.iter_shards(str(tmp_path / "*.jsonl.zst"))), "no shard matches")


def test_too_many_shards(tmp_path):
    _clear(lambda: pools.write_shards([{"id": "0", "text": "x"}], tmp_path, 3), "n_shards=3")


def test_shards_are_written_atomically(tmp_path):
    """A failing writer leaves no shard (and no temporary file) behind."""
    class Boom(dict):
        def __iter__(self):
            raise RuntimeError("disk full")

    def gen():
        yield {"id": "0", "text": "fine"}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        pools.write_shards(list(gen()), tmp_path, 1)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ PASER / kMQ / Q-Tuning (data chapter II)
def _emb(n=30, d=6):
    return np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)


def test_paser_bad_inputs():
    from shrink.selection import paser

    x = _emb()
    _clear(lambda: paser.select(x, np.zeros(30), 31, ntem=False), "budget=31", "[1, 30]")
    _clear(lambda: paser.select(x, np.zeros(29), 5, ntem=False), "jsd", "jsd_scores")
    _clear(lambda: paser.select(x, np.full(30, np.nan), 5, ntem=False), "jsd", "finite")
    _clear(lambda: paser.select(x, np.zeros(30), 5), "NTEM", "ntem=False")
    _clear(lambda: paser.select(x, np.zeros(30), 5, ntem=False, components=("s2c", "x")), "components")
    _clear(lambda: paser.select(x, np.zeros(30), 5, ntem=False, n_clusters=30), "n_clusters=30")
    _clear(lambda: paser.select(x, np.zeros(30), 5, ntem=False, n_clusters=3), "weight 0", "models differ")
    _clear(lambda: paser.allocate([1.0, -1.0], [2, 2], 2), "weights", ">= 0")


def test_paser_token_jsd_bad_inputs():
    import torch

    from shrink.selection import paser

    a, b = torch.zeros(1, 3, 5), torch.zeros(1, 3, 6)
    _clear(lambda: paser.token_jsd(a, b), "shape", "same batch")
    _clear(lambda: paser.token_jsd(a, a, reduction="median"), "reduction", "mean")


def test_kmq_bad_inputs():
    from shrink.selection import kmq

    x = _emb()
    _clear(lambda: kmq.select(x, np.zeros(5), 5, k=3), "quality", "[N]=30")
    _clear(lambda: kmq.select(x, np.zeros(30), 5, k=3, temperature=0), "temperature")
    _clear(lambda: kmq.choose_k(x, (64, 128)), "candidate K", "smaller ks")
    _clear(lambda: kmq.iterative(x, np.zeros(30), 5, lambda s, r: s, rounds=6, k=3), "rounds=6")


def test_qtuning_bad_inputs():
    from shrink.selection import qtuning

    _clear(lambda: qtuning.QTuningHook(0.0, 0.5), "r_sample=0.0", "fraction")
    _clear(lambda: qtuning.QTuningHook(0.5, 2), "r_token=2", "fraction")
    _clear(lambda: qtuning.QTuningHook(0.5, 0.5, lam=3), "lam=3")
    _clear(lambda: qtuning.sample_rule(np.ones(3), np.ones(4), 0.5), "one length")
