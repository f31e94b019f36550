"""FlexRound invariants (issue 15): init == RTN bitwise, outputs on the grid, the STE gradient to S2 against its
closed form, a few steps lower a block's error, and the whole-model loop at 0 steps == RTN."""

import copy

import pytest
import torch

import shrink.models as M
from shrink.quant import QuantSpec, rtn_quantize
from shrink.quant.flexround import (FlexRoundSpec, FlexRoundWeight, RoundSTE, attach, detach, flexround_model,
                                    flexround_quantize)
from shrink.quant.gptq import decoder_weight_linears
from shrink.quant.quantizer import QuantError
from shrink.reconstruction import FitConfig, fit_unit, unit_mse

pytestmark = pytest.mark.usefixtures("one_thread")

GRIDS = [QuantSpec(bits=b, symmetric=s, granularity=g) for b in (2, 3, 4, 8) for s in (False, True)
         for g in ("channel", "tensor")]


def _w(seed, rows=24, cols=40, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * torch.linspace(0.1, 3, cols)).to(dtype)


@pytest.mark.parametrize("spec", GRIDS, ids=lambda s: s.describe())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_init_equals_rtn_bitwise(spec, dtype):
    for seed in range(3):
        W = _w(seed, dtype=dtype)
        out = flexround_quantize(W, spec)
        assert out.dtype == dtype
        assert torch.equal(out, rtn_quantize(W, spec))


def test_attached_linear_computes_with_rtn_weights_and_detach_restores_a_plain_parameter():
    lin = torch.nn.Linear(40, 24, bias=True)
    spec = QuantSpec(bits=3, symmetric=False, granularity="channel")
    w0 = lin.weight.detach().clone()
    attach(lin, spec)
    assert torch.equal(lin.weight, rtn_quantize(w0, spec))
    assert not lin.parametrizations.weight.original.requires_grad
    stats = detach(lin)
    assert stats == {"flips": 0.0, "s1_ratio": 1.0}
    assert type(lin.weight) is torch.nn.Parameter and lin.weight.requires_grad
    assert torch.equal(lin.weight, rtn_quantize(w0, spec))


def _toy(seed=0, n=16, t=8, d=40, rows=24):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    X = (torch.randn(n, t, d, generator=g) @ mix) * torch.linspace(0.2, 3, d)
    return X, _w(seed + 100, rows, d)


@pytest.mark.parametrize("symmetric", [False, True])
def test_trained_output_stays_on_the_grid_and_moves_codes(symmetric):
    X, W = _toy()
    spec = QuantSpec(bits=3, symmetric=symmetric, granularity="channel")
    q = FlexRoundWeight(W, spec)
    res = fit_unit(lambda x: x @ q(W).T, q.parameters(), X, X @ W.T,
                   FitConfig(steps=60, batch_size=4, lr=2e-2, betas=(0.9, 0.999), schedule="cosine"))
    assert res["steps"] == 60
    with torch.no_grad():
        Wq = q(W)
        codes = Wq / q.s1() + q.zero
    assert torch.allclose(codes, codes.round(), atol=1e-4)        # on s1 * integers
    c = codes.round()
    assert c.min() >= spec.qmin and c.max() <= spec.qmax            # within [qmin, qmax]
    assert (c != torch.clamp(torch.round(W / q.s1_rtn) + q.zero, spec.qmin, spec.qmax)).any()  # rounding moved
    assert not torch.equal(q.s1(), q.s1_rtn)                        # the grid step trained too


def test_gradient_reaches_S2_and_matches_the_straight_through_closed_form():
    X, W = _toy(1)
    spec = QuantSpec(bits=3, symmetric=False, granularity="channel")
    q = FlexRoundWeight(W, spec)
    with torch.no_grad():  # move off the initial point so that every factor matters
        q.log_S2.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        q.log_s3.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        q.log_s1.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    G = torch.randn(W.shape, generator=torch.Generator().manual_seed(3))   # dL/dW_hat
    (q(W) * G).sum().backward()
    assert q.log_S2.grad is not None and q.log_S2.grad.abs().sum() > 0
    with torch.no_grad():  # naive: W_hat = s1 (clamp(round(W / D) + z) - z), D = s1 S2 s3; STE: d round(u)/du = 1
        s1 = q.s1_rtn * q.log_s1.exp()
        D = s1 * q.log_S2.exp() * q.log_s3.exp()
        u = torch.round(W / D) + q.zero
        inside = (u >= spec.qmin) & (u <= spec.qmax)
        # d W_hat / d log_S2 = s1 * inside * d(W / D)/d log_S2 = s1 * inside * (-W / D)
        expect = G * s1 * inside * (-W / D)
    assert torch.allclose(q.log_S2.grad, expect, rtol=1e-5, atol=1e-6)
    # log_s3 gets the row sums of the same term
    assert torch.allclose(q.log_s3.grad, expect.sum(1, keepdim=True), rtol=1e-4, atol=1e-5)


def test_round_ste_is_identity_backward():
    x = torch.tensor([0.2, 1.7, -2.5], requires_grad=True)
    y = RoundSTE.apply(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


@pytest.fixture(scope="module")
def tiny():
    model, _ = M.load("tiny-llama")
    g = torch.Generator().manual_seed(0)
    return model, torch.randint(0, 256, (8, 32), generator=g), torch.randint(0, 256, (4, 32), generator=g)


def test_a_few_steps_lower_a_block_error_on_calibration_and_held_out(tiny):
    model, ids, held = tiny
    m = copy.deepcopy(model)
    runner = M.BlockRunner(m)
    with torch.no_grad():
        x, xh = runner.embed(ids), runner.embed(held)
        y, yh = runner.run_block(0, x), runner.run_block(0, xh)
    spec = QuantSpec(bits=3, symmetric=False, granularity="channel")
    qs = [attach(lin, spec) for lin in decoder_weight_linears(runner.blocks[0]).values()]
    for p in runner.blocks[0].parameters():
        p.requires_grad_(False)
    res = fit_unit(lambda h: runner.run_block(0, h), [p for q in qs for p in q.parameters()], x, y,
                   FitConfig(steps=16, batch_size=2, lr=1e-2, betas=(0.9, 0.999), schedule="cosine", eval_at=(0, 16)),
                   heldout=(xh, yh))
    c0, c1 = res["curve"]
    assert c1["calib"] < 0.9 * c0["calib"]
    assert c1["heldout"] < c0["heldout"]


def test_model_at_zero_steps_is_rtn_and_training_lowers_the_final_error(tiny):
    model, ids, held = tiny
    grid = QuantSpec(bits=3, symmetric=False, granularity="channel")
    m0 = copy.deepcopy(model)
    r0 = flexround_model(m0, ids, FlexRoundSpec(grid=grid, steps=0, eval_at=(0,)), heldout_ids=held, verbose=False)
    ref = {n: p for n, p in model.named_parameters()}
    for n, p in m0.named_parameters():
        is_lin = n.endswith("proj.weight") and "layers" in n
        assert torch.equal(p, rtn_quantize(ref[n], grid) if is_lin else ref[n]), n
    assert all(r["flips"] == 0 and r["curve"] == [r["curve"][0]] for r in r0["recon"])
    m1 = copy.deepcopy(model)
    r1 = flexround_model(m1, ids, FlexRoundSpec(grid=grid, steps=8, lr=1e-2, batch_size=2, eval_at=(0, 8)),
                         heldout_ids=held, verbose=False)
    assert r1["final"]["err_calib"] < r0["final"]["err_calib"]
    # GP target: the curve's end is the sequential loop's own App. A error of that block (computed independently)
    for row, blk in zip(r1["recon"], r1["blocks"]):
        assert row["block"] == blk["block"]
        assert row["curve"][-1]["calib"] == pytest.approx(blk["err_calib"], rel=1e-6)
        assert row["curve"][-1]["heldout"] == pytest.approx(blk["err_test"], rel=1e-6)
    # on the grid: at most 2^bits distinct values per row of every quantized linear
    for n, p in m1.named_parameters():
        if n.endswith("proj.weight") and "layers" in n:
            assert max(len(torch.unique(row)) for row in p) <= 2 ** grid.bits, n
    assert all(p.requires_grad for p in m1.parameters())
    assert not any(hasattr(lin, "parametrizations") and len(lin.parametrizations) for lin in m1.modules()
                   if isinstance(lin, torch.nn.Linear))


def test_bad_input_names_the_fix(tiny):
    model, ids, held = tiny
    with pytest.raises(QuantError, match="per-channel"):
        FlexRoundWeight(_w(0), QuantSpec(bits=3, granularity="group", group_size=8))
    with pytest.raises(QuantError, match="target"):
        FlexRoundSpec(target="XX").check()
    with pytest.raises(QuantError, match="heldout_ids"):
        flexround_model(copy.deepcopy(model), ids, FlexRoundSpec(steps=1, eval_at=(0, 1)), verbose=False)
    with pytest.raises(QuantError, match="int64"):
        flexround_model(copy.deepcopy(model), ids.float(), FlexRoundSpec(steps=1), verbose=False)


def test_unit_mse_is_the_plain_mean():
    X, W = _toy(2)
    Y = X @ W.T
    f = lambda x: x @ (W * 1.1).T  # noqa: E731
    assert unit_mse(f, X, Y, "cpu", batch=3) == pytest.approx(float(((f(X).double() - Y.double()) ** 2).mean()), rel=1e-12)


def test_flexround_paper_preset_on_a_standin(monkeypatch, tmp_path, data_dir):
    """The paper preset's code path (LLaMA-2-7B, C4 calibration, WikiText-2 held-out blocks and evaluation) on a
    random-init stand-in and a local C4-format file, shrunk to a few short windows and two steps per block."""
    from conftest import c4_like_file
    from shrink import scales
    from shrink.quant.flexround_exp import FlexRoundContext

    monkeypatch.setenv("SHRINK_STANDINS", "1")
    monkeypatch.setenv("SHRINK_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("SHRINK_C4_FILES", str(c4_like_file(tmp_path / "c4-train.00000-of-01024.json")))
    cfg = scales.get("flexround", "paper").with_(calib_nsamples=2, calib_seqlen=64, heldout_nsamples=2,
                                                 heldout_seqlen=64, steps=2, eval_at=(0, 2), budgets=(0, 2))
    assert cfg.calib_corpus == "c4" and cfg.steps == 2
    ctx = FlexRoundContext(cfg, "paper")
    ctx.wo.cfg = ctx.wo.cfg.with_(seqlen=64, windows=2)
    assert ctx.wo.model.shrink_info["standin_for"] == "meta-llama/Llama-2-7b-hf"
    cell = ctx.measure(3, 0)
    assert cell["ppl"] > 1 and cell["err_calib"] > 0 and cell["bits_per_weight"] == 3
    assert cell["zero_shot"].startswith("not run: offline")
    assert len(list((tmp_path / "results" / "paper" / "02-bits").glob("flexround-*.json"))) == 1
