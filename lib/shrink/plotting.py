"""House plot style and deterministic figure saving.

Introduced in: notebooks/00-start/00-tour.md
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

STYLE = {
    "figure.figsize": (6.4, 3.6), "figure.dpi": 100, "savefig.dpi": 120, "axes.grid": True,
    "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False, "font.size": 10,
    "axes.titlesize": 11, "legend.frameon": False, "svg.hashsalt": "shrink", "image.cmap": "viridis",
}


def use_style() -> None:
    """Apply the handbook's rcParams (explicit values, so figures do not change with defaults)."""
    matplotlib.rcParams.update(STYLE)


def savefig(fig, path: str | Path) -> Path:
    """Save ``fig`` without timestamps (byte-identical SVG/PNG across runs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"Date": None} if path.suffix == ".svg" else {"Software": None}
    fig.savefig(path, metadata=meta, bbox_inches="tight")
    return path


# --- statistical figures (seaborn) --------------------------------------------------------------------------

#: Width of one x category that the hue levels share (seaborn's categorical default).
_WIDTH = 0.8


def _log_y(ax) -> None:
    """Log y axis labelled with plain numbers (``60``, not ``6x10^1``), minor labels when the range is narrow."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _offsets(n: int) -> list[float]:
    """Centres of ``n`` dodged hue levels inside one category (seaborn's ``stripplot(dodge=True)`` layout)."""
    return [(j + 0.5) * _WIDTH / n - _WIDTH / 2 for j in range(n)]


def spread_plot(data, *, x: str, y: str, hue: str | None = None, lo: str | None = None, hi: str | None = None,
                order=None, hue_order=None, palette=None, log: bool = False, ax=None, legend: bool = True,
                markersize: float = 7.0):
    """Per-seed spread: every value as a point, and per group the **mean with a [min, max] bar**.

    The handbook's figure for "numbers with their noise" (one point per seed, calibration draw or
    perturbation; the bar is the range the prose and the asserts talk about, never a standard error).

    Args:
        data: tidy ``pandas.DataFrame``, one row per value (e.g. one row per seed).
        x: categorical column on the x axis; ``hue``: optional categorical column, dodged within each x.
        y: the numeric column.
        lo, hi: optional columns with each value's *own* band (e.g. a :class:`shrink.eval.Spread` of range
            perturbations behind one seed's perplexity), drawn as a thin vertical bar through the point.
        order, hue_order: category orders (default: order of first appearance).
        palette: seaborn palette (default ``"deep"``); ``log``: log-scaled y axis.
        ax: matplotlib axes to draw into (default: a new ``matplotlib.figure.Figure`` that pyplot does not
            manage, so notebooks show it only when displayed).

    Returns:
        the axes. Means and ranges are drawn with
        ``seaborn.pointplot(errorbar=("pi", 100))``, whose percentile interval 0-100 is exactly [min, max];
        the individual values sit just left of their group's mean marker.

    Used by :mod:`shrink.explore`; chapters call it directly for per-seed tables turned into figures::

        plotting.spread_plot(df, x="scheme", y="ppl", hue="pruner", log=True)
    """
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    if ax is None:
        ax = Figure(figsize=STYLE["figure.figsize"]).subplots()
    df = pd.DataFrame(data)
    order = list(order) if order is not None else list(dict.fromkeys(df[x]))
    hues = (list(hue_order) if hue_order is not None else list(dict.fromkeys(df[hue]))) if hue else [None]
    colors = sns.color_palette(palette or "deep", max(len(hues), 1))
    # categorical axes want strings; keep the caller's order
    df = df.assign(**{x: df[x].astype(str)}, **({hue: df[hue].astype(str)} if hue else {}))
    order_s, hues_s = [str(v) for v in order], [str(v) for v in hues] if hue else None
    pal = dict(zip(hues_s, colors)) if hue else None
    kw = dict(data=df, x=x, y=y, order=order_s, ax=ax)
    if hue:
        kw.update(hue=hue, hue_order=hues_s, palette=pal)
    else:
        kw.update(color=colors[0])
    n = len(hues)
    sns.pointplot(**kw, dodge=(_WIDTH - _WIDTH / n) if (hue and n > 1) else False, estimator="mean",
                  errorbar=("pi", 100), linestyle="none", markers="D", markersize=markersize, capsize=0.06,
                  err_kws={"linewidth": 1.4}, legend=bool(hue) and legend, zorder=4)
    # the individual values (and their own bands) just left of their group's mean marker
    offs = _offsets(n) if hue and n > 1 else [0.0]
    shift = 0.3 * _WIDTH / max(n, 1) if hue else 0.15
    for i, xv in enumerate(order_s):
        for j, hv in enumerate(hues_s or [None]):
            sel = df[(df[x] == xv) & ((df[hue] == hv) if hue else True)]
            if not len(sel):
                continue
            pos = [i + offs[j] - shift] * len(sel)
            if lo and hi:  # capped bar, so a band narrower than the marker still shows
                band = sel[sel[lo].notna() & sel[hi].notna()]
                if len(band):
                    ax.vlines([pos[0]] * len(band), band[lo], band[hi], color=colors[j], alpha=0.7, linewidth=1.2,
                              zorder=2)
                    for end in (lo, hi):
                        ax.hlines(band[end], pos[0] - 0.04, pos[0] + 0.04, color=colors[j], alpha=0.7,
                                  linewidth=1.2, zorder=2)
            ax.scatter(pos, sel[y], s=(markersize * 0.8) ** 2, color=colors[j], alpha=0.6, edgecolor="white",
                       linewidth=0.5, zorder=3)
    ax.set_xlim(-0.5, len(order_s) - 0.5)  # the scatter above re-autoscaled the categorical axis
    if log:
        _log_y(ax)
    if hue and legend and ax.get_legend() is not None:
        ax.legend(title=hue, fontsize=8, title_fontsize=8)
    return ax


def curve_plot(data, *, x: str, y: str, hue: str | None = None, hue_order=None, palette=None,
               log: bool = False, ax=None, legend: bool = True):
    """Curves with their spread: per ``hue`` level the mean over the repeated draws at each ``x`` and a
    [min, max] band (what ``seaborn.lineplot(errorbar=("pi", 100))`` draws, aggregated with one vectorised
    ``groupby`` so an explorer redraws at once); ``data`` is long-format (one row per draw and x), e.g. the
    per-block error of every seed. With one draw per curve it is a plain line, without a band."""
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    if ax is None:
        ax = Figure(figsize=STYLE["figure.figsize"]).subplots()
    df = pd.DataFrame(data)
    if hue:
        df = df.assign(**{hue: df[hue].astype(str)})
        hues = [str(v) for v in (hue_order if hue_order is not None else dict.fromkeys(df[hue]))]
    else:
        hues = [None]
    colors = dict(zip(hues, sns.color_palette(palette or "deep", len(hues))))
    for hv in hues:
        part = df[df[hue] == hv] if hue else df
        if not len(part):
            continue
        agg = part.groupby(x, sort=True)[y].agg(["mean", "min", "max", "size"])
        ax.plot(agg.index, agg["mean"], color=colors[hv], label=hv if hue else None)
        if agg["size"].max() > 1:
            ax.fill_between(agg.index, agg["min"], agg["max"], color=colors[hv], alpha=0.2, linewidth=0)
    ax.set(xlabel=x, ylabel=y)
    if log:
        _log_y(ax)
    if hue and legend:
        ax.legend(title=hue, fontsize=8, title_fontsize=8)
    return ax
