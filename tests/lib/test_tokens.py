"""shrink.tokens: attention recomputation vs eager weights, score invariants (WPR mass, 1 iteration = column
mean), exact-count selections with protected tokens, DivPrune O(kN) = O(k²N), ToMe sizes and a naive merge,
pruned forwards at keep 1.0 = the unpruned model, kept RoPE positions, the FLOPs model vs FlopCounterMode."""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import shrink.models as M
from shrink.tokens import decoder as D
from shrink.tokens import encoder as E
from shrink.tokens import flops as F
from shrink.tokens import scores as S
from shrink.tokens import select as sel
from shrink.tokens.attention import TokenInputError, attention_probs, causal_bias, rotary


def _ids(n, seed=0, batch=1):
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def _random_attn(b=2, h=3, n=9, seed=0, causal=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, h, n, n, generator=g) * 2
    if causal:
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1)


# ------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama3", "tiny-mistral"])
def test_decoder_attention_matches_eager_weights(name, one_thread):
    model, _ = M.load(name)
    ids = _ids(33)
    model.config._attn_implementation = "eager"
    out = model(ids, output_attentions=True)
    h = model.model.embed_tokens(ids)
    pos = torch.arange(33)[None]
    cs = rotary(model, h, pos)
    for layer, blk in enumerate(model.model.layers):
        a = attention_probs(model, layer, h)
        assert (a - out.attentions[layer]).abs().max() < 1e-5
        h = blk(h, attention_mask=causal_bias(33), position_ids=pos, position_embeddings=cs)


def test_encoder_attention_matches_eager_weights(one_thread):
    model, _ = M.load("tiny-bert")
    ids = _ids(21)
    model.config._attn_implementation = "eager"
    out = model(ids, output_attentions=True)
    h = model.embeddings(input_ids=ids)
    for layer, blk in enumerate(model.encoder.layer):
        a = attention_probs(model, layer, h)
        assert (a - out.attentions[layer]).abs().max() < 1e-5
        h = blk(h)


# ---------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("causal", [False, True])
def test_wpr_conserves_mass_and_one_iteration_is_column_mean(causal):
    a = _random_attn(causal=causal)
    for it in (1, 5, 30):
        s = S.wpr_heads(a, it)
        assert (s.sum(-1) - 1).abs().max() < 1e-5
    assert torch.allclose(S.wpr_heads(a, 1), a.mean(2), atol=1e-7)
    assert torch.allclose(S.score("wpr", a, iterations=1, heads="mean"), S.score("mean", a), atol=1e-7)
    # damped and sink-excluded variants still conserve mass (the sink gets 0)
    s = S.wpr_heads(a, 20, exclude_sink=True, damping=0.85)
    assert (s.sum(-1) - 1).abs().max() < 1e-5 and float(s[..., 0].abs().max()) == 0.0


def test_wpr_is_power_iteration_of_the_transposed_matrix():
    a = _random_attn(b=1, h=1, n=6)
    s = torch.full((6,), 1 / 6)
    for _ in range(7):
        s = a[0, 0].T @ s                      # naive s <- A^T s
    assert torch.allclose(S.wpr_heads(a, 7)[0, 0], s, atol=1e-6)


def test_causal_wpr_piles_mass_on_token_zero():
    a = _random_attn(b=1, h=2, n=12, causal=True)
    s = S.wpr_heads(a, 200)
    assert float(s[..., 0].min()) > 0.999   # token 0 is absorbing: it attends only to itself


def test_eir_is_rms_and_vhf_filters_heads():
    s = torch.tensor([[[0.5, 0.5, 0.0], [0.1, 0.1, 0.8]]])          # [B=1, H=2, N=3]
    assert torch.allclose(S.aggregate_heads(s, "eir"), ((s ** 2).mean(1)).sqrt())
    var = S.head_variance(s)
    only_second = S.aggregate_heads(s, "mean", vhf=(float(var[0, 0]) + 1e-6, 10.0))
    assert torch.allclose(only_second, s[:, 1])
    with pytest.raises(TokenInputError, match="widen the range"):
        S.aggregate_heads(s, "eir", vhf=(100.0, 200.0))


def test_named_scores_against_naive_definitions():
    a = _random_attn(b=1, h=2, n=5)
    assert torch.allclose(S.score("cls", a)[0], (a[0, 0, 0] + a[0, 1, 0]) / 2)
    assert torch.allclose(S.score("last", a, query=3)[0], (a[0, 0, 3] + a[0, 1, 3]) / 2)
    assert torch.allclose(S.score("h2o", a)[0], a[0].sum(0).sum(0))
    assert torch.equal(S.score("recency", n=4, batch=1), torch.tensor([[0.0, 1, 2, 3]]))
    r1 = S.score("random", n=7, batch=2, generator=torch.Generator().manual_seed(3))
    r2 = S.score("random", n=7, batch=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(r1, r2)


# ------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("n", [7, 10, 33])
@pytest.mark.parametrize("keep", [0.25, 0.3, 0.5, 0.7, 1.0])
def test_exact_counts_and_protection(n, keep):
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(3, n, generator=g)
    k = math.floor(keep * n + 0.5)
    idx = sel.topk_keep(scores, keep, protected=[0, -1])
    assert idx.shape == (3, k)
    assert bool((idx[:, 0] == 0).all() and (idx[:, -1] == n - 1).all())
    assert bool((idx[:, 1:] > idx[:, :-1]).all())                        # sorted, no duplicates
    # the unprotected kept tokens are the top-(k-2) of the rest
    for b in range(3):
        rest = scores[b, 1:-1].topk(k - 2).indices + 1
        assert set(idx[b, 1:-1].tolist()) == set(rest.tolist())
    feats = torch.randn(3, n, 8, generator=g)
    for out in (sel.zero_tprune_keep(scores, feats, keep, protected=[0, -1]),
                sel.divprune_keep(feats, keep, protected=[0, -1])):
        assert out.shape == (3, k) and bool((out[:, 0] == 0).all() and (out[:, -1] == n - 1).all())
        assert bool((out[:, 1:] > out[:, :-1]).all())


def test_zero_tprune_s_share_zero_is_the_i_stage_and_s_stage_drops_duplicates():
    g = torch.Generator().manual_seed(0)
    imp = torch.rand(1, 12, generator=g)
    feats = torch.randn(1, 12, 6, generator=g)
    assert torch.equal(sel.zero_tprune_keep(imp, feats, 0.5, s_share=0.0), sel.topk_keep(imp, 0.5))
    # token 5 (low importance) duplicates the most important token: the S-stage removes it
    imp = torch.linspace(0.1, 1.0, 12)[None].clone()
    imp[0, 5] = 0.35
    feats[0, 5] = feats[0, 11]
    kept = sel.zero_tprune_keep(imp, feats, 10 / 12, s_share=0.5)
    assert 5 not in kept[0].tolist() and kept.shape == (1, 10)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("protected", [None, [0]])
def test_divprune_running_min_equals_reference(seed, protected):
    feats = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(seed))
    feats[:, 7] = feats[:, 3]                                               # a duplicate (distance 0)
    for keep in (0.1, 0.5, 0.9):
        a = sel.divprune_keep(feats, keep, protected=protected)
        b = sel.divprune_keep(feats, keep, protected=protected, reference=True)
        assert torch.equal(a, b)


def test_divprune_maximises_min_distance_on_a_toy():
    # three tight clusters: keeping 3 tokens must take one per cluster
    base = torch.eye(3) * 10
    feats = torch.cat([base[i] + 0.01 * torch.randn(4, 3, generator=torch.Generator().manual_seed(i))
                       for i in range(3)])[None]
    kept = sel.divprune_keep(feats, 3 / 12)[0]
    assert sorted(int(k) // 4 for k in kept) == [0, 1, 2]


def test_tome_sizes_sum_and_naive_merge():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 10, 4, generator=g)
    metric = torch.randn(1, 10, 5, generator=g)
    m = sel.tome_merge(x, metric, 3, protected=[0])
    assert m.x.shape == (1, 7, 4) and float(m.sizes.sum()) == 10.0
    # naive: each even (A) token except 0 picks its best odd (B) token; the 3 best edges merge by mean
    mn = torch.nn.functional.normalize(metric[0], dim=-1)
    a, b = [2, 4, 6, 8], [1, 3, 5, 7, 9]
    best = {i: max(b, key=lambda j: float(mn[i] @ mn[j])) for i in a}
    src = sorted(a, key=lambda i: -float(mn[i] @ mn[best[i]]))[:3]
    groups = {j: [j] + [i for i in src if best[i] == j] for j in b}
    for j, members in groups.items():
        row = m.origin[0].tolist().index(j)
        assert torch.allclose(m.x[0, row], x[0, members].mean(0), atol=1e-6)
        assert float(m.sizes[0, row]) == len(members)
    assert torch.equal(m.assign[0, src], torch.tensor([m.origin[0].tolist().index(best[i]) for i in src]))
    # a second step keeps the sizes summing to 10
    m2 = sel.tome_merge(m.x, m.x, 2, sizes=m.sizes, protected=[0])
    assert float(m2.sizes.sum()) == 10.0


# ---------------------------------------------------------------------------------------- forwards
def test_encoder_keep_one_reproduces_the_model(one_thread):
    model, tok = M.load("tiny-bert")
    ids = E.encode_text(tok, "a short sentence for the tiny encoder")
    ref = model(ids).last_hidden_state
    for method in E.METHODS:
        out = E.encode(model, ids, method=method, keep=1.0, generator=torch.Generator().manual_seed(0),
                       prune_at=(1,))
        assert (out.hidden - ref).abs().max() <= 1e-5
        assert torch.allclose(out.embedding, ref.mean(1), atol=1e-5)


@pytest.mark.parametrize("method", [m for m in E.METHODS if m != "none"])
def test_encoder_pruned_counts_and_protection(method, one_thread):
    model, tok = M.load("tiny-bert")
    ids = _ids(37)
    for keep in (0.3, 0.5, 0.7):
        out = E.encode(model, ids, method=method, keep=keep, prune_at=(1,),
                       generator=torch.Generator().manual_seed(0))
        k = math.floor(keep * 37 + 0.5)
        assert out.tokens_per_layer == [37, k]
        assert out.kept[0, 0] == 0 and out.kept[0, -1] == 36
        assert float(out.sizes.sum()) == (37.0 if method == "tome" else k)


def test_encoder_pruned_equals_manual_gather(one_thread):
    """Pruning by cls at keep 0.5 equals running block 1 on the hand-gathered tokens."""
    model, _ = M.load("tiny-bert")
    ids = _ids(20)
    out = E.encode(model, ids, method="cls", keep=0.5, prune_at=(1,))
    h0 = model.embeddings(input_ids=ids)
    a = attention_probs(model, 0, h0)
    h1 = model.encoder.layer[0](h0)
    sc = a[0, :, 0].mean(0)
    sc[0] = sc[-1] = float("inf")
    idx = sc.topk(10).indices.sort().values
    ref = model.encoder.layer[1](h1[:, idx])
    assert torch.equal(out.kept[0], idx) and (out.hidden - ref).abs().max() < 1e-6


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama3"])
def test_decoder_keep_one_reproduces_logits(name, one_thread):
    model, _ = M.load(name)
    ids = _ids(48)
    ref = model(ids).logits
    for method in D.METHODS:
        out = D.prefill(model, ids, n_context=32, method=method, keep=1.0, prune_at=1,
                        generator=torch.Generator().manual_seed(0))
        assert (out.logits - ref).abs().max() <= 1e-5
        assert torch.equal(out.kept[0], torch.arange(48))


@pytest.mark.parametrize("method", [m for m in D.METHODS if m != "none"])
def test_decoder_pruned_keeps_original_positions(method, one_thread):
    model, _ = M.load("tiny-llama3")
    ids = _ids(48)
    out = D.prefill(model, ids, n_context=32, method=method, keep=0.5, prune_at=1,
                    generator=torch.Generator().manual_seed(0))
    kept = out.kept[0]
    assert out.tokens_per_layer == [48, 16 + 16] and kept[0] == 0
    assert torch.equal(kept[16:], torch.arange(32, 48))                        # the continuation, whole
    # independent reference: block 1 run by hand on the gathered tokens with their original positions
    h = model.model.embed_tokens(ids)
    pos = torch.arange(48)[None]
    h = model.model.layers[0](h, attention_mask=causal_bias(48), position_ids=pos,
                              position_embeddings=rotary(model, h, pos))
    hk, pk = h[:, kept], kept[None]
    hk = model.model.layers[1](hk, attention_mask=causal_bias(32), position_ids=pk,
                               position_embeddings=rotary(model, hk, pk))
    ref = model.lm_head(model.model.norm(hk))
    assert (out.logits - ref).abs().max() < 1e-5


def test_continuation_nll_matches_model_loss(one_thread):
    model, _ = M.load("tiny-llama")
    ids = _ids(30)
    out = D.prefill(model, ids, n_context=20)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(ids).logits[0, 19:29], ids[0, 20:30])
    assert abs(float(D.continuation_nll(out.logits, ids, 20)[0]) - float(ref)) < 1e-5


# ----------------------------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama3", "tiny-bert"])
def test_flops_model_agrees_with_flop_counter(name, one_thread):
    model, _ = M.load(name)
    ids = _ids(40)
    with sdpa_kernel(SDPBackend.MATH):      # CPU's fused SDPA kernel is not counted by FlopCounterMode
        counted, _ = F.counted_flops(model, ids)
        assert abs(counted - F.model_flops(model, [40] * 2)["total"]) <= 0.01 * counted
        if name == "tiny-bert":
            counted, out = F.counted_flops(E.encode, model, ids, method="cls", keep=0.5, prune_at=(1,))
        else:
            counted, out = F.counted_flops(D.prefill, model, ids, n_context=30, method="last", keep=0.5,
                                           prune_at=1)
    n_scored = 40 if name == "tiny-bert" else 30
    predicted = F.model_flops(model, out.tokens_per_layer)["total"] + F.scoring_flops(model, n_scored)
    assert abs(counted - predicted) <= 0.01 * counted


def test_fastv_convention_on_a_known_case():
    cfg = type("C", (), dict(hidden_size=4, intermediate_size=8))()
    assert F.fastv_convention(cfg, [2, 1]) == (4 * 2 * 16 + 2 * 4 * 4 + 2 * 2 * 4 * 8) + (4 * 16 + 2 * 4 + 2 * 4 * 8)


@pytest.mark.parametrize("method", ["cls", "zero_tprune", "tome", "random"])
def test_encoder_start_states_give_identical_results(method, one_thread):
    model, _ = M.load("tiny-bert")
    ids = _ids(30)
    a = E.encode(model, ids, method=method, keep=0.5, prune_at=(1,), generator=torch.Generator().manual_seed(0))
    b = E.encode(model, ids, method=method, keep=0.5, prune_at=(1,), generator=torch.Generator().manual_seed(0),
                 start=E.states(model, ids, 1))
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.kept, b.kept) and a.tokens_per_layer == b.tokens_per_layer


def test_presets_and_paper_numbers_referenced_by_the_notebooks():
    import re
    from pathlib import Path

    import shrink.report as R
    import shrink.scales as SC

    for exp in ("tokens-encoder", "tokens-decoder"):
        for scale in SC.SCALES:
            assert SC.get(exp, scale).model
    assert SC.get("tokens-encoder", "cpu").n_sentences >= 150 and len(SC.get("tokens-encoder", "cpu").seeds) >= 3
    assert SC.get("tokens-decoder", "cpu").windows >= 32
    nums = R.paper("03-tokens")
    root = Path(__file__).resolve().parents[2] / "notebooks" / "03-tokens"
    used = set()
    for nb in root.glob("*.md"):
        used |= set(re.findall(r'"((?:zt|tome|evit|fastv)-[a-z0-9-]+)"', nb.read_text()))
    assert used and used <= set(nums), used - set(nums)
