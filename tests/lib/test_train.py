"""shrink.train: the one training loop (resume, reweighting identity, masks kept, LoRA, SFT labels)."""

import math

import pytest
import torch

from shrink import models
from shrink import train as T
from shrink.errors import BadInputError, ShrinkError


def _tiny(seed=0):
    m, tok = models.load("tiny-llama", seed=seed)
    return m, tok


def _batches(seed=0, B=4, S=32):
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(0, 256, (4096,), generator=g)
    return T.lm_batches(ids, B, S, seed=seed)


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def test_lm_batches_are_functions_of_the_step():
    b = _batches()
    assert torch.equal(b(3)["input_ids"], b(3)["input_ids"])
    assert not torch.equal(b(3)["input_ids"], b(4)["input_ids"])
    ids = torch.arange(1000)
    small = T.lm_batches(ids, 64, 10, seed=0, unique_tokens=50)
    assert int(small(0)["input_ids"].max()) < 50  # token crisis: draws only from the first 50 tokens


def test_token_losses_match_transformers_loss():
    m, _ = _tiny()
    b = _batches(B=1)(0)
    b["labels"][0, :5] = -100
    out = m(input_ids=b["input_ids"], labels=b["labels"])
    tl, mask = T.token_losses(out.logits, b["labels"])
    assert torch.allclose(T.sample_losses(tl, mask)[0], out.loss, atol=1e-6)
    assert int(mask.sum()) == 32 - 1 - 4


def test_resume_is_bit_identical(tmp_path):
    cfg = T.TrainConfig(steps=6, lr=1e-3, log_every=1, checkpoint_every=3, warmup=2)
    m1, _ = _tiny()
    r1 = T.train(m1, _batches(), cfg, progress=False)

    class Stop(Exception):
        pass

    def stop_at_4(info):
        if info["step"] == 4:
            raise Stop

    m2, _ = _tiny()
    with pytest.raises(Stop):
        T.train(m2, _batches(), cfg, checkpoint_dir=tmp_path, progress=False, on_step=stop_at_4)
    m3, _ = _tiny()
    r3 = T.train(m3, _batches(), cfg, checkpoint_dir=tmp_path, progress=False)
    assert r3.resumed_from == 3
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters()))
    assert [h["loss"] for h in r1.history] == [h["loss"] for h in r3.history]


def test_uniform_weights_reproduce_the_baseline_bit_for_bit_and_others_differ():
    cfg = T.TrainConfig(steps=4, lr=1e-3, log_every=1)
    m0, _ = _tiny()
    r0 = T.train(m0, _batches(), cfg, progress=False)
    m1, _ = _tiny()
    r1 = T.train(m1, _batches(), cfg, progress=False,
                 sample_weights=lambda l, t: torch.full_like(l, 1.0 / l.numel()))
    assert [h["loss"] for h in r0.history] == [h["loss"] for h in r1.history]
    assert all(torch.equal(a, b) for a, b in zip(m0.parameters(), m1.parameters()))
    m2, _ = _tiny()
    T.train(m2, _batches(), cfg, progress=False, sample_weights=lambda l, t: torch.softmax(l * 5, 0))
    assert not all(torch.equal(a, b) for a, b in zip(m0.parameters(), m2.parameters()))


def _half_masks(m):
    out = {}
    for n, p in m.named_parameters():
        if n.endswith("proj.weight"):
            g = torch.Generator().manual_seed(len(n))
            out[n] = torch.rand(p.shape, generator=g) > 0.5
    return out


def test_fixed_masks_keep_pruned_weights_zero_under_adamw():
    m, _ = _tiny()
    masks = _half_masks(m)
    before = {n: m.get_parameter(n).detach().clone() for n in masks}
    cfg = T.TrainConfig(steps=5, lr=1e-2, weight_decay=0.1)
    r = T.train(m, _batches(), cfg, masks=masks, progress=False)
    assert T.check_masks(m, masks) == 0 and r.info["mask_violations"] == 0
    for n, mk in masks.items():  # kept weights trained, pruned ones exactly 0
        p = m.get_parameter(n)
        assert not torch.equal(p[mk], before[n][mk])
        assert bool((p[~mk] == 0).all())


def test_lora_with_masks_merges_and_stays_sparse():
    pytest.importorskip("peft")
    m, _ = _tiny()
    masks = {n: v for n, v in _half_masks(m).items() if "q_proj" in n or "v_proj" in n}
    base_o = m.model.layers[0].self_attn.o_proj.weight.detach().clone()
    base_q = m.model.layers[0].self_attn.q_proj.weight.detach().clone()
    cfg = T.TrainConfig(steps=4, lr=1e-2, lora={"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]})
    r = T.train(m, _batches(), cfg, masks=masks, progress=False)
    merged = r.model
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert T.check_masks(merged, masks) == 0
    assert 0 < r.info["lora_masked_fraction"] < 1
    assert torch.equal(merged.model.layers[0].self_attn.o_proj.weight, base_o)  # not a LoRA target: untouched
    q = merged.model.layers[0].self_attn.q_proj.weight
    qm = masks["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q[qm], base_q[qm])  # the merged LoRA update changed the kept weights


def test_sft_labels_mask_the_prompt():
    tok = models.ByteTokenizer()
    ex = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
    e = T.tokenize_sft(tok, ex)
    n_prompt = len(tok.encode(T.format_prompt(ex)))
    assert bool((e["labels"][:n_prompt] == -100).all())
    assert e["labels"][n_prompt:].tolist() == tok.encode("5") + [tok.eos_token_id]
    b = T.sft_batches([e, T.tokenize_sft(tok, {"instruction": "x", "output": "longer answer"})], 2, seed=0)(0)
    assert b["input_ids"].shape == b["attention_mask"].shape and int(b["attention_mask"].sum()) == \
        int(e["input_ids"].numel()) + len(T.tokenize_sft(tok, {"instruction": "x", "output": "longer answer"})["input_ids"])


def test_sft_batches_visit_every_example_once_per_epoch():
    tok = models.ByteTokenizer()
    exs = [T.tokenize_sft(tok, {"instruction": str(i), "output": "y"}) for i in range(12)]
    b = T.sft_batches(exs, 4, seed=1)
    seen = torch.cat([b(t)["index"] for t in range(3)])
    assert sorted(seen.tolist()) == list(range(12))
    assert sorted(torch.cat([b(t)["index"] for t in range(3, 6)]).tolist()) == list(range(12))


def test_lr_schedule_endpoints():
    cfg = T.TrainConfig(steps=100, warmup=10, schedule="cosine", min_lr_ratio=0.1)
    assert T.lr_factor(cfg, 0) == pytest.approx(0.1) and T.lr_factor(cfg, 9) == pytest.approx(1.0)
    assert T.lr_factor(cfg, 10) == pytest.approx(1.0) and T.lr_factor(cfg, 100) == pytest.approx(0.1)
    assert T.lr_factor(T.TrainConfig(steps=10, schedule="linear"), 10) == 0.0


def test_sparse_updater_through_the_loop():
    from shrink.pruning.training import SparseUpdater

    m, _ = _tiny()
    cfg = T.TrainConfig(steps=8, lr=1e-3)
    r = T.train(m, _batches(), cfg, progress=False,
                updater=lambda model, opt: SparseUpdater(model, opt, "gmp", sparsity=0.5, start_step=0,
                                                          end_step=6, update_every=2))
    r.updater.check()
    for n, p in r.updater.params.items():  # exact scheduled count, and the weights are zero there
        mask = r.updater.masks.masks[n]
        assert int((~mask).sum()) == int(p.numel() * 0.5), n
        assert bool((p[~mask] == 0).all()), n


@pytest.mark.parametrize("kwargs, word", [
    (dict(steps=0), "steps"), (dict(steps=5, warmup=9), "warmup"), (dict(steps=5, lr=float("nan")), "lr"),
    (dict(steps=5, lora={"r": 4}), "targets"), (dict(steps=5, schedule="step"), "schedule"),
])
def test_bad_config_names_the_setting(kwargs, word):
    with pytest.raises(BadInputError, match=word):
        T.TrainConfig(**kwargs)


def test_masks_and_updater_together_are_refused():
    m, _ = _tiny()
    with pytest.raises(ShrinkError, match="not both"):
        T.train(m, _batches(), T.TrainConfig(steps=1), masks=_half_masks(m), updater=lambda a, b: None)


def test_diverging_loss_is_a_clear_error():
    m, _ = _tiny()
    with torch.no_grad():
        m.lm_head.weight.fill_(float("inf"))
    with pytest.raises(ShrinkError, match="lower cfg.lr"):
        T.train(m, _batches(), T.TrainConfig(steps=2), progress=False)


def test_evaluate_loss_is_token_weighted():
    m, _ = _tiny()
    bs = [_batches(B=2)(0), _batches(B=1)(1)]
    ev = T.evaluate_loss(m, bs)
    assert ev["tokens"] == 3 * 31 and math.isclose(ev["ppl"], math.exp(ev["loss"]))


def test_loss_fn_hook_reproduces_the_default_loss_and_trains_a_non_lm():
    # the hook computing the same next-token loss gives the same trajectory bit for bit
    cfg = T.TrainConfig(steps=3, lr=1e-3)
    a, _ = _tiny()
    ra = T.train(a, _batches(), cfg, progress=False)

    def lm_loss(model, batch, t):
        out = model(input_ids=batch["input_ids"])
        tl, m = T.token_losses(out.logits, batch["labels"])
        return T.sample_losses(tl, m).mean(), int(m.sum())
    b, _ = _tiny()
    rb = T.train(b, _batches(), cfg, progress=False, loss_fn=lm_loss)
    assert all(torch.equal(x, y) for x, y in zip(_params(a), _params(b)))
    assert [h["loss"] for h in ra.history] == [h["loss"] for h in rb.history] and ra.tokens == rb.tokens
    # a module that is not a causal LM: least squares on a fixed target, only "w" trainable
    torch.manual_seed(0)
    reg = torch.nn.Sequential()
    reg.w = torch.nn.Parameter(torch.zeros(3))
    reg.frozen = torch.nn.Parameter(torch.ones(3))
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    r = T.train(reg, lambda t: {"x": x, "y": y}, T.TrainConfig(steps=200, lr=0.05, trainable=("w",)),
                progress=False, loss_fn=lambda m, b, t: ((b["x"] @ m.w - b["y"]) ** 2).mean())
    assert r.history[-1]["loss"] < 1e-2 * r.history[0]["loss"] + 1e-6
    assert torch.equal(reg.frozen.detach(), torch.ones(3))
    with pytest.raises(T.TrainError, match="loss_fn must return a scalar tensor"):
        T.train(reg, lambda t: {}, T.TrainConfig(steps=1), progress=False, loss_fn=lambda m, b, t: 1.0)
    with pytest.raises(T.TrainError, match="replaces the per-sample"):
        T.train(reg, lambda t: {}, T.TrainConfig(steps=1), progress=False, loss_fn=lambda m, b, t: 1.0,
                sample_weights=T.uniform_weights)
