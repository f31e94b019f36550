import sys
import types

import pytest

from shrink import eval, models
from shrink.errors import OfflineError


def test_zero_shot_needs_online():
    model, tok = models.load("tiny-llama")
    with pytest.raises(OfflineError, match="SHRINK_ONLINE"):
        eval.zero_shot(model, tok)


def test_zero_shot_glue_with_a_fake_harness(monkeypatch):
    """The wrapper passes the in-memory model to HFLM and averages acc as the papers do."""
    seen = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            seen.update(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size)

    def simple_evaluate(model, tasks, num_fewshot, limit):
        seen.update(tasks=tasks, num_fewshot=num_fewshot)
        return {"results": {t: {"acc,none": 0.5 + 0.1 * i, "acc_norm,none": 0.4} for i, t in enumerate(tasks)}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate, lm_eval.__version__ = simple_evaluate, "fake"
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.models", types.ModuleType("lm_eval.models"))
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    monkeypatch.setenv("SHRINK_ONLINE", "1")
    model, tok = models.load("tiny-llama")
    out = eval.zero_shot(model, tok, tasks=("boolq", "rte"), batch_size=4)
    assert seen["pretrained"] is model and seen["tasks"] == ["boolq", "rte"] and seen["num_fewshot"] == 0
    assert out["tasks"]["rte"]["acc"] == pytest.approx(0.6) and out["mean_acc"] == pytest.approx(0.55)


def test_paper_zero_shot_records_why_it_did_not_run_and_keys_on_it(monkeypatch):
    """Offline, the paper cells record the reason (no silent skip) under a key an online rerun does not reuse."""
    from shrink.quant.weightonly import zero_shot_fields, zero_shot_key

    monkeypatch.delenv("SHRINK_ONLINE", raising=False)
    model, tok = models.load("tiny-llama")
    assert eval.paper_zero_shot(model, tok).startswith("not run: offline")
    cfg = types.SimpleNamespace(zero_shot=True)
    assert zero_shot_key(cfg, "paper") == {"zero_shot": "offline"}
    assert zero_shot_key(cfg, "cpu") == {} and zero_shot_fields(cfg, "cpu", model, tok) == {}  # cpu keys unchanged
    assert zero_shot_key(types.SimpleNamespace(zero_shot=False), "paper") == {}
    monkeypatch.setenv("SHRINK_ONLINE", "1")
    monkeypatch.setattr(eval, "zero_shot", lambda m, t, tasks, **kw: {"mean_acc": 0.5, "tasks": {}})
    assert zero_shot_key(cfg, "paper") == {"zero_shot": "lm-eval"}
    assert zero_shot_fields(cfg, "paper", model, tok) == {"zero_shot": {"mean_acc": 0.5, "tasks": {}}}
