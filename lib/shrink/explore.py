"""Interactive explorers over result rows, with a static fallback figure.

``explore(rows, dims, metric, curve=None, spread=None)`` builds an :class:`Explorer` over rows that are
already in memory (a notebook's cached records, or :func:`shrink.results.records`), so it responds
instantly. Displayed in an interactive kernel (JupyterLab through ``make lab``) it is an ipywidgets UI: one
dropdown per dimension (a value or ``(all)``), a dropdown per metric / curve when there are several, and an
``Output`` holding the figure, redrawn from the rows on every change. Headless (papermill, ``make``, pytest:
:func:`shrink.env.headless`) and in the book it is the **static fallback**: the same figure with every
dimension at ``(all)``, so the book and the papermill runs show what the widgets show before any click.

The figure, for dimensions ``dims = [d0, d1, *facets]`` (``spread`` removed from the list first):

* one **curve** panel per value of ``d0`` (and facet combination): the curve of each ``d1`` value, mean over the
  ``spread`` dimension (e.g. the seeds) with a [min, max] band (:func:`shrink.plotting.curve_plot`);
* one **metric** panel per facet combination: ``d0`` on the x axis, ``d1`` as colour, every ``spread`` value as a
  point and the mean with its [min, max] bar (:func:`shrink.plotting.spread_plot`). A metric whose values are
  :class:`shrink.eval.Spread` objects (or their JSON form ``{"values": [...], "kind": ...}``) also draws each
  value's own band (e.g. range perturbations) and uses its mean as the point.

Accessors (``dims``, ``metric``, ``curve``): a key, a dotted path into nested dicts (``"final.err_calib"``,
``"config.spec.pruner"``), a path through a list of dicts (``"blocks.err_calib"`` -> one value per block), or a
callable ``row -> value``; several as a dict ``{label: accessor}``. An unknown dimension, metric or path, a
``spread`` that is not a dimension, or rows that the dimensions do not tell apart raise
:class:`~shrink.errors.ShrinkError` subclasses naming the fix.

Example (notebook 01b)::

    rows = [{"pruner": p, "scheme": s, "seed": sd, **r} for (p, s, sd), r in runs.items()]
    explore.explore(rows, ["pruner", "scheme", "seed"], spread="seed", metric={"ppl": "ppl"},
                    curve={"calibration error": "blocks.err_calib"}, log=True)
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Mapping, Sequence

from . import env
from .errors import BadInputError, UnknownNameError

ALL = "(all)"
_MAX_COLS = 4


# --- accessors -------------------------------------------------------------------------------------------------

def _resolve(row: Any, path: str, *, what: str) -> Any:
    """Follow a dotted ``path`` through dicts (and lists of dicts, mapping the rest of the path over them)."""
    if isinstance(row, Mapping) and path in row:  # a flat key (may itself contain dots)
        return row[path]
    cur = row
    parts = path.split(".")
    for i, part in enumerate(parts):
        if isinstance(cur, Mapping):
            if part not in cur:
                keys = ", ".join(sorted(map(str, cur))[:25])
                raise UnknownNameError(f"{what} {path!r}: no key {part!r} in the row (keys there: {keys}). "
                                       "Pass an existing key, a dotted path or a callable row -> value.")
            cur = cur[part]
        elif isinstance(cur, (list, tuple)) and cur and all(isinstance(v, Mapping) for v in cur):
            rest = ".".join(parts[i:])
            return [_resolve(v, rest, what=what) for v in cur]
        else:
            raise UnknownNameError(f"{what} {path!r}: {'.'.join(parts[:i])!r} is a {type(cur).__name__}, not a "
                                   "dict; shorten the path or pass a callable row -> value.")
    return cur


def _accessors(spec, *, what: str) -> dict[str, Callable[[Any], Any]]:
    """``{label: accessor}`` from a key, a path, a callable, a list of those or a dict ``{label: accessor}``."""
    if spec is None:
        return {}
    if isinstance(spec, (str, bytes)) or callable(spec):
        spec = [spec]
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, Sequence):
        items = [(s if isinstance(s, str) else getattr(s, "__name__", f"{what} {i}"), s) for i, s in enumerate(spec)]
    else:
        raise BadInputError(f"{what}: expected a key, a dotted path, a callable or a dict {{label: accessor}}, "
                            f"got {type(spec).__name__}.")
    out = {}
    for label, acc in items:
        if isinstance(acc, str):
            out[str(label)] = (lambda path: lambda row: _resolve(row, path, what=what))(acc)
        elif callable(acc):
            out[str(label)] = acc
        else:
            raise BadInputError(f"{what} {label!r}: the accessor must be a key/path string or a callable, "
                                f"got {type(acc).__name__}.")
    if not out:
        raise BadInputError(f"{what}: give at least one accessor.")
    return out


def _number(v, *, what: str) -> tuple[float, float | None, float | None, str | None]:
    """(value, lo, hi, kind) from a number, a Spread(-like) object or its JSON form ``{"values": ...}``."""
    if isinstance(v, Mapping) and "values" in v:
        vals = [float(x) for x in v["values"]]
        if not vals:
            raise BadInputError(f"{what}: a spread with no values; record at least one value.")
        return sum(vals) / len(vals), min(vals), max(vals), v.get("kind")
    if hasattr(v, "values") and hasattr(v, "lo") and hasattr(v, "hi"):
        return float(v.mean), float(v.lo), float(v.hi), getattr(v, "kind", None)
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise BadInputError(f"{what}: expected a number or a shrink.eval.Spread, got {type(v).__name__} "
                            f"({str(v)[:60]!r}); point the accessor at a number.") from None
    return x, None, None, None


# --- the explorer ----------------------------------------------------------------------------------------------

class Explorer:
    """Rows tidied into DataFrames (:attr:`table`: one row per input row and metric; :attr:`curves`: one row per
    curve point), a :meth:`figure` for any selection, and a :meth:`widget`. Build it with :func:`explore`."""

    def __init__(self, rows, dims, metric=None, curve=None, *, spread: str | None = None, log: bool = False,
                 log_curve: bool | None = None, curve_x: str = "block", title: str | None = None,
                 interactive: bool | None = None):
        import pandas as pd

        if isinstance(rows, pd.DataFrame):
            rows = rows.to_dict("records")
        rows = list(rows)
        if not rows:
            raise BadInputError("explore: no rows to explore; pass the records or metrics dicts of a run.")
        self.dims = _accessors(dims, what="dimension")
        self.metrics = _accessors(metric, what="metric")
        self.curve_specs = _accessors(curve, what="curve")
        if not self.metrics and not self.curve_specs:
            raise BadInputError("explore: give a metric= and/or a curve= to plot.")
        if spread is not None and spread not in self.dims:
            raise UnknownNameError(f"explore: spread={spread!r} is not one of the dimensions {list(self.dims)}; "
                                   "add it to dims (it is aggregated into [min, max]) or drop spread=.")
        self.spread = spread
        self.log, self.log_curve = log, (log if log_curve is None else log_curve)
        self.curve_x, self.title = curve_x, title
        self.interactive = (not env.headless()) if interactive is None else interactive
        self.last_figure = None

        keys = []
        table, curves = [], []
        for i, row in enumerate(rows):
            d = {name: acc(row) for name, acc in self.dims.items()}
            for name, v in d.items():
                if isinstance(v, (list, dict)):
                    raise BadInputError(f"dimension {name!r} of row {i} is a {type(v).__name__}; a dimension "
                                        "must be a label (str/number); point it at a scalar.")
            keys.append(tuple(d.values()))
            for label, acc in self.metrics.items():
                val, lo, hi, kind = _number(acc(row), what=f"metric {label!r} of row {i}")
                table.append({**d, "metric": label, "value": val, "lo": lo, "hi": hi, "kind": kind})
            for label, acc in self.curve_specs.items():
                ys = acc(row)
                if not isinstance(ys, (list, tuple)) or not ys:
                    raise BadInputError(f"curve {label!r} of row {i}: expected a non-empty list of numbers, got "
                                        f"{type(ys).__name__}; point it at a per-block list (e.g. 'blocks.err_calib').")
                curves += [{**d, "curve": label, self.curve_x: k, "value": float(y)} for k, y in enumerate(ys)]
        dup = [k for k, n in _counts(keys).items() if n > 1]
        if dup:
            raise BadInputError(f"explore: {len(dup)} combinations of the dimensions {list(self.dims)} occur more "
                                f"than once (e.g. {dup[0]}); add the dimension that tells those rows apart.")
        self.table = pd.DataFrame(table)
        self.curves = pd.DataFrame(curves)
        self.levels = {name: list(dict.fromkeys(k[j] for k in keys)) for j, name in enumerate(self.dims)}

    # roles of the dimensions
    @property
    def _roles(self) -> tuple[str, str | None, list[str]]:
        names = [n for n in self.dims if n != self.spread]
        if not names:  # only the spread dimension: it is the x axis
            return self.spread, None, []
        return names[0], (names[1] if len(names) > 1 else None), names[2:]

    def selection_rows(self, frame, selection: Mapping[str, Any]):
        """``frame`` restricted to the selection ``{dim: value}`` (``(all)`` or absent = every value)."""
        for name, value in selection.items():
            if name not in self.dims:
                raise UnknownNameError(f"explore: unknown dimension {name!r}; dimensions: {list(self.dims)}.")
            if value is None or value == ALL:
                continue
            if value not in self.levels[name]:
                raise BadInputError(f"explore: {name}={value!r} does not occur; values: {self.levels[name]}.")
            frame = frame[frame[name] == value] if len(frame) else frame
        return frame

    def figure(self, metric: str | None = None, curve: str | None = None, **selection):
        """The figure for one selection (``dim=value`` keywords; every dimension at ``(all)`` by default):
        curve panels first, then metric panels; a ``matplotlib.figure.Figure`` that pyplot does not manage."""
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        from . import plotting

        metric = metric or (next(iter(self.metrics)) if self.metrics else None)
        curve = curve or (next(iter(self.curve_specs)) if self.curve_specs else None)
        for got, known, what in ((metric, self.metrics, "metric"), (curve, self.curve_specs, "curve")):
            if got is not None and got not in known:
                raise UnknownNameError(f"explore: unknown {what} {got!r}; {what}s: {list(known)}.")
        x, hue, facets = self._roles
        sel = lambda name: [v for v in self.levels[name] if selection.get(name, ALL) in (ALL, None, v)]  # noqa: E731
        facet_combos = list(itertools.product(*[sel(f) for f in facets])) or [()]
        panels = []
        if curve is not None:
            panels += [("curve", (xv, *fc)) for xv in sel(x) for fc in facet_combos]
        if metric is not None:
            panels += [("metric", fc) for fc in facet_combos]
        ncols = min(len(panels), _MAX_COLS)
        nrows = math.ceil(len(panels) / ncols)
        n_slots = len(sel(x)) * (len(hue_order) if (hue_order := sel(hue) if hue else None) else 1)
        width = max(3.6, 0.35 * n_slots, 0.6 * len(sel(x))) if curve is None else 3.6  # metric-only: room for every point
        fig = Figure(figsize=(width * ncols, 3.1 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        curves = self.selection_rows(self.curves[self.curves["curve"] == curve], selection) if curve else None
        table = self.selection_rows(self.table[self.table["metric"] == metric], selection) if metric else None
        for k, (ax, (kind, key)) in enumerate(zip(axes, panels)):
            if kind == "curve":
                xv, fc = key[0], key[1:]
                part = curves[(curves[x] == xv)]
                for f, v in zip(facets, fc):
                    part = part[part[f] == v]
                plotting.curve_plot(part, x=self.curve_x, y="value", hue=hue, hue_order=hue_order, log=self.log_curve,
                                    ax=ax, legend=(k == 0))
                ax.set(title=", ".join(f"{v}" for v in (xv, *fc)), ylabel=curve if k % ncols == 0 else "")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            else:
                part = table
                for f, v in zip(facets, key):
                    part = part[part[f] == v]
                band = part["lo"].notna().any()
                plotting.spread_plot(part, x=x, y="value", hue=hue, order=sel(x), hue_order=hue_order,
                                     lo="lo" if band else None, hi="hi" if band else None, log=self.log, ax=ax,
                                     legend=(curve is None and k == 0))
                kinds = sorted({str(s) for s in part["kind"].dropna()})
                note = f"points: {self.spread}s" if self.spread else ""
                if band:
                    note += ("; " if note else "") + f"bars at points: {', '.join(kinds) or 'spread'} [min, max]"
                ax.set(ylabel=metric, title=", ".join(f"{f}={v}" for f, v in zip(facets, key)) or metric)
                if note:
                    ax.set_xlabel(f"{x}\n({note})", fontsize=8)
                if sum(len(str(v)) for v in sel(x)) * 0.075 > width * 0.8:  # labels would overlap: slant them
                    ax.tick_params(axis="x", labelrotation=30)
                    for label in ax.get_xticklabels():
                        label.set_horizontalalignment("right")
                if hue and ax.get_legend() is not None:
                    ax.legend(title=hue, fontsize=7, title_fontsize=7, loc="best")
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        if self.title:
            fig.suptitle(self.title)
        self.last_figure = fig
        return fig

    # --- interactive -------------------------------------------------------------------------------------------

    def widget(self):
        """The ipywidgets UI: one dropdown per dimension, one per metric/curve when there are several, and an
        ``Output`` with the figure; every change redraws from the in-memory rows."""
        import ipywidgets as W
        from IPython.display import display

        controls = {name: W.Dropdown(options=[ALL, *levels], value=ALL, description=name,
                                     layout=W.Layout(width="auto"), style={"description_width": "initial"})
                    for name, levels in self.levels.items()}
        if len(self.metrics) > 1:
            controls["metric"] = W.Dropdown(options=list(self.metrics), description="metric")
        if len(self.curve_specs) > 1:
            controls["curve"] = W.Dropdown(options=list(self.curve_specs), description="curve")
        out = W.Output()

        def redraw(_=None):
            values = {k: c.value for k, c in controls.items()}
            fig = self.figure(metric=values.pop("metric", None), curve=values.pop("curve", None), **values)
            with out:
                out.clear_output(wait=True)
                display(fig)

        for c in controls.values():
            c.observe(redraw, names="value")
        redraw()
        box = W.VBox([W.HBox(list(controls.values()), layout=W.Layout(flex_flow="row wrap")), out])
        box.controls, box.output = controls, out
        return box

    def _ipython_display_(self):
        from IPython.display import display

        if self.interactive:
            display(self.widget())
        else:
            display(self.figure())


def _counts(keys):
    out: dict = {}
    for k in keys:
        out[k] = out.get(k, 0) + 1
    return out


def explore(rows, dims, metric=None, curve=None, *, spread: str | None = None, log: bool = False,
            log_curve: bool | None = None, curve_x: str = "block", title: str | None = None,
            interactive: bool | None = None) -> Explorer:
    """An explorer over ``rows`` (see the module docstring); display it (last expression of a cell).

    Args:
        rows: list of dicts (metrics dicts, full result records, flat rows) or a DataFrame.
        dims: the dimensions, in role order ``[x, colour, *facets]``: accessors (key / dotted path / callable)
            or ``{label: accessor}``; together they must identify each row.
        metric: one or several scalar metrics (number or Spread per row); the first is shown first.
        curve: one or several per-row curves (a list of numbers, e.g. ``"blocks.err_calib"``).
        spread: the dimension whose values are repeated draws (seeds): shown as points with mean and [min, max],
            and as the band around the mean curve.
        log, log_curve: log-scaled metric / curve axes (``log_curve`` defaults to ``log``).
        interactive: ``True`` widgets, ``False`` static figure; default: widgets unless headless.
    """
    return Explorer(rows, dims, metric, curve, spread=spread, log=log, log_curve=log_curve, curve_x=curve_x,
                    title=title, interactive=interactive)
