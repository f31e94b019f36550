"""Result records (JSON) and the ``cached`` helper.

A record is ``results/<scale>/<chapter>/<name>-<hash>.json`` holding::

    {"name", "scale", "chapter", "key": <sha256 of the config>, "config": {...}, "metrics": {...},
     "versions": {...}, "git_sha", "device", "created", "seconds"}

``cached(name, config, fn, scale=..., chapter=...)`` returns the stored metrics when a record with the same
config hash exists, else runs ``fn()`` and writes the record **atomically** (temporary file + rename), so an
interrupted ``make run`` resumes where it stopped and never leaves a half-written record. Tensors (pruned
weights, activation caches) go through ``cached_tensors`` into ``$SHRINK_CACHE``, not into ``results/``.

Every record stores ``code``, a hash of the ``shrink`` package's source. What happens to a record made by
other code depends on the scale (``stale_policy``): at ``tiny`` (cheap, never committed) it is recomputed;
at ``cpu`` and ``paper`` (committed, hours to recompute) it is **reused and announced** — the record keeps
its own ``code`` and ``git_sha``, and the book's results page lists such records. ``SHRINK_STALE=recompute``
recomputes them, ``SHRINK_STALE=reuse`` reuses them at every scale.
Set ``SHRINK_RECOMPUTE=1`` to ignore existing records (they are overwritten only when the new run finishes).

Introduced in: notebooks/00-start/00-tour.md
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import env
from .errors import CacheCorruptError
from .scales import SCALES

SCHEMA = 1
#: Chapter -> the subpackages its results depend on (besides the core); unknown chapters depend on all.
CHAPTER_PACKAGES = {"00-start": (), "01-weights": ("pruning",), "02-bits": ("quant",), "03-tokens": ("tokens",),
                    "04-data": ("selection",)}


def chapter_code_hash(chapter: str) -> str:
    """The code hash a record of ``chapter`` is compared against (core + the chapter's package)."""
    return env.code_hash(CHAPTER_PACKAGES.get(chapter))


def results_root() -> Path:
    """``$SHRINK_RESULTS``, else ``results/`` of the checkout, else ``./results``."""
    if os.environ.get("SHRINK_RESULTS"):
        return Path(os.environ["SHRINK_RESULTS"]).expanduser()
    root = env.repo_root()
    return (root / "results") if root is not None else Path("results")


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (torch.dtype, Path)):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a result record; convert it to numbers/strings")


def config_key(config: dict) -> str:
    """sha256 (first 16 hex) of the canonical JSON of ``config``."""
    blob = json.dumps(_jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def record_path(name: str, config: dict, *, scale: str, chapter: str) -> Path:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; scales: {', '.join(SCALES)}")
    return results_root() / scale / chapter / f"{name}-{config_key(config)}.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save(name: str, config: dict, metrics: dict, *, scale: str, chapter: str, seconds: float | None = None) -> Path:
    """Write a result record; returns its path."""
    path = record_path(name, config, scale=scale, chapter=chapter)
    record = {"schema": SCHEMA, "name": name, "scale": scale, "chapter": chapter, "key": config_key(config),
              "config": _jsonable(config), "metrics": _jsonable(metrics), "versions": env.versions(),
              "git_sha": env.git_sha(), "code": chapter_code_hash(chapter), "device": env.device_name(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": seconds}
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def load(path: str | Path) -> dict:
    """Read a record; a file that is not valid JSON raises :class:`CacheCorruptError` naming it."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        record["metrics"]  # noqa: B018 - must exist
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
        raise CacheCorruptError(f"result record {path} is corrupt ({exc}). Delete that one file and rerun; "
                                "other records are untouched.") from exc
    return record


def stale_policy(scale: str) -> str:
    """``"reuse"`` or ``"recompute"`` for a record made by other code: ``$SHRINK_STALE`` if set (the old
    ``SHRINK_REUSE_STALE=1`` means ``reuse``), else recompute at ``tiny`` and reuse (announced) elsewhere."""
    value = os.environ.get("SHRINK_STALE") or ("reuse" if os.environ.get("SHRINK_REUSE_STALE") == "1" else "")
    if value not in ("", "reuse", "recompute"):
        from .errors import ShrinkError

        raise ShrinkError(f"SHRINK_STALE={value!r}: use 'reuse' or 'recompute' (or leave it unset).")
    return value or ("recompute" if scale == "tiny" else "reuse")


def cached(name: str, config: dict, fn: Callable[[], dict], *, scale: str, chapter: str) -> dict:
    """Return the metrics of a stored run of ``fn`` with this ``config``, or run it and store them.

    Args:
        name: experiment name (file stem).
        config: everything that determines the result (model, data, seeds, hyperparameters).
        fn: computes the metrics dict (JSON-able values, tensors become lists).
        scale, chapter: where the record lives, ``results/<scale>/<chapter>/``.
    """
    path = record_path(name, config, scale=scale, chapter=chapter)
    if path.exists() and os.environ.get("SHRINK_RECOMPUTE") != "1":
        record = load(path)
        current = chapter_code_hash(chapter)
        if record.get("code") == current:
            return record["metrics"]
        if stale_policy(scale) == "reuse":
            print(f"[shrink.results] {path.name} was computed by other shrink code ({record.get('code')} != "
                  f"{current}): reused (SHRINK_STALE=recompute recomputes it).")
            return record["metrics"]
        print(f"[shrink.results] {path.name} was computed by other shrink code ({record.get('code')} != "
              f"{current}): recomputing.")
    t0 = time.perf_counter()
    metrics = fn()
    save(name, config, metrics, scale=scale, chapter=chapter, seconds=round(time.perf_counter() - t0, 3))
    return _jsonable(metrics)


def cached_tensors(name: str, config: dict, fn: Callable[[], Any]) -> Any:
    """Like :func:`cached` for torch objects (state dicts, activation tensors): stored with ``torch.save``
    under ``$SHRINK_CACHE/tensors/`` (atomic write); not committed."""
    path = env.cache_dir("tensors") / f"{name}-{config_key(config)}.pt"
    if path.exists() and os.environ.get("SHRINK_RECOMPUTE") != "1":
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise CacheCorruptError(f"tensor cache {path} is corrupt ({exc}); delete that file and rerun.") from exc
    value = fn()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(value, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return value


def records(scale: str, chapter: str | None = None) -> list[dict]:
    """All records of a scale (and chapter), sorted by path."""
    base = results_root() / scale
    if chapter:
        base = base / chapter
    return [load(p) for p in sorted(base.rglob("*.json"))] if base.exists() else []
