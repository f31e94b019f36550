"""Fault catalogue, loss reweighting and the from-scratch runs (shrink.selection.reweight / scratch,
shrink.models.add_dropout): bad settings raise a ShrinkError naming the problem and the fix (classified with the
catalogue's harness)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import assert_clear as _clear  # noqa: E402

import shrink  # noqa: E402
from shrink import models  # noqa: E402
from shrink.selection import reweight as R  # noqa: E402
from shrink.selection import scratch as S  # noqa: E402




@pytest.mark.parametrize("kw,names", [
    ({"strategy": "mid"}, ("mid", "quadratic")),
    ({"strategy": "linupper", "r": 0}, ("r", "positive")),
    ({"strategy": "linupper", "r": float("nan")}, ("r", "positive")),
    ({"strategy": "linupper", "burn_in": -3}, ("burn_in", "-3")),
    ({"strategy": "linupper", "delta": 0}, ("delta",)),
])
def test_bad_reweighter(kw, names):
    _clear(lambda: R.Reweighter(**kw), *names)


def test_bad_losses_dropout_and_pool_sizes():
    _clear(lambda: R.Reweighter("linupper")(torch.ones(2, 3), 0), "[B]")
    m, _ = models.load("tiny-llama")
    _clear(lambda: models.add_dropout(m, 1.0), "dropout", "[0, 1)")
    cfg = shrink.scales.get("token-crisis", "tiny")
    _clear(lambda: S.unique_tokens_for(cfg, S.budget(cfg)), "seqlen", "repeats")
    _clear(lambda: S.build_pool(cfg.with_(train_blocks=10**6)), "train_blocks")
    _clear(lambda: S.domain_bytes("wikipedia"), "wikipedia", "shakespeare")
