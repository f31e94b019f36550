"""shrink.quant: the quantizer against naive per-element formulas, W8A8 wrapping, static calibration,
SmoothQuant invariance."""

import math

import pytest
import torch

import shrink.models as M
import shrink.quant as Q
from shrink.quant import QuantError, QuantSpec, fake_quant


def naive_sym(x, bits, narrow=True):
    """Per-element symmetric fake quant of a 1-D group (SmoothQuant formula, clamped)."""
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax if narrow else -(2 ** (bits - 1))
    s = max(x.abs().max(), torch.tensor(1e-8)) / qmax
    return torch.stack([torch.clamp(torch.round(v / s), qmin, qmax) * s for v in x])


def naive_asym(x, bits):
    """Per-element asymmetric fake quant of a 1-D group (QLLM-Eval/AWQ formula; range widened to hold 0)."""
    qmax = 2 ** bits - 1
    lo, hi = torch.minimum(x.min(), torch.tensor(0.0)), torch.maximum(x.max(), torch.tensor(0.0))
    s = max(hi - lo, torch.tensor(1e-8)) / qmax
    z = torch.clamp(torch.round(-lo / s), 0, qmax)
    return torch.stack([(torch.clamp(torch.round(v / s) + z, 0, qmax) - z) * s for v in x])


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran", ["tensor", "token", "column", "group"])
def test_fake_quant_matches_naive_formulas(bits, symmetric, gran):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(5, 8, generator=g) * 3 + 0.5
    x[2, 3] = 40.0  # an outlier
    spec = QuantSpec(bits, symmetric, gran, group_size=4)
    naive = naive_sym if symmetric else naive_asym
    out = fake_quant(x, spec)
    exp = torch.empty_like(x)
    if gran == "tensor":
        exp = naive(x.flatten(), bits).view_as(x)
    elif gran == "token":
        for r in range(5):
            exp[r] = naive(x[r], bits)
    elif gran == "column":
        for c in range(8):
            exp[:, c] = naive(x[:, c], bits)
    else:
        for r in range(5):
            for s in range(0, 8, 4):
                exp[r, s:s + 4] = naive(x[r, s:s + 4], bits)
    assert torch.equal(out, exp)


@pytest.mark.parametrize("spec", [QuantSpec(8, True, "tensor"), QuantSpec(8, False, "token"),
                                  QuantSpec(4, False, "group", 16), QuantSpec(6, True, "column")])
def test_round_trip_bounds_and_levels(spec):
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(1)) * 5
    lo, hi = Q.range_of(x, spec)
    s, _ = Q.qparams(lo, hi, spec)
    err = (x - fake_quant(x, spec)).abs()
    xs = x.view(6, 2, 16) if spec.granularity == "group" else x
    es = err.view(6, 2, 16) if spec.granularity == "group" else err
    assert (es <= s / 2 * (1 + 1e-5)).all()  # dynamic ranges never clip: error <= half a step
    assert xs.shape == es.shape
    # at most 2^bits distinct levels per scale group
    fq = fake_quant(x, spec)
    for row in (fq.T if spec.granularity == "column" else fq.reshape(-1, 16) if spec.granularity == "group" else fq):
        assert row.unique().numel() <= 2 ** spec.bits
    # more bits, smaller error
    assert (x - fake_quant(x, spec.with_(bits=spec.bits + 2))).pow(2).sum() < err.pow(2).sum()


def test_static_clips_and_per_sample():
    spec = QuantSpec(8, True, "tensor")
    x = torch.tensor([[1.0, -2.0, 10.0]])
    s, z = Q.qparams(torch.tensor(-2.0), torch.tensor(2.0), spec)
    assert fake_quant(x, spec, s, z)[0, 2] == pytest.approx(2.0, rel=1e-6)  # outside the static range: clipped
    xb = torch.stack([torch.randn(4, 8), 100 * torch.randn(4, 8)])
    per = fake_quant(xb, spec, per_sample=True)
    assert torch.equal(per[0], fake_quant(xb[0], spec)) and torch.equal(per[1], fake_quant(xb[1], spec))


def test_bad_specs_raise():
    with pytest.raises(QuantError):
        QuantSpec(1)
    with pytest.raises(QuantError):
        QuantSpec(8, granularity="row")
    with pytest.raises(QuantError):
        QuantSpec(8, granularity="token", static=True)
    with pytest.raises(QuantError, match="divide"):
        fake_quant(torch.randn(2, 10), QuantSpec(8, granularity="group", group_size=4))


@pytest.fixture(scope="module")
def tiny():
    model, tok = M.load("tiny-llama", seed=0)
    return model, tok


def _ids(n, t, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def test_wrap_unwrap_and_fp_identity(tiny):
    model, _ = tiny
    ids = _ids(2, 16)
    ref = model(ids).logits
    wrapped = Q.wrap_model(model, None, None)
    assert len(wrapped) == 2 * 7 and all("lm_head" not in n for n in wrapped)
    assert torch.equal(model(ids).logits, ref)
    with pytest.raises(QuantError, match="already wrapped"):
        Q.wrap_model(model, None, None)
    Q.unwrap_model(model)
    w, a = Q.cushioncache_paper("token", w_group_size=32)
    with Q.quantized(model, w, a):
        out = model(ids).logits
        assert not torch.equal(out, ref) and torch.allclose(out, ref, atol=0.05)
    assert not Q.quant_linears(model) and torch.equal(model(ids).logits, ref)


def test_static_calibration_excludes_prefix_positions(tiny):
    model, _ = tiny
    ptoks, ids = [256, 10], _ids(3, 12, seed=2)
    full = torch.cat([torch.tensor(ptoks).expand(3, -1), ids], 1)
    # independent naive ranges: hook every linear input of the full sequence, drop prefix positions
    seen = {}
    hooks = [lin.register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, []).append(a[0][:, 2:]))
             for n, lin in Q.decoder_linears(model).items()]
    with torch.no_grad():
        model(full)
    for h in hooks:
        h.remove()
    spec = QuantSpec(8, False, "tensor", static=True)
    prefix = M.KVPrefix.from_tokens(model, ptoks)  # full-precision prefix K/V, built before wrapping
    Q.wrap_model(model, None, spec)
    try:
        r_skip = Q.calibrate(model, full, skip_first=2, batch_size=3)
        r_prefix = Q.calibrate(model, ids, prefix=prefix, batch_size=3)
        r_all = Q.calibrate(model, full, batch_size=3)
    finally:
        Q.unwrap_model(model)
    for n, xs in seen.items():
        x = torch.cat(xs)
        assert float(r_skip[n][0]) == pytest.approx(float(x.min()), abs=1e-6)
        assert float(r_skip[n][1]) == pytest.approx(float(x.max()), abs=1e-6)
        assert torch.allclose(r_prefix[n][1], r_skip[n][1], atol=1e-4)
        assert torch.allclose(r_prefix[n][0], r_skip[n][0], atol=1e-4)
    assert any(float(r_all[n][1]) > float(r_skip[n][1]) + 1e-6 or float(r_all[n][0]) < float(r_skip[n][0]) - 1e-6
               for n in seen)  # including the prefix positions would have changed some range


def test_clip_top_matches_naive_quantile(tiny):
    model, _ = tiny
    ids = _ids(2, 20, seed=3)
    name = "0.mlp.down_proj"
    seen = []
    h = Q.decoder_linears(model)[name].register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        model(ids)
    h.remove()
    tokmax = torch.cat(seen).abs().amax(-1).flatten().sort().values  # 40 tokens
    Q.wrap_model(model, None, QuantSpec(8, True, "tensor", static=True, clip_top=0.1))
    try:
        r = Q.calibrate(model, ids, batch_size=2)
    finally:
        Q.unwrap_model(model)
    assert float(r[name][1]) == pytest.approx(float(tokmax[40 - 4 - 1]), rel=1e-6)  # top 4 of 40 dropped


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-mistral"])
def test_smoothquant_preserves_fp_function(name):
    model, _ = M.load(name, seed=1)
    ids = _ids(2, 16, seed=4)
    ref = model(ids).logits
    scales = Q.act_scales(model, ids)
    first = "0.self_attn.q_proj"
    s = Q.smooth_model(model, scales, alpha=0.8)[first]
    assert torch.allclose(model(ids).logits, ref, atol=1e-4, rtol=1e-4)
    after = Q.act_scales(model, ids)[first]
    assert torch.allclose(after, scales[first] / s, rtol=1e-4, atol=1e-6)  # the input range moved by 1/s


def test_presets_conventions():
    w, a = Q.smoothquant_level("O3")
    assert w.granularity == "tensor" and a.static and a.symmetric
    w, a = Q.qllm_eval("token")
    assert w.granularity == "group" and not a.symmetric and not a.static
    w, a = Q.cushioncache_paper("dynamic")
    assert a.granularity == "tensor" and not a.static and not a.symmetric
    with pytest.raises(QuantError):
        Q.smoothquant_code("static")
    with pytest.raises(QuantError):
        Q.smoothquant_level("O4")


# ---- range perturbation (issue 9: the conditioning probe) -----------------------------------------------------

def test_perturb_ranges_static_exact_factors_and_reproducible(tiny):
    model, _ = tiny
    ids = _ids(2, 16, seed=5)
    w, a = Q.cushioncache_paper("static", w_group_size=32)
    with Q.quantized(model, w, a, calib_ids=ids) as m:
        base = {n: (q.lo.clone(), q.hi.clone()) for n, q in Q.quant_linears(m).items()}
        ref = m(ids).logits
    eps = 1e-3
    with Q.quantized(model, w, a, ranges=base) as m:                 # reused ranges == fresh calibration
        assert torch.equal(m(ids).logits, ref)
        facs = Q.perturb_ranges(m, eps, seed=7)
        got = {n: (q.lo.clone(), q.hi.clone()) for n, q in Q.quant_linears(m).items()}
    # naive: same generator order, lo then hi per layer
    gen = torch.Generator().manual_seed(7)
    for n, (lo, hi) in base.items():
        f_lo = 1 + eps * (torch.rand(lo.shape, generator=gen, dtype=torch.float64) * 2 - 1)
        f_hi = 1 + eps * (torch.rand(hi.shape, generator=gen, dtype=torch.float64) * 2 - 1)
        assert torch.equal(facs[n][0], f_lo) and torch.equal(facs[n][1], f_hi)
        assert torch.equal(got[n][0], (lo.double() * f_lo).float()) and torch.equal(got[n][1], (hi.double() * f_hi).float())
        assert ((got[n][1] / hi - 1).abs() <= eps * 1.001).all()
    with Q.quantized(model, w, a, ranges=base, perturb=(eps, 7)) as m:   # the context-manager path is the same
        assert all(torch.equal(q.hi, got[n][1]) for n, q in Q.quant_linears(m).items())
    with Q.quantized(model, w, a, ranges=base, perturb=(eps, 8)) as m:
        assert any(not torch.equal(q.hi, got[n][1]) for n, q in Q.quant_linears(m).items())
    with Q.quantized(model, w, a, ranges=base, perturb=(0.0, 7)) as m:   # eps = 0 is the identity
        assert torch.equal(m(ids).logits, ref)
    assert base["0.mlp.down_proj"][1] is not got["0.mlp.down_proj"][1]  # the ranges dict was not modified


def test_perturb_ranges_dynamic_uses_jitter(tiny):
    model, _ = tiny
    ids = _ids(2, 16, seed=6)
    for act in ("dynamic", "token"):
        w, a = Q.cushioncache_paper(act, w_group_size=32)
        with Q.quantized(model, w, a) as m:
            ref = m(ids).logits
        with Q.quantized(model, w, a, perturb=(0.0, 3)) as m:          # factors exactly 1: same function
            assert all(q.range_jitter == (1.0, 1.0) for q in Q.quant_linears(m).values())
            assert torch.equal(m(ids).logits, ref)
        x = torch.randn(3, 5, 64) * 4
        with Q.quantized(model, w, a, perturb=(0.05, 3)) as m:
            q = Q.quant_linears(m)["0.self_attn.q_proj"]
            f_lo, f_hi = q.range_jitter
            assert f_lo != 1.0 and abs(f_lo - 1) <= 0.05 and abs(f_hi - 1) <= 0.05
            lo, hi = Q.range_of(x, a)
            s, z = Q.qparams(lo * f_lo, hi * f_hi, a)                  # naive: scale the dynamic range
            assert torch.equal(q.quantize_input(x), Q.fake_quant(x, a, s, z))


def test_perturb_and_ranges_bad_input(tiny):
    model, _ = tiny
    w, a = Q.cushioncache_paper("static", w_group_size=32)
    with pytest.raises(QuantError, match="eps"):
        with Q.quantized(model, w, a, calib_ids=_ids(1, 8), perturb=(-1e-6, 0)):
            pass
    with pytest.raises(QuantError, match="do not match"):
        with Q.quantized(model, w, a, ranges={}):
            pass
    assert not Q.quant_linears(model)                                   # unwrapped after the error


def test_bits_context_noise_probes(one_thread, data_dir):
    """ppl(perturb=, calib_seed=) are new cache keys; eps = 0 and the preset's calibration seed reproduce the
    unperturbed record exactly (so the in-memory range reuse equals a fresh calibration)."""
    import json

    import shrink
    from shrink import eval as ev, results
    from shrink.quant.experiments import BitsContext, gap_closed, gap_closed_spread

    cfg = shrink.scales.get("bits", "tiny")
    ctx = BitsContext(cfg, "tiny")
    w, a = cfg.specs("static")
    base = ctx.ppl(w=w, a=a)["ppl"]
    zero = ctx.ppl_spread(w=w, a=a, eps=0.0, seeds=(0, 1), with_record=False)
    assert zero.values == (base, base) and zero.kind == "range perturbation"
    rec = ctx.ppl_spread(w=w, a=a, eps=0.0, seeds=(0, 1))                # + the unperturbed record as one more draw
    assert rec.values == (base, base, base) and rec.seeds == ("record", 0, 1)
    assert ctx.calib_spread(w=w, a=a, seeds=(cfg.seed,)).values == (base,)
    other = ctx.calib_spread(w=w, a=a, seeds=(cfg.seed + 1,))
    wd, ad = cfg.specs("dynamic")
    dyn = ctx.ppl(w=wd, a=ad)["ppl"]
    assert ctx.ppl_spread(w=wd, a=ad, eps=0.0, seeds=(0,), with_record=False).values == (dyn,)
    big = ctx.ppl_spread(w=w, a=a, eps=0.2, seeds=(0,), with_record=False)   # a large perturbation does move it
    assert big.values[0] != base
    recs = [json.loads(p.read_text()) for p in (results.results_root() / "tiny" / "02-bits").glob("ppl-*.json")]
    confs = [r["config"] for r in recs]
    assert sum("perturb" not in c and c["calib"][-1] == cfg.seed for c in confs) == 2     # static + dynamic base
    assert sum(c.get("perturb") == [0.0, 0] for c in confs) == 2 and any(c.get("perturb") == [0.2, 0] for c in confs)
    assert any(c["calib"][-1] == cfg.seed + 1 for c in confs) and other.n == 1
    # gap closed over pairs, on ppl and log-ppl
    q, qp = ev.Spread([50.0, 52.0]), ev.Spread([34.0, 35.0])
    g = gap_closed_spread(q, 31.0, qp, 30.0)
    assert g.n == 4 and g.lo == gap_closed(50.0, 31.0, 35.0, 30.0) and g.hi == gap_closed(52.0, 31.0, 34.0, 30.0)
    gl = gap_closed_spread(q, 31.0, qp, 30.0, log=True)
    assert math.isclose(gl.lo, 1 - (math.log(35) - math.log(30)) / (math.log(50) - math.log(31)))
