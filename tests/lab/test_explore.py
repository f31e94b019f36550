"""shrink.explore and the seaborn helpers of shrink.plotting: widgets construct, callbacks redraw the figure,
the static fallback renders the same content, the drawn means and [min, max] bars agree with a naive
computation, and bad dimensions / metrics raise ShrinkError with the fix."""

from __future__ import annotations

import io

import numpy as np
import pytest

from shrink import explore, plotting
from shrink.errors import ShrinkError

PRUNERS, SCHEMES, SEEDS = ["wanda", "sparsegpt", "magnitude"], ["LR", "BR", "BR+GP"], [0, 1, 2]


def _rows():
    rng = np.random.default_rng(0)
    rows = []
    for i, p in enumerate(PRUNERS):
        for j, s in enumerate(SCHEMES):
            for sd in SEEDS:
                rows.append({"pruner": p, "scheme": s, "seed": sd, "ppl": float(50 + 10 * i - 3 * j + rng.normal()),
                             "final": {"err_calib": float(100 - 20 * j + sd)},
                             "blocks": [{"err_calib": float((b + 1) * (3 - j) + sd), "err_test": float(b + sd)}
                                        for b in range(5)]})
    return rows


def _explorer(**kw):
    return explore.explore(_rows(), ["pruner", "scheme", "seed"], spread="seed",
                           metric={"ppl": "ppl", "final error": "final.err_calib"},
                           curve={"calibration": "blocks.err_calib", "held-out": "blocks.err_test"}, **kw)


def _mean_markers(ax):
    """{x position: y} of the diamond mean markers that spread_plot draws (seaborn pointplot)."""
    out = {}
    for line in ax.lines:
        if line.get_marker() == "D":
            out.update({round(float(x), 6): float(y) for x, y in zip(line.get_xdata(), line.get_ydata())})
    return out


def test_static_fallback_panels_and_values_match_a_naive_computation():
    ex = _explorer(interactive=False)
    fig = ex.figure()
    # one curve panel per pruner, then the metric panel
    assert len(fig.axes) == len(PRUNERS) + 1
    assert [ax.get_title() for ax in fig.axes[:3]] == PRUNERS
    # curve panel: one mean line per scheme, equal to the naive mean over seeds
    rows = _rows()
    ax0 = fig.axes[0]
    drawn = [line.get_ydata() for line in ax0.lines if len(line.get_ydata()) == 5]
    assert len(drawn) == len(SCHEMES)
    for s, y in zip(SCHEMES, drawn):
        naive = np.mean([[b["err_calib"] for b in r["blocks"]] for r in rows if r["pruner"] == "wanda"
                         and r["scheme"] == s], axis=0)
        np.testing.assert_allclose(y, naive)
    assert len(ax0.collections) == len(SCHEMES)  # one [min, max] band per scheme (three seeds)
    # metric panel: mean markers at pruner index + scheme offset equal the naive means over seeds
    means = _mean_markers(fig.axes[-1])
    offsets = [-0.8 / 3, 0.0, 0.8 / 3]
    for i, p in enumerate(PRUNERS):
        for j, s in enumerate(SCHEMES):
            naive = np.mean([r["ppl"] for r in rows if r["pruner"] == p and r["scheme"] == s])
            assert means[round(i + offsets[j], 6)] == pytest.approx(naive, rel=1e-12)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:4] == b"\x89PNG"


def test_spread_plot_bars_are_min_max_and_own_bands_are_drawn():
    data = [{"x": "a", "y": v, "lo": v - 1, "hi": v + 2} for v in (1.0, 4.0, 2.0)]
    ax = plotting.spread_plot(data, x="x", y="y", lo="lo", hi="hi")
    bars = [line for line in ax.lines if line.get_marker() != "D" and len(line.get_ydata()) >= 2]
    ys = np.concatenate([line.get_ydata() for line in bars])
    ys = ys[np.isfinite(ys)]
    assert ys.min() == 1.0 and ys.max() == 4.0  # [min, max] of the values, not a standard error
    assert _mean_markers(ax) == {0.0: pytest.approx(7 / 3)}
    segs = np.concatenate([c.get_segments() for c in ax.collections if hasattr(c, "get_segments")])
    vertical = [tuple(sg[:, 1]) for sg in segs if sg[0, 0] == sg[1, 0]]
    assert sorted(vertical) == [(0.0, 3.0), (1.0, 4.0), (3.0, 6.0)]
    caps = sorted(sg[0, 1] for sg in segs if sg[0, 1] == sg[1, 1])
    assert caps == [0.0, 1.0, 3.0, 3.0, 4.0, 6.0]
    # every category stays in view (the scatter must not re-autoscale the categorical axis)
    ax = plotting.spread_plot([{"x": c, "h": h, "y": 1.0} for c, h in (("a", "u"), ("a", "v"), ("b", "u"), ("c", "u"))],
                              x="x", y="y", hue="h")
    assert ax.get_xlim() == (-0.5, 2.5) and [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]


def test_widget_constructs_and_callbacks_redraw():
    ex = _explorer(interactive=True)
    box = ex.widget()
    c = box.controls
    assert set(c) == {"pruner", "scheme", "seed", "metric", "curve"}
    assert list(c["pruner"].options) == [explore.ALL, *PRUNERS]
    assert len(ex.last_figure.axes) == len(PRUNERS) + 1
    c["pruner"].value = "wanda"
    assert len(ex.last_figure.axes) == 2 and ex.last_figure.axes[0].get_title() == "wanda"
    c["seed"].value = 1  # one seed: plain lines, no band
    assert len(ex.last_figure.axes[0].collections) == 0
    c["metric"].value = "final error"
    assert ex.last_figure.axes[-1].get_ylabel() == "final error"
    means = _mean_markers(ex.last_figure.axes[-1])
    assert sorted(means.values()) == [61.0, 81.0, 101.0]  # final.err_calib of wanda, seed 1, per scheme
    c["curve"].value = "held-out"
    assert ex.last_figure.axes[0].get_ylabel() == "held-out"


def test_display_is_widget_when_interactive_and_figure_when_headless(monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, **kw: shown.append(obj))
    _explorer(interactive=False)._ipython_display_()
    _explorer(interactive=True)._ipython_display_()
    from matplotlib.figure import Figure

    assert isinstance(shown[0], Figure)
    assert type(shown[-1]).__name__ == "VBox"
    assert explore.explore(_rows(), ["pruner", "scheme", "seed"], metric="ppl").interactive is False  # pytest: headless


def test_spread_metric_values_draw_their_bands():
    class FakeSpread:  # the shrink.eval.Spread contract: values, kind, mean, lo, hi
        def __init__(self, values):
            self.values, self.kind = values, "range perturbation"
            self.mean, self.lo, self.hi = float(np.mean(values)), min(values), max(values)

    rows = [{"prefix": pf, "granularity": g, "bits": b, "ppl": FakeSpread([10.0 + k, 11.0 + k, 13.0 + k])}
            for k, (pf, g, b) in enumerate([(pf, g, b) for pf in ("none", "cushioncache")
                                            for g in ("tensor", "token") for b in (8, 4)])]
    rows[0]["ppl"] = {"values": [1.0, 2.0], "kind": "range perturbation"}  # the JSON form in a record
    from shrink.eval import Spread

    rows[1]["ppl"] = Spread((11.0, 12.0, 14.0), kind="range perturbation")  # the real class
    ex = explore.explore(rows, ["prefix", "granularity", "bits"], metric="ppl", interactive=False)
    fig = ex.figure()
    assert [ax.get_title() for ax in fig.axes] == ["bits=8", "bits=4"]  # third dimension: one panel per value
    assert ex.table["lo"].tolist()[:2] == [1.0, 11.0] and ex.table["hi"].tolist()[:2] == [2.0, 14.0]
    assert "range perturbation" in fig.axes[0].get_xlabel()
    assert any(hasattr(c, "get_segments") and len(c.get_segments()) for c in fig.axes[0].collections)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dims=["pruner", "schem"], metric="ppl"), "schem"),
    (dict(dims=["pruner", "scheme", "seed"], metric="pll"), "pll"),
    (dict(dims=["pruner", "scheme", "seed"], metric="ppl", spread="seeds"), "spread"),
    (dict(dims=["pruner", "scheme"], metric="ppl"), "more than once"),
    (dict(dims=["pruner", "scheme", "seed"], metric="blocks"), "number"),
    (dict(dims=["pruner", "scheme", "seed"], curve="ppl"), "list"),
    (dict(dims=["pruner", "scheme", "seed"]), "metric="),
])
def test_bad_input_raises_shrink_error_naming_the_problem(kwargs, match):
    with pytest.raises(ShrinkError, match=match):
        explore.explore(_rows(), **kwargs)


def test_unknown_selection_raises():
    ex = _explorer(interactive=False)
    with pytest.raises(ShrinkError, match="prunr"):
        ex.figure(prunr="wanda")
    with pytest.raises(ShrinkError, match="values"):
        ex.figure(pruner="obc")
    with pytest.raises(ShrinkError, match="metrics"):
        ex.figure(metric="accuracy")
    with pytest.raises(ShrinkError):
        explore.explore([], ["pruner"], metric="ppl")


def test_records_with_dotted_paths():
    recs = [{"config": {"spec": {"pruner": r["pruner"], "scheme": r["scheme"]}, "seed": r["seed"]}, "metrics": r}
            for r in _rows()]
    ex = explore.explore(recs, {"pruner": "config.spec.pruner", "scheme": "config.spec.scheme", "seed": "config.seed"},
                         metric="metrics.ppl", curve="metrics.blocks.err_calib", spread="seed", interactive=False)
    assert len(ex.table) == len(recs) and len(ex.curves) == 5 * len(recs)
    assert ex.levels["pruner"] == PRUNERS
