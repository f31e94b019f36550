"""Pruner masks against naive reference implementations written here (small matrices)."""

import pytest
import torch

from shrink.pruning import (MaskSet, PruningError, check_mask, magnitude_mask, parse_pattern, sparsegpt_prune,
                            wanda_mask)


pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(rows, cols, seed):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ Wanda
def wanda_reference(W, X, sparsity=None, n=None, m=None):
    """Per row: score |W_ij| * ||X_j||_2 (X: [tokens, in]); prune the k lowest (ties by index)."""
    rows, cols = W.shape
    norms = [sum(float(X[t, j]) ** 2 for t in range(X.shape[0])) ** 0.5 for j in range(cols)]
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for r in range(rows):
        scores = [abs(float(W[r, j])) * norms[j] for j in range(cols)]
        if n is None:
            order = sorted(range(cols), key=lambda j: (scores[j], j))
            for j in order[: int(cols * sparsity)]:
                keep[r, j] = False
        else:
            for g in range(0, cols, m):
                order = sorted(range(g, g + m), key=lambda j: (scores[j], j))
                for j in order[:n]:
                    keep[r, j] = False
    return keep


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.3), ("2:4", 0.5),
                                              ("4:8", 0.5)])
def test_wanda_equals_reference(pattern, sparsity):
    W, X = _rand(6, 16, 0), _rand(20, 16, 1)
    pat = parse_pattern(pattern, sparsity)
    mask = wanda_mask(W.float(), (X ** 2).sum(0).float(), pat)
    ref = wanda_reference(W, X, sparsity, pat.n, pat.m)
    assert torch.equal(mask, ref)
    check_mask(mask, pat, "row" if not pat.is_nm else "matrix")


def test_wanda_uses_activations():
    """A column with a huge input norm survives although its weights are small."""
    W = _rand(4, 8, 2).float()
    W[:, 3] = 1e-3
    sq = torch.ones(8)
    sq[3] = 1e12
    assert wanda_mask(W, sq, parse_pattern("unstructured", 0.5))[:, 3].all()
    assert not magnitude_mask(W, parse_pattern("unstructured", 0.5))[:, 3].any()


# ------------------------------------------------------------------------------------------------ magnitude
def test_magnitude_exact_count_with_ties():
    W = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 0.5, 0.5]])
    m = magnitude_mask(W, parse_pattern("unstructured", 0.5))
    assert int((~m).sum()) == 4
    assert not m[1, 2] and not m[1, 3] and m[1, 0] and m[1, 1]
    assert torch.equal((~m[0]).nonzero().flatten(), torch.tensor([0, 1]))  # ties broken by index


# ------------------------------------------------------------------------------------------------ SparseGPT
def sparsegpt_reference(W, H, sparsity=None, n=None, m=None, blocksize=128, percdamp=0.01):
    """OBS with explicit inverses (SparseGPT Eq. 3), no Cholesky trick, no lazy batching.

    For column i the inverse Hessian of the not-yet-processed columns F = {i..d-1} is inv(H[F, F]). The
    saliency of w_ri is w_ri^2 / [inv(H_F)]_00; pruning w_ri updates W[r, F] -= w_ri / [inv(H_F)]_00 *
    inv(H_F)[0, :]. Masks: unstructured = the k lowest saliencies of each block of `blocksize` columns computed
    at the block start (ties by index); N:M = the n lowest saliencies of every m columns at column i % m == 0.
    """
    W = W.clone()
    H = H.clone()
    d = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(d, dtype=H.dtype)
    inv_diag = [torch.linalg.inv(H[i:, i:])[0, 0] for i in range(d)]
    keep = torch.ones_like(W, dtype=torch.bool)
    for i in range(d):
        if n is None and i % blocksize == 0:
            blk = slice(i, min(i + blocksize, d))
            sal = torch.stack([W[:, j] ** 2 / inv_diag[j] for j in range(blk.start, blk.stop)], 1)
            k = int(sal.numel() * sparsity)
            order = sorted(range(sal.numel()), key=lambda f: (float(sal.flatten()[f]), f))
            kb = torch.ones(sal.numel(), dtype=torch.bool)
            kb[order[:k]] = False
            keep[:, blk] = kb.view_as(sal)
        if n is not None and i % m == 0:
            for r in range(W.shape[0]):
                sal = [float(W[r, j] ** 2 / inv_diag[j]) for j in range(i, i + m)]
                for j in sorted(range(m), key=lambda j: (sal[j], j))[:n]:
                    keep[r, i + j] = False
        Hi = torch.linalg.inv(H[i:, i:])
        for r in range(W.shape[0]):
            if not keep[r, i]:
                W[r, i:] -= W[r, i] / Hi[0, 0] * Hi[0, :]
                W[r, i] = 0.0
    return W, keep


@pytest.mark.parametrize("pattern,blocksize", [("unstructured", 128), ("unstructured", 8), ("2:4", 8),
                                               ("4:8", 16)])
def test_sparsegpt_equals_obs_reference(pattern, blocksize):
    W, X = _rand(5, 24, 3), _rand(64, 24, 4)
    X[:, 5] = 0  # a dead input
    H = 2 * X.T @ X / X.shape[0]
    pat = parse_pattern(pattern, 0.5)
    (w_new, mask), = sparsegpt_prune([W], H, pat, blocksize=blocksize, dtype=torch.float64)
    w_ref, m_ref = sparsegpt_reference(W, H, 0.5, pat.n, pat.m, blocksize)
    assert torch.equal(mask, m_ref)
    assert torch.allclose(w_new, w_ref, atol=1e-9, rtol=1e-9)
    assert (w_new[~mask] == 0).all()
    check_mask(mask, pat, "block" if not pat.is_nm else "matrix", blocksize=blocksize)


def test_sparsegpt_beats_magnitude_on_layer_error():
    W, X = _rand(16, 32, 5).float(), _rand(256, 32, 6).float() * torch.linspace(0.1, 3, 32)
    H = 2 * X.T @ X / 256
    pat = parse_pattern("unstructured", 0.5)
    (w_s, _), = sparsegpt_prune([W], H, pat)
    w_m = W * magnitude_mask(W, pat)
    err = lambda w: float(((X @ (W - w).T) ** 2).mean())  # noqa: E731
    assert err(w_s) < 0.5 * err(w_m)


def test_sparsegpt_group_equals_individual():
    """Stacking linears that share H (q/k/v) gives the same result as pruning each alone."""
    X = _rand(80, 16, 7)
    H = 2 * X.T @ X / 80
    Ws = [_rand(r, 16, 10 + r) for r in (4, 6, 3)]
    pat = parse_pattern("unstructured", 0.5)
    together = sparsegpt_prune(Ws, H, pat, dtype=torch.float64)
    for W, (w_t, m_t) in zip(Ws, together):
        (w_i, m_i), = sparsegpt_prune([W], H, pat, dtype=torch.float64)
        assert torch.equal(m_t, m_i)
        assert torch.allclose(w_t, w_i, atol=1e-12)


def test_sparsegpt_sparsity_zero_is_identity():
    W, X = _rand(4, 16, 8).float(), _rand(32, 16, 9).float()
    (w, m), = sparsegpt_prune([W], 2 * X.T @ X / 32, parse_pattern("unstructured", 0.0))
    assert m.all() and torch.allclose(w, W)


# ------------------------------------------------------------------------------------------------ checks / errors
def test_check_mask_detects_violations():
    pat = parse_pattern("2:4")
    mask = torch.tensor([[True, False, True, False, False, False, True, True]])
    check_mask(mask, pat)
    mask[0, 0] = False
    with pytest.raises(PruningError, match="2:4"):
        check_mask(mask, pat)
    with pytest.raises(PruningError, match="per row"):
        check_mask(torch.tensor([[True, False], [True, True]]), parse_pattern("unstructured", 0.5), "row")


@pytest.mark.parametrize("bad", ["3:2", "2-4", "0:4", "structured"])
def test_bad_pattern(bad):
    with pytest.raises(PruningError):
        parse_pattern(bad)


def test_bad_sparsity_and_shapes():
    with pytest.raises(PruningError):
        parse_pattern("unstructured", 1.0)
    with pytest.raises(PruningError, match="divisible"):
        wanda_mask(torch.ones(2, 6), torch.ones(6), parse_pattern("4:8"))
    with pytest.raises(PruningError, match="shape"):
        wanda_mask(torch.ones(2, 6), torch.ones(5), parse_pattern("unstructured", 0.5))
    with pytest.raises(PruningError, match="rows"):
        sparsegpt_prune([torch.ones(2, 6)], torch.eye(5), parse_pattern("unstructured", 0.5))


def test_maskset_keeps_zeros_through_training():
    lin = torch.nn.Linear(8, 4, bias=False)
    mask = magnitude_mask(lin.weight, parse_pattern("unstructured", 0.5))
    ms = MaskSet(lin, {"weight": mask})
    ms.apply()
    handles = ms.hook_gradients()
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(5, 8)).pow(2).sum().backward()
        assert (lin.weight.grad[~mask] == 0).all()
        opt.step()
    for h in handles:
        h.remove()
    ms.verify()
    with pytest.raises(PruningError, match="bool"):
        MaskSet(lin, {"weight": mask.float()})


# ------------------------------------------------------------------------------------------------ compensation
def test_eora_minimises_activation_error():
    from shrink.pruning.compensate import bias_compensation, eora_factors

    X = _rand(200, 12, 20).float() * torch.linspace(0.1, 5, 12)
    W = _rand(8, 12, 21).float()
    Wc = W * magnitude_mask(W, parse_pattern("unstructured", 0.5))
    dW = W - Wc
    err = lambda D: float(((X @ D.T) ** 2).sum())  # noqa: E731
    B, A = eora_factors(dW, X.T @ X, 8)
    assert err(dW - B @ A) < 1e-6 * err(dW)  # full rank: exact
    B, A = eora_factors(dW, X.T @ X, 2)
    U, S, Vh = torch.linalg.svd(dW)
    plain = (U[:, :2] * S[:2]) @ Vh[:2]
    assert err(dW - B @ A) < err(dW - plain)  # activation-aware beats plain SVD at equal rank
    # optimality against random rank-2 perturbations of the solution
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        P = (B + 1e-2 * torch.randn(8, 2, generator=g)) @ (A + 1e-3 * torch.randn(2, 12, generator=g))  # rank 2
        assert err(dW - B @ A) <= err(dW - P) + 1e-6
    b = bias_compensation(dW, X.mean(0))
    assert torch.allclose((X @ dW.T - b).mean(0), torch.zeros(8), atol=1e-3)


def test_sparsegpt_nm_selection_equals_lowest_k_with_ties():
    from shrink.pruning.masks import lowest_k_mask
    from shrink.pruning.sparsegpt import _nm_keep

    g = torch.Generator().manual_seed(3)
    sal = torch.randint(0, 3, (200, 4), generator=g).float()  # many ties
    for n in (1, 2, 3):
        assert torch.equal(_nm_keep(sal, n), lowest_k_mask(sal, n))
