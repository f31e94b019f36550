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
