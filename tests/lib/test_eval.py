import math

import pytest
import torch
import torch.nn.functional as F

from shrink import eval, models


def naive_ppl(model, tokens, seqlen, windows, prefix_ids=None):
    """Independent reference: one window at a time, token by token log-probabilities in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            win = tokens[w * seqlen:(w + 1) * seqlen]
            ids = win if prefix_ids is None else torch.cat([torch.tensor(prefix_ids), win])
            offset = 0 if prefix_ids is None else len(prefix_ids)
            logp = F.log_softmax(model(ids[None]).logits[0].double(), -1)
            for t in range(1, seqlen):
                total -= logp[offset + t - 1, win[t]].item()
                count += 1
    return math.exp(total / count)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_perplexity_matches_naive_loop(name):
    model, _ = models.load(name)
    tokens = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0))
    res = eval.perplexity(model, tokens, 96, progress=False)
    assert res.n_windows == 1000 // 96 and res.n_tokens == res.n_windows * 95  # tail dropped
    ref = naive_ppl(model, tokens, 96, res.n_windows)
    assert abs(res.ppl - ref) / ref < 1e-4
    batched = eval.perplexity(model, tokens, 96, batch_size=4, progress=False)
    assert abs(batched.ppl - res.ppl) / res.ppl < 1e-5


def test_perplexity_window_limit_and_prefix():
    model, _ = models.load("tiny-llama")
    tokens = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(1))
    prefix = models.KVPrefix.from_tokens(model, [256, 10, 32])
    res = eval.perplexity(model, tokens, 64, max_windows=3, prefix=prefix, batch_size=2, progress=False)
    assert res.n_windows == 3 and res.prefix_len == 3
    ref = naive_ppl(model, tokens, 64, 3, prefix_ids=[256, 10, 32])
    assert abs(res.ppl - ref) / ref < 1e-4
    plain = eval.perplexity(model, tokens, 64, max_windows=3, progress=False)
    assert plain.ppl != res.ppl


def test_perplexity_result_records_provenance():
    model, _ = models.load("tiny-mistral")
    res = eval.perplexity(model, torch.arange(300) % 256, 100, dataset="toy", split="x", progress=False).to_dict()
    for key in ("ppl", "nll", "n_windows", "seqlen", "dataset", "split", "model", "dtype", "versions"):
        assert key in res
    assert res["model"] == "tiny-mistral" and res["dtype"] == "torch.float32" and "torch" in res["versions"]


def test_perplexity_bad_input():
    model, _ = models.load("tiny-llama")
    with pytest.raises(ValueError, match="exceeds the context"):
        eval.perplexity(model, torch.arange(2000) % 256, 1024, progress=False)
    with pytest.raises(ValueError, match="1-D"):
        eval.perplexity(model, torch.zeros(2, 100, dtype=torch.long), 10, progress=False)
    with pytest.raises(ValueError, match="no full window"):
        eval.perplexity(model, torch.arange(50), 64, progress=False)


# ---- Spread (numbers with their noise) ----------------------------------------------------------------------

def test_spread_of_deterministic_fn_is_zero():
    s = eval.spread(lambda seed: 34.25, range(5), kind="range perturbation")
    assert s.n == 5 and s.std == 0.0 and s.lo == s.hi == s.mean == 34.25 and s.width == 0.0
    assert s.seeds == (0, 1, 2, 3, 4)
    assert s.fmt(2) == "34.25 ± 0.00 [34.25, 34.25], n=5 range perturbations"


def test_spread_statistics_match_naive():
    vals = [34.42, 34.00, 34.83]
    s = eval.Spread(vals, kind="range perturbation")
    m = sum(vals) / 3
    assert math.isclose(s.mean, m)
    assert math.isclose(s.std, math.sqrt(sum((v - m) ** 2 for v in vals) / 2))
    assert (s.lo, s.hi, s.n) == (34.00, 34.83, 3)
    assert float(s) == s.mean
    assert s.fmt(1) == "34.4 ± 0.4 [34.0, 34.8], n=3 range perturbations"
    assert eval.Spread([1.0], kind="seeds").fmt(1) == "1.0 (n=1 seed)"
    logs = s.map(math.log)
    assert logs.values == tuple(math.log(v) for v in vals) and logs.kind == s.kind
    assert eval.Spread.from_dict(s.to_dict()) == s


def test_spread_calls_fn_with_each_seed():
    seen = []
    s = eval.spread(lambda seed: seen.append(seed) or seed * 2.0, [3, 1, 2], kind="seeds")
    assert seen == [3, 1, 2] and s.values == (6.0, 2.0, 4.0)


def test_separated_intervals():
    a = eval.Spread([1.0, 2.0])
    assert eval.separated(a, eval.Spread([2.5, 3.0]))
    assert eval.separated(eval.Spread([2.5, 3.0]), a)
    assert not eval.separated(a, eval.Spread([1.5, 3.0]))     # overlap
    assert not eval.separated(a, eval.Spread([2.0, 3.0]))     # touching counts as overlap
    assert not eval.separated(a, eval.Spread([0.0, 5.0]))     # containment
    assert eval.separated(a, 2.1) and not eval.separated(a, 1.5)


def test_spread_bad_input_names_fix():
    from shrink.errors import ShrinkError

    with pytest.raises(ShrinkError, match="at least one value"):
        eval.Spread([])
    with pytest.raises(ShrinkError, match="NaN"):
        eval.Spread([1.0, float("nan")])
    with pytest.raises(ShrinkError, match="seeds"):
        eval.spread(lambda s: 1.0, [])
