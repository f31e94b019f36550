"""shrink.pruning.recovery: one-shot + recovery vs gradual pruning during fine-tuning (01h; data chapter II)."""

import copy
import math

import pytest
import torch

from shrink import eval as shrink_eval
from shrink import results, scales
from shrink.pruning import recovery as R
from shrink.pruning.sequential import prune_model
from shrink.pruning.training import PolynomialSchedule
from shrink.scales import PresetError
from shrink.train import check_masks


@pytest.fixture(scope="module")
def st():
    torch.set_num_threads(1)
    cfg = scales.get("pruning-recovery", "tiny").with_(steps=6, gmp_end=4, gmp_every=2, rigl_every=2)
    return R.setup(cfg, "tiny")


def test_registered_at_every_scale():
    for scale in ("tiny", "cpu", "paper"):
        cfg = scales.get("pruning-recovery", scale)
        assert cfg.sparsity == 0.5 and cfg.gmp_end < cfg.steps and cfg.gmp_end % cfg.gmp_every == 0
    cpu = scales.get("pruning-recovery", "cpu")
    assert cpu.model == "smollm2-135m" and len(cpu.seeds) >= 1
    assert {"none", "fixed", "gmp"} <= set(cpu.methods)
    # the recovery text is never the split perplexity is measured on
    assert (cpu.train_corpus, cpu.train_split) != ("wikitext2", "test")


def test_bad_presets_name_the_fix():
    cfg = scales.get("pruning-recovery", "tiny")
    with pytest.raises(PresetError, match="unstructured"):
        cfg.with_(pattern="2:4")
    with pytest.raises(PresetError, match="multiple of"):
        cfg.with_(gmp_end=5, gmp_every=2)
    with pytest.raises(PresetError, match="gmp_end"):
        cfg.with_(gmp_end=8)  # == steps: GMP would never train at the final sparsity
    with pytest.raises(PresetError, match="unknown recovery methods"):
        cfg.with_(methods=("none", "gmpp"))


def test_training_on_the_test_split_is_refused():
    cfg = scales.get("pruning-recovery", "tiny").with_(train_split="test")
    with pytest.raises(R.RecoveryError, match="test split"):
        R.setup(cfg, "tiny")


def test_oneshot_returns_fresh_copies(st):
    m1, k1, _ = R.oneshot(st, 0)
    with torch.no_grad():
        next(iter(m1.parameters())).add_(1.0)
        for mm in k1.masks.values():
            mm.fill_(True)
    m2, k2, info = R.oneshot(st, 0)
    assert info["sparsity"] == 0.5
    assert all(float((~m).float().mean()) == 0.5 for m in k2.masks.values())
    assert check_masks(m2, k2) == 0
    assert not torch.equal(next(iter(m1.parameters())), next(iter(m2.parameters())))


def test_none_equals_an_independent_prune_and_perplexity(st):
    """The 'none' record = prune_model(Wanda, LR) on the same calibration draw + the one perplexity function."""
    from shrink import data

    c = st.cfg
    r = R.run(st, "none", 1)
    m = copy.deepcopy(st.model)
    calib = data.calibration_set(st.tok, c.calib_corpus, c.calib_split, nsamples=c.calib_nsamples,
                                 seqlen=c.calib_seqlen, seed=1)
    prune_model(m, calib, R.prune_spec(c), verbose=False)
    p = shrink_eval.perplexity(m, st.eval_tokens, c.eval_seqlen, max_windows=c.eval_windows)
    assert r["ppl"] == p.ppl
    assert r["train"] is None and r["targets"]["violations"] == 0


@pytest.mark.parametrize("method", ["fixed", "lora", "static"])
def test_fixed_masks_stay_exact_through_recovery(st, method):
    r = R.run(st, method, 0)
    t = r["targets"]
    assert t["violations"] == 0
    assert t["pruned"] == sum(int(m.numel() * 0.5) for m in R.oneshot(st, 0)[1].masks.values())
    assert t["mask_sparsity"] == 0.5 and t["zero_fraction"] >= 0.5
    assert len(r["train"]["history"]) == st.cfg.steps
    if method == "lora":
        # the merged LoRA update is dense: re-masking removed a strictly positive, partial share of it
        assert 0 < r["train"]["lora_masked_fraction"] < 1
        assert r["train"]["trainable_params"] < sum(p.numel() for p in st.model.parameters())


def test_same_mask_as_oneshot_after_fixed_recovery(st):
    """The fixed run changes weights but not the mask: the zero pattern includes the one-shot mask exactly."""
    m0, masks, _ = R.oneshot(st, 2)
    from shrink.train import train

    res = train(m0, R.batches(st, 2), R.train_config(st.cfg, "fixed", 2), masks=masks, progress=False)
    _, ref, _ = R.oneshot(st, 2)
    for n, mm in ref.masks.items():
        w = res.model.get_parameter(n)
        assert bool((w[~mm] == 0).all())
        # and the kept weights moved (recovery did something)
    moved = sum(int((res.model.get_parameter(n)[mm] != R.oneshot(st, 2)[0].get_parameter(n)[mm]).sum())
                for n, mm in ref.masks.items())
    assert moved > 0


def test_a_revived_weight_is_caught(st):
    m, masks, _ = R.oneshot(st, 0)
    name, mm = next(iter(masks.masks.items()))
    idx = (~mm).nonzero()[0]
    with torch.no_grad():
        m.get_parameter(name)[tuple(idx)] = 0.5
    assert R._targets_report(m, masks)["violations"] == 1


def test_gmp_reaches_the_exact_final_mask_on_the_cubic_schedule(st):
    c = st.cfg
    r = R.run(st, "gmp", 0)
    u = r["updater"]
    assert u["pruned"] == u["expected_pruned"] == r["targets"]["pruned"]
    assert r["targets"]["violations"] == 0 and r["targets"]["mask_sparsity"] == 0.5
    # updates at 0, every, ..., end with Zhu & Gupta's s_t = s_f (1 - (1 - t / t_end)^3), written out here
    steps = [h["step"] for h in u["updates"]]
    assert steps == list(range(0, c.gmp_end + 1, c.gmp_every))
    for h in u["updates"]:
        naive = c.sparsity * (1 - (1 - min(h["step"], c.gmp_end) / c.gmp_end) ** 3)
        assert math.isclose(h["sparsity"], naive, abs_tol=1e-12)
        assert math.isclose(h["sparsity"], PolynomialSchedule(0, c.gmp_end, c.gmp_every).sparsity(h["step"], 0.5))
    assert u["updates"][0]["changed"] == 0  # step 0: sparsity 0, nothing pruned yet
    assert u["updates"][-1]["sparsity"] == 0.5


def test_rigl_keeps_the_count_and_moves_the_mask(st):
    r = R.run(st, "rigl", 0)
    _, ref, _ = R.oneshot(st, 0)
    assert r["targets"]["pruned"] == sum(int((~m).sum()) for m in ref.masks.values())
    assert r["targets"]["violations"] == 0
    assert sum(h["changed"] for h in r["updater"]["updates"]) > 0


def test_every_method_sees_the_same_batches_and_steps(st):
    cfgs = {m: R.train_config(st.cfg, m, 0) for m in ("fixed", "lora", "gmp", "dense-ft")}
    assert len({c.steps for c in cfgs.values()}) == 1
    assert len({(c.warmup, c.schedule) for c in cfgs.values()}) == 1
    b1, b2 = R.batches(st, 0), R.batches(st, 0)
    assert torch.equal(b1(3)["input_ids"], b2(3)["input_ids"])
    assert not torch.equal(b1(3)["input_ids"], R.batches(st, 1)(3)["input_ids"])


def test_cache_keys_hold_the_setting_not_results(st):
    keys = {results.config_key(R.config_of(st, m, s)) for m in R.METHODS for s in (0, 1)}
    assert len(keys) == 2 * len(R.METHODS)
    cfg = R.config_of(st, "gmp", 0)
    assert cfg["gmp"] == {"end": st.cfg.gmp_end, "every": st.cfg.gmp_every, "power": 3}
    assert "oneshot" not in cfg and "oneshot" in R.config_of(st, "fixed", 0)
    # a record round-trips and is read back without recomputation
    first = R.cached_run(st, "none", 0)
    again = R.cached_run(st, "none", 0)
    assert first["ppl"] == again["ppl"]


def test_flops_per_token_counts_forward_and_backward(st):
    m = st.model
    fwd = R.flops_per_token(m, "none", 32)
    full = R.flops_per_token(m, "fixed", 32)
    lora = R.flops_per_token(m, "lora", 32)
    n_lin = sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2 and "embed" not in n)
    assert fwd["step"] == 0
    assert full["step"] - lora["step"] == 2 * n_lin           # LoRA skips the base weights' gradients
    assert full["step"] == pytest.approx(3 * full["forward"], rel=0.2)


def test_one_calibration_draw_for_every_seed(st):
    """calib_seed: one one-shot mask for all seeds; the key of the run whose seed is the draw is unchanged."""
    import dataclasses

    st1 = dataclasses.replace(st, cfg=st.cfg.with_(calib_seed=0), _oneshot={})
    assert R.config_of(st1, "fixed", 0) == R.config_of(st, "fixed", 0)
    assert R.config_of(st1, "fixed", 1)["oneshot"]["calib_seed"] == 0
    assert R.config_of(st1, "gmp", 1) == R.config_of(st, "gmp", 1)  # GMP never sees the calibration windows
    _, k0, _ = R.oneshot(st1, 0)
    _, k1, _ = R.oneshot(st1, 2)
    assert len(st1._oneshot) == 1 and all(torch.equal(k0.masks[n], k1.masks[n]) for n in k0.masks)
    _, k2, _ = R.oneshot(st, 2)
    assert any(not torch.equal(k0.masks[n], k2.masks[n]) for n in k0.masks)  # another draw, another mask
