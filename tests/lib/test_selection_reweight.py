"""Loss reweighting (Sow et al., ICLR 2025): the data notes' exact gates and the bitwise uniform identity with the loop."""

import math

import numpy as np
import pytest
import torch

from shrink import models
from shrink import train as T
from shrink.errors import ShrinkError
from shrink.selection import reweight as R
from shrink.selection.errors import SelectionError

STRATS = ("linupper", "quadratic", "extremes")


def _naive(losses, strategy, r=1.0, delta=1.0):
    """The paper's equations in float64 numpy, written independently of the library."""
    l = np.asarray(losses, np.float64)
    lo, hi = l.min(), l.max()
    x = np.zeros_like(l) if hi == lo else (2 * delta * l - delta * (hi + lo)) / (hi - lo)
    f = {"linupper": np.minimum(x + delta, delta), "quadratic": 1 - x ** 2 / delta ** 2, "extremes": np.abs(x),
         "uniform": np.zeros_like(x)}[strategy]
    e = np.exp((f - f.max()) / r)
    return e / e.sum()


def _losses(B=16, seed=0):
    return torch.rand(B, generator=torch.Generator().manual_seed(seed)) * 3 + 1.5


@pytest.mark.parametrize("strategy", R.STRATEGIES)
@pytest.mark.parametrize("B", [1, 2, 7, 64])
def test_weights_sum_to_one_and_match_the_naive_equations(strategy, B):
    for seed in range(3):
        l = _losses(B, seed)
        for r in (0.1, 1.0, 10.0):
            w = R.Reweighter(strategy, r=r)(l, 10)
            assert w.shape == l.shape and w.dtype == l.dtype
            assert abs(float(w.sum()) - 1.0) < 1e-6
            assert bool((w >= 0).all())
            assert np.allclose(w.double().numpy(), _naive(l.numpy(), strategy, r), atol=1e-6, rtol=1e-5)


def test_normalisation_maps_the_batch_onto_minus_delta_delta():
    l = torch.tensor([2.0, 3.0, 4.0, 2.5])
    for delta in (1.0, 0.5):
        x = R.normalize_losses(l, delta)
        assert float(x.min()) == -delta and float(x.max()) == delta
        assert abs(float(x[1])) < 1e-7  # the midpoint (2 + 4) / 2 = 3 maps to 0
    assert torch.equal(R.normalize_losses(torch.full((5,), 2.0)), torch.zeros(5))  # all equal: zeros
    for s in STRATS:  # ... hence uniform weights
        assert torch.allclose(R.weights(torch.full((5,), 2.0), s), torch.full((5,), 0.2))


@pytest.mark.parametrize("strategy", STRATS)
def test_large_temperature_gives_uniform_weights(strategy):
    l = _losses(32)
    gaps = [float((R.weights(l, strategy, r=r) - 1 / 32).abs().max()) for r in (1.0, 10.0, 1e3, 1e6)]
    assert gaps[0] > 1e-3  # r = 1 is not uniform ...
    assert all(a > b for a, b in zip(gaps, gaps[1:]))  # ... the gap shrinks with r ...
    assert gaps[-1] < 1e-6  # ... and vanishes as r -> infinity


def test_small_temperature_concentrates_on_the_best_score():
    l = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    w = R.weights(l, "extremes", r=1e-3)  # |x| = 1 at both ends
    assert torch.allclose(w, torch.tensor([0.5, 0, 0, 0, 0.5]), atol=1e-6)
    w = R.weights(l, "quadratic", r=1e-3)  # 1 - x^2 is largest at the midpoint
    assert torch.allclose(w, torch.tensor([0.0, 0, 1, 0, 0]), atol=1e-6)


def test_linupper_is_monotone_in_loss_and_flat_above_the_midpoint():
    for seed in range(5):
        l = _losses(33, seed)
        w = R.weights(l, "linupper", r=1.0)
        order = torch.argsort(l)
        ws = w[order]
        assert bool((ws[1:] >= ws[:-1]).all())  # non-decreasing in the loss
        mid = (l.max() + l.min()) / 2
        above, below = w[l >= mid], w[l < mid]
        assert bool((above == above[0]).all())  # exactly flat above the batch midpoint (f = delta, capped)
        assert bool((below < above[0]).all())  # strictly lower below it
        # the capped weight is e^0 / Z and the smallest loss gets e^(-delta / r) / Z
        assert math.isclose(float(w[l.argmin()] / above[0]), math.exp(-1.0), rel_tol=1e-5)


def test_quadratic_and_extremes_shapes():
    l = torch.linspace(1, 5, 9)  # symmetric around the midpoint 3
    q, e = R.weights(l, "quadratic"), R.weights(l, "extremes")
    assert torch.allclose(q, q.flip(0), atol=1e-7) and torch.allclose(e, e.flip(0), atol=1e-7)
    assert int(q.argmax()) == 4 and int(e.argmin()) == 4


def test_softmax_maximises_the_kl_regularised_score():
    """w = softmax(f / r) maximises  sum_i w_i f_i - r KL(w || uniform)  on the simplex (Gibbs variational
    principle): random points of the simplex never do better."""
    l = _losses(8)
    f = R.score("linupper", R.normalize_losses(l)).double()
    r = 0.7
    w = R.weights(l, "linupper", r=r).double()

    def obj(v):
        return float((v * f).sum() - r * (v * torch.log(v * v.numel())).sum())

    g = torch.Generator().manual_seed(0)
    best = obj(w)
    for _ in range(200):
        v = torch.distributions.Dirichlet(torch.ones(8, dtype=torch.float64)).sample()
        v = (0.9 * v + 0.1 * w) if _ % 2 else v
        assert obj(v) <= best + 1e-12
    del g


def test_uniform_and_burn_in_return_the_loops_default_bitwise():
    l = _losses(9)
    ref = T.uniform_weights(l, 0)
    assert torch.equal(R.Reweighter("uniform")(l, 0), ref)
    assert torch.equal(R.Reweighter("uniform", r=3.0, burn_in=0)(l, 500), ref)
    rw = R.Reweighter("linupper", burn_in=5)
    assert all(torch.equal(rw(l, t), ref) for t in range(5))
    assert not torch.equal(rw(l, 5), ref)


def _batches(B=4, S=32):
    ids = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(7))
    return T.lm_batches(ids, B, S, seed=3)


def _run(sample_weights, steps=5):
    m, _ = models.load("tiny-llama", seed=0)
    r = T.train(m, _batches(), T.TrainConfig(steps=steps, lr=3e-3, log_every=1, warmup=1), progress=False,
                sample_weights=sample_weights)
    return [h["loss"] for h in r.history], [p.detach().clone() for p in m.parameters()]


def test_uniform_reproduces_the_baseline_trajectory_bit_for_bit_in_the_real_loop():
    base_l, base_p = _run(None)
    for sw in (R.Reweighter("uniform"), R.Reweighter("extremes", burn_in=5)):  # burn-in covering every step
        l, p = _run(sw)
        assert l == base_l
        assert all(torch.equal(a, b) for a, b in zip(base_p, p))
    for s in STRATS:  # a real strategy changes the trajectory after burn-in
        l, p = _run(R.Reweighter(s, burn_in=2))
        assert l[:2] == base_l[:2]
        assert l[2:] != base_l[2:]
        assert not all(torch.equal(a, b) for a, b in zip(base_p, p))


def test_bad_settings_name_the_fix():
    with pytest.raises(SelectionError, match="quadratic"):
        R.Reweighter("mid")
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(SelectionError, match="positive"):
            R.Reweighter("linupper", r=bad)
    with pytest.raises(SelectionError, match="burn_in"):
        R.Reweighter("linupper", burn_in=-1)
    with pytest.raises(SelectionError, match=r"\[B\]"):
        R.Reweighter("linupper")(torch.ones(2, 3), 0)
    with pytest.raises(ShrinkError):
        R.score("upper", torch.zeros(3))
