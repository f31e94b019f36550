"""ATP-style adaptive thresholds: the masked soft forward equals the hard (physically dropped) one, fixed
ratio 1 is the unpruned encoder, gradients reach only the MLPs, training through shrink.train meets the budget."""

import pytest
import torch

import shrink.models as M
from shrink.errors import ShrinkError
from shrink.tokens import adaptive as A
from shrink.tokens import encoder as E


_VOCAB = {}


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    cls, sep, v = _VOCAB["cls"], _VOCAB["sep"], _VOCAB["v"]
    return torch.cat([torch.tensor([[cls]]), torch.randint(5, v, (1, n - 2), generator=g), torch.tensor([[sep]])], 1)


@pytest.fixture(scope="module")
def bert():
    m, tok = M.load("tiny-bert")
    _VOCAB.update(cls=tok.bos_token_id, sep=tok.eos_token_id, v=m.config.vocab_size)
    return m


def test_masked_equals_hard_and_fixed_one_is_unpruned(bert, one_thread):
    atp = A.ATP(bert, (1,), seed=0)
    with torch.no_grad():
        for s in range(3):
            x = _ids(40, s)
            a, b = atp(x, mode="masked"), atp(x, mode="hard")
            assert (a.embedding - b.embedding).abs().max() < 1e-5
            assert [round(float(c)) for c in a.counts] == b.counts and torch.equal(a.kept, b.kept)
            assert int(b.kept[0, 0]) == 0 and int(b.kept[0, -1]) == 39            # [CLS], [SEP] protected
            f = atp(x, mode="fixed", ratios=[1.0])
            assert (f.embedding - E.encode(bert, x).embedding).abs().max() < 1e-5 and f.counts == [40, 40]
            h = atp(x, mode="fixed", ratios=[0.5])
            assert h.counts[1] == 20 and h.budget == pytest.approx((40 + 20) / 80)


def test_soft_scores_match_the_ltp_score_and_gradients_reach_only_the_mlps(bert, one_thread):
    x = _ids(30)
    with torch.no_grad():
        h = E.states(bert, x, 1)[0]
        from shrink.tokens.attention import attention_probs
        p = attention_probs(bert, 0, h)
    z = A.log_ratio_scores(p, torch.ones(30))
    naive = torch.log(p[0].mean(0).mean(0) * 30)                          # mean over heads and queries
    assert (z - naive).abs().max() < 1e-5
    atp = A.ATP(bert, (1,), seed=0)
    loss, out = A.passage_loss(atp, x, E.encode(bert, x).embedding, target=0.5, lam=10.0)
    loss.backward()
    assert all(p.grad is None for p in bert.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in atp.thresholds.parameters())
    assert float(out.budget) < 1.0


def test_training_through_shrink_train_moves_the_budget_to_the_target(bert, one_thread):
    xs = [_ids(32 + 2 * s, s) for s in range(8)]
    with torch.no_grad():
        refs = torch.cat([E.encode(bert, x).embedding for x in xs])
    atp = A.ATP(bert, (1,), seed=1)
    with torch.no_grad():
        before = sum(float(atp(x, mode="soft").budget) for x in xs) / len(xs)
    target = 0.9
    res = A.train_atp(atp, xs, refs, target=target, lam=50.0, steps=40, batch=4, lr=0.05, seed=0)
    with torch.no_grad():
        after = sum(float(atp(x, mode="soft").budget) for x in xs) / len(xs)
    assert abs(after - target) < abs(before - target) - 0.02, (before, after)
    assert res.history and bert.training is False
    frozen = [p.requires_grad for p in bert.parameters()]
    assert not any(frozen)


def test_bad_atp_inputs(bert):
    with pytest.raises(ShrinkError, match="strictly increasing"):
        A.ATP(bert, (2, 1))
    atp = A.ATP(bert, (1,))
    with pytest.raises(ShrinkError, match="modes: soft"):
        atp(_ids(10), mode="top")
    with pytest.raises(ShrinkError, match="needs ratios="):
        atp(_ids(10), mode="fixed")
    with pytest.raises(ShrinkError, match="one passage"):
        atp(torch.cat([_ids(10), _ids(10)]), mode="hard")
