"""Where things live: environment variables, cache folders, versions, device.

Environment variables (all optional except ``SHRINK_DATA`` for offline corpora):

``SHRINK_DATA``
    the offline data folder (``../shared/data`` next to the checkout; see its ``MANIFEST.md``).
``SHRINK_ONLINE``
    ``1`` allows Hub models and ``datasets`` downloads. Default: offline; nothing touches the network.
``SHRINK_CACHE``
    cache folder for converted models and tensors (default ``~/.cache/shrink``).
``SHRINK_RESULTS``
    folder of result records (default ``results/`` at the repository root, else ``./results``).
``SHRINK_HEADLESS``
    set by the Makefile and papermill runs: progress bars off, no interactive extras.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path

import torch


def online() -> bool:
    """True when ``SHRINK_ONLINE=1``: Hub models and ``datasets`` downloads are allowed."""
    return os.environ.get("SHRINK_ONLINE", "0").strip().lower() in ("1", "true", "yes")


def headless() -> bool:
    """True in papermill/Make runs (``SHRINK_HEADLESS=1``) and under pytest."""
    return os.environ.get("SHRINK_HEADLESS", "0") == "1" or "PYTEST_CURRENT_TEST" in os.environ


def cache_dir(*parts: str) -> Path:
    """The user cache folder ``$SHRINK_CACHE`` (default ``~/.cache/shrink``) joined with ``parts``."""
    root = Path(os.environ.get("SHRINK_CACHE", Path.home() / ".cache" / "shrink")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def repo_root() -> Path | None:
    """The checkout this package was installed from (editable install), if any."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "lib" / "shrink").is_dir():
            return parent
    return None


def git_sha() -> str | None:
    """The checkout's HEAD commit, with ``+dirty`` when tracked files changed; None outside git."""
    root = repo_root()
    if root is None:
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) or None


def code_hash(packages: tuple[str, ...] | None = None) -> str:
    """sha256 (first 12 hex) of the ``shrink`` source a result depends on (paths + contents).

    The core (every top-level module of ``shrink`` and the ``ops`` package) always counts; ``packages``
    names the chapter subpackages to add (e.g. ``("pruning",)``); ``None`` means every subpackage.
    Stored in every result record; :func:`shrink.results.cached` recomputes a record made by other code.
    """
    root = Path(__file__).resolve().parent
    files = [p for p in root.rglob("*.py") if p.parent == root or p.relative_to(root).parts[0] == "ops"
             or packages is None or p.relative_to(root).parts[0] in packages]
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("shrink", "torch", "transformers", "gguf", "datasets", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def device_name() -> str:
    """A short description of the compute device, e.g. ``cpu (2 threads)`` or the GPU's name."""
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"
