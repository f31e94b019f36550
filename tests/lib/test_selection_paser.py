"""PASER: budget allocation (exact), per-token JSD in [0, ln 2] (vs a naive formula), sparse S2C equal to a
naive dense implementation with O(N k) memory, NTEM's consistency rule, the component ablation."""

import math

import numpy as np
import pytest
import torch

from shrink import models
from shrink import train as T
from shrink.selection import paser as P
from shrink.selection.errors import SelectionError


# ------------------------------------------------------------------------------------------- allocate
def _water(weights, sizes, budget):
    """Independent real-valued shares: x_c = min(size_c, lam * w_c) with sum x = min(B, sum sizes), by bisection."""
    w, s = np.asarray(weights, float), np.asarray(sizes, float)
    act = (w > 0) & (s > 0)
    target = min(budget, s[act].sum())
    lo, hi = 0.0, 1e12
    for _ in range(300):
        lam = (lo + hi) / 2
        if np.minimum(s, lam * w)[act].sum() < target:
            lo = lam
        else:
            hi = lam
    return np.where(act, np.minimum(s, hi * w), 0.0)


def test_allocate_hand_case():
    assert P.allocate([1, 1, 2], [10, 10, 1], 6).tolist() == [3, 2, 1]  # cap 1, then 2.5 / 2.5, remainder to first
    assert P.allocate([1, 2, 3], [100, 100, 100], 6).tolist() == [1, 2, 3]
    assert P.allocate([1, 1], [2, 3], 10).tolist() == [2, 3]  # budget above the pool: everything, sum < B


def test_allocate_proportional_capped_largest_remainder():
    rng = np.random.default_rng(0)
    for _ in range(500):
        c = int(rng.integers(1, 25))
        sizes = rng.integers(0, 60, size=c)
        w = rng.random(c) * (rng.random(c) > 0.1)
        if w[sizes > 0].sum() == 0:
            continue
        B = int(rng.integers(0, sizes.sum() + 20))
        q = P.allocate(w, sizes, B)
        x = _water(w, sizes, B)
        assert q.dtype == np.int64 and (q >= 0).all() and (q <= sizes).all()
        assert q.sum() <= B
        assert q.sum() == min(B, sizes[(w > 0) & (sizes > 0)].sum())
        assert np.all(np.abs(q - x) < 1 + 1e-6)  # each cluster within 1 of its proportional (capped) share
        assert np.all(q[w == 0] == 0)
        # largest remainder: whoever got a unit above floor has a fractional part >= anyone left with room below
        fl = np.floor(x + 1e-9)
        up = q > fl
        room = (q == fl) & (q < sizes) & (w > 0)
        if up.any() and room.any():
            assert (x - fl)[up].min() >= (x - fl)[room].max() - 1e-6


def test_allocate_rejects_bad_input():
    with pytest.raises(SelectionError, match="weight 0"):
        P.allocate([0.0, 0.0], [3, 3], 2)
    with pytest.raises(SelectionError, match="finite"):
        P.allocate([np.nan, 1.0], [3, 3], 2)


# ------------------------------------------------------------------------------------------- JSD
def _naive_jsd(p_logits, q_logits):
    p = np.exp(p_logits - p_logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(q_logits - q_logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    m = (p + q) / 2
    kl = lambda a, b: np.sum(np.where(a > 0, a * np.log(a / b), 0.0), -1)  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_token_jsd_matches_naive_and_is_bounded():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(3, 7, 11, generator=g) * 3
    q = torch.randn(3, 7, 11, generator=g) * 3
    per = P.token_jsd(p, q, reduction=None)
    assert np.allclose(per.numpy(), _naive_jsd(p.double().numpy(), q.double().numpy()), atol=1e-12)
    assert (per >= 0).all() and (per <= math.log(2)).all()
    assert torch.allclose(per, P.token_jsd(q, p, reduction=None))  # symmetric
    assert float(P.token_jsd(p, p, reduction=None).abs().max()) < 1e-12
    # disjoint supports reach ln 2
    a = torch.full((1, 1, 4), -1e4)
    b = a.clone()
    a[..., 0] = 1e4
    b[..., 1] = 1e4
    assert abs(float(P.token_jsd(a, b)[0]) - math.log(2)) < 1e-9


def test_token_jsd_mean_vs_sum_length_bias():
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(1, 5, 9, generator=g), torch.randn(1, 5, 9, generator=g)
    mask = torch.tensor([[True, True, False, True, True]])
    per = P.token_jsd(p, q, mask, reduction=None)
    assert float(per[0, 2]) == 0.0
    assert torch.allclose(P.token_jsd(p, q, mask, reduction="sum"), per.sum(-1))
    assert torch.allclose(P.token_jsd(p, q, mask), per.sum(-1) / 4)
    # the same sample repeated twice: the official sum doubles (length bias), the mean does not move
    p2, q2 = torch.cat([p, p], 1), torch.cat([q, q], 1)
    m2 = torch.cat([mask, mask], 1)
    assert torch.allclose(P.token_jsd(p2, q2, m2, reduction="sum"), 2 * P.token_jsd(p, q, mask, reduction="sum"))
    assert torch.allclose(P.token_jsd(p2, q2, m2), P.token_jsd(p, q, mask))
    with pytest.raises(SelectionError, match="reduction"):
        P.token_jsd(p, q, reduction="max")


def test_jsd_scores_on_models_batched_equals_single():
    dense, tok = models.load("tiny-llama", seed=0)
    pruned, _ = models.load("tiny-llama", seed=0)
    with torch.no_grad():
        for prm in pruned.parameters():
            if prm.ndim == 2:
                prm.mul_((prm.abs() > prm.abs().median()).float())  # 50% magnitude pruning
    ex = [T.tokenize_sft(tok, {"instruction": f"say {w}", "output": f"{w} " * (i + 1)})
          for i, w in enumerate(["a", "bb", "ccc", "dd", "e"])]
    s = P.jsd_scores(dense, pruned, ex, batch_size=3)
    one = np.array([P.jsd_scores(dense, pruned, [e])[0] for e in ex])
    assert np.allclose(s, one, atol=1e-6)  # padding does not leak into the scores
    assert (s > 0).all() and (s <= math.log(2)).all()
    assert np.allclose(P.jsd_scores(dense, dense, ex), 0.0, atol=1e-9)
    ins = P.jsd_scores(dense, pruned, ex, on="instruction")
    assert (ins > 0).all() and not np.allclose(ins, s)


# ------------------------------------------------------------------------------------------- S2C
def _dense_s2c(x, K, k):
    """Naive dense S2C with the same sparse-graph kernel (N x N matrices everywhere)."""
    from scipy.linalg import eigh

    n = len(x)
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    nb = np.zeros((n, n), bool)
    for i in range(n):
        order = [j for j in np.argsort(d[i], kind="stable") if j != i][:k]
        nb[i, order] = True
    nb = nb | nb.T
    sigma = np.median(d[nb])
    A = np.where(nb, np.exp(-d ** 2 / (2 * sigma ** 2)), 0.0) + np.eye(n)
    D = np.diag(A.sum(1))
    L = np.eye(n) - np.linalg.inv(D) @ A  # the official formula
    mu, V = eigh(A, D)  # D^-1 A v = mu v  <=>  L v = (1 - mu) v
    V = V[:, np.argsort(-mu)[:K]]
    V /= np.linalg.norm(V, axis=0, keepdims=True)
    lam = np.sort(1 - mu)[:K]
    assert np.allclose(L @ V, V * lam[None, :], atol=1e-8)
    S = np.abs(V @ V.T) * (nb | np.eye(n, dtype=bool))
    return S, lam, np.sort(1 - mu)


def test_s2c_sparse_equals_dense():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(80, 6))
    K, k = 4, 7
    out = P.s2c_affinity(x, n_clusters=K, k_neighbors=k, seed=0)
    S_dense, lam, allam = _dense_s2c(x, K, k)
    assert np.min(np.diff(allam[:K + 1])) > 1e-4  # distinct eigenvalues: V is unique up to signs
    assert np.allclose(out["eigenvalues"], lam, atol=1e-8)
    assert np.allclose(out["S"].toarray(), S_dense, atol=1e-7)
    assert np.array_equal(P.nmf_labels(out["S"], K, 0), P.nmf_labels(S_dense, K, 0))


def test_s2c_memory_is_n_times_k():
    rng = np.random.default_rng(0)
    n, k = 3000, 10
    out = P.s2c_affinity(rng.normal(size=(n, 16)).astype(np.float32), n_clusters=8, k_neighbors=k)
    for name in ("graph", "A", "S"):
        assert out[name].nnz <= n * (2 * k + 1), name  # never N x N
    assert out["V"].shape == (n, 8)


def test_s2c_finds_blob_structure():
    """The paper's NMF-on-|V V^T| step is not an exact blob recoverer (the official dense version scores
    similar ARIs on these draws); the gate is well above chance (ARI 0) on every draw."""
    import warnings

    from sklearn.metrics import adjusted_rand_score

    aris = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        centres = rng.normal(size=(4, 10)) * 3
        x = np.concatenate([c + rng.normal(size=(40, 10)) for c in centres])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lab = P.s2c(x, n_clusters=4, k_neighbors=8, seed=0)
        aris.append(adjusted_rand_score(np.repeat(np.arange(4), 40), lab))
    assert min(aris) > 0.15 and np.mean(aris) > 0.35, aris  # measured: 0.23 .. 1.0, mean 0.54


# ------------------------------------------------------------------------------------------- NTEM
def test_concept_graph_rule():
    g = P.ConceptGraph()
    assert g.consistent(["a", "b"])
    g.add(["a", "b"])
    assert g.consistent(["a", "c"])  # only one known concept
    g.add(["a", "c"])
    assert not g.consistent(["b", "c"])  # both known, never seen together
    assert g.consistent(["a", "b", "z"])


def test_rake_phrases_classic_example():
    text = ("Compatibility of systems of linear constraints over the set of natural numbers. Criteria of "
            "compatibility of a system of linear Diophantine equations")
    ph = P.rake_phrases(text)
    assert "linear diophantine equations" in ph and "natural numbers" in ph and "compatibility" in ph
    assert ph[0] == "linear diophantine equations"  # highest deg/freq sum, as in Rose et al.'s example


# ------------------------------------------------------------------------------------------- select
def _pool(seed=0, n=150, d=8):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, d)) * 5
    lab = np.repeat(np.arange(5), n // 5)
    x = centres[lab] + rng.normal(size=(n, d))
    jsd = rng.random(n) * 0.1 + 0.05 * lab  # cluster 4 most degraded
    words = [f"w{j}" for j in range(40)]
    concepts = [list(rng.choice(words, 3, replace=False)) for _ in range(n)]
    return x.astype(np.float32), jsd, concepts


def test_select_budget_and_proportional_quotas():
    x, jsd, concepts = _pool()
    for B in (10, 37, 90):
        idx, info = P.select(x, jsd, B, n_clusters=5, k_neighbors=8, ntem=False)
        q = info["quotas"]
        assert q.sum() == B and len(idx) == B and len(np.unique(idx)) == B
        assert np.all(np.abs(q - _water(info["cds"], info["sizes"], B)) < 1 + 1e-9)
        for c in range(len(q)):  # CDARS: the top-IES members of each cluster
            mem = np.flatnonzero(info["labels"] == c)
            top = set(mem[np.argsort(-jsd[mem], kind="stable")[: q[c]]].tolist())
            assert top == set(idx[info["labels"][idx] == c].tolist())
        idx2, info2 = P.select(x, jsd, B, n_clusters=5, k_neighbors=8, concepts=concepts)
        assert len(idx2) <= B and (info2["taken"] <= info2["quotas"]).all()
        assert info2["taken"].sum() == len(idx2)


def test_select_ntem_replay():
    x, jsd, concepts = _pool(1)
    idx, info = P.select(x, jsd, 60, n_clusters=5, k_neighbors=8, concepts=concepts)
    assert info["rejected"] > 0
    g = P.ConceptGraph()  # every accepted sample was consistent with those accepted before it
    order = []
    for c in np.argsort(-info["cds"], kind="stable"):
        mem = np.flatnonzero(info["labels"] == c)
        order += [i for i in mem[np.argsort(-jsd[mem], kind="stable")] if i in set(idx.tolist())]
    for i in order:
        assert g.consistent(concepts[i])
        g.add(concepts[i])


def test_select_ablation_components():
    x, jsd, concepts = _pool(2)
    full, _ = P.select(x, jsd, 40, n_clusters=5, k_neighbors=8, concepts=concepts)
    for comps in [("cdars", "ntem"), ("s2c", "ntem"), ("s2c", "cdars"), ()]:
        idx, info = P.select(x, jsd, 40, n_clusters=5, k_neighbors=8, concepts=concepts, components=comps)
        assert len(idx) <= 40 and len(np.unique(idx)) == len(idx)
        if "ntem" not in comps:
            assert len(idx) == 40 and info["rejected"] == 0
        if "cdars" not in comps:
            assert info["quotas"].max() - info["quotas"].min() <= 1 or (info["quotas"] == info["sizes"]).any()
    no_cdars, _ = P.select(x, jsd, 40, n_clusters=5, k_neighbors=8, ntem=False, components=("s2c",))
    with_cdars, _ = P.select(x, jsd, 40, n_clusters=5, k_neighbors=8, ntem=False)
    assert jsd[with_cdars].mean() > jsd[no_cdars].mean()  # CDARS takes the degraded samples


def test_select_bad_input():
    x, jsd, concepts = _pool()
    with pytest.raises(SelectionError, match="budget"):
        P.select(x, jsd, 0, concepts=concepts)
    with pytest.raises(SelectionError, match="jsd"):
        P.select(x, jsd[:-1], 5, concepts=concepts)
    with pytest.raises(SelectionError, match="components"):
        P.select(x, jsd, 5, concepts=concepts, components=("s2c", "magic"))
    with pytest.raises(SelectionError, match="concepts"):
        P.select(x, jsd, 5)
