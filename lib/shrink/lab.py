"""JupyterLab for stepping through the notebooks: ``make lab`` runs ``python -m shrink.lab``.

What it sets up, all inside the project's ``.venv`` (nothing in ``~/.jupyter``):

* **``.md`` files open as notebooks on double click**: JupyterLab's app-level settings override
  ``<sys.prefix>/share/jupyter/lab/settings/overrides.json`` gets
  ``@jupyterlab/docmanager-extension:plugin`` -> ``defaultViewers`` = ``{"markdown": "Jupytext Notebook",
  "myst": "Jupytext Notebook"}`` (the setting jupytext's ``jupytext-config set-default-viewer`` writes into
  the *user* settings; other keys already in the file are kept).
* **the repository's ``jupytext.toml`` applies** although the server's root is ``notebooks/`` (jupytext
  looks for its configuration only inside the server's root): its ``formats`` and metadata filters are
  passed as ``--JupytextConfiguration.<key>=...`` options, so a notebook saved in Lab is written back as
  MyST markdown paired with an ``.ipynb`` (ignored by git), exactly as the ``jupytext`` CLI would.
* **the project's kernel**: ``make env`` registers ``python3`` with ``--sys-prefix``, so kernels run
  ``.venv/bin/python``; the server binds ``127.0.0.1`` only, and ``SHRINK_HEADLESS`` is unset for the kernels so
  :mod:`shrink.explore` shows live widgets instead of the static figures that papermill and the book get.

``tests/lab/test_lab.py`` starts the same command on a free port with a token and runs the tour's first
cells at ``tiny`` scale through the server's REST and websocket API.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path

from . import env
from .errors import ShrinkError

#: JupyterLab's document-manager setting that makes jupytext's notebook view the default for ``.md``.
DEFAULT_VIEWERS = {"markdown": "Jupytext Notebook", "myst": "Jupytext Notebook"}
_DOCMANAGER = "@jupyterlab/docmanager-extension:plugin"
#: jupytext.toml keys forwarded to the server (JupytextConfiguration traits).
_JUPYTEXT_KEYS = ("formats", "notebook_metadata_filter", "cell_metadata_filter")


def settings_overrides_path(prefix: str | Path = sys.prefix) -> Path:
    """``<prefix>/share/jupyter/lab/settings/overrides.json``: JupyterLab's app-level settings defaults."""
    return Path(prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.json"


def configure(prefix: str | Path = sys.prefix) -> Path:
    """Make jupytext's notebook view the default viewer for ``.md`` files in this environment's JupyterLab.

    Merges :data:`DEFAULT_VIEWERS` into ``overrides.json`` (other settings are kept); idempotent. Returns the
    file's path. A file that is not valid JSON raises :class:`ShrinkError` naming it.
    """
    path = settings_overrides_path(prefix)
    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text() or "{}")
        except json.JSONDecodeError as exc:
            raise ShrinkError(f"{path} is not valid JSON ({exc}); fix or delete it and rerun `make lab`.") from exc
    section = data.setdefault(_DOCMANAGER, {})
    section["defaultViewers"] = {**section.get("defaultViewers", {}), **DEFAULT_VIEWERS}
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def jupytext_options(root: Path | None = None) -> list[str]:
    """``--JupytextConfiguration.<key>=<value>`` for the keys of the repository's ``jupytext.toml``."""
    root = root or env.repo_root()
    cfg_path = (root / "jupytext.toml") if root else None
    if cfg_path is None or not cfg_path.exists():
        return []
    cfg = tomllib.loads(cfg_path.read_text())
    return [f"--JupytextConfiguration.{k}={cfg[k]}" for k in _JUPYTEXT_KEYS if k in cfg]


def command(*, port: int = 8888, token: str | None = None, notebook_dir: str | Path | None = None,
            browser: bool = True, root: Path | None = None) -> list[str]:
    """The ``jupyter lab`` argv: loopback only, root ``notebooks/``, the repository's jupytext settings.

    ``token=None`` keeps JupyterLab's own random token (printed in the log with the URL to open).
    """
    root = root or env.repo_root()
    if notebook_dir is None:
        if root is None:
            raise ShrinkError("no checkout found: pass notebook_dir= (the folder holding the .md notebooks).")
        notebook_dir = root / "notebooks"
    argv = [sys.executable, "-m", "jupyterlab", f"--notebook-dir={notebook_dir}", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0", *jupytext_options(root),
            # offline: no extension installs from PyPI, no update checks or news feed
            "--LabApp.extension_manager=readonly", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI run as root
        argv.append("--allow-root")
    if token is not None:
        argv.append(f"--IdentityProvider.token={token}")
    if not browser:
        argv.append("--no-browser")
    return argv


def kernel_env(base: dict | None = None) -> dict:
    """The server's environment: ``SHRINK_HEADLESS`` and ``TQDM_DISABLE`` (set by the Makefile for batch
    runs) removed, so kernels are interactive; ``SHRINK_DATA`` and the rest pass through."""
    out = dict(os.environ if base is None else base)
    for key in ("SHRINK_HEADLESS", "TQDM_DISABLE"):
        out.pop(key, None)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shrink.lab", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("LAB_PORT", 8888)))
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser")
    parser.add_argument("--configure-only", action="store_true", help="write the settings and exit")
    args = parser.parse_args(argv)
    path = configure()
    print(f"[shrink.lab] .md files open as notebooks (default viewer set in {path})")
    if args.configure_only:
        return
    cmd = command(port=args.port, browser=not args.no_browser)
    print("[shrink.lab] " + " ".join(cmd[1:]), flush=True)
    os.execve(cmd[0], cmd, kernel_env())


if __name__ == "__main__":
    main()
