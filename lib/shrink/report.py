"""Tables, paper numbers and glued measurements for the notebooks, and the book's results page.

Three things every notebook uses (the shared API of issue 9):

* :func:`table` — a result table as a real HTML table (a pandas ``Styler`` inside a horizontally scrollable
  container), numbers rounded to ``digits`` significant digits, :class:`shrink.eval.Spread` shown as
  ``mean ± std [min, max], n=... kind``.
* :func:`paper` / :func:`paper_vs_ours` — the papers' numbers live in one YAML file per chapter,
  ``lib/shrink/paper_numbers/<chapter>.yaml`` (entries ``id: {value, ref, model, note}``); the "paper vs
  ours" section of a notebook is *generated* from those ids and from measured values, never hand-typed.
* :func:`glue` — a measured number quoted in prose: ``report.glue("tour_ppl", dense["ppl"], ".2f")`` in a
  code cell (it returns ``None``: nothing is displayed), ``{glue:text}`tour_ppl``` in the markdown. MyST-NB reads the glued value from the executed
  notebook's outputs, so it renders with ``execute_notebooks: "off"`` (papermill executes, the book only
  renders).

The results page::

    python -m shrink.report --scale cpu --out build/book/results.md

renders every record of ``results/<scale>/`` (metrics, device, kernel set, whether the record was made by
other code than the current checkout's).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import math
import numbers
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from . import results
from .errors import ShrinkError


class ReportError(ShrinkError):
    """Bad input to a table, an unknown paper-number id, or a malformed paper-numbers file."""


# --------------------------------------------------------------------------------------------------------------
# Number formatting
# --------------------------------------------------------------------------------------------------------------

def _is_spread(v: Any) -> bool:
    return hasattr(v, "values") and hasattr(v, "fmt") and hasattr(v, "std") and hasattr(v, "kind")


def fmt_number(v: Any, digits: int = 4) -> str:
    """A number for a table or prose: ``digits`` significant digits, no scientific notation between 1e-3
    and 1e15, integers in full (thousands separated by a thin space when >= 10 000); NaN -> ``"—"``.

    >>> fmt_number(19.13382), fmt_number(0.000012345), fmt_number(1234567.8), fmt_number(3)
    ('19.13', '1.234e-05', '1234568', '3')
    """
    if _is_spread(v):
        return fmt_spread(v, digits)
    if isinstance(v, bool) or v is None:
        return "—" if v is None else str(v)
    if isinstance(v, numbers.Integral):
        return f"{int(v):,}".replace(",", "\u2009") if abs(int(v)) >= 10_000 else str(int(v))
    if isinstance(v, numbers.Real):
        x = float(v)
        if math.isnan(x):
            return "—"
        if math.isinf(x):
            return "∞" if x > 0 else "−∞"
        if x == 0:
            return "0"
        mag = math.floor(math.log10(abs(x)))
        if mag < -3 or mag >= 15:
            return f"{x:.{max(digits - 1, 0)}e}"
        decimals = max(digits - 1 - mag, 0)
        return f"{x:.{decimals}f}"
    return str(v)


def _spread_decimals(s: Any, digits: int) -> int:
    """Decimals that show the std with one significant digit (two when it starts with 1 or 2); a
    single measurement shows ``digits`` significant digits."""
    if s.std > 0:  # two significant digits when the std's leading digit is 1 or 2, else one
        mag = math.floor(math.log10(s.std))
        lead = int(s.std / 10 ** mag)
        d = (1 if lead < 3 else 0) - mag
    else:
        d = digits - 1 - math.floor(math.log10(abs(s.mean) or 1.0))
    return int(min(max(d, 0), 8))


def fmt_spread(s: Any, digits: int = 4) -> str:
    """``Spread.fmt`` with decimals chosen from the spread (:func:`_spread_decimals`)."""
    return s.fmt(_spread_decimals(s, digits))


# --------------------------------------------------------------------------------------------------------------
# 1. Tables
# --------------------------------------------------------------------------------------------------------------

_TABLE_CSS = ("border-collapse:collapse;font-size:0.9em;font-variant-numeric:tabular-nums;"
              "margin:0.5em 0;")


class Table:
    """A result table: displays as HTML (Jupyter, MyST-NB, the book) and as aligned text in a terminal.

    Attributes:
        frame: the formatted ``pandas.DataFrame`` (strings, as shown).
        data: the raw ``pandas.DataFrame`` (numbers as given; row labels, if any, as the first column).
        styler: the ``pandas.io.formats.style.Styler`` that renders the HTML.
    """

    def __init__(self, data, frame, styler, caption):
        self.data, self.frame, self.styler, self.caption = data, frame, styler, caption

    def to_html(self) -> str:
        """The table inside ``<div class="shrink-table" style="overflow-x:auto">``: a wide table scrolls
        instead of being clipped by the page."""
        return ('<div class="shrink-table" style="overflow-x:auto;max-width:100%">'
                + self.styler.to_html() + "</div>")

    def _repr_html_(self) -> str:
        return self.to_html()

    def to_markdown(self) -> str:
        """A pipe table of the formatted cells (for generated Markdown pages)."""
        cols = [str(c) for c in self.frame.columns]
        lines = ["| " + " | ".join(_md_cell(c) for c in cols) + " |", "|" + "---|" * len(cols)]
        for _, row in self.frame.iterrows():
            lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
        return "\n".join(lines)

    def __repr__(self) -> str:
        text = self.frame.to_string(index=False)
        return (f"{self.caption}\n{text}" if self.caption else text)


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _frame(data, index):
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        df = data.copy()
    elif isinstance(data, dict):
        if not data:
            raise ReportError("table() got an empty dict; pass at least one row ({row_label: {column: value}}).")
        bad = [k for k, v in data.items() if not isinstance(v, dict)]
        if bad:
            raise ReportError(f"table() got a dict whose values are not dicts (rows {bad[:3]}): pass a dict of "
                              "rows {row_label: {column: value}}, a list of dicts, or a DataFrame.")
        df = pd.DataFrame.from_dict(data, orient="index")
        df.index.name = index if isinstance(index, str) else None
        return df, True
    elif isinstance(data, (list, tuple)):
        if not data:
            raise ReportError("table() got an empty list; pass at least one row (a dict of column -> value).")
        bad = [i for i, r in enumerate(data) if not isinstance(r, dict)]
        if bad:
            raise ReportError(f"table() got a list whose items {bad[:3]} are not dicts: pass one dict per row.")
        df = pd.DataFrame(list(data))
    else:
        raise ReportError(f"table() cannot show a {type(data).__name__}: pass a list of dicts, a dict of dicts "
                          "(rows) or a pandas DataFrame.")
    if index is None:
        show = not isinstance(df.index, pd.RangeIndex)
        return df, show
    if index not in df.columns:
        raise ReportError(f"table(index={index!r}): no such column; columns are {list(df.columns)}.")
    return df.set_index(index), True


def table(data, *, caption: str | None = None, digits: int = 4, index: str | None = None) -> Table:
    """A result table that renders as a real HTML table (pandas ``Styler``), numbers rounded.

    Args:
        data: a list of dicts (one per row), a dict of dicts (``{row_label: {column: value}}``) or a
            ``pandas.DataFrame``. Cells may be numbers, strings, ``None`` or :class:`shrink.eval.Spread`.
        caption: shown above the table.
        digits: significant digits of floats (:func:`fmt_number`); a Spread shows its std with one or
            two significant digits (:func:`_spread_decimals`).
        index: a column to use as the row labels (list-of-dicts input); a dict of dicts uses its keys.

    Returns:
        a :class:`Table` (``_repr_html_`` for notebooks, ``to_markdown()`` for generated pages).
    """
    if not isinstance(digits, int) or isinstance(digits, bool) or not 1 <= digits <= 12:
        raise ReportError(f"table(digits={digits!r}): use an integer number of significant digits in 1..12.")
    df, show_index = _frame(data, index)
    if show_index:  # row labels become the first column (one header row, left-aligned text)
        label = df.index.name or ""
        if label in df.columns:
            raise ReportError(f"table(): the row-label name {label!r} is also a column; rename one of them.")
        df = df.reset_index(names=label)
    frame = df.map(lambda v: fmt_number(v, digits) if not isinstance(v, str) else v)
    styler = frame.style
    # a deterministic id (nbval compares the HTML of executed notebooks)
    uid = hashlib.sha256((repr(caption) + frame.to_json()).encode()).hexdigest()[:10]
    styler.set_uuid(uid)
    styler.set_table_attributes(f'class="shrink-result dataframe" style="{_TABLE_CSS}"')
    styler.set_table_styles([
        {"selector": "th, td", "props": [("padding", "0.25em 0.6em"), ("border-bottom", "1px solid #ddd")]},
        {"selector": "td", "props": [("text-align", "right")]},
        {"selector": "th", "props": [("text-align", "left")]},
        {"selector": "caption", "props": [("caption-side", "top"), ("text-align", "left"),
                                          ("font-weight", "bold")]},
    ])
    text_cols = [c for c in df.columns if df[c].map(lambda v: isinstance(v, str)).all()]
    if text_cols:  # text columns left-aligned
        styler.set_properties(subset=text_cols, **{"text-align": "left"})
    if caption:
        styler.set_caption(html.escape(caption))
    styler.hide(axis="index")
    return Table(df, frame, styler, caption)


# --------------------------------------------------------------------------------------------------------------
# 2. Paper numbers
# --------------------------------------------------------------------------------------------------------------

PAPER_KEYS_REQUIRED = ("value", "ref")
PAPER_KEYS = ("value", "ref", "model", "note", "paper", "unit")


def paper_numbers_dir() -> Path:
    """``lib/shrink/paper_numbers/`` (package data)."""
    return Path(str(resources.files("shrink").joinpath("paper_numbers")))


def paper_file(chapter: str) -> Path:
    return paper_numbers_dir() / f"{chapter}.yaml"


@lru_cache(maxsize=None)
def _load_paper(path_str: str, mtime: float) -> dict:
    import yaml

    path = Path(path_str)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ReportError(f"{path} is not valid YAML ({exc}); fix the file.") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ReportError(f"{path}: the top level must be a mapping id -> {{value, ref, ...}}; got "
                          f"{type(raw).__name__}.")
    out = {}
    for pid, entry in raw.items():
        if not isinstance(pid, str):
            raise ReportError(f"{path}: id {pid!r} is not a string; quote it.")
        if not isinstance(entry, dict):
            raise ReportError(f"{path}: entry {pid!r} must be a mapping with keys value and ref "
                              f"(optional: model, note, paper, unit); got {entry!r}.")
        missing = [k for k in PAPER_KEYS_REQUIRED if k not in entry]
        if missing:
            raise ReportError(f"{path}: entry {pid!r} lacks {missing}; every paper number needs its value and "
                              "the table/figure it comes from (ref: \"Table 3\").")
        extra = sorted(set(entry) - set(PAPER_KEYS))
        if extra:
            raise ReportError(f"{path}: entry {pid!r} has unknown keys {extra}; allowed: {list(PAPER_KEYS)}.")
        v = entry["value"]
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ReportError(f"{path}: entry {pid!r} value {v!r} must be a number or a string.")
        if not isinstance(entry["ref"], str) or not entry["ref"].strip():
            raise ReportError(f"{path}: entry {pid!r} ref must name the table or figure, e.g. \"Table 3\".")
        out[pid] = dict(entry)
    return out


def paper(chapter: str) -> dict:
    """The paper numbers of ``chapter`` (``lib/shrink/paper_numbers/<chapter>.yaml``): ``{id: {value, ref,
    model?, note?, paper?, unit?}}``. A missing or malformed file raises :class:`ReportError` naming it."""
    path = paper_file(chapter)
    if not path.exists():
        have = sorted(p.stem for p in paper_numbers_dir().glob("*.yaml"))
        raise ReportError(f"no paper numbers for chapter {chapter!r}: {path} does not exist (have: {have}). "
                          "Create it with entries  id: {value: ..., ref: \"Table N\", model: ..., note: ...}.")
    return _load_paper(str(path), path.stat().st_mtime)


def _paper_value(v) -> str:
    """A paper's number as the paper prints it (``5.47``, ``9250.33``, ``2622``): no re-rounding."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v) if isinstance(v, float) else str(v)


def _paper_cell(chapter: str, nums: dict, ids, digits: int) -> tuple[str, str]:
    if ids is None:
        return "—", "—"
    if isinstance(ids, str):
        ids = [ids]
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, str) for i in ids):
        raise ReportError(f"paper_vs_ours: 'paper' must be an id, a list of ids or None; got {ids!r}.")
    unknown = [i for i in ids if i not in nums]
    if unknown:
        raise ReportError(f"paper_vs_ours({chapter!r}): unknown paper-number ids {unknown}; add them to "
                          f"{paper_file(chapter)} or use one of {sorted(nums)}.")
    vals, refs = [], []
    for i in ids:
        e = nums[i]
        v = e["value"] if isinstance(e["value"], str) else _paper_value(e["value"])
        if e.get("unit"):
            v = f"{v} {e['unit']}"
        vals.append(v)
        ref = e["ref"] if not e.get("paper") else f"{e['paper']}, {e['ref']}"
        if e.get("model"):
            ref = f"{ref}: {e['model']}"
        refs.append(ref)
    uniq_refs = list(dict.fromkeys(refs))
    return " / ".join(vals), "; ".join(uniq_refs)


ROW_KEYS = ("quantity", "paper", "ours", "why")


def paper_vs_ours(chapter: str, rows: Iterable[dict], *, caption: str | None = "Paper vs ours",
                  digits: int = 4) -> Table:
    """The generated "paper vs ours" table of a notebook.

    Args:
        chapter: e.g. ``"00-start"``; paper numbers come from ``lib/shrink/paper_numbers/<chapter>.yaml``.
        rows: dicts ``{"quantity": str, "paper": id | [ids] | None, "ours": number | Spread | str,
            "why": str}``; several ids are shown as ``a / b`` with their references.
        digits: significant digits of numbers.

    Returns:
        a :class:`Table` with columns quantity | paper | paper's setting and reference | ours | why they differ.
    """
    nums = paper(chapter)
    out = []
    for k, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ReportError(f"paper_vs_ours: row {k} is a {type(row).__name__}; pass dicts with keys {ROW_KEYS}.")
        extra = sorted(set(row) - set(ROW_KEYS))
        missing = [key for key in ("quantity", "ours", "why") if key not in row]
        if extra or missing:
            raise ReportError(f"paper_vs_ours: row {k} ({row.get('quantity', '?')!r}) has unknown keys {extra} / "
                              f"lacks {missing}; rows have keys {ROW_KEYS} ('paper' may be None).")
        value, ref = _paper_cell(chapter, nums, row.get("paper"), digits)
        ours = row["ours"]
        ours = ours if isinstance(ours, str) else fmt_number(ours, digits)
        out.append({"quantity": row["quantity"], "paper": value, "paper's setting (reference)": ref,
                    "ours": ours, "why they differ": row["why"]})
    if not out:
        raise ReportError("paper_vs_ours got no rows; pass at least one {quantity, paper, ours, why}.")
    return table(out, caption=caption, digits=digits)


# --------------------------------------------------------------------------------------------------------------
# 3. Measured numbers in prose
# --------------------------------------------------------------------------------------------------------------

class _Text:
    """Displays as exactly ``text`` (``text/plain`` without the quotes a ``str`` repr adds)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def glue_text(value: Any, fmt: str | None = None) -> str:
    """The text :func:`glue` stores for ``value``: ``format(value, fmt)``; without ``fmt``, :func:`fmt_number`
    (4 significant digits) for numbers and ``Spread.fmt`` with decimals from the spread for a Spread (for
    a Spread, ``fmt`` is the number of decimals, e.g. ``"1"``)."""
    if _is_spread(value):
        return value.fmt(int(fmt)) if fmt else fmt_spread(value)
    if isinstance(value, str):
        return value if not fmt else format(value, fmt)
    if fmt:
        try:
            return format(value, fmt)
        except (ValueError, TypeError) as exc:
            raise ReportError(f"format spec {fmt!r} does not apply to {value!r} ({exc}); use a spec like '.2f', "
                              "'.1%' or ',d'.") from exc
    return fmt_number(value)


def glue(name: str, value: Any, fmt: str | None = None) -> None:
    """Store a measured value for the prose: ``{glue:text}`name``` in the markdown shows it.

    Args:
        name: the glue key (unique in the notebook; letters, digits, ``_`` and ``-``).
        value: a number, a :class:`shrink.eval.Spread` or a string.
        fmt: a format spec (``".2f"``, ``".1%"``, ``",d"``); see :func:`glue_text` for the default.

    Returns ``None`` on purpose: a glue call as the last line of a cell shows nothing (nbval does not honour
    a trailing ``;``). ``glue_text(value, fmt)`` gives the same text for printing or asserting.

    Wraps ``myst_nb.glue(name, ..., display=False)``: the value is kept in the cell's outputs
    (``application/papermill.record/text/plain``) and MyST-NB pastes it when rendering the book, also with
    ``execute_notebooks: "off"`` (the book renders papermill's executed notebooks).
    """
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ReportError(f"glue name {name!r}: use letters, digits, '_' and '-' only (it is referenced as "
                          "{glue:text}`name` in markdown).")
    try:
        text = glue_text(value, fmt)
    except ReportError as exc:
        raise ReportError(f"glue({name!r}): {exc}") from None
    try:
        from myst_nb import glue as nb_glue
    except ImportError as exc:  # pragma: no cover - myst-nb ships with the book extra
        raise ReportError("shrink.report.glue needs myst-nb: pip install -e '.[book]'.") from exc
    nb_glue(name, _Text(text), display=False)


# --------------------------------------------------------------------------------------------------------------
# The results page
# --------------------------------------------------------------------------------------------------------------

def _scalar_metrics(metrics: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            out[key] = v
        elif isinstance(v, dict) and len(v) <= 12:
            out.update(_scalar_metrics(v, key + "."))
    return out


def _kernels(r: dict) -> str:
    """The record's kernel set in words: ``"AVX2 (MKL AVX2, oneDNN AVX2), 1 thread"``; ``"not recorded"`` for
    records made before records stored it (``shrink.env.kernel_set``)."""
    k = r.get("kernels")
    if not isinstance(k, dict) or not k:
        return "not recorded"
    threads = k.get("threads")
    parts = [str(k.get("cpu_capability", "?"))]
    libs = [f"{name} {k[key]}" for name, key in (("MKL", "mkl_isa"), ("oneDNN", "dnnl_isa")) if k.get(key)]
    if libs:
        parts[0] += f" ({', '.join(libs)})"
    if k.get("env"):
        parts.append(", ".join(f"{a}={b}" for a, b in sorted(k["env"].items())))
    if threads:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    if str(k.get("device", "cpu")).startswith("cuda"):
        parts.insert(0, str(k["device"]))
    return ", ".join(parts)


def _machine(r: dict) -> str:
    """Device, torch build and kernel set of a record."""
    parts = [str(r.get("device", "?"))]
    torch_v = (r.get("versions") or {}).get("torch")
    if torch_v:
        parts.append(f"torch {torch_v}")
    parts.append(f"kernels: {_kernels(r)}")
    return ", ".join(parts)


def _n(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def render(scale: str, max_metrics: int = 4) -> str:
    """The results page (MyST Markdown): per chapter, the machines that made the records, the records made
    by other code than this checkout's, and one row per record with its first scalar metrics."""
    lines = [f"# Results at a glance ({scale} scale)", "",
             f"Generated from `results/{scale}/` by `python -m shrink.report`. Each row is one result record "
             "(config hash `key`; the full config, metrics, versions and git SHA are in the JSON file). "
             "*machine* is the device, torch build and kernel set (ATen CPU capability, MKL/oneDNN instruction set, "
             "threads) that computed the record; *code* says "
             "whether the record was made by the current chapter code (`current`) or by other code and reused "
             "(`other: <hash>`; `SHRINK_STALE=recompute` recomputes it).", ""]
    recs = results.records(scale)
    if not recs:
        lines += ["No result records yet at this scale: run `make run` (cpu) or the notebooks.", ""]
        return "\n".join(lines)
    by_chapter: dict[str, list[dict]] = {}
    for r in recs:
        by_chapter.setdefault(r["chapter"], []).append(r)
    for chapter, rs in sorted(by_chapter.items()):
        current = results.chapter_code_hash(chapter)
        other = [r for r in rs if r.get("code") != current]
        machines: dict[str, int] = {}
        for r in rs:
            machines[_machine(r)] = machines.get(_machine(r), 0) + 1
        lines += [f"## {chapter}", "",
                  f"{_n(len(rs), 'record')}; current code hash of this chapter `{current}`. Machines: "
                  + "; ".join(f"{m} ({_n(n, 'record')})" for m, n in machines.items()) + ".", ""]
        if other:
            by_code: dict[str, int] = {}
            for r in other:
                by_code[r.get("code") or "no code hash"] = by_code.get(r.get("code") or "no code hash", 0) + 1
            head = ("**All records were made by other code**" if len(other) == len(rs) else
                    f"**{_n(len(other), 'record')} made by other code**")
            lines += [head + " and reused: " + ", ".join(f"`{c}` ({_n(n, 'record')})" for c, n in by_code.items())
                      + (": " + ", ".join(f"`{r['name']}-{r['key']}`" for r in other) if len(other) <= 12 else
                         " (the *code* column says which)") + ".", ""]
        else:
            lines += ["Every record was made by the current code.", ""]
        rows = []
        for r in rs:
            m = _scalar_metrics(r["metrics"])
            shown = ", ".join(f"{k}={fmt_number(v)}" for k, v in list(m.items())[:max_metrics])
            more = f" (+{len(m) - max_metrics} more)" if len(m) > max_metrics else ""
            code = "current" if r.get("code") == current else f"other: {r.get('code') or '?'}"
            rows.append({"record": r["name"], "key": f"`{r['key']}`", "metrics": shown + more,
                         "machine": _machine(r), "code": code, "git": f"`{(r.get('git_sha') or '?')[:9]}`"})
        lines += [table(rows).to_markdown(), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Staging executed notebooks for the book
# --------------------------------------------------------------------------------------------------------------

#: Cell tags that the book never shows (papermill's injected cell: the run's scale is in the banner).
HIDDEN_TAGS = ("injected-parameters",)


def machine_paths() -> dict[str, str]:
    """Absolute paths of this machine that published pages must not carry -> what they become."""
    import os

    from . import env

    out = {}
    root = env.repo_root()
    if root is not None:
        out[str(root)] = "<repo>"
    for var in ("SHRINK_DATA", "SHRINK_CACHE", "SHRINK_RESULTS"):
        if os.environ.get(var):
            out[str(Path(os.environ[var]).expanduser().resolve())] = f"${var}"
            out[os.environ[var].rstrip("/")] = f"${var}"
    home = str(Path.home())
    if home not in ("/", ""):
        out[home] = "~"
    # longest first, so /work/main/.venv is rewritten as <repo>/.venv, not as a shorter prefix
    return dict(sorted(((k, v) for k, v in out.items() if len(k) > 1), key=lambda kv: -len(kv[0])))


def _scrub(obj, paths: dict[str, str]):
    if isinstance(obj, str):
        for k, v in paths.items():
            obj = obj.replace(k, v)
        return obj
    if isinstance(obj, list):
        return [_scrub(x, paths) for x in obj]
    if isinstance(obj, dict):
        return {k: _scrub(v, paths) for k, v in obj.items()}
    return obj


def stage_notebook(src: str | Path, dst: str | Path) -> dict:
    """Copy an executed notebook into the book: cells tagged ``injected-parameters`` get ``remove-cell``
    (MyST-NB drops them), and this machine's absolute paths (:func:`machine_paths`) are rewritten in outputs
    and metadata (``<repo>``, ``$SHRINK_DATA``, ``~``). Returns ``{"hidden": n, "scrubbed": n}``."""
    import json

    nb = json.loads(Path(src).read_text())
    hidden = 0
    for cell in nb.get("cells", []):
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if any(t in tags for t in HIDDEN_TAGS) and "remove-cell" not in tags:
            tags.append("remove-cell")
            hidden += 1
    before = json.dumps(nb)
    nb = _scrub(nb, machine_paths())
    text = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_text(text)
    return {"hidden": hidden, "scrubbed": int(json.dumps(nb) != before)}


def stage_notebooks(executed: str | Path, dst: str | Path) -> list[Path]:
    """Stage every finished ``<executed>/<chapter>/<nb>.ipynb`` (not ``*.failed.ipynb``, not hidden
    ``.*`` partial files) into ``<dst>/<chapter>/<nb>.ipynb``."""
    executed, dst = Path(executed), Path(dst)
    if not executed.is_dir():
        raise ReportError(f"{executed} does not exist: execute the notebooks first (make notebooks SCALE=...).")
    staged = []
    for nb in sorted(executed.rglob("*.ipynb")):
        if nb.name.endswith(".failed.ipynb") or nb.name.startswith("."):
            continue
        out = dst / nb.relative_to(executed)
        stage_notebook(nb, out)
        staged.append(out)
    return staged


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the book's results page from results/<scale>/ and stage the "
                                            "executed notebooks into the book folder.")
    p.add_argument("--scale", required=True)
    p.add_argument("--out", required=True, help="the results page, e.g. build/book/results.md")
    p.add_argument("--stage", nargs=2, metavar=("EXECUTED", "DST"),
                   help="also stage EXECUTED/<chapter>/*.ipynb into DST (hide injected parameters, no machine "
                        "paths)")
    a = p.parse_args(argv)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(_scrub(render(a.scale), machine_paths()) + "\n")
    if a.stage:
        staged = stage_notebooks(*a.stage)
        print(f"shrink.report: results page {a.out}; {len(staged)} notebooks staged into {a.stage[1]}")


if __name__ == "__main__":
    main()
