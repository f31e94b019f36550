"""CushionCache: L_q against a naive computation, batched candidates == one at a time == in-sequence
prefix, greedy search rule and checkpoints, prefix tuning leaves the model untouched, paper presets on
stand-ins, diagnostics."""

import json

import pytest
import torch

import shrink.data as D
import shrink.models as M
import shrink.quant as Q
from shrink.quant import diagnostics as G
from shrink.quant.cushioncache import LQ_SPEC


@pytest.fixture(scope="module")
def tiny():
    return M.load("tiny-llama", seed=0)


def _text(n=10, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def test_lq_matches_naive_hooks(tiny):
    model, _ = tiny
    text = _text()
    xs = []
    hooks = [lin.register_forward_pre_hook(lambda _m, a: xs.append(a[0].detach()))
             for lin in Q.decoder_linears(model).values()]
    with torch.no_grad():
        model(text[None])
    for h in hooks:
        h.remove()
    naive = sum(float((x - Q.fake_quant(x, LQ_SPEC)).pow(2).sum()) for x in xs)  # 14 linear inputs
    got = Q.text_lq(model, text)
    assert got["lq"] == pytest.approx(naive, rel=1e-5)
    assert got["maxabs"] == pytest.approx(max(float(x.abs().max()) for x in xs), rel=1e-6)


def test_batched_candidates_equal_one_at_a_time_and_in_sequence(tiny):
    model, _ = tiny
    text, cands = _text(12, 1), torch.tensor([256, 10, 32, 65, 101, 257, 46])
    prefix = M.KVPrefix.from_tokens(model, [256, 10])
    batched = Q.candidate_lq(model, text, cands, prefix, batch_size=7)
    single = Q.candidate_lq(model, text, cands, prefix, batch_size=1)
    assert torch.allclose(batched["lq"], single["lq"], rtol=1e-4)
    assert batched["token_forwards"] == 7 * 13
    for i, c in enumerate(cands.tolist()):  # independent path: prefix of 3 tokens computed in one forward
        ref = Q.text_lq(model, text, M.KVPrefix.from_tokens(model, [256, 10, c]))
        assert float(batched["lq"][i]) == pytest.approx(ref["lq"], rel=1e-4)
    blk = Q.candidate_lq(model, text, cands[:3], prefix, target="block_inputs", batch_size=3)
    assert blk["lq"].shape == (3,) and (blk["lq"] > 0).all()


def test_greedy_search_rule_and_checkpoint(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    texts = torch.stack([_text(10, 2), _text(10, 3)])
    cands = Q.shortlist(tok, texts.flatten(), 8)
    assert cands.numel() == 8 and cands.unique().numel() == 8
    ck = tmp_path / "search.json"
    res = Q.greedy_search(model, texts, cands, tau=0.999, max_len=3, batch_size=4, checkpoint=ck)
    for rec in res.history:
        assert rec["accepted"] == (rec["lq_best"] < 0.999 * rec["lq_before"])
        assert rec["best_token"] in cands.tolist() and rec["top5"][0][1] == rec["lq_best"]
    assert len(res.tokens) == sum(r["accepted"] for r in res.history) <= 3 and res.done
    assert not res.history[-1]["accepted"] or len(res.tokens) == 3
    state = json.loads(ck.read_text())
    assert state["tokens"] == res.tokens
    monkeypatch.setattr(Q.cushioncache, "candidate_lq", lambda *a, **k: pytest.fail("resumed run recomputed"))
    again = Q.greedy_search(model, texts, cands, tau=0.999, max_len=3, batch_size=4, checkpoint=ck)
    assert again.tokens == res.tokens and again.history == res.history


def test_prerank_and_prefixquant_baseline(tiny):
    model, _ = tiny
    pool = torch.arange(0, 259)
    sc = Q.prerank_vocab(model, pool, batch_size=100)
    assert sc.shape == (259,) and torch.isfinite(sc).all()
    one = Q.prerank_vocab(model, pool[:5], batch_size=1)
    assert torch.allclose(sc[:5], one, rtol=1e-5)
    out = Q.prefixquant_tokens(model, torch.randint(0, 256, (2, 16)), eta=1.5, top=2)
    assert len(out["tokens"]) <= 2 and all(isinstance(t, int) for t in out["tokens"])


@pytest.mark.parametrize("mode", ["detach", "ste"])
def test_prefix_tuning_leaves_model_weights(tiny, mode):
    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    prefix = M.KVPrefix.from_tokens(model, [256])
    train = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(5))
    tuned, hist = Q.tune_prefix(model, prefix, train, steps=3, lr=1e-2, batch_size=2, rounding_grad=mode)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == [p.requires_grad for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(tuned.keys, prefix.keys))
    assert len(hist) == 3 and not any(k.requires_grad for k in tuned.keys)


def test_ste_gradient_vanishes_with_dynamic_scales_detach_does_not(tiny):
    """bits.md §1.4: with STE rounding and stop-grad dynamic scales nothing is clipped, so ||X - q(X)||^2 has
    (almost) no gradient; the handbook's 'detach' reading gives 2 (X - q(X))."""
    model, _ = tiny
    text = _text(12, 6)[None]
    norms = {}
    for mode in ("ste", "detach"):
        prefix = M.KVPrefix.from_tokens(model, [256])
        keys = [k.clone().requires_grad_(True) for k in prefix.keys]
        p = M.KVPrefix(keys, [v.clone() for v in prefix.values])
        with Q.LqRecorder(model, grad=mode) as rec:
            model(input_ids=text, past_key_values=p.cache(1), use_cache=True)
        rec.lq.sum().backward()
        norms[mode] = sum(float(k.grad.norm()) for k in keys)
    assert norms["detach"] > 0 and norms["ste"] < 1e-3 * norms["detach"]


def test_tuning_with_validation_never_returns_worse(tiny):
    model, _ = tiny
    prefix = M.KVPrefix.from_tokens(model, [256])
    train = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(7))
    val = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(8))
    tuned, hist = Q.tune_prefix(model, prefix, train, steps=4, lr=0.5, batch_size=2, val_ids=val, eval_every=2)
    vals = [h["val_loss"] for h in hist if "val_loss" in h]
    assert hist[0]["step"] == 0 and len(vals) == 3
    # the returned prefix has the best validation objective seen
    with torch.no_grad():
        from shrink.quant.cushioncache import _objective
        got = float(_objective(model, val, tuned, 0.01, LQ_SPEC, "linear_inputs", None, None, "token_mean")[0])
    assert got == pytest.approx(min(vals), rel=1e-4)


def test_diagnostics(tiny):
    model, _ = tiny
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(9))
    prefix = M.KVPrefix.from_tokens(model, [256, 10])
    st = G.residual_stats(model, ids, prefix)
    assert st["top1"].shape == (3,) and (st["top1"] >= st["top2"]).all() and (st["top2"] >= st["top3"]).all()
    lin = G.linear_input_stats(model, ids)
    assert len(lin) == 14 and all(v["top1"] >= v["median"] for v in lin.values())
    att = G.attention_mass(model, ids, prefix)
    assert att.shape == (2, 18)
    assert torch.allclose(att.sum(-1), torch.ones(2), atol=1e-5)  # each query's attention sums to one
    assert model.config._attn_implementation == "sdpa"
    t5 = G.table5_stats(model, ids)
    assert t5["top1"] >= t5["top10pct"] >= t5["median"] > 0
    g = torch.randn(100000, generator=torch.Generator().manual_seed(0))
    assert G.kurtosis(g) == pytest.approx(3.0, abs=0.1)
    ref = model(ids).logits
    with G.massive_intervention(model, 0, [3, 5], 0.0):
        out = model(ids).logits
    assert not torch.equal(out, ref) and torch.equal(out[:, 0], out[:, 0])
    assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("paper_model", ["meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B",
                                         "mistralai/Mistral-7B-v0.1", "facebook/opt-6.7b"])
def test_paper_presets_run_on_standins(paper_model, monkeypatch, tmp_path):
    from conftest import c4_like_file

    monkeypatch.setenv("SHRINK_STANDINS", "1")
    monkeypatch.setenv("SHRINK_C4_FILES", str(c4_like_file(tmp_path / "c4.json", n_docs=4, words=120)))
    cfg = Q.presets.paper_preset(paper_model)
    assert cfg.alpha == 0.8 and cfg.search_corpus == "c4" and cfg.search_seqlen == 512 and cfg.shortlist_k is None
    model, tok = M.load(cfg.model)
    # the paper's search texts (C4), shortened to fit the stand-in; full-vocabulary candidates
    texts = D.calibration_set(tok, "c4", "train", nsamples=2, seqlen=32, seed=0)
    res = Q.greedy_search(model, texts, torch.arange(len(tok)), tau=cfg.tau, max_len=2, batch_size=128)
    assert res.history[0]["n_candidates"] == len(tok)
    prefix = M.KVPrefix.from_tokens(model, res.tokens or [tok.bos_token_id])
    # SmoothQuant (alpha 0.8) + paper quantizers; group 32 because the stand-ins are 64 wide (paper: 128)
    calib = texts[:, :24]
    Q.smooth_model(model, Q.act_scales(model, calib, prefix=prefix), alpha=cfg.alpha)
    for act in ("static", "dynamic", "token"):
        w, a = Q.cushioncache_paper(act, w_group_size=32)
        with Q.quantized(model, w, a, calib_ids=calib, prefix=prefix):
            out = model(texts[:1], past_key_values=prefix.cache(1), use_cache=True).logits
        assert torch.isfinite(out).all()
    tuned, _ = Q.tune_prefix(model, prefix, texts[:, :16], steps=1, batch_size=2)
    assert tuned.length == prefix.length


@pytest.mark.cpu
def test_smollm2_sink_prefix_cuts_lq():
    """On SmolLM2 one sink-like prefix token removes the massive activation from the text's linear inputs."""
    model, tok = M.load("smollm2-135m")
    prose = ("The river rises in the northern hills and flows south through farmland for about two hundred "
             "kilometres before it reaches the sea. Several small towns grew up along its banks in the "
             "nineteenth century, when the railway arrived and the mills were built.")
    text = torch.tensor(tok.encode(prose, add_special_tokens=False))
    plain = Q.text_lq(model, text)
    pre = Q.text_lq(model, text, M.KVPrefix.from_tokens(model, tok.encode("\n", add_special_tokens=False)))
    assert plain["maxabs"] > 1000 and plain["maxabs"] / pre["maxabs"] > 10
    assert pre["lq"] < 0.5 * plain["lq"]  # the paper's tau = 0.5 acceptance would take it
