"""Q-Tuning: the sample rule keeps round(r·B) samples (within ±1 of r·B) per batch, the token rule keeps
exactly ⌈r·T⌉ tokens per Q2 sample (vs a naive re-implementation), EU scores vs a naive formula, and the
hook inside shrink.train.train (r = 1 reproduces plain training bit for bit)."""

import math

import numpy as np
import pytest
import torch

from shrink import models
from shrink import train as T
from shrink.selection import qtuning as Q
from shrink.selection.errors import SelectionError


def test_sample_rule_hits_the_ratio():
    rng = np.random.default_rng(0)
    for _ in range(400):
        B = int(rng.integers(1, 70))
        r = float(rng.choice([0.1, 0.125, 0.25, 0.3, 0.5, 0.7, 1.0]))
        ppl = np.exp(rng.normal(size=B))
        ent = rng.normal(size=B) + (0.8 * np.log(ppl) if rng.random() < 0.5 else 0)
        if rng.random() < 0.2:
            ppl = np.round(ppl, 1)  # ties
        keep, info = Q.sample_rule(ppl, ent, r)
        assert abs(int(keep.sum()) - r * B) <= 1
        assert int(keep.sum()) == min(B, max(1, round(r * B)))
        assert not (info["q2"] & info["q4"]).any() and np.array_equal(info["q2"] | info["q4"], keep)


def test_sample_rule_quadrants_follow_the_code():
    # 2 samples per quadrant: Q1 high/high, Q2 high PPL low Ent, Q3 low/low, Q4 low PPL high Ent
    ppl = np.array([9.0, 8.0, 9.5, 8.5, 1.0, 1.5, 1.2, 1.7])
    ent = np.array([5.0, 4.0, 0.5, 0.7, 0.6, 0.4, 4.5, 5.5])
    keep, info = Q.sample_rule(ppl, ent, 0.5)
    assert np.flatnonzero(keep).tolist() == [2, 3, 6, 7]
    assert np.flatnonzero(info["q2"]).tolist() == [2, 3] and np.flatnonzero(info["q4"]).tolist() == [6, 7]
    assert info["topped_up"] == 0 and info["trimmed"] == 0
    assert Q.quadrants(ppl, ent).tolist() == [1, 1, 2, 2, 3, 3, 4, 4]


def test_sample_rule_bisection_set_is_the_quantile_definition():
    rng = np.random.default_rng(1)
    for _ in range(100):
        B = 64
        ppl, ent = np.exp(rng.normal(size=B)), rng.normal(size=B)
        keep, info = Q.sample_rule(ppl, ent, 0.25)
        a = info["alpha"]
        q2 = (ppl > np.quantile(ppl, 1 - a)) & (ent <= np.quantile(ent, a))
        q4 = (ppl <= np.quantile(ppl, a)) & (ent > np.quantile(ent, 1 - a))
        assert info["bisect_count"] == int((q2 | q4).sum())
        if info["topped_up"] == 0 and info["trimmed"] == 0:
            assert np.array_equal(keep, q2 | q4)
        if info["topped_up"]:
            assert (q2 | q4)[~keep].sum() == 0  # every bisection member is kept


def _naive_token_keep(nll, mask, rows, r, lam):
    B, L = nll.shape
    keep = mask.copy()
    for i in rows:
        p = [math.exp(nll[i, j]) if mask[i, j] else 0.0 for j in range(L)]
        s = {j: (1 - lam) * p[j] + lam * ((p[j - 1] if j > 0 else 0) + (p[j + 1] if j + 1 < L else 0))
             for j in range(L) if mask[i, j]}
        k = math.ceil(r * len(s) - 1e-9)
        chosen = sorted(s, key=lambda j: (s[j], j))[:k]
        keep[i] = False
        keep[i, chosen] = True
    return keep


def test_token_rule_keeps_ceil_r_T_lowest_scores():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        B, L = 6, 17
        nll = torch.rand(B, L, generator=g) * 4
        mask = torch.rand(B, L, generator=g) > 0.3
        mask[:, 0] = True
        rows = [0, 2, 5]
        for r in (0.5, 0.7, 0.75, 1.0):
            keep = Q.token_rule(nll * mask, mask, rows, r, lam=0.5)
            want = _naive_token_keep((nll * mask).double().numpy(), mask.numpy(), rows, r, 0.5)
            assert np.array_equal(keep.numpy(), want)
            for i in range(B):
                n = int(mask[i].sum())
                assert int(keep[i].sum()) == (math.ceil(r * n - 1e-9) if i in rows else n)
                assert not (keep[i] & ~mask[i]).any()


def test_eu_scores_match_naive():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 5, generator=g)
    labels = torch.randint(0, 5, (3, 6), generator=g)
    labels[:, :2] = -100
    att = torch.ones(3, 6, dtype=torch.long)
    att[2, 5] = 0
    labels[2, 5] = -100
    ppl, ent, nll, mask = Q.eu_scores(logits, labels, att)
    pr, er, _, _ = Q.eu_scores(logits, labels, att, entropy_over="response")
    lp = torch.log_softmax(logits.double(), -1)
    for i in range(3):
        resp = [j for j in range(1, 6) if labels[i, j] != -100]
        want = math.exp(-np.mean([float(lp[i, j - 1, labels[i, j]]) for j in resp]))
        assert abs(ppl[i] - want) < 1e-5 and abs(pr[i] - want) < 1e-5
        H = [-float((lp[i, j].exp() * lp[i, j]).sum()) for j in range(5)]
        assert abs(ent[i] - np.mean([H[j] for j in range(5) if att[i, j + 1]])) < 1e-5  # the code's positions
        assert abs(er[i] - np.mean([H[j - 1] for j in resp])) < 1e-5


def _sft(tok, n=12):
    ex = [{"instruction": f"Count to {i}.", "output": " ".join(str(j) for j in range(i + 3))} for i in range(n)]
    return [T.tokenize_sft(tok, e) for e in ex]


def test_hook_prunes_samples_and_tokens():
    m, tok = models.load("tiny-llama", seed=0)
    data = _sft(tok)
    batch = T.sft_batches(data, 8, seed=0)(0)
    hook = Q.QTuningHook(0.5, 0.7)
    out = hook(m, batch, 0)
    log = hook.log[-1]
    assert out["input_ids"].shape[0] == 4 == log["kept"] and len(out["index"]) == 4
    n_before = (batch["labels"][:, 1:] != -100).sum(1)
    n_after = (out["labels"][:, 1:] != -100).sum(1)
    orig = n_before[[int((batch["index"] == i).nonzero()) for i in out["index"]]]
    pruned = [int(a) != int(b) for a, b in zip(n_after, orig)]
    for a, b, p in zip(n_after.tolist(), orig.tolist(), pruned):
        assert a == (math.ceil(0.7 * b - 1e-9) if p else b)
    assert sum(pruned) == log["q2"]  # every Q2 row (and only those) lost tokens here (T >= 4)
    assert torch.equal(out["input_ids"], batch["input_ids"][[int((batch["index"] == i).nonzero())
                                                              for i in out["index"]]])


def test_hook_with_ratio_one_is_plain_training():
    data_tok = None
    res = []
    for hook in (None, Q.QTuningHook(1.0, 1.0)):
        m, tok = models.load("tiny-llama", seed=0)
        data_tok = data_tok or _sft(tok)
        r = T.train(m, T.sft_batches(data_tok, 4, seed=1), T.TrainConfig(steps=3, lr=1e-3, log_every=1),
                    batch_hook=hook, progress=False)
        res.append([h["loss"] for h in r.history])
    assert res[0] == res[1]


def test_hook_in_training_runs_and_logs():
    m, tok = models.load("tiny-llama", seed=0)
    hook = Q.QTuningHook(0.25, 0.5)
    T.train(m, T.sft_batches(_sft(tok), 8, seed=0), T.TrainConfig(steps=3, lr=1e-3, log_every=1),
            batch_hook=hook, progress=False)
    assert [h["kept"] for h in hook.log] == [2, 2, 2]
    assert all(h["tokens_kept"] < h["tokens_before"] for h in hook.log)


def test_bad_ratios():
    for bad in (0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(SelectionError, match="fraction"):
            Q.QTuningHook(bad, 0.5)
    with pytest.raises(SelectionError, match="entropy_over"):
        Q.QTuningHook(0.5, 0.5, entropy_over="prompt")
