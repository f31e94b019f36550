"""Invariants of shrink.pruning.training (issue 16): exact counts, schedules, ERK budget, drop/grow, STE, LTH,
optimizer-state handling, and a small end-to-end direction measured over 3 seeds."""

import copy
import math

import pytest
import torch
from torch import nn

from shrink.errors import ShrinkError
from shrink.pruning import MaskSet, Pattern, check_mask
from shrink.pruning import training as T

torch.set_num_threads(1)


def mlp(seed=0, d_in=16, h=64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))


class Task:
    """Synthetic regression: y = teacher MLP(x) + noise (fixed teacher, seeded batches)."""

    def __init__(self, d_in=16):
        torch.manual_seed(123)
        self.teacher = nn.Sequential(nn.Linear(d_in, 32), nn.Tanh(), nn.Linear(32, 1))
        self.d_in = d_in

    def batch(self, step, n=64):
        g = torch.Generator().manual_seed(10_000 + step)
        x = torch.randn(n, self.d_in, generator=g)
        with torch.no_grad():
            y = self.teacher(x)
        return x, y


TASK = Task()


def train(model, upd, opt, steps, task=TASK, check_every=None):
    for t in range(steps):
        x, y = task.batch(t)
        opt.zero_grad()
        with upd.forward():
            loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        info = upd.step()
        if check_every and info["updated"]:
            check_every(upd, t)
    return upd


def weights(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("weight")}


# -------------------------------------------------------------------------------------------------- schedules
def test_polynomial_schedule_matches_zhu_gupta_formula_and_torch_ao():
    from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

    sch = T.PolynomialSchedule(start=10, end=40, every=5)
    for t in range(0, 60):
        want = 0.8 + (0.0 - 0.8) * (1 - (min(max(t, 10), 40) - 10) / 30) ** 3  # Eq. 1 with s_i = 0
        assert sch.sparsity(t, 0.8) == pytest.approx(want, abs=1e-15)
        # torch.ao's cubic scheduler (t counted in units of dt, n steps)
        if 10 <= t <= 40:
            ao = CubicSL.sparsity_compute_fn(0.0, 0.8, t, 10, 1, 30)
            assert sch.sparsity(t, 0.8) == pytest.approx(ao, abs=1e-12)
    assert [t for t in range(60) if sch.is_update(t)] == [10, 15, 20, 25, 30, 35, 40]
    vals = [sch.sparsity(t, 0.8) for t in range(60)]
    assert all(a <= b for a, b in zip(vals, vals[1:])) and vals[0] == 0.0 and vals[-1] == 0.8
    # JaxPruner's shifted variant, its test vector
    assert T.PolynomialSchedule(0, 20, 1, shift=1).sparsity(9, 0.5) == pytest.approx(0.4375)


def test_cosine_drop_fraction():
    assert T.cosine_drop_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert T.cosine_drop_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert T.cosine_drop_fraction(100, 0.3, 100) == 0.0 and T.cosine_drop_fraction(150, 0.3, 100) == 0.0


# -------------------------------------------------------------------------------------------------- ERK
def test_erk_matches_jaxpruner_vectors_and_budget():
    shapes = {"a": (2, 4), "b": (3, 6), "c": (2, 4, 6)}
    for s, want in [(0.5, {"a": 0.0, "b": 0.31, "c": 0.655}), (0.8, {"a": 0.556, "b": 0.704, "c": 0.852})]:
        got = T.erk_allocation(shapes, s)
        for n, sh in shapes.items():
            N = math.prod(sh)
            assert abs(got[n] - want[n] * N) <= 0.005 * N + 1, (s, n, got[n], want[n] * N)
        assert sum(got.values()) == sum(int(math.prod(sh) * s) for sh in shapes.values())


@pytest.mark.parametrize("s", [0.1, 0.5, 0.8, 0.9, 0.95])
def test_erk_budget_exact_and_density_rule(s):
    shapes = {"q": (64, 64), "k": (16, 64), "up": (256, 64), "down": (64, 256), "out": (8, 64), "big": (512, 512)}
    got = T.erk_allocation(shapes, s)
    assert sum(got.values()) == sum(int(math.prod(sh) * s) for sh in shapes.values())  # exact global budget
    dens = {n: 1 - got[n] / math.prod(sh) for n, sh in shapes.items()}
    assert all(0 <= got[n] < math.prod(sh) for n, sh in shapes.items())
    # among non-dense layers, density ∝ (n_in + n_out) / (n_in n_out) up to one weight of rounding
    sparse = [n for n in shapes if got[n] > 0]
    r = {n: sum(sh) / math.prod(sh) for n, sh in shapes.items()}
    N = {n: math.prod(sh) for n, sh in shapes.items()}
    kept_budget = sum(N[n] - int(N[n] * s) for n in shapes)
    eps = (kept_budget - sum(N[n] for n in shapes if n not in sparse)) / sum(r[n] * N[n] for n in sparse)
    for n in sparse:
        assert abs((N[n] - got[n]) - eps * r[n] * N[n]) < 1.0  # largest-remainder rounding: under one weight
        assert dens[n] <= 1.0
    # layers made dense are exactly those with the largest r (clamping loop)
    dense = [n for n in shapes if got[n] == 0]
    if dense:
        assert min(r[n] for n in dense) >= max(r[n] for n in sparse)


# -------------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("dist", ["uniform", "erk"])
def test_gmp_exact_counts_after_every_update_and_monotone(dist):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    upd = T.SparseUpdater(model, opt, "gmp", sparsity=0.8, distribution=dist, start_step=5, end_step=45,
                          update_every=10)
    prev = {}

    def check(u, t):
        counts = u.target_counts(t)
        for n, m in u.masks:
            assert int((~m).sum()) == counts[n]
            if n in prev:
                assert not (m & ~prev[n]).any()  # kept(t) ⊆ kept(t-1)
            prev[n] = m.clone()
        if dist == "uniform":
            s = u.scheduled_sparsity(t)
            for n, m in u.masks:
                assert int((~m).sum()) == int(m.numel() * s)
        else:
            assert sum(counts.values()) == sum(int(m.numel() * u.scheduled_sparsity(t)) for _, m in u.masks)
        u.check()

    train(model, upd, opt, 60, check_every=check)
    assert [h["step"] for h in upd.history] == [5, 15, 25, 35, 45]
    upd.check()
    if dist == "uniform":
        for n, m in upd.masks:
            check_mask(m, Pattern(0.8), name=n)


def test_sparsity_report_equals_maskset():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    upd = train(model, T.SparseUpdater(model, opt, "rigl", sparsity=0.7, distribution="erk", update_every=5,
                                       end_step=30), opt, 20)
    rep = {r["name"]: r for r in upd.report()}
    ref = upd.masks.sparsity()
    assert set(rep) == set(ref)
    for n, v in ref.items():
        assert rep[n]["sparsity"] == v
    for n, m in upd.masks:
        assert rep[n]["pruned"] == int((~m).sum()) and rep[n]["zeros"] >= rep[n]["pruned"]


# -------------------------------------------------------------------------------------------------- Adam revival
def test_pruned_weights_stay_zero_through_50_adamw_steps_and_moments_reset():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    upd = T.SparseUpdater(model, opt, "magnitude", sparsity=0.5, start_step=20)
    train(model, upd, opt, 20)  # dense: moments everywhere
    w0 = {n: p.detach().clone() for n, p in upd.params.items()}
    for t in range(20, 70):
        x, y = TASK.batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        upd.step()
        for n, p in upd.params.items():
            m = upd.masks.masks[n]
            assert int((p[~m] != 0).sum()) == 0
            st = opt.state[p]
            assert int((st["exp_avg"][~m] != 0).sum()) == 0 and int((st["exp_avg_sq"][~m] != 0).sum()) == 0
    assert any((p != w0[n]).any() for n, p in upd.params.items())  # kept weights did train


def test_negative_control_gradient_hook_alone_revives_pruned_weights():
    """The failure the updater prevents: hooks only, after dense AdamW steps, pruned weights move again."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for t in range(20):
        x, y = TASK.batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    w = model[2].weight
    m = w.detach().abs() > w.detach().abs().median()
    ms = MaskSet(model, {"2.weight": m})
    ms.apply()
    ms.hook_gradients()
    for t in range(20, 30):
        x, y = TASK.batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    assert int((w[~m] != 0).sum()) > 0.9 * int((~m).sum())


# -------------------------------------------------------------------------------------------------- RigL / SET
def naive_rigl(w, g, old, n_drop):
    """Reference: python sorts. Drop the n_drop smallest |w| among active (ties: lower index first), grow the
    n_drop largest |g| among the others (ties: higher index first, the keep_top convention)."""
    wf, gf, of = w.flatten().tolist(), g.flatten().tolist(), old.flatten().tolist()
    active = [i for i in range(len(wf)) if of[i]]
    drop = sorted(active, key=lambda i: (abs(wf[i]), i))[:n_drop]
    kept = set(active) - set(drop)
    cand = [i for i in range(len(wf)) if i not in kept]
    grow = sorted(cand, key=lambda i: (-abs(gf[i]), -i))[:n_drop]
    new = torch.zeros(len(wf), dtype=torch.bool)
    new[list(kept | set(grow))] = True
    return new.reshape(old.shape)


@pytest.mark.parametrize("alg", ["rigl", "set"])
def test_drop_grow_constant_count_zero_init_and_skip(alg):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    upd = T.SparseUpdater(model, opt, alg, sparsity=0.8, distribution="erk", update_every=10, start_step=10,
                          end_step=50, drop_fraction=0.3)
    counts0 = {n: int(m.sum()) for n, m in upd.masks}
    upd.check()
    n_updates = 0
    for t in range(60):
        x, y = TASK.batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        old = {n: m.clone() for n, m in upd.masks}
        before = {n: p.detach().clone() for n, p in upd.params.items()}
        grads = {n: p.grad.clone() for n, p in upd.params.items()}
        moments = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in upd.params.items()} \
            if opt.state else None
        info = upd.step()
        if not info["updated"]:
            continue
        n_updates += 1
        assert info["skipped"]  # skip_gradients
        df = T.cosine_drop_fraction(t, 0.3, 50)
        for n, p in upd.params.items():
            m, o = upd.masks.masks[n], old[n]
            assert int(m.sum()) == counts0[n]  # constant count
            dropped, grown = o & ~m, m & ~o
            assert int(dropped.sum()) == int(grown.sum())
            if alg == "rigl":
                ref = naive_rigl(before[n], grads[n], o, int(int(o.sum()) * df))
                assert torch.equal(m, ref)
            assert torch.equal(p[grown], torch.zeros(int(grown.sum())))  # regrown start at 0
            assert torch.equal(p[m & o], before[n][m & o])  # kept weights did not move (step skipped)
            if moments:
                for k in ("exp_avg", "exp_avg_sq"):
                    v = opt.state[p][k]
                    assert int((v[grown] != 0).sum()) == 0
                    assert torch.equal(v[~(o ^ m)], moments[n][k][~(o ^ m)])  # others bit-identical
        upd.check()
    assert n_updates == 5
    assert upd.history[-1]["changed"] == {n: 0 for n in upd.shapes}  # α(T_end) = 0: last update changes nothing


def test_set_regrowth_seeded_reproducible_and_random():
    def run(seed):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        upd = T.SparseUpdater(model, opt, "set", sparsity=0.8, update_every=5, end_step=100, seed=seed)
        train(model, upd, opt, 11)
        return {n: m.clone() for n, m in upd.masks}

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_set_grows_uniformly_over_candidates():
    """Growth frequency per candidate over many seeded draws is flat (chi-square, 1 layer)."""
    model = nn.Sequential(nn.Linear(8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    hits = torch.zeros(64)
    trials = 400
    for seed in range(trials):
        upd = T.SparseUpdater(model, opt, "set", sparsity=0.5, update_every=1, end_step=10, seed=seed,
                              drop_fraction=0.25, drop_decay="constant",
                              masks=MaskSet(model, {"0.weight": torch.arange(64).reshape(8, 8) < 32}))
        with torch.no_grad():
            model[0].weight.copy_(torch.arange(64, dtype=torch.float).reshape(8, 8) + 1)
            model[0].weight.mul_(upd.masks.masks["0.weight"])
        kept_after_drop = (torch.arange(64) >= 8) & (torch.arange(64) < 32)  # the 8 lowest |w| active dropped
        upd._update_masks(0, raw_grads=False)
        m = upd.masks.masks["0.weight"].flatten()
        assert torch.equal(m & kept_after_drop, kept_after_drop) and int(m.sum()) == 32
        hits += (m & ~kept_after_drop).float()
    cand = ~((torch.arange(64) >= 8) & (torch.arange(64) < 32))
    obs = hits[cand]
    exp = trials * 8 / int(cand.sum())
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < 80  # 39 dof: p(chi2 > 80) < 1e-4


# -------------------------------------------------------------------------------------------------- LTH
def test_lth_rewind_restores_saved_weights_under_final_mask():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    upd = T.SparseUpdater(model, opt, "lth", sparsity=0.8, rewind_step=3, end_step=30)
    saved = None
    for t in range(31):
        if t == 3:
            saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        if t == 30:
            final = {n: p.detach().clone() for n, p in upd.params.items()}
        x, y = TASK.batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        info = upd.step()
    assert info["rewound"] and len(opt.state) == 0
    for n, p in model.named_parameters():
        if n in upd.params:
            m = upd.masks.masks[n]
            ref = T.keep_top(final[n].abs(), m.numel() - int(m.numel() * 0.8))
            assert torch.equal(m, ref)  # mask = magnitude(θ_T)
            assert torch.equal(p.detach(), saved[n] * m)  # θ_k ⊙ m, bitwise
        else:
            assert torch.equal(p.detach(), saved[n])
    upd.check()
    train(model, upd, opt, 10)
    upd.check()


# -------------------------------------------------------------------------------------------------- STE
def test_ste_masked_forward_straight_through_backward():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = mlp()  # STE follows s(t) every step, so any end_step is valid with the default update_every
    T.SparseUpdater(other, torch.optim.SGD(other.parameters(), lr=0.1), "ste", sparsity=0.5, end_step=37)
    upd = T.SparseUpdater(model, opt, "ste", sparsity=0.5, start_step=0, end_step=10, update_every=1)
    for _ in range(12):
        upd.step()  # advance to full sparsity (no gradients: SGD skips params without grad)
    x, y = TASK.batch(0)
    dense = {n: p.detach().clone() for n, p in upd.params.items()}
    with upd.forward():
        out = model(x)
    # forward equals an explicit masked model
    ref = mlp()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n, m in upd.masks:
            ref.get_parameter(n).mul_(m)
    assert torch.allclose(out, ref(x), atol=0, rtol=0)
    for n, m in upd.masks:
        assert int((~m).sum()) == int(m.numel() * 0.5)
        assert torch.equal(upd.params[n].detach(), dense[n])  # dense weights untouched by the forward
    loss = ((out - y) ** 2).mean()
    loss.backward()
    ((ref(x) - y) ** 2).mean().backward()
    for n, m in upd.masks:
        g, gref = upd.params[n].grad, ref.get_parameter(n).grad
        assert torch.equal(g, gref)  # grad(w) == grad(w_eff): straight through
        assert int((g[~m] != 0).sum()) > 0  # pruned weights get gradient too
    upd.step()
    assert any(bool((upd.params[n].detach()[~m] != dense[n][~m]).any()) for n, m in upd.masks)  # dense update
    exported = upd.finalize()
    for n, m in exported:
        check_mask(m, Pattern(0.5), name=n)
        assert int((upd.params[n][~m] != 0).sum()) == 0


# -------------------------------------------------------------------------------------------------- one-shot
def test_random_pruning_seeded_and_saliency_is_abs_w_times_g():
    def rnd(seed):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        u = T.SparseUpdater(model, opt, "random", sparsity=0.6, seed=seed)
        u.step()
        u.check()
        return {n: m.clone() for n, m in u.masks}

    a, b, c = rnd(0), rnd(0), rnd(3)
    assert all(torch.equal(a[n], b[n]) for n in a) and any(not torch.equal(a[n], c[n]) for n in a)

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    u = T.SparseUpdater(model, opt, "saliency", sparsity=0.6)
    x, y = TASK.batch(0)
    ((model(x) - y) ** 2).mean().backward()
    w = {n: p.detach().clone() for n, p in u.params.items()}
    g = {n: p.grad.clone() for n, p in u.params.items()}
    u.step()
    for n, m in u.masks:
        assert torch.equal(m, T.keep_top((w[n] * g[n]).abs(), m.numel() - int(m.numel() * 0.6)))
        check_mask(m, Pattern(0.6), name=n)


def test_initial_maskset_static_keeps_counts_and_state_dict_round_trip():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    init = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) > 0.3
            for n, p in weights(model).items()}
    upd = T.SparseUpdater(model, opt, "rigl", sparsity=0.7, masks=MaskSet(model, init), update_every=4,
                          end_step=40)
    counts = {n: int((~m).sum()) for n, m in init.items()}
    train(model, upd, opt, 10)
    assert upd.check() == counts
    assert upd.history and any(sum(h["changed"].values()) for h in upd.history)  # masks did move
    # resume: a copy continued from the state dict equals the uninterrupted run over the next 3 updates
    sd, msd = upd.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    osd = copy.deepcopy(opt.state_dict())  # its tensors are the live state otherwise
    train_from = lambda m, u, o: [  # noqa: E731
        (o.zero_grad(), ((m(TASK.batch(t)[0]) - TASK.batch(t)[1]) ** 2).mean().backward(), u.step())
        for t in range(10, 22)]
    train_from(model, upd, opt)
    model2 = mlp()
    model2.load_state_dict(msd)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(osd)
    upd2 = T.SparseUpdater(model2, opt2, "rigl", sparsity=0.7, masks=MaskSet(model2, init), update_every=4,
                           end_step=40)
    upd2.load_state_dict(sd)
    model2.load_state_dict(msd)  # after building the updater: its constructor applies the initial masks
    train_from(model2, upd2, opt2)
    assert all(torch.equal(upd.masks.masks[n], upd2.masks.masks[n]) for n in upd.shapes)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_default_targets_skip_embeddings_tied_and_lm_head():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.fc = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 10, bias=False)
            self.tied = nn.Linear(8, 10, bias=False)
            self.tied.weight = self.emb.weight

    assert T.default_targets(LM()) == ["fc.weight"]


def test_tiny_llama_rigl_erk_linears_only_exact_counts():
    """On the decoder's linears (embeddings and lm_head excluded): ERK budget exact, counts constant through
    RigL updates on the LM loss, pruned weights zero, non-target parameters never masked."""
    import shrink.models as M

    model, _ = M.load("tiny-llama")
    model.train()
    names = T.default_targets(model)
    assert names and all(".layers." in n and n.endswith("_proj.weight") for n in names)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    upd = T.SparseUpdater(model, opt, "rigl", sparsity=0.8, distribution="erk", update_every=2, end_step=8)
    counts = upd.check()
    assert sum(counts.values()) == sum(int(math.prod(s) * 0.8) for s in upd.shapes.values())
    emb = model.get_input_embeddings().weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    for t in range(6):
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        upd.step()
        assert upd.check() == counts
    assert set(upd.shapes) == set(names) and not torch.equal(model.get_input_embeddings().weight, emb)
    assert sum(sum(h["changed"].values()) for h in upd.history) > 0


# -------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw,words", [
    ({"sparsity": 1.2}, ("sparsity", "0.8")),
    ({"algorithm": "snap"}, ("snap", "rigl")),
    ({"update_every": 0}, ("update_every",)),
    ({"distribution": "foo"}, ("foo", "erk")),
    ({"drop_decay": "linear"}, ("drop_decay", "cosine")),
    ({"end_step": None}, ("end_step",)),
    ({"targets": ["0.bias"]}, ("0.bias", "remove")),
    ({"targets": ["nope.weight"]}, ("nope.weight",)),
])
def test_bad_inputs_raise_shrink_error_naming_fix(kw, words):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    args = {"algorithm": "rigl", "end_step": 100, **kw}
    with pytest.raises(ShrinkError) as info:
        T.SparseUpdater(model, opt, args.pop("algorithm"), **args)
    msg = str(info.value)
    for w in words:
        assert w in msg, msg


def test_gmp_end_not_reachable_and_unknown_optimizer_state():
    model = mlp()
    with pytest.raises(ShrinkError, match="multiple of update_every"):
        T.SparseUpdater(model, torch.optim.SGD(model.parameters(), lr=0.1), "gmp", start_step=0, end_step=25,
                        update_every=10)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    upd = T.SparseUpdater(model, opt, "gmp", start_step=2, end_step=12, update_every=10)
    with pytest.raises(ShrinkError, match="Adagrad keeps per-weight state 'sum'"):
        train(model, upd, opt, 15)


# -------------------------------------------------------------------------------------------------- end to end
class E2ETask(Task):
    """A harder teacher (64 tanh units, input weights x2) so that 80 % sparsity costs loss."""

    def __init__(self, d_in=16):
        torch.manual_seed(123)
        self.teacher = nn.Sequential(nn.Linear(d_in, 64), nn.Tanh(), nn.Linear(64, 1))
        with torch.no_grad():
            self.teacher[0].weight.mul_(2)
        self.d_in = d_in


E2E = E2ETask()


def run_e2e(alg, seed, steps=150):
    model = mlp(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    kw = {"dense": dict(algorithm="magnitude", sparsity=0.0),
          "random": dict(algorithm="random", sparsity=0.8, seed=seed),
          "gmp": dict(algorithm="gmp", sparsity=0.8, start_step=15, end_step=85, update_every=10),
          "rigl": dict(algorithm="rigl", sparsity=0.8, update_every=10, end_step=112, seed=seed)}[alg]
    upd = T.SparseUpdater(model, opt, kw.pop("algorithm"), **kw)
    train(model, upd, opt, steps, task=E2E)
    upd.check()
    x, y = E2E.batch(999_999, 2048)
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean())


def test_end_to_end_rigl_and_gmp_beat_random_pruning_over_3_seeds():
    """Tiny MLP (16-64-64-1), synthetic regression, 150 AdamW steps at 80 %: GMP and RigL reach a lower
    held-out MSE than one-shot random pruning at step 0 for every one of 3 seeds, and dense is below both.
    Measured (seeds 0-2, one thread): dense 0.0122-0.0127, RigL 0.0140, GMP 0.0139-0.0142, random
    0.0154-0.0165: the assert compares the worst seed of one arm with the best of the other."""
    res = {a: [run_e2e(a, s) for s in range(3)] for a in ("dense", "random", "gmp", "rigl")}
    for a in ("gmp", "rigl"):
        assert max(res[a]) < min(res["random"]), res
        assert max(res["dense"]) < min(res[a]), res
