"""Fault catalogue, tokens chapter: every bad input raises a ShrinkError whose message names the fix."""

import pytest
import torch

import shrink.models as M
from shrink.errors import ShrinkError
from shrink.tokens import decoder as D
from shrink.tokens import encoder as E
from shrink.tokens import scores as S
from shrink.tokens import select as sel


def _attn(n=6):
    return torch.rand(1, 2, n, n).softmax(-1)


@pytest.mark.parametrize("keep", [0, 0.0, -0.5, 1.5, True, "0.5"])
def test_keep_ratio_outside_zero_one(keep):
    with pytest.raises(ShrinkError, match=r"keep ratio must lie in \(0, 1\]"):
        sel.topk_keep(torch.rand(1, 10), keep)


def test_unknown_score_name():
    with pytest.raises(ShrinkError, match="scores: cls, mean, last"):
        S.score("attention", _attn())


def test_unknown_method_names():
    model, _ = M.load("tiny-bert")
    with pytest.raises(ShrinkError, match="methods: none"):
        E.encode(model, torch.randint(0, 256, (1, 8)), method="fastv", keep=0.5)
    dec, _ = M.load("tiny-llama")
    with pytest.raises(ShrinkError, match="methods: none"):
        D.prefill(dec, torch.randint(0, 256, (1, 8)), method="tome", keep=0.5)


def test_protected_tokens_exceed_budget():
    with pytest.raises(ShrinkError, match="raise the keep ratio or protect fewer tokens"):
        sel.topk_keep(torch.rand(1, 10), 0.2, protected=[0, 1, 2])
    with pytest.raises(ShrinkError, match="raise the keep ratio"):
        sel.divprune_keep(torch.rand(1, 10, 4), 0.2, protected=[0, 1, 2])


def test_random_score_needs_a_generator():
    with pytest.raises(ShrinkError, match="generator=torch.Generator"):
        S.score("random", n=5, batch=1)


def test_attention_shape_and_missing_attention():
    with pytest.raises(ShrinkError, match=r"\[B, H, N, N\]"):
        S.score("cls", torch.rand(2, 5, 5))
    with pytest.raises(ShrinkError, match="needs the attention"):
        S.score("wpr")


@pytest.mark.parametrize("kw,match", [({"iterations": 0}, "iterations must be an integer >= 1"),
                                      ({"damping": 0.0}, r"damping must lie in \(0, 1\]")])
def test_wpr_options(kw, match):
    with pytest.raises(ShrinkError, match=match):
        S.wpr_heads(_attn(), **kw)


def test_vhf_filtering_every_head():
    with pytest.raises(ShrinkError, match="widen the range or pass vhf=None"):
        S.score("wpr", _attn(), vhf=(1e6, 1e7))


def test_tome_r_beyond_one_round():
    with pytest.raises(ShrinkError, match="r schedule"):
        sel.tome_merge(torch.rand(1, 10, 4), torch.rand(1, 10, 4), 6)


def test_zero_tprune_options():
    with pytest.raises(ShrinkError, match="s_share"):
        sel.zero_tprune_keep(torch.rand(1, 10), torch.rand(1, 10, 3), 0.5, s_share=1.5)
    with pytest.raises(ShrinkError, match="partition must be 'seq'"):
        sel.zero_tprune_keep(torch.rand(1, 10), torch.rand(1, 10, 3), 0.5, partition="random")


def test_prune_layer_out_of_range():
    model, _ = M.load("tiny-bert")
    with pytest.raises(ShrinkError, match="prune_at"):
        E.encode(model, torch.randint(0, 256, (1, 8)), method="cls", keep=0.5, prune_at=(0,))
    dec, _ = M.load("tiny-llama")
    with pytest.raises(ShrinkError, match="prune_at"):
        D.prefill(dec, torch.randint(0, 256, (1, 8)), method="last", keep=0.5, prune_at=5)


def test_wrong_model_family():
    model, _ = M.load("tiny-bert")
    with pytest.raises(ShrinkError, match="shrink.tokens.encoder.encode"):
        D.prefill(model, torch.randint(0, 256, (1, 8)))
    dec, _ = M.load("tiny-llama")
    with pytest.raises(ShrinkError, match="shrink.tokens.decoder.prefill"):
        E.encode(dec, torch.randint(0, 256, (1, 8)))


def test_context_longer_than_input():
    dec, _ = M.load("tiny-llama")
    with pytest.raises(ShrinkError, match="n_context"):
        D.prefill(dec, torch.randint(0, 256, (1, 8)), n_context=9)
