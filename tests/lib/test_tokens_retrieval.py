"""shrink.tokens.retrieval: vectorised Chamfer = a naive triple loop, every reduction with k >= n = the full
score exactly, k-means against scikit-learn on planted clusters, exact budgets, ranks and nDCG against
scikit-learn, the inverse-cloze set (query removed from its document), and the bench invariant."""

import math

import pytest
import torch

import shrink.models as M
from shrink import scales
from shrink.tokens import retrieval as R


def _unit(ns, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1) for n in ns]


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chamfer_matches_naive_loop(chunk):
    docs, qs = _unit((1, 6, 11, 3, 8), seed=1), _unit((4, 1, 9), seed=2)
    fast = R.chamfer(qs, docs, chunk_tokens=chunk)
    assert fast.shape == (3, 5)
    assert (fast - R.chamfer_naive(qs, docs)).abs().max() < 1e-5
    # padded input gives the same scores
    assert torch.equal(R.chamfer(qs, R.pad(docs), chunk_tokens=chunk), fast)


def test_chamfer_padding_cannot_win():
    # all-negative similarities: a zero padding vector would score 0 > every real one if it were not masked
    doc = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])]
    q = [torch.tensor([[-1.0, 0.0]])]
    assert R.chamfer(q, doc)[0, 0] == -1.0


@pytest.mark.parametrize("method", R.REDUCTIONS)
def test_every_reduction_with_all_vectors_is_exact(method):
    docs, qs = _unit((7, 13, 2), seed=3), _unit((5, 3), seed=4)
    full = R.chamfer(qs, docs)
    for k in (None, 13, 50) if method != "all" else (None,):
        red = [R.reduce(x, method, k, generator=torch.Generator().manual_seed(0)) for x in docs]
        assert torch.equal(R.chamfer(qs, red), full), (method, k)


def test_budgets_and_heuristics():
    x = _unit((20,), seed=5)[0]
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    for k in (1, 4, 9):
        for m in ("kmeans", "first", "spacing", "random"):
            assert R.reduce(x, m, k, generator=g()).shape == (k, 12)
    assert torch.equal(R.reduce(x, "first", 4), x[:4])
    sp = R.reduce(x, "spacing", 4)
    assert torch.equal(sp[0], x[0]) and torch.equal(sp[-1], x[-1])
    assert torch.equal(R.reduce(x, "random", 5, generator=g()), R.reduce(x, "random", 5, generator=g()))
    assert torch.equal(R.reduce(x, "kmeans", 5, generator=g()), R.reduce(x, "kmeans", 5, generator=g()))


def test_kmeans_recovers_planted_clusters_like_sklearn():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [-5.0, -5.0, 0]])
    x = torch.cat([c + 0.1 * torch.randn(15, 3, generator=g) for c in centers])
    ours = R.kmeans(x, 4, generator=torch.Generator().manual_seed(1))
    ref = torch.tensor(KMeans(4, n_init=10, random_state=0).fit(x.numpy()).cluster_centers_, dtype=torch.float32)
    key = lambda c: c[c[:, 0].argsort()]  # noqa: E731
    order_o = sorted(range(4), key=lambda i: tuple(ours[i].tolist()))
    order_r = sorted(range(4), key=lambda i: tuple(ref[i].tolist()))
    assert (ours[order_o] - ref[order_r]).abs().max() < 1e-4
    # each centroid is its cluster's mean
    truth = torch.stack([x[15 * i: 15 * (i + 1)].mean(0) for i in range(4)])
    assert (key(ours) - key(truth)).abs().max() < 1e-5


def test_kmeans_with_duplicate_points():
    x = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]])
    c = R.kmeans(x, 4, generator=torch.Generator().manual_seed(0))
    assert c.shape == (4, 2)


def test_ranks_and_metrics_against_sklearn():
    from sklearn.metrics import ndcg_score

    s = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.2, 0.8, 0.1], [0.1, 0.2, 0.3, 0.4]])
    rel = [0, 1, 0]
    rk = R.ranks(s, rel)
    assert rk == [1, 3, 4]   # query 1: tied with doc 0 -> counted against it
    m = R.rank_metrics(rk)
    assert m["recall@1"] == pytest.approx(1 / 3) and m["recall@5"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 4) / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(5)) / 3)
    # sklearn on tie-free scores
    s2 = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.25, 0.2, 0.8, 0.1], [0.1, 0.2, 0.3, 0.4]])
    y = torch.zeros_like(s2)
    y[torch.arange(3), torch.tensor(rel)] = 1
    per = [ndcg_score(y[i:i + 1].numpy(), s2[i:i + 1].numpy(), k=10) for i in range(3)]
    assert R.rank_metrics(R.ranks(s2, rel))["ndcg_per_query"] == pytest.approx(per)


def test_bad_input_names_the_fix():
    x = _unit((5,))[0]
    with pytest.raises(R.RetrievalInputError, match="choose one of"):
        R.reduce(x, "median", 2)
    with pytest.raises(R.RetrievalInputError, match="generator"):
        R.reduce(x, "kmeans", 2)
    with pytest.raises(R.RetrievalInputError, match="integer >= 1"):
        R.reduce(x, "first", 0)
    with pytest.raises(R.RetrievalInputError, match="n_queries"):
        R.cloze_set(M.ByteTokenizer(), n_docs=3, n_queries=5)


def test_cloze_set_holds_queries_out(data_dir):
    cs = R.cloze_set(M.ByteTokenizer(), n_docs=30, n_queries=10, query_tokens=(20, 300), seed=0)
    assert len(cs.docs) == 30 and len(cs.queries) == 10 == len(cs.relevant)
    assert len(set(cs.docs)) == 30
    for q, r in zip(cs.queries, cs.relevant):
        assert q not in cs.docs[r] and 20 <= len(q.encode()) + 2 <= 300
    assert R.cloze_set(M.ByteTokenizer(), n_docs=30, n_queries=10, query_tokens=(20, 300), seed=0).docs == cs.docs


def test_bench_kmeans_with_all_vectors_equals_full(data_dir, one_thread):
    cfg = scales.get("tokens-retrieval", "tiny")
    bench = R.RetrievalBench(cfg, "tiny")
    full = bench.run("all")
    big = max(x.shape[0] for x in bench.vectors()[0])
    km = bench.run("kmeans", big, seed=1)
    assert km["ndcg_per_query"] == full["ndcg_per_query"] and km["stored_fraction"] == 1.0
    low = bench.run("first", 2)
    assert low["vectors_per_doc"] == 2.0


def test_bench_single_vector_is_the_encoders_mean_pooling(data_dir, one_thread):
    cfg = scales.get("tokens-retrieval", "tiny")
    bench = R.RetrievalBench(cfg, "tiny")
    sv = bench.single_vector()
    d = torch.nn.functional.normalize(R.mean_pooled(bench.model, bench.tok, bench.set.docs, max_tokens=cfg.max_tokens), dim=-1)
    q = torch.nn.functional.normalize(R.mean_pooled(bench.model, bench.tok, bench.set.queries, max_tokens=cfg.max_tokens), dim=-1)
    ref = R.rank_metrics(R.ranks(q @ d.T, bench.set.relevant))
    assert sv["ndcg_per_query"] == pytest.approx(ref["ndcg_per_query"], abs=1e-9)
