"""KV-cache eviction (H2O, StreamingLLM): the unbounded cache equals the full forward, budgets hold,
StreamingLLM keeps sink + window, H2O without heavy hitters equals a recent-only window."""

import pytest
import torch

import shrink.models as M
from shrink.errors import ShrinkError
from shrink.tokens import kvcache as KV


def _ids(n, seed=0):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama3"])
def test_no_eviction_equals_full_forward(name, one_thread):
    model, _ = M.load(name)
    ids = _ids(24)
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    ref = [-float(logp[t, ids[0, t + 1]]) for t in range(23)]
    for policy, kw in [("none", {}), ("streaming", {"budget": 64, "sink": 4}), ("h2o", {"budget": 64, "heavy": 8})]:
        out = KV.streaming_nll(model, ids, policy=policy, **kw)
        assert max(abs(a - b) for a, b in zip(out["nll"], ref)) < 1e-4


def test_streaming_keeps_sink_and_window(one_thread):
    model, _ = M.load("tiny-llama3")
    out = KV.streaming_nll(model, _ids(30), policy="streaming", budget=10, sink=3)
    assert out["max_cache"] == 10
    assert out["kept_positions"] == [0, 1, 2] + list(range(22, 29))


def test_h2o_budget_and_recent_only_equivalence(one_thread):
    model, _ = M.load("tiny-llama3")
    ids = _ids(30)
    h2o = KV.streaming_nll(model, ids, policy="h2o", budget=12, heavy=4)
    assert h2o["max_cache"] == 12 and len(h2o["kept_positions"]) == 12
    assert h2o["kept_positions"][-8:] == list(range(21, 29))             # the recent window
    a = KV.streaming_nll(model, ids, policy="h2o", budget=8, heavy=0)
    b = KV.streaming_nll(model, ids, policy="streaming", budget=8, sink=0)
    assert a["nll"] == b["nll"]


@pytest.mark.parametrize("kw,match", [({"policy": "lru", "budget": 8}, "policies: none"),
                                      ({"policy": "streaming", "budget": 1}, "budget must be an integer >= 2"),
                                      ({"policy": "streaming", "budget": 8, "sink": 8}, "sink=8"),
                                      ({"policy": "h2o", "budget": 8}, "h2o needs heavy=")])
def test_bad_eviction_arguments(kw, match, one_thread):
    model, _ = M.load("tiny-llama")
    with pytest.raises(ShrinkError, match=match):
        KV.streaming_nll(model, _ids(12), **kw)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama3"])
def test_one_pass_simulation_equals_the_cache_based_run(name, one_thread):
    # an independent implementation (masks over all decoded rows, block by block) against the real
    # DynamicCache eviction, with evictions both right after the prompt and during decoding
    model, _ = M.load(name)
    ids = _ids(36, 1)
    for policy, kw in [("none", {}), ("streaming", {"budget": 10, "sink": 3}), ("streaming", {"budget": 9, "sink": 0}),
                       ("h2o", {"budget": 12, "heavy": 5}), ("random", {"budget": 9, "heavy": 4, "seed": 2})]:
        for p in (6, 18):
            a = KV.streaming_nll(model, ids, policy=policy, prefill=p, return_logp=True, **kw)
            b = KV.simulate_nll(model, ids, policy=policy, prefill=p, return_logp=True, **kw)
            assert len(a["decoded_nll"]) == len(b["decoded_nll"]) == 36 - 1 - p
            assert max(abs(x - y) for x, y in zip(a["decoded_nll"], b["decoded_nll"])) < 1e-4, (policy, p)
            assert (a["logp"] - b["logp"]).abs().max() < 1e-4
            assert a["kept_positions"] == b["kept_positions"] and a["max_cache"] == b["max_cache"]


def test_prefill_up_to_the_budget_equals_token_by_token(one_thread):
    model, _ = M.load("tiny-llama3")
    ids = _ids(30, 2)
    for policy, kw in [("streaming", {"budget": 12, "sink": 2}), ("h2o", {"budget": 12, "heavy": 4}),
                       ("random", {"budget": 12, "heavy": 4, "seed": 5})]:
        tok = KV.streaming_nll(model, ids, policy=policy, **kw)
        pre = KV.streaming_nll(model, ids, policy=policy, prefill=10, **kw)   # no eviction before step 12
        assert max(abs(x - y) for x, y in zip(tok["nll"], pre["nll"])) < 1e-4
        assert tok["kept_positions"] == pre["kept_positions"]


def test_random_eviction_depends_on_its_seed_only(one_thread):
    model, _ = M.load("tiny-llama3")
    ids = _ids(30, 3)
    a = KV.simulate_nll(model, ids, policy="random", budget=8, heavy=4, prefill=12, seed=0)
    b = KV.simulate_nll(model, ids, policy="random", budget=8, heavy=4, prefill=12, seed=0)
    c = KV.simulate_nll(model, ids, policy="random", budget=8, heavy=4, prefill=12, seed=1)
    assert a["decoded_nll"] == b["decoded_nll"] and a["kept_positions"] != c["kept_positions"]
    assert a["kept_positions"][-4:] == [25, 26, 27, 28]          # the recent window is never evicted
    with pytest.raises(ShrinkError, match="prefill=0 must be an integer in"):
        KV.simulate_nll(model, ids, policy="none", prefill=0)
    with pytest.raises(ShrinkError, match="random needs heavy="):
        KV.simulate_nll(model, ids, policy="random", budget=8, prefill=4)
