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
