"""kMQ (K by silhouette, exact budget, quality-weighted draws), its iterative variant, and the quality scores
(IFD / response perplexity) against an independent unbatched computation."""

import math

import numpy as np
import pytest
import torch

from shrink import models
from shrink.selection import kmq, quality
from shrink.selection.errors import SelectionError


def _blobs(K=4, n=40, d=10, seed=0, scale=8.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, d)) * scale
    return np.concatenate([c + rng.normal(size=(n, d)) for c in centres]), np.repeat(np.arange(K), n)


def test_choose_k_by_silhouette_finds_the_blobs():
    x, _ = _blobs(K=4)
    k, scores = kmq.choose_k(x, (2, 4, 8, 16), seed=0)
    assert k == 4 and scores[4] == max(scores.values())


def test_select_budget_exact_and_balanced():
    x, _ = _blobs(K=4, n=40)
    q = np.random.default_rng(0).normal(size=len(x))
    for B in (1, 7, 50, 160):
        idx, info = kmq.select(x, q, B, k=4, seed=1)
        assert len(idx) == B and len(np.unique(idx)) == B
        assert info["quotas"].sum() == B and info["quotas"].max() - info["quotas"].min() <= 1
        assert np.array_equal(np.bincount(info["labels"][idx], minlength=4), info["quotas"])


def test_select_redistributes_when_a_cluster_is_small():
    x, _ = _blobs(K=3, n=30)
    x = np.concatenate([x[:35], x[60:]])  # cluster sizes 30, 5, 30
    idx, info = kmq.select(x, np.zeros(len(x)), 45, k=3, seed=0)
    assert len(idx) == 45 and sorted(info["quotas"].tolist()) == [5, 20, 20]


def test_select_low_temperature_takes_the_best_per_cluster():
    x, _ = _blobs(K=4)
    q = np.random.default_rng(2).normal(size=len(x))
    idx, info = kmq.select(x, q, 20, k=4, seed=0, temperature=1e-6)
    for c in range(4):
        mem = np.flatnonzero(info["labels"] == c)
        best = set(mem[np.argsort(-q[mem])[: info["quotas"][c]]].tolist())
        assert best == set(idx[info["labels"][idx] == c].tolist())


def test_select_quality_weighting_direction():
    """Softmax(quality) sampling prefers high-quality examples: over 40 seeds the mean quality of the
    selection beats the pool's by far more than its spread."""
    x, _ = _blobs(K=4)
    q = np.random.default_rng(3).normal(size=len(x)) * 2
    means = [q[kmq.select(x, q, 20, k=4, seed=s)[0]].mean() for s in range(40)]
    assert np.mean(means) - q.mean() > 5 * np.std(means) / math.sqrt(40)


def test_iterative_follows_the_callback():
    from shrink.selection.baselines import kmeans

    x, _ = _blobs(K=4, n=40)
    labels, _ = kmeans(x, 4, 0)  # the clusters iterative() builds with seed 0
    q = np.zeros(len(x))
    calls = []

    def score_fn(sel, r):
        calls.append((len(sel), r))
        return np.where(labels[sel] == 2, 10.0, 0.0)  # the model "still fails" on cluster 2

    idx, info = kmq.iterative(x, q, 60, score_fn, rounds=3, k=4, seed=0, cluster_temperature=0.1)
    assert len(idx) == 60 and len(np.unique(idx)) == 60
    assert calls == [(20, 0), (40, 1)]
    assert np.array_equal(info["labels"], labels)
    left = int((labels == 2).sum()) - int((labels[info["rounds"][0]["selected"]] == 2).sum())
    got = int((labels[info["rounds"][1]["selected"]] == 2).sum())
    assert got == min(20, left)  # round 1 takes what cluster 2 has left before anything else
    assert info["rounds"][1]["weights"][2] > 0.99
    with pytest.raises(SelectionError, match="score_fn"):
        kmq.iterative(x, q, 60, lambda sel, r: np.zeros(3), rounds=2, k=4)


def test_kmq_bad_input():
    x, _ = _blobs()
    with pytest.raises(SelectionError, match="quality"):
        kmq.select(x, np.zeros(3), 5, k=4)
    with pytest.raises(SelectionError, match="budget"):
        kmq.select(x, np.zeros(len(x)), 0, k=4)
    with pytest.raises(SelectionError, match="candidate K"):
        kmq.choose_k(x[:5], (8, 16))


# ------------------------------------------------------------------------------------------- quality
EX = [{"instruction": "Add two and two.", "output": "Four. 2 + 2 = 4."},
      {"instruction": "Name a colour.", "input": "warm", "output": "Red"},
      {"instruction": "Repeat: abc abc", "output": "abc abc abc abc abc"}]


def _naive_nll(model, ids, start):
    """Unbatched mean NLL of ids[start:] given ids[:start] (one forward, no padding)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return float(-torch.stack([lp[j - 1, ids[j]] for j in range(start, len(ids))]).mean())


def test_ifd_matches_unbatched_formula():
    from shrink.train import format_prompt

    m, tok = models.load("tiny-llama", seed=0)
    score, cond, unc = quality.ifd(m, tok, EX, return_parts=True, batch_size=2)
    for e, c, u, s in zip(EX, cond, unc, score):
        p = tok.encode(format_prompt(e), add_special_tokens=False)
        r = tok.encode(e["output"], add_special_tokens=False)
        assert abs(c - _naive_nll(m, p + r, len(p))) < 1e-5
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        assert abs(u - _naive_nll(m, [start] + r, 1)) < 1e-5
        assert abs(s - math.exp(c - u)) < 1e-9
    assert np.allclose(quality.response_ppl(m, tok, EX), np.exp(cond))
    with pytest.raises(SelectionError, match="output"):
        quality.ifd(m, tok, [{"instruction": "x", "output": " "}])
