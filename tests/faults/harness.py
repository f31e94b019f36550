"""The fault catalogue's harness: rows, outcome classes, and the classifier.

A row is one bad input or fault a new user could cause. Its ``action(ctx)`` performs it and returns an
:class:`Outcome` (or raises; :func:`observe` turns a raised exception into an outcome). Every row expects
class ``clear``; the catalogue test asserts it, and ``python tests/faults/census.py`` counts the classes
of any checkout (``PYTHONPATH=<worktree of 08ad5d4>/lib`` for the code before issue 10).

Outcome classes, most serious first:

``looks-done``  a half-run or failed result is left where Make / the book / the tests take it as finished
``silent``      no error: a wrong or empty result is returned (or exit 0) for an input that has no answer
``lost``        a result that had been computed is lost (deleted, overwritten by a partial one)
``traceback``   a raw exception (not a ``ShrinkError``), or on the CLI: stdout not JSON / not exit 2
``unclear``     a ``ShrinkError`` (JSON + exit 2 on the CLI) whose message does not name the problem or the fix
``clear``       a ``ShrinkError`` (JSON + exit 2) whose message names the problem and the fix
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("looks-done", "silent", "lost", "traceback", "unclear", "clear")
#: words a message uses when it tells the user what to do
#: (or, naming the valid values: "must be ...", "one of", "known ...:", "did you mean")
FIX_WORDS = re.compile(r"\b(use|set|pass|give|delete|remove|restore|rerun|re-run|re-execute|reload|load|run|"
                       r"point|install|reinstall|pick|choose|lower|raise|check|call|cast|clean|fix|add|unset|"
                       r"tokenize|recalibrate|copy|convert|report|build|flatten|rebuild|find|list|e\.g\.|"
                       r"must be|must lie|one of|known \w+:|registered:|splits:|scales:|did you mean)", re.I)


@dataclass
class Outcome:
    cls: str
    detail: str = ""


@dataclass
class Row:
    id: str
    layer: str          # cli | library | make | signals | disk
    action: Callable    # action(ctx) -> Outcome | None (None: returned normally = silent), may raise
    names: tuple = ()   # words the message must contain (the problem: a parameter, a file name ...)
    what: str = ""      # one line: the fault
    slow: bool = False  # needs a kernel / subprocess of several seconds
    tags: tuple = field(default_factory=tuple)


def classify_message(msg: str, names=()) -> str:
    low = msg.lower()
    words = re.sub(r"\S*/\S*", " ", msg)  # fix words inside paths ("build/executed/...") do not count
    if all(str(n).lower() in low for n in names) and FIX_WORDS.search(words):
        return "clear"
    return "unclear"


def classify_exception(exc: BaseException, names=()) -> Outcome:
    try:
        from shrink.errors import ShrinkError
    except ImportError:  # pragma: no cover
        ShrinkError = ()
    msg = str(exc)
    if isinstance(exc, ShrinkError):
        return Outcome(classify_message(msg, names), f"{type(exc).__name__}: {msg[:300]}")
    return Outcome("traceback", f"{type(exc).__name__}: {msg[:300]}")


def observe(row: Row, ctx) -> Outcome:
    """Run a row and classify what happened."""
    try:
        out = row.action(ctx)
    except SystemExit as exc:  # an in-process CLI call that exited
        return Outcome("traceback", f"SystemExit {exc.code} outside the CLI wrapper")
    except BaseException as exc:  # noqa: BLE001 - classify everything, KeyboardInterrupt included
        if isinstance(exc, KeyboardInterrupt) and not getattr(ctx, "expect_interrupt", False):
            raise
        return classify_exception(exc, row.names)
    if not isinstance(out, Outcome):
        return Outcome("silent", f"returned normally: {str(out)[:200]}")
    if out.cls == "clear-msg":  # an action that returns a message to classify (CLI JSON, make output)
        return Outcome(classify_message(out.detail, row.names), out.detail[:300])
    return out


# --------------------------------------------------------------------------------------------------
# CLI helpers
# --------------------------------------------------------------------------------------------------
def cli_outcome(rc: int, stdout: str, stderr: str = "") -> Outcome:
    """Classify a CLI run: JSON ``{"error", "message"}`` + exit 2 is a message to classify."""
    try:
        obj = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        return Outcome("traceback", f"rc={rc}, stdout is not JSON: {stdout[-200:]!r} {stderr[-300:]!r}")
    if rc == 0:
        return Outcome("silent", f"rc=0: {stdout[:200]}")
    if rc == 2 and isinstance(obj, dict) and "error" in obj and "message" in obj and obj["error"] != "internal":
        return Outcome("clear-msg", f"{obj['error']}: {obj['message']}")
    return Outcome("traceback", f"rc={rc}: {stdout[-200:]!r} {stderr[-300:]!r}")


def cli_inprocess(argv: list[str], env: dict | None = None) -> Outcome:
    """``shrink.cli.main(argv)`` in this process (fast), with ``env`` set temporarily."""
    from shrink import cli

    buf_out, buf_err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update({k: v for k, v in (env or {}).items() if v is not None})
    for k, v in (env or {}).items():
        if v is None:
            os.environ.pop(k, None)
    rc = 0
    try:
        with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
            try:
                cli.main(argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception as exc:  # noqa: BLE001 - a raw traceback escaping main()
                return Outcome("traceback", f"{type(exc).__name__}: {str(exc)[:300]}")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return cli_outcome(rc, buf_out.getvalue(), buf_err.getvalue())


def cli_subprocess(argv: list[str], env: dict | None = None, cwd=None, timeout=300) -> Outcome:
    e = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    p = subprocess.run([sys.executable, "-m", "shrink.cli", *argv], capture_output=True, text=True, env=e,
                       cwd=cwd or ROOT, timeout=timeout)
    return cli_outcome(p.returncode, p.stdout, p.stderr)


# --------------------------------------------------------------------------------------------------
# A tiny MyST notebook for shrink run / make rows
# --------------------------------------------------------------------------------------------------
HEADER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---
"""


def tiny_notebook(path: Path, body: str = "x = 1", sanity: str = "assert x == 1", *, heading=True) -> Path:
    """A notebook with a parameters cell, one body cell and (under ``## Sanity checks``) one assert cell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = HEADER + "\n# Fault notebook\n\n```{code-cell} ipython3\n:tags: [parameters]\nscale = \"cpu\"\n```\n\n"
    for cell in ([body] if isinstance(body, str) else body):  # a list: one code cell each
        text += f"```{{code-cell}} ipython3\n{cell}\n```\n\n"
    if heading:
        text += "## Sanity checks\n\n"
    text += f"```{{code-cell}} ipython3\n{sanity}\n```\n\n## Summary\n\nDone.\n"
    path.write_text(text)
    return path


def assert_clear(fn, *names) -> None:
    """Call ``fn``; it must raise a ShrinkError whose message is ``clear`` (names ``names`` and says the fix).

    The plain-test rows of the per-chapter fault files use this instead of a catalogue :class:`Row`."""
    import pytest

    from shrink.errors import ShrinkError

    with pytest.raises(ShrinkError) as info:
        fn()
    out = classify_exception(info.value, names)
    assert out.cls == "clear", out.detail
