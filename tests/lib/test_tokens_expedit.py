"""shrink.tokens.expedit: SLIC clustering (plateaus recovered, windows, soft assignments, the pooling start),
k-NN reconstruction weights against a naive loop, ratio 1 = the unpruned encoder exactly for every method,
budgets and token counts per block, hard-limit equivalences (tiny temperature: expedit = unpooling), ToMe
unmerging copies, bad input named."""

import math

import pytest
import torch

import shrink.models as M
from shrink import scales
from shrink.tokens import expedit as EX
from shrink.tokens import select as sel
from shrink.tokens.attention import TokenInputError


@pytest.fixture(scope="module")
def bert():
    model, _ = M.load("tiny-bert")
    return model


def _ids(n, seed=0):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _plateaus(sizes=(5, 9, 4), noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    lv = torch.eye(len(sizes), 4) * 4
    return torch.cat([lv[i] + noise * torch.randn(n, 4, generator=g) for i, n in enumerate(sizes)])


@pytest.mark.parametrize("window", [0, 3, 5])
def test_slic_recovers_plateaus(window):
    x = _plateaus()
    cl = EX.slic_1d(x, 3, iterations=5, window=window, temperature=0.1)
    assert cl.labels.tolist() == [0] * 5 + [1] * 9 + [2] * 4
    assert torch.allclose(cl.assign.sum(1), torch.ones(18))
    for j, (a, b) in enumerate(((0, 5), (5, 14), (14, 18))):
        assert (cl.centroids[j] - x[a:b].mean(0)).abs().max() < 0.05


def test_slic_windows_and_pool_start():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    m, w = 10, 3
    cl = EX.slic_1d(x, m, iterations=2, window=w)
    finite = torch.isfinite(cl.dist)
    assert (finite.sum(1) == w).all()
    home = (torch.arange(40) * m) // 40
    assert finite[torch.arange(40), home].all()                        # the home cell is always visible
    assert (cl.assign[~finite] == 0).all()
    p = EX.slic_1d(x, m, iterations=0)
    ref = torch.stack([x[math.floor(j * 40 / m): math.ceil((j + 1) * 40 / m)].mean(0) for j in range(m)])
    assert torch.allclose(p.centroids, ref, atol=1e-6) and torch.equal(p.labels, home)


def test_knn_weights_match_naive():
    d = torch.rand(7, 6, generator=torch.Generator().manual_seed(2)) * 3
    d[0, 2] = float("inf")
    w = EX.knn_weights(d, 3, 0.5)
    for i in range(7):
        fin = [j for j in range(6) if math.isfinite(d[i, j])]
        near = sorted(fin, key=lambda j: float(d[i, j]))[:3]
        e = {j: math.exp(-float(d[i, j]) / 0.5) for j in near}
        z = sum(e.values())
        for j in range(6):
            assert float(w[i, j]) == pytest.approx(e.get(j, 0.0) / z, abs=1e-6)


@pytest.mark.parametrize("method", EX.METHODS)
def test_ratio_one_is_the_unpruned_encoder(bert, method, one_thread):
    ids = _ids(30)
    out = EX.forward(bert, ids, method=method, alpha=1, ratio=1.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = bert(input_ids=ids).last_hidden_state[0]
    assert torch.equal(out.tokens, ref)


@pytest.mark.parametrize("method", EX.METHODS)
def test_budgets_and_token_counts(bert, method, one_thread):
    ids = _ids(41, seed=3)
    out = EX.forward(bert, ids, method=method, alpha=1, ratio=0.4, generator=torch.Generator().manual_seed(0))
    m = sel.kept_count(0.4, 41)
    assert out.m == m and out.tokens_per_layer == [41, m] and out.tokens.shape == (41, 64)
    assert torch.isfinite(out.tokens).all()


def test_hard_limit_expedit_equals_unpooling(bert, one_thread):
    ids = _ids(33, seed=4)
    kw = dict(alpha=1, ratio=0.5, window=0, iterations=5, temperature=1e-4, knn=1)
    a = EX.forward(bert, ids, method="expedit", **kw)
    b = EX.forward(bert, ids, method="unpool", **kw)
    assert (a.tokens - b.tokens).abs().max() < 1e-5


def test_tome_unmerge_copies_and_pruned_tokens_keep_exact_outputs(bert, one_thread):
    ids = _ids(29, seed=5)
    out = EX.forward(bert, ids, method="tome", alpha=1, ratio=0.5)
    body = out.tokens[1:-1]
    distinct = torch.unique(body, dim=0).shape[0]
    assert distinct == out.m - 2                                   # every token copies one of the m-2 merged rows
    ev = EX.forward(bert, ids, method="evit", alpha=1, ratio=0.5, knn=1)
    assert torch.unique(ev.tokens[1:-1], dim=0).shape[0] == ev.m - 2


def test_flops_ratio_falls_with_the_ratio(one_thread):
    model, _ = M.load("minilm")
    ids = torch.randint(1000, 20000, (1, 120), generator=torch.Generator().manual_seed(0))
    ids[0, 0], ids[0, -1] = 101, 102
    fr = [EX.flops_ratio(model, EX.forward(model, ids, method="expedit", alpha=2, ratio=r)) for r in (0.7, 0.5, 0.3)]
    assert fr[0] > fr[1] > fr[2] and fr[0] < 1


def test_bad_input_names_the_fix(bert):
    ids = _ids(20)
    with pytest.raises(TokenInputError, match="alpha"):
        EX.forward(bert, ids, alpha=2)
    with pytest.raises(TokenInputError, match="methods"):
        EX.forward(bert, ids, method="slic", alpha=1)
    with pytest.raises(TokenInputError, match="generator"):
        EX.forward(bert, ids, method="random", alpha=1, ratio=0.5)
    with pytest.raises(TokenInputError, match="need 3"):
        EX.forward(bert, ids, alpha=1, ratio=0.05)
    with pytest.raises(TokenInputError, match="m must lie"):
        EX.slic_1d(torch.randn(4, 2), 5)


def test_bench_records(data_dir, one_thread):
    cfg = scales.get("tokens-expedit", "tiny")
    bench = EX.ExpeditBench(cfg, "tiny")
    r = bench.run("expedit", cfg.alpha, 0.5)
    assert len(r["cos"]) == cfg.n_sentences and 0 < r["cos_mean"] <= 1
    full = bench.run("expedit", cfg.alpha, 1.0)
    assert all(c == pytest.approx(1.0, abs=1e-6) for c in full["cos"])
