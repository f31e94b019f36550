"""Real INT8 W8A8 (shrink.quant.int8): same codes as fake quantization, exact int32 path on every backend."""

import pytest
import torch

from shrink import models, ops
from shrink.eval import perplexity
from shrink.quant import QuantError, QuantSpec, calibrate, quant_linears, wrap_model
from shrink.quant.int8 import Int8Linear, fake_twin_output, int8_linears, to_int8

W = QuantSpec(bits=8, symmetric=True, granularity="channel")
A_DYN = QuantSpec(bits=8, symmetric=True, granularity="token")
A_STATIC = QuantSpec(bits=8, symmetric=True, granularity="tensor", static=True)


def _model():
    m, tok = models.load("tiny-llama", seed=0)
    return m, tok


def _ids(n=96, seed=0):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("a_spec", [A_DYN, A_STATIC], ids=["per-token-dynamic", "per-tensor-static"])
def test_codes_equal_fake_quant_and_outputs_agree_to_fp32_rounding(a_spec):
    m, _ = _model()
    wrap_model(m, W, a_spec)
    if a_spec.static:
        calibrate(m, _ids(128, 1))
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(3))
    for name, ql in quant_linears(m).items():
        il = Int8Linear.from_quant_linear(ql)
        # weight codes x steps reproduce the fake-quant weight bit for bit
        assert torch.equal(il.w_q.float() * il.s_w[:, None], ql.wq)
        xin = x if ql.in_features == 64 else torch.randn(2, 7, ql.in_features)
        q, s = il.quantize_input(xin.reshape(-1, xin.shape[-1]))
        assert torch.equal((q.float() * s[:, None]).reshape(xin.shape), ql.quantize_input(xin))
        ref, got = fake_twin_output(ql, xin), il(xin)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), name


def test_cpu_backend_is_bit_identical_to_the_reference_backend():
    m, _ = _model()
    wrap_model(m, W, A_DYN)
    il = Int8Linear.from_quant_linear(next(iter(quant_linears(m).values())))
    x = torch.randn(33, il.in_features, generator=torch.Generator().manual_seed(0))
    y = il(x)
    used = ops.last_backend("int8_matmul_dequant")
    with ops.reference_only():
        y_ref = il(x)
    assert ops.last_backend("int8_matmul_dequant") == "reference"
    assert torch.equal(y, y_ref), f"backend {used} differs from the reference"


def test_to_int8_model_perplexity_matches_fake_quant_and_stores_int8():
    m, tok = _model()
    ids = _ids(256, 5)[0]
    wrap_model(m, W, A_DYN)
    fake = perplexity(m, ids, seqlen=64).ppl
    rep = to_int8(m)
    assert rep["linears"] == 14 and not quant_linears(m)
    assert all(il.w_q.dtype == torch.int8 for il in int8_linears(m).values())
    assert rep["int8_bytes"] < rep["fp32_bytes"] / 3.5
    real = perplexity(m, ids, seqlen=64).ppl
    assert abs(real - fake) / fake < 1e-5


@pytest.mark.parametrize("w,a,word", [
    (QuantSpec(bits=8, symmetric=False), A_DYN, "symmetric"),
    (W, QuantSpec(bits=4), "INT8"),
    (QuantSpec(bits=8, granularity="group", group_size=16), A_DYN, "granularity"),
    (W, QuantSpec(bits=8, granularity="column", static=True), "granularity"),
])
def test_unsupported_grids_are_refused_with_the_fix(w, a, word):
    m, _ = _model()
    wrap_model(m, w, a)
    with pytest.raises(QuantError, match=word):
        to_int8(m)


def test_uncalibrated_static_and_unwrapped_models_are_refused():
    m, _ = _model()
    with pytest.raises(QuantError, match="wrap the model"):
        to_int8(m)
    wrap_model(m, W, A_STATIC)
    with pytest.raises(QuantError, match="calibrate"):
        to_int8(m)
