"""Recovery experiment of notebooks 04c/04d: evaluation functions against naive versions, masks kept,
selectors valid at the budget, records keyed by configs, the paper-scale path on a stand-in."""

import json
import math

import numpy as np
import pytest
import torch

from shrink import models, scales
from shrink.selection import recovery as R
from shrink.selection.errors import SelectionError
from shrink.train import tokenize_sft


def test_last_number():
    assert R.last_number("so 3 + 4 = 7.") == 7.0
    assert R.last_number("He pays $1,234 in total") == 1234.0
    assert R.last_number("-5 degrees then 2.5") == 2.5
    assert R.last_number("a loss of -12") == -12.0
    assert R.last_number("no digits") is None


@pytest.fixture
def tiny(one_thread):
    torch.manual_seed(0)
    return models.load("tiny-llama")


EXAMPLES = [{"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5", "source": "gsm8k"},
            {"instruction": "Say hi.", "input": "politely", "output": "Hello there, friend!", "source": "lima"},
            {"instruction": "Name a colour.", "input": "", "output": "Blue.", "source": "lima"}]


def test_response_nll_equals_a_naive_per_example_loop(tiny):
    model, tok = tiny
    got = R.response_nll(model, tok, EXAMPLES, batch_size=2)
    tot = {}
    with torch.no_grad():
        for e in EXAMPLES:
            t = tokenize_sft(tok, e, max_prompt=128, max_response=128)
            logits = model(input_ids=t["input_ids"][None]).logits[0]
            lab = t["labels"]
            nll = [-torch.log_softmax(logits[j - 1], -1)[lab[j]].item() for j in range(1, len(lab)) if lab[j] != -100]
            a = tot.setdefault(e["source"], [0.0, 0])
            a[0] += sum(nll)
            a[1] += len(nll)
    for s, (l_, n) in tot.items():
        assert got["per_source"][s]["tokens"] == n
        assert abs(got["per_source"][s]["nll"] - l_ / n) < 1e-4
    assert abs(got["macro"] - np.mean([l_ / n for l_, n in tot.values()])) < 1e-4


def test_batched_greedy_generation_equals_one_by_one(tiny):
    model, tok = tiny
    prompts = ["### Instruction:\nAdd 2 and 3.\n\n### Response:\n", "Hi", "A longer prompt than the others here"]
    batched = R.generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [R.generate_greedy(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single


def test_gsm8k_exact_match_counts_last_numbers(tiny, monkeypatch):
    model, tok = tiny
    gens = ["the answer is 5", "I think 4, no 12", "nothing"]
    monkeypatch.setattr(R, "generate_greedy", lambda *a, **k: list(gens))
    ex = [{"instruction": "q", "input": "", "output": o} for o in ("... so 5", "3 * 4 = 12", "It is 7.")]
    r = R.gsm8k_exact_match(model, tok, ex, 8)
    assert r["correct"] == [True, True, False] and r["n"] == 3
    assert abs(r["em"] - 2 / 3) < 1e-12 and abs(r["se"] - math.sqrt(2 / 9 / 3)) < 1e-12
    assert abs(r["answered"] - 2 / 3) < 1e-12
    with pytest.raises(SelectionError, match="no number"):
        R.gsm8k_exact_match(model, tok, [{"instruction": "q", "input": "", "output": "none"}], 8)


def _magnitude_half(model):
    """A stand-in pruner for the tests (the library never imports shrink.pruning): half of every decoder linear."""
    masks = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("model.layers.") and n.endswith("proj.weight"):
                thr = p.abs().flatten().kthvalue(p.numel() // 2).values
                masks[n] = p.abs() > thr
                p.mul_(masks[n])
    return masks


@pytest.fixture
def experiment(data_dir, one_thread):
    cfg = scales.get("recovery", "tiny")
    return R.Experiment(cfg, "tiny", _magnitude_half, {"pruner": "test-magnitude", "sparsity": 0.5})


def test_recovery_keeps_the_masks_and_lowers_the_training_loss(experiment):
    ex = experiment
    pruned, masks = ex.pruned()
    sel = [ex.pool.train[i] for i in range(ex.k)]
    model, tr = R.recover(pruned, masks, ex.tok(), sel, ex.cfg.with_(recovery_epochs=4), seed=0)
    assert tr["mask_violations"] == 0 and tr["steps"] == R.steps_for(ex.k, ex.cfg.with_(recovery_epochs=4))
    for n, m in masks.items():
        assert (model.get_parameter(n)[~m] == 0).all()
        assert (pruned.get_parameter(n)[~m] == 0).all()            # the pruned model itself is untouched
    changed = any(not torch.equal(model.get_parameter(n), pruned.get_parameter(n)) for n in masks)
    assert changed
    # cached pruned model: a second call gives identical weights
    again, _ = R.pruned_model(ex.dense()[0], _magnitude_half, {"model": ex.cfg.model, **ex.prune_key})
    assert all(torch.equal(again.get_parameter(n), pruned.get_parameter(n)) for n in masks)


@pytest.mark.parametrize("method", ["random", "k-center", "ifd", "kmq", "paser", "paser-no-s2c", "paser-no-cdars",
                                    "paser-no-ntem"])
def test_selectors_return_valid_budget_sets(experiment, method):
    fn, knobs = experiment.selector(method, seed=1)
    idx = np.asarray(fn())
    n = len(experiment.pool.train)
    assert idx.dtype == np.int64 and len(set(idx.tolist())) == idx.size and 0 <= idx.min() and idx.max() < n
    if method != "paser":  # NTEM may reject below the budget; the others meet it exactly
        assert idx.size == experiment.k, (method, idx.size)
    else:
        assert 0 < idx.size <= experiment.k
    json.dumps(knobs)  # part of the cache key


def test_step_cost_fields_and_errors(experiment):
    ex = experiment
    pruned, masks = ex.pruned()
    c = R.step_cost(pruned, masks, ex.tok(), ex.pool.train[:8], ex.cfg, steps=3, repeats=2)
    assert c["steps"] == 3 and c["repeats"] == 2
    assert c["forward_s"] > 0 and c["step_s"] > 0 and c["gen_s"] > 0
    # the parts are rounded to 1e-4 s and the ratio to 1e-3: bound the difference by what that rounding allows
    # (a tiny forward of ~2 ms rounds by up to 2.5 %, so a fixed relative tolerance fails on a fast machine)
    r = c["step_s"] / c["forward_s"]
    tol = 1.1 * r * (5e-5 / (c["forward_s"] - 5e-5) + 5e-5 / c["step_s"]) + 5e-4
    assert abs(c["step_over_forward"] - r) <= tol, (c, r, tol)
    first = [R.tokenize_sft(ex.tok(), e, max_prompt=ex.cfg.max_prompt, max_response=ex.cfg.max_response)
             for e in ex.pool.train[:8]]
    assert c["batch_tokens"] <= ex.cfg.batch_size * max(t["input_ids"].numel() for t in first)
    assert all((pruned.get_parameter(n)[~m] == 0).all() for n, m in masks.items())   # the pruned model untouched
    with pytest.raises(SelectionError, match="step_cost needs"):
        R.step_cost(pruned, masks, ex.tok(), ex.pool.train[:1], ex.cfg)
    with pytest.raises(SelectionError, match="steps >= 2"):
        R.step_cost(pruned, masks, ex.tok(), ex.pool.train[:8], ex.cfg, steps=1)


def test_ifd_rule_prefers_high_ifd_below_one(experiment, monkeypatch):
    n = len(experiment.pool.train)
    ifd = np.linspace(0.5, 1.5, n)
    experiment._scores = {"ifd": ifd.tolist()}
    idx = experiment.selector("ifd", 0)[0]()
    below = np.flatnonzero(ifd < 1)
    want = below[np.argsort(-ifd[below])][:experiment.k]
    assert sorted(idx.tolist()) == sorted(want.tolist())


def test_run_record_and_no_recovery(experiment):
    ex = experiment
    r = ex.run("random", 0)
    assert r["n_selected"] == ex.k and abs(sum(r["composition"].values()) - 1) < 1e-9
    assert r["train"]["mask_violations"] == 0 and r["ppl"] > 1 and set(r["nll"]) <= set(ex.pool.sources)
    assert r["gsm8k"]["n"] == ex.cfg.em_n
    assert ex.run("random", 0)["selection_sha"] == r["selection_sha"]
    assert ex.run("random", 1)["selection_sha"] != r["selection_sha"]
    p = ex.no_recovery()
    assert p["ppl"] > 1 and "train" not in p
    full = ex.run("full", 0)
    assert full["n_selected"] == len(ex.pool.train)
    assert full["train"]["steps"] == R.steps_for(len(ex.pool.train), ex.cfg)
    with pytest.raises(SelectionError, match="unknown recovery method"):
        ex.selector("pasr", 0)


def test_budget_and_preset_errors():
    from shrink.scales import PresetError

    cfg = scales.get("recovery", "tiny")
    with pytest.raises(PresetError, match="budget"):
        cfg.with_(budget=0.0)
    with pytest.raises(PresetError, match="em_n"):
        cfg.with_(em_n=99)
    with pytest.raises(PresetError, match="method_seeds"):
        cfg.with_(method_seeds=(("kmq-iter", (7,)),))   # not a subset of seeds
    with pytest.raises(PresetError, match="method_seeds"):
        cfg.with_(method_seeds=(("kmq-iter", 0),))
    with pytest.raises(PresetError, match="pattern_methods.*pasr"):
        cfg.with_(pattern_methods=("random", "pasr"))
    with pytest.raises(PresetError, match="prune_patterns"):
        cfg.with_(prune_patterns=("unstructured", "3:4"))


def test_seeds_per_method():
    cfg = scales.get("recovery", "tiny").with_(seeds=(0, 1, 2), full_seeds=(1,), ablation_seeds=(0, 2),
                                                method_seeds=(("kmq-iter", (0,)), ("k-center", (0, 1))))
    assert cfg.seeds_for("random") == (0, 1, 2) and cfg.seeds_for("paser") == (0, 1, 2)
    assert cfg.seeds_for("kmq-iter") == (0,) and cfg.seeds_for("k-center") == (0, 1)
    assert cfg.seeds_for("full") == (1,)
    assert cfg.seeds_for("paser-no-ntem") == (0, 2) and cfg.seeds_for("paser-no-s2c") == (0, 2)
    trimmed = cfg.with_(method_seeds=(("full", ()), ("paser-no-s2c", (0,))))   # an entry wins; () = not run
    assert trimmed.seeds_for("full") == () and trimmed.seeds_for("paser-no-s2c") == (0,)
    assert trimmed.seeds_for("paser-no-ntem") == (0, 2)


def test_paper_preset_on_a_standin_and_a_local_alpaca_file(monkeypatch, tmp_path, data_dir, one_thread):
    """Paper scale offline: the LLaMA-2-7B preset on its random-init stand-in and a local Alpaca-format file
    (the format of alpaca-cleaned); the budget, LoRA targets and evaluation paths run unchanged."""
    from shrink.selection.instructions import write_alpaca_json

    monkeypatch.setenv("SHRINK_STANDINS", "1")
    rows = [{"instruction": f"Compute {i} plus {i}.", "input": "", "output": f"{i} + {i} = {2 * i}"} for i in range(40)]
    f = write_alpaca_json(tmp_path / "alpaca_data_cleaned.json", rows)
    paper = scales.get("recovery", "paper")
    cfg = paper.with_(sources=(str(f),), heldout=4, nll_per_source=4, batch_size=2, max_prompt=16, max_response=8,
                      eval_seqlen=64, eval_windows=1, encoder="tiny-bert", n_clusters=2, kmq_ks=(2,))
    ex = R.Experiment(cfg, "tiny", _magnitude_half, {"pruner": "test-magnitude", "sparsity": 0.5})
    assert ex.dense()[0].shrink_info["standin_for"] == paper.model
    assert len(ex.pool.train) == 36 and ex.k == round(0.2 * 36)
    assert R.lora_config(cfg, 1, 0).lora["targets"] == list(paper.lora_targets)
    r = ex.run("random", 0)
    assert r["n_selected"] == ex.k and "gsm8k" not in r and r["train"]["mask_violations"] == 0
