"""The core block reconstruction (shrink.reconstruction.fit_unit) shared by pruning's BR and FlexRound."""

import copy

import pytest
import torch

from shrink.pruning import MaskSet, ReconConfig, reconstruct
from shrink.reconstruction import FitConfig, ReconstructionError, fit_unit

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(seed=0, n=10, t=6, d=12):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(d, d)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d, d, generator=g) / d ** 0.5)
        lin.bias.zero_()
    X = torch.randn(n, t, d, generator=g)
    Y = X @ torch.randn(d, d, generator=g).T / d ** 0.5
    return lin, X, Y


def test_held_out_tracking_does_not_change_training():
    lin, X, Y = _problem()
    a, b = copy.deepcopy(lin), copy.deepcopy(lin)
    cfg = FitConfig(steps=7, batch_size=3, lr=1e-2, schedule="cosine")
    ra = fit_unit(a, a.parameters(), X, Y, cfg)
    rb = fit_unit(b, b.parameters(), X, Y, FitConfig(**{**cfg.__dict__, "eval_at": (0, 3, 7)}),
                  heldout=(X[:4] + 0.1, Y[:4]))
    assert ra["losses"] == rb["losses"] and len(ra["losses"]) == 7
    assert torch.equal(a.weight, b.weight)
    assert [c["step"] for c in rb["curve"]] == [0, 3, 7]
    assert rb["curve"][-1]["calib"] < rb["curve"][0]["calib"]
    assert all(p.grad is None for p in b.parameters())


def test_steps_cross_epochs_with_one_permutation_per_epoch():
    lin, X, Y = _problem(n=10)
    seen = []

    def unit(x):
        seen.append(x.shape[0])
        return lin(x)
    fit_unit(unit, lin.parameters(), X, Y, FitConfig(steps=6, batch_size=4))
    assert seen == [4, 4, 2, 4, 4, 2]          # ceil(10 / 4) = 3 batches per epoch, the partial batch kept


@pytest.mark.parametrize("schedule,last", [("linear", 1 / 5), ("cosine", 0.5 * (1 + torch.cos(torch.tensor(0.8 * 3.141592653589793)).item())),
                                           ("constant", 1.0)])
def test_schedules(schedule, last):
    lin, X, Y = _problem()
    lrs = []
    opt_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return opt_step(self, *a, **k)
    torch.optim.AdamW.step = spy
    try:
        fit_unit(lin, lin.parameters(), X, Y, FitConfig(steps=5, batch_size=2, lr=1.0, schedule=schedule))
    finally:
        torch.optim.AdamW.step = opt_step
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(last, rel=1e-6)


def test_pruning_wrapper_is_the_core_fit_with_masks():
    """BR's reconstruct == fit_unit with the mask hooks: same losses; pruned weights stay exactly zero."""
    lin, X, Y = _problem(1)
    model = torch.nn.Sequential(lin)
    m = torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        lin.weight.mul_(m)
    ref = copy.deepcopy(model)
    masks = MaskSet(model, {"0.weight": m})
    r = reconstruct(model, list(model.parameters()), masks, X, Y, ReconConfig(epochs=2, batch_size=3, lr=1e-2))
    rmask = MaskSet(ref, {"0.weight": m})
    c = fit_unit(ref, list(ref.parameters()), X, Y, FitConfig(steps=8, batch_size=3, lr=1e-2, betas=(0.9, 0.95)),
                 hooks=rmask.hook_gradients, after_step=rmask.apply)
    assert r["losses"] == c["losses"] and r["steps"] == 8
    assert torch.equal(lin.weight, ref[0].weight)
    assert bool((lin.weight[~m] == 0).all())


def test_bad_input_names_the_problem():
    lin, X, Y = _problem()
    with pytest.raises(ReconstructionError, match="steps"):
        fit_unit(lin, lin.parameters(), X, Y, FitConfig(steps=-1))
    with pytest.raises(ReconstructionError, match="schedule"):
        fit_unit(lin, lin.parameters(), X, Y, FitConfig(steps=1, schedule="step"))
    with pytest.raises(ReconstructionError, match="eval_at"):
        fit_unit(lin, lin.parameters(), X, Y, FitConfig(steps=2, eval_at=(3,)))
    with pytest.raises(ReconstructionError, match="same N and T"):
        fit_unit(lin, lin.parameters(), X, Y[:3], FitConfig(steps=1))
    with pytest.raises(ReconstructionError, match="no parameters"):
        fit_unit(lin, [], X, Y, FitConfig(steps=1))


def test_fused_adamw_is_the_default_and_the_for_loop_stays_available():
    """fused=True (default) and fused=False run the same AdamW update: equal to the last bits, not bitwise;
    fused=False is torch's for-loop AdamW (the implementation of the older records), step for step."""
    lin, X, Y = _problem(2)
    a, b, c = copy.deepcopy(lin), copy.deepcopy(lin), copy.deepcopy(lin)
    cfg = FitConfig(steps=6, batch_size=3, lr=1e-2)
    assert cfg.fused is True
    ra = fit_unit(a, list(a.parameters()), X, Y, cfg)
    rb = fit_unit(b, list(b.parameters()), X, Y, FitConfig(**{**cfg.__dict__, "fused": False}))
    assert ra["optimizer"] == "adamw-fused" and rb["optimizer"] == "adamw-for-loop"
    assert torch.allclose(a.weight, b.weight, rtol=0, atol=1e-6) and ra["losses"] == pytest.approx(rb["losses"], rel=1e-5)
    # the for-loop path, replayed by hand with torch's default AdamW and the same batches and schedule
    opt = torch.optim.AdamW(c.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / 6))
    gen, step = torch.Generator().manual_seed(0), 0
    while step < 6:
        perm = torch.randperm(X.shape[0], generator=gen)
        for s in range(0, X.shape[0], 3):
            if step == 6:
                break
            idx = perm[s:s + 3]
            loss = ((c(X[idx]) - Y[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    assert torch.equal(b.weight, c.weight) and torch.equal(b.bias, c.bias)
