"""Count the catalogue's outcome classes on a checkout (issue 10's before/after numbers).

    SHRINK_DATA=... SHRINK_THREADS=1 .venv/bin/python tests/faults/census.py [--json out.json] [--skip-slow]
    PYTHONPATH=../shrink-before/lib ... tests/faults/census.py      # the code before issue 10 (git worktree)

Prints one line per row (id, layer, class, detail) and the count per class.
"""

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--skip-slow", action="store_true")
    ap.add_argument("-k", default="")
    args = ap.parse_args()
    import pytest
    import torch

    torch.set_num_threads(1)
    from catalogue import ROWS
    from harness import CLASSES, Outcome, observe
    import shrink

    print(f"# shrink from {Path(shrink.__file__).parent}", flush=True)
    rows, counts = [], collections.Counter()
    for row in ROWS:
        if (args.skip_slow and row.slow) or args.k not in row.id:
            continue
        with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
            mp.setenv("SHRINK_CACHE", str(Path(d) / "cache"))
            mp.setenv("SHRINK_RESULTS", str(Path(d) / "results"))
            ctx = SimpleNamespace(tmp=Path(d), mp=mp, expect_interrupt=False)
            try:
                out = observe(row, ctx)
            except BaseException as exc:  # noqa: BLE001 - a row that crashes the harness itself
                out = Outcome("traceback", f"harness: {type(exc).__name__}: {exc}")
        counts[out.cls] += 1
        rows.append({"id": row.id, "layer": row.layer, "class": out.cls, "detail": out.detail[:300]})
        print(f"{row.id:45s} {row.layer:8s} {out.cls:10s} {out.detail[:150]!r}", flush=True)
    print("\n# counts:", {c: counts[c] for c in CLASSES}, "total", sum(counts.values()))
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": {c: counts[c] for c in CLASSES}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
