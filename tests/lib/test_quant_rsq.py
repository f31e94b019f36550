"""RSQ invariants (issue 15): uniform token weights = GPTQ bit for bit, the weighted Hessian equals the naive
sum, weight normalisation (mean 1, range, prefix zeros), attention concentration against eager attention, and
the folded rotation keeps the full-precision function (<= 1e-4)."""

import copy

import pytest
import torch

import shrink.models as M
from shrink.blockwise import sequential
from shrink.models import BlockRunner
from shrink.obs import InputStats, OBSError, StatsCollector
from shrink.quant import QuantError, QuantSpec, WeightQuantSpec, quantize_model
from shrink.quant.gptq import decoder_weight_linears
from shrink.quant.rsq import (attention_concentration, fold_norms, hadamard, mean_one, minmax_normalize,
                              orthogonal, rotate_model, token_weight_fn, token_weights)

GRID = QuantSpec(bits=3, symmetric=False, granularity="channel")


@pytest.fixture(scope="module")
def tiny():
    model, _ = M.load("tiny-llama")
    g = torch.Generator().manual_seed(0)
    return model, torch.randint(0, 256, (6, 48), generator=g)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_weighted_hessian_equals_naive_sum():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 40, 16, generator=g, dtype=torch.float64)
    r = torch.rand(3, 40, generator=g, dtype=torch.float64) * 3
    st = InputStats(16, hessian=True)
    st.add(X[:2], token_weight=r[:2])
    st.add(X[2:], token_weight=r[2:])
    naive = sum(r[b, t] * torch.outer(X[b, t], X[b, t]) for b in range(3) for t in range(40)) * 2 / 120
    assert torch.allclose(st.hessian().double(), naive, rtol=1e-5, atol=1e-5)


def test_uniform_token_weights_equal_gptq_bitwise(tiny):
    model, ids = tiny
    spec = WeightQuantSpec(method="gptq", grid=GRID, batch=4)  # batch 4 of 6: two batches, the second short
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = quantize_model(a, ids, spec, verbose=False)
    rb = quantize_model(b, ids, spec, token_weights=token_weight_fn(b, "uniform"), verbose=False)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ra["final"]["err_calib"] == rb["final"]["err_calib"]


def test_attncon_weights_change_the_result_and_reach_the_hessian(tiny):
    model, ids = tiny
    spec = WeightQuantSpec(method="gptq", grid=GRID)
    a, c = copy.deepcopy(model), copy.deepcopy(model)
    quantize_model(a, ids, spec, verbose=False)
    quantize_model(c, ids, spec, token_weights=token_weight_fn(c, "attncon"), verbose=False)
    wa, wc = _weights(a), _weights(c)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    # the block-0 Hessian collected through the sequential loop = the naive weighted sum over its q/k/v input
    runner = BlockRunner(copy.deepcopy(model))
    x0 = runner.embed(ids)
    w = token_weights("attncon", x0, model=runner.model, layer=0)
    seen = {}

    def grab(b, block, lin, sc):
        if b == 0:
            seen["H"] = sc.stats["self_attn.q_proj"].hessian()

    sequential(runner, ids, ids.shape[0], linears=decoder_weight_linears, compress=grab, needs_stats=True,
               hessian=True, batch=4, token_weights=lambda b, blk, x: token_weights("attncon", x, model=runner.model,
                                                                                    layer=b), verbose=False)
    xn = runner.blocks[0].input_layernorm(x0).reshape(-1, x0.shape[-1]).double()
    naive = 2 * (xn * w.reshape(-1, 1).double()).T @ xn / xn.shape[0]
    assert torch.allclose(seen["H"].double(), naive, rtol=1e-4, atol=1e-6)


def test_token_weight_normalisation():
    g = torch.Generator().manual_seed(2)
    c = torch.rand(50, generator=g) * 7 + 2
    w = minmax_normalize(c, 0.005, 1.0)
    assert abs(float(w.min()) - 0.005) < 1e-7 and abs(float(w.max()) - 1.0) < 1e-7
    assert int(w.argmax()) == int(c.argmax()) and int(w.argmin()) == int(c.argmin())
    m = mean_one(w)
    assert abs(float(m.mean()) - 1.0) < 1e-6
    assert torch.allclose(m / m.max(), w / w.max())  # renormalisation keeps the ratios
    assert torch.equal(mean_one(torch.ones(37)), torch.ones(37))  # exact: uniform stays GPTQ
    # heuristics: firstn keeps T/8 positions, dropsink zeroes the sink; every row has mean 1 over the text
    f = token_weights("firstn", n=2, t=64)
    assert (f[:, :8] == 8).all() and (f[:, 8:] == 0).all()
    d = token_weights("dropsink", n=2, t=64, sink=1)
    assert (d[:, 0] == 0).all() and torch.allclose(d.mean(1), torch.ones(2))
    # prefix positions get weight 0 and do not enter the mean
    p = token_weights("uniform", n=3, t=20, skip=4)
    assert (p[:, :4] == 0).all() and torch.equal(p[:, 4:], torch.ones(3, 16))
    with pytest.raises(QuantError, match="strategy"):
        token_weights("magic", n=1, t=8)
    with pytest.raises(QuantError, match="firstn"):
        token_weights("firstn", n=1, t=4)
    with pytest.raises(QuantError, match="model"):
        token_weights("attncon", n=1, t=8)


def test_attention_concentration_matches_eager_attention(tiny):
    model, ids = tiny
    m = copy.deepcopy(model)
    m.config._attn_implementation = "eager"
    out = m(ids[:2], output_attentions=True, output_hidden_states=True)
    for layer in range(2):
        A = out.attentions[layer].float()
        ref = A.sum((1, 2))
        ours = attention_concentration(m, layer, out.hidden_states[layer])
        assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4)
        # causal: column j is attended by T - j queries; the columns sum to H * T (rows sum to 1)
        assert torch.allclose(ours.sum(1), torch.full((2,), float(A.shape[1] * A.shape[2])), rtol=1e-5)
        w = token_weights("attncon", out.hidden_states[layer], model=m, layer=layer, min_value=0.005)
        assert torch.allclose(w.mean(1), torch.ones(2), atol=1e-6)
        ratio = w.max(1).values / w.min(1).values
        assert torch.allclose(ratio, torch.full((2,), 200.0), rtol=1e-4)  # max/min = 1 / 0.005
        # with a prefix: only text queries and text keys
        skip = 5
        ref_p = A[:, :, skip:, skip:].sum((1, 2))
        assert torch.allclose(attention_concentration(m, layer, out.hidden_states[layer], skip), ref_p,
                              rtol=1e-4, atol=1e-4)


def test_stats_collector_rejects_mismatched_token_weights(tiny):
    model, ids = tiny
    runner = BlockRunner(model)
    x = runner.embed(ids[:2])
    lin = decoder_weight_linears(runner.blocks[0])
    with StatsCollector(lin, hessian=True) as sc:
        sc.token_weight = torch.ones(2, 7)
        with pytest.raises(OBSError, match="token_weight"):
            runner.run_block(0, x)


@pytest.mark.parametrize("n", [1, 2, 12, 24, 64, 576, 1536])
def test_hadamard_orders_and_orthogonality(n):
    H = hadamard(n)
    assert set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=H.dtype))
    for mode in ("hadamard", "random"):
        Q = orthogonal(n, mode, seed=3)
        assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=Q.dtype), atol=1e-12)
    with pytest.raises(QuantError, match="random"):
        hadamard(6)  # no Hadamard matrix of order 6 exists


@pytest.mark.parametrize("mode", ["hadamard", "random"])
def test_rotation_keeps_the_full_precision_function_tiny(tiny, mode):
    model, ids = tiny
    r = rotate_model(copy.deepcopy(model), mode, seed=1)
    with torch.no_grad():
        ref, out = model(ids).logits.log_softmax(-1), r(ids).logits.log_softmax(-1)
    assert float((out - ref).abs().max()) <= 1e-4
    # the weights really moved (rotation is not the identity) and the norms carry no scale any more
    assert not torch.allclose(r.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    assert all(torch.equal(b.input_layernorm.weight, torch.ones_like(b.input_layernorm.weight))
               for b in r.model.layers)


def test_fold_norms_unties_embeddings_and_keeps_the_function():
    model, _ = M.load("tiny-llama")
    model.lm_head.weight = model.model.embed_tokens.weight  # tie, as SmolLM2 is
    with torch.no_grad():
        model.model.norm.weight.mul_(torch.linspace(0.5, 2, model.model.norm.weight.numel()))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
        f = fold_norms(copy.deepcopy(model))
        assert f.lm_head.weight.data_ptr() != f.model.embed_tokens.weight.data_ptr()
        assert torch.allclose(f(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_rotation_keeps_the_full_precision_function_smollm2(one_thread):
    model, _ = M.load("smollm2-135m")
    ids = torch.randint(0, 5000, (1, 96), generator=torch.Generator().manual_seed(5))
    r = rotate_model(copy.deepcopy(model), "hadamard", seed=0)
    with torch.no_grad():
        ref, out = model(ids).logits.log_softmax(-1), r(ids).logits.log_softmax(-1)
    assert float((out - ref).abs().max()) <= 1e-4


def test_rotated_rsq_runs_and_rtn_rejects_token_weights(tiny):
    model, ids = tiny
    r = rotate_model(copy.deepcopy(model), "hadamard", seed=0)
    res = quantize_model(r, ids, WeightQuantSpec(method="gptq", grid=GRID),
                         token_weights=token_weight_fn(r, "attncon"), verbose=False)
    assert res["final"]["err_calib"] > 0
    for lin in decoder_weight_linears(r.model.layers[0]).values():
        assert max(len(torch.unique(row)) for row in lin.weight) <= 2 ** GRID.bits
    with pytest.raises(QuantError, match="RTN"):
        quantize_model(copy.deepcopy(model), ids, WeightQuantSpec(method="rtn", grid=GRID),
                       token_weights=token_weight_fn(model, "uniform"), verbose=False)


@pytest.mark.parametrize("hub_id", ["meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B"])
def test_paper_preset_on_standins(monkeypatch, data_dir, hub_id):
    """The paper preset's code path (rotation, attncon RSQ at W3 and W4) on the random-init stand-ins (LLaMA-3's
    has GQA: the per-head V/O rotation and the attention columns must handle repeated key/value heads)."""
    from shrink import data, scales
    from shrink.quant.weightonly import grid_spec

    monkeypatch.setenv("SHRINK_STANDINS", "1")
    cfg = scales.get("rsq", "paper").with_(model=hub_id)
    model, tok = M.load(cfg.model)
    assert model.shrink_info["standin_for"] == hub_id
    assert (cfg.calib_corpus, cfg.calib_split, cfg.rsq_bits) == ("wikitext2", "train", 3)
    ids = data.calibration_set(tok, "wikitext2", "validation", nsamples=2, seqlen=48, seed=0)  # train is online only
    rot = rotate_model(copy.deepcopy(model), "hadamard", seed=0)
    with torch.no_grad():
        assert float((rot(ids).logits.log_softmax(-1) - model(ids).logits.log_softmax(-1)).abs().max()) <= 1e-4
    for bits in (3, 4):
        m = copy.deepcopy(rot)
        res = quantize_model(m, ids, WeightQuantSpec(method="gptq", grid=grid_spec(cfg.rsq_grid, bits)),
                             token_weights=token_weight_fn(m, "attncon", min_value=cfg.min_value,
                                                           max_value=cfg.max_value), verbose=False)
        assert res["final"]["err_calib"] > 0 and res["bits_per_weight"] == bits


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama3"])
def test_prefix_block_runner_equals_prefixed_lm_and_attention_with_prefix(name):
    """The block loop from a fixed key/value prefix reproduces PrefixedLM exactly, repeated block calls do not
    accumulate cache entries, and the prefixed attention columns equal eager attention over prefix + text."""
    from shrink.models import KVPrefix, PrefixedLM
    from shrink.quant.rsq import PrefixBlockRunner, attention_concentration_prefixed

    model, _ = M.load(name)
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(6))
    kv = KVPrefix.from_tokens(model, [5, 7, 9])
    r = PrefixBlockRunner(model, kv)
    with torch.no_grad():
        ref = PrefixedLM(model, kv)(ids).logits
        assert torch.equal(r.logits(ids), ref)
        assert torch.equal(r.logits(ids), ref)  # fresh cache per block call
        m = copy.deepcopy(model)
        m.config._attn_implementation = "eager"
        full = m(torch.cat([torch.tensor([[5, 7, 9]]).expand(3, -1), ids], 1), output_attentions=True,
                 output_hidden_states=True)
        h = r.embed(ids)
        for layer in range(len(r)):
            want = full.attentions[layer][:, :, 3:, 3:].float().sum((1, 2))
            got = attention_concentration_prefixed(model, layer, h, kv)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
            h = r.run_block(layer, h)
    # RSQ through the prefixed runner: uniform weights are GPTQ on the same runner, bit for bit
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    spec = WeightQuantSpec(method="gptq", grid=GRID)
    quantize_model(a, ids, spec, runner=PrefixBlockRunner(a, kv), verbose=False)
    quantize_model(b, ids, spec, runner=PrefixBlockRunner(b, kv), token_weights=token_weight_fn(b, "uniform"),
                   verbose=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
