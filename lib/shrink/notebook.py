"""The one setup call at the top of every notebook.

``shrink.notebook.setup(seed=seed, scale=scale)`` seeds Python/NumPy/torch, applies the house plot style,
turns progress bars off when headless (papermill, Make, pytest), sets torch's thread count from
``SHRINK_THREADS`` if given, and prints a banner with versions, device and scale.

Introduced in: notebooks/00-start/00-tour.md
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from . import env, plotting
from .errors import NotExecutedError, env_int
from .scales import check_scale


def seed_everything(seed: int) -> None:
    """Seed ``random``, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def data_status() -> str:
    """``$SHRINK_DATA`` for the banner without the machine's path (published notebooks must not carry one):
    ``"$SHRINK_DATA (ok)"`` when it holds ``MANIFEST.md``, ``"$SHRINK_DATA (no MANIFEST.md)"``, or
    ``"(unset)"``."""
    path = os.environ.get("SHRINK_DATA")
    if not path:
        return "(unset)"
    ok = os.path.isfile(os.path.join(os.path.expanduser(path), "MANIFEST.md"))
    return "$SHRINK_DATA (ok)" if ok else "$SHRINK_DATA (no MANIFEST.md)"


def setup(seed: int = 0, scale: str = "tiny", quiet: bool = False) -> dict:
    """Prepare a notebook run; returns the banner as a dict (also printed unless ``quiet``).

    Args:
        seed: global seed for this run.
        scale: ``tiny`` | ``cpu`` | ``paper`` (validated).
    """
    check_scale(scale)
    seed_everything(seed)
    plotting.use_style()
    if env.headless():  # no progress bars in papermill/Make/pytest logs
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        import transformers

        transformers.utils.logging.disable_progress_bar()
    threads = env_int("SHRINK_THREADS", minimum=1)  # EnvError for SHRINK_THREADS=abc / 0
    if threads:
        torch.set_num_threads(threads)
    if scale == "tiny":
        torch.use_deterministic_algorithms(True, warn_only=True)
    banner = {"scale": scale, "seed": seed, "device": env.device_name(), "online": env.online(),
              "data": data_status(), **env.versions()}
    if not quiet:
        print(" | ".join(f"{k}={v}" for k, v in banner.items()))
    return banner


# --------------------------------------------------------------------------------------------------
# The one "is this executed notebook finished?" check (shrink run, make book and the contract test)
# --------------------------------------------------------------------------------------------------
#: a heading that opens the sanity-check cells: "## Sanity checks" (the skeleton), or one saying "(asserted)"
SANITY_HEADING = re.compile(r"^#{1,3}\s+(sanity|.*\(asserted\))", re.I | re.M)


def _heading_level(cell: dict) -> int | None:
    """Level of the first heading of a markdown cell (``## X`` -> 2), None if it has none."""
    m = re.search(r"^(#{1,6})\s", "".join(cell.get("source", "")), re.M)
    return len(m.group(1)) if m else None


def sanity_cells(cells: list[dict]) -> list[int]:
    """Indices of the sanity-check code cells: those tagged ``sanity`` and those under a markdown heading
    ``## Sanity checks`` (or a heading ending in ``(asserted)``), until the next heading of the same or a
    higher level."""
    out, level = [], None
    for i, c in enumerate(cells):
        if c["cell_type"] == "markdown":
            src, lv = "".join(c.get("source", "")), _heading_level(c)
            if SANITY_HEADING.search(src):
                level = lv
            elif level is not None and lv is not None and lv <= level:
                level = None
        elif c["cell_type"] == "code":
            if level is not None or "sanity" in c.get("metadata", {}).get("tags", []):
                out.append(i)
    return out


def check_executed(path: str | Path) -> dict:
    """Raise :class:`NotExecutedError` unless the executed notebook ``path`` is complete.

    Complete means: it parses as a notebook; every code cell has an ``execution_count`` (papermill leaves
    the cells after a failure or an interruption without one); no output is an error; and at least one
    sanity-check cell exists (see :func:`sanity_cells`) and ran. Returns ``{"cells", "code_cells",
    "sanity_cells"}``.
    """
    path = Path(path)
    fix = (f"Re-execute it: `shrink run notebooks/<chapter>/{path.stem}.md --scale <scale>` "
           f"(or `make notebooks`), or delete {path}.")
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
        cells = nb["cells"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise NotExecutedError(f"{path} is not a readable notebook ({type(exc).__name__}: {exc}). {fix}") from None
    code = [i for i, c in enumerate(cells) if c.get("cell_type") == "code"]
    not_run = [i for i in code if cells[i].get("execution_count") is None]
    errors = [i for i in code for o in cells[i].get("outputs", []) if o.get("output_type") == "error"]
    if errors:
        c = cells[errors[0]]
        err = next(o for o in c["outputs"] if o.get("output_type") == "error")
        raise NotExecutedError(f"{path}: code cell {errors[0]} raised {err.get('ename')}: "
                               f"{str(err.get('evalue'))[:300]}. {fix}")
    if not_run:
        raise NotExecutedError(f"{path}: {len(not_run)} of {len(code)} code cells never ran (first: cell "
                               f"{not_run[0]}); the run was interrupted or failed. {fix}")
    sanity = sanity_cells(cells)
    if not sanity:
        raise NotExecutedError(f"{path} has no sanity-check cell (a code cell under '## Sanity checks' or tagged "
                               "'sanity'); add one to the notebook source and re-execute.")
    return {"cells": len(cells), "code_cells": len(code), "sanity_cells": len(sanity)}
