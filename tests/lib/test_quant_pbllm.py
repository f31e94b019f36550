"""PB-LLM / GPTQ-PB invariants (issue 15): exact salient fraction, two values per row, exact bit accounting,
fraction 1 = 8-bit GPTQ, agreement with an explicit-inverse reference, stacked = separate."""

import math

import pytest
import torch

from shrink.obs import inverse_hessian_factor
from shrink.quant import QuantSpec
from shrink.quant.gptq import gptq_quantize
from shrink.quant.pbllm import (PBSpec, accounting_of_masks, binary_scale, bit_accounting, n_salient,
                                pbllm_model, pbllm_quantize, salient_mask, saliency)
from shrink.quant.quantizer import QuantError, qparams, range_of


def _data(seed, rows=12, d=32, n=256, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=dtype) / d ** 0.5 + torch.eye(d, dtype=dtype)
    X = torch.randn(n, d, generator=g, dtype=dtype) @ mix * torch.linspace(0.2, 3, d, dtype=dtype)
    W = torch.randn(rows, d, generator=g, dtype=dtype)
    return W, X, 2 * X.T @ X / n


def pb_reference(W, H, frac, metric, gptq=True, high_bits=8, percdamp=0.01):
    """Naive GPTQ-PB: explicit inverses of the remaining columns' Hessian, one column at a time; the salient set
    by sorting a Python list; alpha by a loop over each row's non-salient entries."""
    W, H = W.clone(), H.clone()
    rows, d = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(d, dtype=H.dtype)
    # [H_F^-1]_00 for F = {i..d-1}: the squared diagonal of the Cholesky factor of H^-1 (computed independently)
    dinv = torch.tensor([float(torch.linalg.inv(H[i:, i:])[0, 0]) for i in range(d)], dtype=W.dtype)
    if metric == "magnitude":
        score = W.abs()
    else:
        score = W ** 2 / dinv.reshape(1, -1)  # w^2 / U_jj^2 with U_jj^2 = [H_F^-1]_00
    k = int(round(frac * rows * d))
    flat = sorted(range(rows * d), key=lambda t: (-float(score.flatten()[t]), t))[:k]
    mask = torch.zeros(rows * d, dtype=torch.bool)
    mask[flat] = True
    mask = mask.reshape(rows, d)
    alpha = []
    for r in range(rows):
        vals = [abs(float(W[r, j])) for j in range(d) if not mask[r, j]]
        alpha.append(sum(vals) / len(vals) if vals else 0.0)
    alpha = torch.tensor(alpha, dtype=W.dtype)
    qmax = 2 ** high_bits - 1
    lo = torch.minimum(W.min(1).values, torch.zeros(rows, dtype=W.dtype))
    hi = torch.maximum(W.max(1).values, torch.zeros(rows, dtype=W.dtype))
    lo, hi = lo.float(), hi.float()  # the library's grid parameters are fp32 (shrink.quant.qparams)
    s = (hi - lo).clamp(min=1e-8) / qmax
    z = torch.round(-lo / s).clamp(0, qmax)
    s, z = s.to(W.dtype), z.to(W.dtype)

    def tq(w, j):
        high = (torch.clamp(torch.round(w / s) + z, 0, qmax) - z) * s
        return torch.where(mask[:, j], high, torch.where(w >= 0, alpha, -alpha))

    if not gptq:
        return torch.stack([tq(W[:, j], j) for j in range(d)], 1), mask
    for i in range(d):
        Hi = torch.linalg.inv(H[i:, i:])
        q = tq(W[:, i], i)
        err = (W[:, i] - q) / Hi[0, 0]
        W[:, i:] -= err.unsqueeze(1) * Hi[0, :].unsqueeze(0)
        W[:, i] = q
    return W, mask


@pytest.mark.parametrize("metric", ["magnitude", "hessian"])
@pytest.mark.parametrize("gptq", [True, False])
def test_pbllm_equals_naive_reference(metric, gptq):
    W, X, H = _data(1)
    X[:, 5] = 0
    H = 2 * X.T @ X / X.shape[0]
    spec = PBSpec(salient_frac=0.15, metric=metric, gptq=gptq, blocksize=8)
    (ours,), (mask,) = pbllm_quantize([W], H, spec, dtype=torch.float64)
    ref, ref_mask = pb_reference(W, H, 0.15, metric, gptq)
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(ours, ref, atol=1e-9, rtol=1e-9)
    assert (ours[:, 5][mask[:, 5]] == 0).all()  # salient dead weights sit on the grid's zero


@pytest.mark.parametrize("frac", [0.0, 0.05, 0.1, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(12, 32), (7, 13)])
def test_exact_salient_fraction(frac, shape):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(*shape, generator=g)
    W[0, :4] = 0.5  # ties in the score
    k = n_salient(W.numel(), frac)
    assert k == int(round(frac * W.numel()))
    m = salient_mask(W.abs(), frac)
    assert int(m.sum()) == k
    if 0 < k < W.numel():  # the chosen ones are the largest scores
        assert W.abs()[m].min() >= W.abs()[~m].max()
    (q,), (m2,) = pbllm_quantize([W], None, PBSpec(salient_frac=frac, gptq=False))
    assert torch.equal(m, m2)


@pytest.mark.parametrize("gptq", [True, False])
def test_binary_part_has_two_values_per_row(gptq):
    W, X, H = _data(2, dtype=torch.float32)
    spec = PBSpec(salient_frac=0.1, metric="hessian", gptq=gptq)
    (q,), (m,) = pbllm_quantize([W], H, spec)
    for r in range(W.shape[0]):
        vals = torch.unique(q[r][~m[r]])
        assert len(vals) == 2 and torch.isclose(vals[0], -vals[1])
    if not gptq:  # alpha = mean |w| over the non-salient weights; signs kept
        alpha = binary_scale(W, m)
        assert torch.allclose(q[~m].abs(), alpha.unsqueeze(1).expand_as(q)[~m])
        assert torch.equal(torch.sign(q[~m]), torch.where(W[~m] >= 0, 1.0, -1.0))


def test_salient_values_on_the_8bit_row_grid():
    W, X, H = _data(4, dtype=torch.float64)
    (q,), (m,) = pbllm_quantize([W], H, PBSpec(salient_frac=0.2, metric="hessian"), dtype=torch.float64)
    hs = QuantSpec(bits=8, symmetric=False, granularity="channel")
    s, z = qparams(*range_of(W, hs), hs)
    codes = q / s + z
    assert torch.allclose(codes[m], codes[m].round(), atol=1e-6)
    assert codes[m].min() >= -1e-6 and codes[m].max() <= 255 + 1e-6


def test_fraction_one_is_8bit_gptq_and_rtn():
    W, X, H = _data(5, dtype=torch.float32)
    (pb,), (m,) = pbllm_quantize([W], H, PBSpec(salient_frac=1.0, metric="magnitude"))
    (gp,) = gptq_quantize([W], H, QuantSpec(bits=8, symmetric=False, granularity="channel"))
    assert m.all()
    assert torch.equal(pb, gp)
    (pb0,), _ = pbllm_quantize([W], None, PBSpec(salient_frac=1.0, gptq=False))
    from shrink.quant.gptq import rtn_quantize
    assert torch.equal(pb0, rtn_quantize(W, QuantSpec(bits=8, symmetric=False, granularity="channel")))
    acc = accounting_of_masks([m])
    assert acc["bpw_paper"] == 8.0 and acc["salient_frac"] == 1.0


def test_stacked_equals_separate():
    W, X, H = _data(6, rows=20, dtype=torch.float64)
    spec = PBSpec(salient_frac=0.1, metric="hessian")
    stacked, masks = pbllm_quantize([W[:8], W[8:]], H, spec, dtype=torch.float64)
    for part, q, m in zip((W[:8], W[8:]), stacked, masks):
        (alone,), (ma,) = pbllm_quantize([part], H, spec, dtype=torch.float64)
        assert torch.equal(m, ma)
        assert torch.allclose(q, alone, atol=1e-10)


def test_gptq_pb_beats_direct_rounding_on_the_layer_error():
    W, X, H = _data(7, rows=32, d=64, n=1024, dtype=torch.float64)
    err = lambda Q: float(((X @ (W - Q).T) ** 2).sum())  # noqa: E731
    for metric in ("magnitude", "hessian"):
        (g,), _ = pbllm_quantize([W], H, PBSpec(salient_frac=0.1, metric=metric), dtype=torch.float64)
        (r,), _ = pbllm_quantize([W], H, PBSpec(salient_frac=0.1, metric=metric, gptq=False), dtype=torch.float64)
        assert err(g) < err(r)


def test_bit_accounting_exact():
    acc = bit_accounting([(10, 576, 576), (4, 1536, 0)], high_bits=8)
    n = 10 * 576 + 4 * 1536
    assert acc["weights"] == n and acc["salient"] == 576
    assert acc["payload"] == (n - 576) + 576 * 8
    assert acc["mask_bitmap"] == n
    assert acc["mask_sparse"] == 576 * 10 + 10 * 32 + 0 * 11 + 4 * 32  # ceil(log2 576) = 10
    assert acc["scales"] == 14 * (16 + 16 + 8)
    assert acc["bpw_paper"] == acc["payload"] / n
    assert acc["bpw_bitmap"] == (acc["payload"] + n + acc["scales"]) / n
    assert acc["bpw_sparse"] == (acc["payload"] + acc["mask_sparse"] + acc["scales"]) / n
    # the paper's count at f = 0.1: (1 - f) * 1 + 8 f = 1.7
    a = bit_accounting([(100, 1000, 10000)])
    assert math.isclose(a["bpw_paper"], 1.7, rel_tol=0, abs_tol=1e-12)
    assert math.ceil(math.log2(1536)) == 11
    with pytest.raises(QuantError):
        bit_accounting([(2, 2, 5)])


def test_hessian_saliency_uses_cholesky_diagonal():
    W, X, H = _data(8, dtype=torch.float64)
    U, _ = inverse_hessian_factor(H, 0.01)
    s = saliency(W, "hessian", U)
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    d2 = torch.tensor([float(torch.linalg.inv(Hd[i:, i:])[0, 0]) for i in range(H.shape[0])], dtype=H.dtype)
    assert torch.allclose(s, W ** 2 / d2, rtol=1e-9)


def test_bad_input_names_the_fix():
    W = torch.randn(4, 8)
    with pytest.raises(QuantError, match="salient_frac"):
        PBSpec(salient_frac=1.5).check()
    with pytest.raises(QuantError, match="metric"):
        PBSpec(metric="random").check()
    with pytest.raises(QuantError, match="Hessian"):
        pbllm_quantize([W], None, PBSpec(metric="hessian", gptq=False))
    with pytest.raises(QuantError, match="calibration"):
        from shrink.models import load
        m, _ = load("tiny-llama", seed=0)
        pbllm_model(m, None, PBSpec(gptq=True), verbose=False)


def test_model_level_counts_every_linear():
    from shrink.models import BlockRunner, load
    from shrink.quant.gptq import decoder_weight_linears

    m, _ = load("tiny-llama", seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (4, 32), generator=g)
    res = pbllm_model(m, ids, PBSpec(salient_frac=0.2, metric="hessian"), verbose=False)
    lins = [l for b in BlockRunner(m).blocks for l in decoder_weight_linears(b).values()]
    assert res["bits"]["weights"] == sum(l.weight.numel() for l in lins)
    assert res["bits"]["salient"] == sum(n_salient(l.weight.numel(), 0.2) for l in lins)
    for l in lins:  # each row: two binary values plus at most 256 grid values
        w = l.weight
        assert all(len(torch.unique(w[r])) <= 2 + 256 for r in range(w.shape[0]))


@pytest.mark.parametrize("hub_id", ["meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B"])
def test_pbllm_paper_preset_on_a_standin(monkeypatch, tmp_path, data_dir, hub_id):
    """The paper preset's code path (C4 calibration, WikiText-2 evaluation) on random-init stand-ins of
    LLaMA-2-7B and LLaMA-3-8B and a local C4-format file, shrunk to a few short windows."""
    from conftest import c4_like_file
    from shrink import scales
    from shrink.quant.pbllm_experiment import PBLLMContext

    monkeypatch.setenv("SHRINK_STANDINS", "1")
    monkeypatch.setenv("SHRINK_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("SHRINK_C4_FILES", str(c4_like_file(tmp_path / "c4-train.00000-of-01024.json")))
    cfg = scales.get("pbllm", "paper").with_(model=hub_id, seqlen=64, windows=2, calib_nsamples=2, calib_seqlen=64)
    assert cfg.calib_corpus == "c4" and cfg.high_bits == 8
    ctx = PBLLMContext(cfg, "paper")
    assert ctx.model.shrink_info["standin_for"] == hub_id
    cell = ctx.measure(0.1, "hessian", True, 0)
    from shrink.models import BlockRunner
    from shrink.quant.gptq import decoder_weight_linears

    numel = sum(l.weight.numel() for b in BlockRunner(ctx.model).blocks for l in decoder_weight_linears(b).values())
    assert cell["ppl"] > 1 and cell["err_calib"] > 0 and cell["bits"]["weights"] == numel
    assert cell["zero_shot"].startswith("not run: offline")
    direct = ctx.measure(0.1, "magnitude", False)
    assert direct["ppl"] > 1
    assert len(list((tmp_path / "results" / "paper" / "02-bits").glob("pbllm-*.json"))) == 2
