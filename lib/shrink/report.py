"""Generate the book's "Results at a glance" page from the result records (JSON -> Markdown).

    python -m shrink.report --scale cpu --out build/book/results.md

Numbers quoted across pages come from ``results/<scale>/**.json``, never copy-pasted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import results


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


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render(scale: str, max_cols: int = 6) -> str:
    """Markdown with one table per chapter of the scalar metrics of every record."""
    lines = [f"# Results at a glance ({scale} scale)", "",
             f"Generated from `results/{scale}/` by `python -m shrink.report`. Each row is one result record "
             "(config hash `key`, git SHA and device are in the JSON file).", ""]
    recs = results.records(scale)
    if not recs:
        lines += ["No result records yet at this scale: run `make run` (cpu) or the notebooks.", ""]
        return "\n".join(lines)
    by_chapter: dict[str, list[dict]] = {}
    for r in recs:
        by_chapter.setdefault(r["chapter"], []).append(r)
    for chapter, rs in sorted(by_chapter.items()):
        lines += [f"## {chapter}", "", "| record | key | metrics | device | git |", "|---|---|---|---|---|"]
        for r in rs:
            m = _scalar_metrics(r["metrics"])
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in list(m.items())[:max_cols])
            more = f" (+{len(m) - max_cols} more)" if len(m) > max_cols else ""
            sha = (r.get("git_sha") or "?")[:9]
            lines.append(f"| {r['name']} | `{r['key']}` | {shown}{more} | {r.get('device', '?')} | `{sha}` |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scale", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(render(a.scale) + "\n")


if __name__ == "__main__":
    main()
