"""shrink.selection.dedup (04j): the eps curve is SemDeDup's mask, budgets are exact, DBP quotas sum and
respect their bounds, DBP runs on the SemDeDup-kept chunks, presets reject bad fractions."""

import numpy as np
import pytest

import shrink
from shrink.scales import PresetError
from shrink.selection import SelectionError
from shrink.selection import baselines as B
from shrink.selection import dedup as DD
from shrink.selection import experiment as E


def _cfg(**kw):
    cfg = shrink.scales.get("data-dedup", "tiny")
    return cfg.with_(**kw) if kw else cfg


def test_curve_selections_and_quotas_are_exact():
    cfg = _cfg()
    c = DD.dedup_curve(cfg, seed=0, scale="tiny")
    st = E.setting(cfg, False)
    n = len(st.pool)
    emb = E._embeddings(cfg.encoder, tuple(st.texts))
    labels, cents = B.kmeans(emb, cfg.n_clusters, 0)
    m = np.asarray(c["m"])
    # the record's curve is SemDeDup's own mask at every eps, recomputed independently
    for point in c["curve"]:
        mask = B.semdedup(emb, point["eps"], n_clusters=cfg.n_clusters, seed=0, labels=labels, centroids=cents)
        assert point["kept"] == pytest.approx(mask.mean(), abs=0)
    for f in cfg.fractions:
        k = DD.budget_n(n, f)
        sel = c["selections"][str(f)]
        assert all(len(sel[x]) == k == len(set(sel[x])) for x in DD.DEDUP_METHODS)
        assert set(sel["semdedup"]) == set(np.argsort(m, kind="stable")[:k].tolist()) or \
            m[sel["semdedup"]].max() == np.sort(m)[k - 1]  # the k smallest m (ties aside)
        q, sizes = np.array(c["dbp"][str(f)]["quotas"]), np.array(c["dbp"][str(f)]["sizes"])
        lo = np.minimum(sizes, np.ceil(k / len(sizes) * cfg.dbp_min_ratio))
        assert q.sum() == k and (q >= lo).all() and (q <= sizes).all()
        assert (m[sel["dbp"]] <= 1 - cfg.semdedup_eps).all()  # DBP only picks SemDeDup-kept chunks
    assert DD.selection(cfg, "full", None, seed=0, scale="tiny").tolist() == list(range(n))


def test_lm_run_trains_on_the_selection():
    cfg = _cfg(steps=2, warmup=1, wiki_windows=2)
    f = cfg.fractions[0]
    r = DD.lm_run(cfg, "semdedup", f, seed=0, scale="tiny")
    assert r["selection"]["n"] == DD.budget_n(len(E.setting(cfg, False).pool), f)
    assert r["selection"]["tag"] == f"semdedup@{f}" and np.isfinite(r["wiki_bpb"])


def test_bad_inputs_name_the_fix():
    with pytest.raises(PresetError, match="fractions"):
        _cfg(fractions=(1.5,))
    with pytest.raises(SelectionError, match="fractions"):
        DD.selection(_cfg(), "random", 0.33, seed=0, scale="tiny")
    with pytest.raises(SelectionError, match="use one of"):
        DD.selection(_cfg(), "kcenter", 0.25, seed=0, scale="tiny")
    with pytest.raises(SelectionError, match="lower the fraction"):
        DD.dedup_curve(_cfg(semdedup_eps=0.99, fractions=(0.9,)), seed=0, scale="tiny")
