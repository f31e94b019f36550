"""The bits chapter's activation quantizer dispatches through ``shrink.ops`` (issue 14 §3) and computes exactly
what :func:`shrink.quant.fake_quant` computes: bit for bit on every input, whichever path a call takes."""

import torch
import pytest

from shrink import ops
from shrink.quant import QuantSpec, fake_quant, fake_quant_kernel, qparams, range_of, wrap_model
from shrink.quant.fakequant import QuantLinear


def _acts(seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 17, 96, generator=g)
    x[0, 3, 5] = 600.0             # a massive activation (the chapter's outliers)
    x[1, 4] = 0.0                  # an all-zero token row
    x[2, 6] = torch.linspace(-2, 2, 96)  # values at many .5 ties after scaling
    x[2, 7] = x[2, 7].abs()        # a one-signed row (asymmetric grid with zero point at an end)
    return x.to(dtype)


SPECS = [QuantSpec(bits=b, symmetric=s, granularity="token", narrow=n)
         for b in (8, 6, 4) for s in (True, False) for n in ((True, False) if s else (True,))]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe() + ("" if s.narrow else " wide"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_token_kernel_path_is_fake_quant(spec, dtype):
    x = _acts(0, dtype)
    ops._LAST.pop("fake_quant_per_token", None)
    got = fake_quant_kernel(x, spec)
    assert ops.last_backend("fake_quant_per_token") is not None  # the op ran
    want = fake_quant(x, spec)
    assert got.dtype == want.dtype == dtype and torch.equal(got, want)


def test_tiny_row_takes_fake_quant_and_still_matches():
    spec = QuantSpec(bits=8, symmetric=True, granularity="token")
    x = _acts(1)
    x[0, 0] = 1e-10  # range in (0, 1e-8): the op's step would differ from qparams' floor
    assert not torch.equal(ops.fake_quant_per_token(x, 8, True), fake_quant(x, spec))  # why the guard exists
    ops._LAST.pop("fake_quant_per_token", None)
    assert torch.equal(fake_quant_kernel(x, spec), fake_quant(x, spec))
    assert ops.last_backend("fake_quant_per_token") is None  # not dispatched


def test_nan_input_still_reports_through_fake_quant():
    from shrink.quant import QuantError

    x = _acts(2)
    x[1, 2, 3] = float("nan")
    with pytest.raises(QuantError, match="NaN"):
        fake_quant_kernel(x, QuantSpec(bits=8, granularity="token"))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("narrow", [True, False])
def test_static_per_tensor_kernel_path_is_fake_quant(symmetric, narrow):
    spec = QuantSpec(bits=8, symmetric=symmetric, granularity="tensor", static=True, narrow=narrow)
    calib = torch.randn(4, 96, generator=torch.Generator().manual_seed(3)) * 0.3  # smaller than the inputs: clipping binds
    lo, hi = range_of(calib, spec)
    s, z = qparams(lo, hi, spec)
    x = _acts(4)
    ops._LAST.pop("fake_quant_per_tensor", None)
    got = fake_quant_kernel(x, spec, s, z)
    assert ops.last_backend("fake_quant_per_tensor") is not None
    want = fake_quant(x, spec, s, z)
    assert torch.equal(got, want)
    assert int(torch.round(want / s).min()) == (spec.qmin if symmetric else -int(z))  # the clamp bound, not -128


def test_static_nan_propagates_as_before():
    spec = QuantSpec(bits=8, granularity="tensor", static=True)
    s, z = qparams(*range_of(_acts(5), spec), spec)
    x = _acts(6)
    x[0, 0, 0] = float("nan")
    got, want = fake_quant_kernel(x, spec, s, z), fake_quant(x, spec, s, z)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(got.nan_to_num(), want.nan_to_num())


def test_quant_linear_dispatches_and_keeps_its_output():
    """A wrapped linear's forward goes through the op, and its output equals the direct fake-quant formula."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    w, a = QuantSpec(bits=8, granularity="channel"), QuantSpec(bits=8, granularity="token")
    ql = QuantLinear(lin, w, a, name="toy")
    x = _acts(7)
    ops._LAST.pop("fake_quant_per_token", None)
    y = ql(x)
    assert ops.last_backend("fake_quant_per_token") is not None
    want = torch.nn.functional.linear(fake_quant(x, a), fake_quant(lin.weight.detach(), w), lin.bias)
    assert torch.equal(y, want)


def test_wrapped_model_unchanged_by_dispatch():
    """The tiny model's W8A8 logits equal those computed with every activation quantized by fake_quant."""
    import copy

    from shrink import models

    model, _ = models.load("tiny-llama", seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    spec_w, spec_a = QuantSpec(bits=8, granularity="channel"), QuantSpec(bits=8, granularity="token")
    wrap_model(a, spec_w, spec_a)
    wrap_model(b, spec_w, spec_a)
    for m in b.modules():
        if isinstance(m, QuantLinear):
            m.quantize_input = (lambda mod: (lambda x: fake_quant(x, mod.a_spec)))(m)
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
