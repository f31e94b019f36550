"""shrink.selection.scratch (the from-scratch runs of 04f/04g) and shrink.models.add_dropout."""

import math

import pytest
import torch

import shrink
from shrink import models
from shrink import train as T
from shrink.errors import BadInputError
from shrink.scales import PresetError
from shrink.selection import scratch as S


def _cfg(name="reweight"):
    return shrink.scales.get(name, "tiny")


def test_add_dropout_acts_in_training_mode_only_and_is_undone_by_its_handles():
    m, _ = models.load("tiny-llama", seed=0)
    ref, _ = models.load("tiny-llama", seed=0)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    handles = models.add_dropout(m, 0.3)
    assert len(handles) == 2 * len(models.decoder_blocks(m))  # attention and MLP of every block
    m.eval(), ref.eval()
    assert torch.equal(m(input_ids=x).logits, ref(input_ids=x).logits)  # eval: unchanged
    m.train(), ref.train()
    torch.manual_seed(1)
    a = m(input_ids=x).logits
    torch.manual_seed(1)
    b = m(input_ids=x).logits
    assert torch.equal(a, b)  # seeded by torch's global RNG
    assert not torch.equal(a, ref(input_ids=x).logits)  # training: dropped
    for h in handles:
        h.remove()
    assert torch.equal(m(input_ids=x).logits, ref(input_ids=x).logits)
    assert models.add_dropout(m, 0.0) == []
    for bad in (1.0, -0.1, "0.1", True):
        with pytest.raises(BadInputError, match=r"\[0, 1\)"):
            models.add_dropout(m, bad)


def test_dropout_training_is_reproducible_and_differs_from_no_dropout():
    def run(p):
        m, _ = models.load("tiny-llama", seed=0)
        models.add_dropout(m, p)
        ids = torch.randint(0, 256, (2048,), generator=torch.Generator().manual_seed(0))
        r = T.train(m, T.lm_batches(ids, 4, 32, seed=0), T.TrainConfig(steps=3, lr=3e-3, log_every=1), progress=False)
        return [h["loss"] for h in r.history]

    a, b, c = run(0.2), run(0.2), run(0.0)
    assert a == b and a != c


def test_pool_layout_split_and_determinism():
    cfg = _cfg()
    pool = S.build_pool(cfg)
    n_dom = len(cfg.scratch_domains)
    assert pool.train.numel() == n_dom * cfg.train_blocks * cfg.block_bytes
    assert pool.train.dtype == torch.long and int(pool.train.max()) < 256
    assert set(pool.val) == set(cfg.scratch_domains)
    for d, v in pool.val.items():
        assert v.shape == (cfg.val_blocks * cfg.block_bytes // cfg.seqlen, cfg.seqlen)
        held = bytes(v.reshape(-1).tolist())
        assert bytes(pool.train.tolist()).find(held) == -1, f"{d}: a validation block is in the training stream"
    assert pool.wiki.shape == (cfg.wiki_windows, cfg.seqlen)
    again = S._build.__wrapped__(tuple(cfg.scratch_domains), cfg.pool_seed, cfg.block_bytes, cfg.train_blocks,
                                 cfg.val_blocks, cfg.seqlen, cfg.wiki_windows)
    assert torch.equal(again.train, pool.train) and again.info == pool.info
    other = S._build.__wrapped__(tuple(cfg.scratch_domains), cfg.pool_seed + 1, cfg.block_bytes, cfg.train_blocks,
                                 cfg.val_blocks, cfg.seqlen, cfg.wiki_windows)
    assert not torch.equal(other.train, pool.train)


def test_unique_tokens_give_the_epochs_and_bad_sizes_raise():
    cfg = _cfg("token-crisis")
    b = S.budget(cfg)
    assert b == cfg.steps * cfg.batch_size * cfg.seqlen
    for k, _ in cfg.points:
        assert S.unique_tokens_for(cfg, k) == b // k
    with pytest.raises(shrink.errors.ShrinkError, match="seqlen"):
        S.unique_tokens_for(cfg, b)  # 1 unique token per epoch: no window fits
    with pytest.raises(shrink.errors.ShrinkError, match="budget"):
        S.unique_tokens_for(cfg.with_(steps=10_000), 1)
    with pytest.raises(PresetError):
        cfg.with_(points=((1, 1.5),))
    with pytest.raises(PresetError):
        cfg.with_(block_bytes=100)


def test_runs_are_cached_records_with_per_domain_curves(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_RESULTS", str(tmp_path))
    cfg = _cfg().with_(steps=8, eval_every=4, burn_in=2)
    r = S.reweight_run(cfg, strategy="linupper", seed=0, scale="tiny")
    assert [e["step"] for e in r["evals"]] == [4, 8]
    assert set(r["final"]["val"]) == set(cfg.scratch_domains)
    assert math.isfinite(r["wiki_bpb"]) and 0 < r["wiki_bpb"] < 9  # below the uniform-byte 8.02 bits
    assert len(list(tmp_path.rglob("reweight-run-*.json"))) == 1
    assert S.reweight_run(cfg, strategy="linupper", seed=0, scale="tiny")["wiki_bpb"] == r["wiki_bpb"]
    c = S.token_crisis_run(cfg, repeats=4, dropout=0.1, seed=0, scale="tiny")
    assert c["epochs"] == 4 and c["unique_tokens"] == S.budget(cfg) // 4 and c["dropout"] == 0.1


def test_uniform_identity_gate():
    out = S.uniform_identity(_cfg(), steps=3)
    assert out["params_equal"] == {"default": True, "uniform": True, "linupper-burn-in": True, "linupper": False}
    assert out["losses"]["default"] == out["losses"]["uniform"] == out["losses"]["linupper-burn-in"]


def test_grid_puts_extra_repeats_on_the_first_seed():
    cfg = shrink.scales.get("token-crisis", "cpu")
    grid = S.token_crisis_grid(cfg)
    assert len(grid) == len(set(grid))
    extra = [(k, p) for k, p in cfg.one_seed_points if (k, p) not in cfg.points]
    assert [(k, p) for k, p, s in grid if s != cfg.seeds[0]] == [kp for s in cfg.seeds[1:] for kp in cfg.points]
    assert [(k, p) for k, p, s in grid[len(cfg.points) * len(cfg.seeds):]] == extra
