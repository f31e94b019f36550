"""The sequential loop, the statistics groups, reconstruction and the presets on tiny models / stand-ins."""

import copy
import json

import pytest
import torch

import shrink.models as M
from shrink.pruning import (PRUNERS, PruneSpec, PruningError, ReconConfig, StatsCollector, check_mask,
                            dense_streams, parse_pattern, prune_model, select_linears)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    model, _ = M.load("tiny-llama")
    g = torch.Generator().manual_seed(0)
    return model, torch.randint(0, 256, (8, 32), generator=g), torch.randint(0, 256, (4, 32), generator=g)


def _recon(epochs=3):
    return ReconConfig(epochs=epochs, batch_size=2, lr=1e-3)


@pytest.mark.parametrize("pruner", PRUNERS)
def test_sparsity_zero_reproduces_dense_model(tiny, pruner):
    model, ids, held = tiny
    m = copy.deepcopy(model)
    res = prune_model(m, ids, PruneSpec(pruner=pruner, sparsity=0.0), heldout_ids=held, verbose=False)
    assert all(b["err_calib"] == 0 and b["err_test"] == 0 for b in res.blocks) or pruner == "sparsegpt"
    assert max(b["err_calib"] for b in res.blocks) < 1e-10
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, model(ids).logits, atol=1e-5)
        assert torch.allclose(M.BlockRunner(m).logits(ids), model(ids).logits, atol=1e-5)


def test_stats_groups_share_inputs_and_hessian_is_exact(tiny):
    model, ids, _ = tiny
    runner = M.BlockRunner(model)
    block = runner.blocks[0]
    lin = select_linears(block)
    x = runner.embed(ids)
    captured = {}
    def grab(n):
        def hook(_mod, args, _out):
            captured[n] = args[0].detach()  # returns None: the output is not replaced
        return hook
    hooks = [mod.register_forward_hook(grab(n)) for n, mod in lin.items()]
    with StatsCollector(lin, hessian=True) as sc, torch.no_grad():
        runner.run_block(0, x)
    for h in hooks:
        h.remove()
    groups = sorted(sorted(g) for g in sc.groups)
    assert groups == sorted([["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                             ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]])
    assert sc.stats["self_attn.q_proj"] is sc.stats["self_attn.v_proj"]
    X = captured["mlp.down_proj"].reshape(-1, 128).double()
    H = sc.stats["mlp.down_proj"].hessian().double()
    assert torch.allclose(H, 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-6)
    assert torch.allclose(sc.stats["mlp.down_proj"].sq_norm.double(), (X ** 2).sum(0), rtol=1e-4)


@pytest.mark.parametrize("pruner,pattern,group", [("magnitude", "unstructured", "matrix"),
                                                  ("wanda", "unstructured", "row"),
                                                  ("sparsegpt", "unstructured", "block"),
                                                  ("wanda", "2:4", "nm"), ("sparsegpt", "4:8", "nm"),
                                                  ("magnitude", "2:4", "nm")])
def test_exact_sparsity_in_every_matrix(tiny, pruner, pattern, group):
    model, ids, _ = tiny
    m = copy.deepcopy(model)
    res = prune_model(m, ids, PruneSpec(pruner=pruner, pattern=pattern, sparsity=0.5), verbose=False)
    n_lin = sum(len(select_linears(b)) for b in M.decoder_blocks(m))
    assert len(res.masks) == n_lin
    pat = parse_pattern(pattern, 0.5)
    for name, mask in res.masks:
        w = m.get_parameter(name)
        assert (w[~mask] == 0).all()
        assert int((~mask).sum()) == mask.numel() // 2  # exactly 50 % per matrix
        check_mask(mask, pat, "matrix" if group == "nm" else group, name)
        if group in ("row", "nm"):
            assert ((~mask).sum(1) == mask.shape[1] // 2).all()


def test_dense_cache_gives_identical_results(tiny):
    model, ids, held = tiny
    spec = PruneSpec(pruner="sparsegpt", scheme="BR+GP", recon=_recon(1))
    a = prune_model(copy.deepcopy(model), ids, spec, heldout_ids=held, verbose=False)
    b = prune_model(copy.deepcopy(model), ids, spec, heldout_ids=held, dense=dense_streams(model, ids),
                    dense_heldout=dense_streams(model, held), verbose=False)
    assert [r["err_calib"] for r in a.blocks] == pytest.approx([r["err_calib"] for r in b.blocks], rel=1e-6)
    assert [r["err_test"] for r in a.blocks] == pytest.approx([r["err_test"] for r in b.blocks], rel=1e-6)


@pytest.mark.parametrize("pruner", ["wanda"])
def test_reconstruction_lowers_error_and_keeps_masks(tiny, pruner):
    model, ids, held = tiny
    errs = {}
    for scheme in ("LR", "BR", "BR+GP", "BR+GP+CR"):
        m = copy.deepcopy(model)
        res = prune_model(m, ids, PruneSpec(pruner=pruner, scheme=scheme, recon=_recon()), heldout_ids=held,
                          verbose=False)
        res.masks.verify()
        assert res.sparsity["__all__"] == 0.5
        errs[scheme] = res.final["err_calib"]
        if scheme in ("BR", "BR+GP"):
            # every unit's loss fell: mean of the last epoch (4 steps) below the first epoch's
            assert all(sum(ls[-4:]) < sum(ls[:4]) for ls in res.recon_losses)
    # measured on tiny-llama (3 epochs): LR 3.7e-5 -> BR ~1.4e-5 -> GP ~1.1e-5; assert half the effect
    assert errs["BR"] < 0.7 * errs["LR"]
    assert errs["BR+GP"] < errs["BR"]
    assert errs["BR+GP+CR"] < errs["LR"]


def test_attention_only_and_mlp_only(tiny):
    model, ids, _ = tiny
    for targets, frag in (("attn", "self_attn"), ("mlp", "mlp")):
        res = prune_model(copy.deepcopy(model), ids, PruneSpec(pruner="wanda", targets=targets), verbose=False)
        assert res.masks.masks and all(frag in n for n, _ in res.masks)


def test_extra_sequences_do_not_enter_statistics(tiny):
    """Self-generated sequences join the loss only: LR masks are unchanged by them."""
    model, ids, _ = tiny
    extra = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    a = prune_model(copy.deepcopy(model), ids, PruneSpec(pruner="wanda"), verbose=False)
    b = prune_model(copy.deepcopy(model), ids, PruneSpec(pruner="wanda"), extra_ids=extra, verbose=False)
    assert all(torch.equal(ma, b.masks.masks[n]) for n, ma in a.masks)
    c = prune_model(copy.deepcopy(model), torch.cat([ids, extra]), PruneSpec(pruner="wanda"), verbose=False)
    assert any(not torch.equal(ma, c.masks.masks[n]) for n, ma in a.masks)


def test_bad_spec_errors(tiny):
    model, ids, _ = tiny
    for kw, msg in ((dict(pruner="obs"), "pruner"), (dict(scheme="GP"), "scheme"), (dict(targets="ffn"), "targets"),
                    (dict(pattern="3:4x"), "pattern")):
        with pytest.raises(PruningError, match=msg):
            prune_model(copy.deepcopy(model), ids, PruneSpec(**kw), verbose=False)
    with pytest.raises(PruningError, match="extra_ids"):
        prune_model(copy.deepcopy(model), ids, PruneSpec(), extra_ids=ids[:, :8], verbose=False)


def test_opt_standin_with_local_c4_and_paper_preset(tmp_path, monkeypatch):
    """The paper preset's code path (OPT-125M, C4 calibration, full schedule shape) on the random stand-in."""
    import shrink.scales
    from shrink.pruning import experiment

    rows = [{"text": "The quick brown fox jumps over the lazy dog. " * 30 + str(i), "timestamp": "2019-04-25",
             "url": f"https://example.com/{i}"} for i in range(12)]
    path = tmp_path / "c4-train.00000-of-01024.json"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.setenv("SHRINK_STANDINS", "1")
    monkeypatch.setenv("SHRINK_C4_FILES", str(path))
    monkeypatch.setenv("SHRINK_RESULTS", str(tmp_path / "results"))
    cfg = shrink.scales.get("pruning-reconstruction", "paper")
    assert (cfg.calib_nsamples, cfg.calib_seqlen, cfg.epochs, cfg.batch_size, cfg.lr) == (256, 1024, 10, 8, 2e-4)
    small = cfg.with_(calib_nsamples=4, calib_seqlen=64, heldout_nsamples=2, heldout_seqlen=64, eval_seqlen=64,
                      eval_windows=2, eval2_corpus=None, epochs=1, batch_size=2)
    st = experiment.setup(small, "paper")
    assert st.model.config.model_type == "opt"
    calib = st.calib(0)
    assert calib.shape == (4, 64)
    for pruner in PRUNERS:
        out = experiment.cached_measure(st, "standin", experiment.spec_for(small, pruner, "BR+GP+CR"), 0)
        assert out["sparsity"]["__all__"] == 0.5 and len(out["blocks"]) == 2
        assert out["ppl"] > 1


def test_llama_standin_paper_preset(monkeypatch, tmp_path):
    import shrink.scales
    from shrink.pruning import experiment

    monkeypatch.setenv("SHRINK_STANDINS", "1")
    monkeypatch.setenv("SHRINK_RESULTS", str(tmp_path / "results"))
    cfg = shrink.scales.get("pruning-overfitting", "paper")
    assert cfg.model == "huggyllama/llama-7b"
    small = cfg.with_(calib_corpus="wikitext2", calib_split="validation", calib_nsamples=4, calib_seqlen=64,
                      heldout_nsamples=2, heldout_seqlen=64, eval_seqlen=64, eval_windows=2, eval2_corpus=None,
                      epochs=1, batch_size=2)
    st = experiment.setup(small, "paper")
    out = experiment.measure(st, experiment.spec_for(small, "sparsegpt", "BR", pattern="2:4"), st.calib(0))
    assert out["sparsity"]["__all__"] == 0.5


def test_self_generate_shapes_and_determinism(tiny):
    from shrink.pruning.selfgen import looks_english, self_generate

    model, _ = M.load("tiny-llama")
    tok = M.ByteTokenizer()
    a = self_generate(model, tok, 3, 16, seed=1, min_alpha=0.0, batch_size=2)
    b = self_generate(model, tok, 3, 16, seed=1, min_alpha=0.0, batch_size=2)
    assert a.shape == (3, 16) and a.dtype == torch.long and torch.equal(a, b)
    assert not (a == tok.eos_token_id).any()
    assert looks_english("The cat sat") and not looks_english("def f(x): return 1")


def test_compensation_on_tiny_model(tiny):
    """EoRA at full rank restores the dense block outputs; bias compensation keeps sparse weights untouched."""
    from shrink.pruning.compensate import compensate_model

    model, ids, _ = tiny
    m = copy.deepcopy(model)
    res = prune_model(m, ids, PruneSpec(pruner="wanda"), verbose=False)
    with torch.no_grad():
        err = lambda mm: float(((mm(ids).logits - model(ids).logits) ** 2).mean())  # noqa: E731
    base = err(m)
    mb = copy.deepcopy(m)
    info = compensate_model(mb, model, ids, bias=True)
    assert info["extra_params"] == sum(l.out_features for b in M.decoder_blocks(m) for l in select_linears(b).values())
    for name, mask in res.masks:
        assert (mb.get_parameter(name)[~mask] == 0).all()
    assert err(mb) < base
    mf = copy.deepcopy(m)
    compensate_model(mf, model, ids, rank=1000)  # full rank: B A = dW exactly
    assert err(mf) < 1e-8 * max(base, 1e-30) + 1e-10
