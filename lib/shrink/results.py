"""Result records (JSON), small committed tensors (safetensors) and the ``cached`` helpers.

A record is ``results/<scale>/<chapter>/<name>-<hash>.json`` holding::

    {"name", "scale", "chapter", "key": <sha256 of the config>, "config": {...}, "metrics": {...},
     "versions": {...}, "git_sha", "code", "kernels": {...}, "device", "created", "seconds"}

``cached(name, config, fn, scale=..., chapter=...)`` returns the stored metrics when a record with the same
config hash exists, else runs ``fn()`` and writes the record **atomically** (temporary file + rename), so an
interrupted ``make run`` resumes where it stopped and never leaves a half-written record. Cache keys come from
configs only, never from computed floats.

Small tensors a committed result depends on (a tuned prefix, a mask summary, selected indices: at most
:data:`TENSOR_LIMIT` bytes) go through ``cached_tensors(name, config, fn, scale=..., chapter=...)`` into
``results/<scale>/<chapter>/tensors/<name>-<hash>.safetensors``, with a JSON record beside it (config, the
sha256 of the file's bytes, the non-tensor parts such as a training history, versions, kernels); the hash is
checked on every load. Large tensors (pruned weights, activation caches) go through ``cached_tensors(name,
config, fn)`` without a scale into ``$SHRINK_CACHE/tensors/``, which is not committed.

**Records made elsewhere.** Every record stores ``code``, a hash of the ``shrink`` source of its chapter, and
``kernels`` (:func:`shrink.env.kernel_set`: ATen CPU capability, MKL/oneDNN ISA, threads). A record made by
other code is, depending on the scale (``stale_policy``), recomputed at ``tiny`` (cheap, never committed) and
**reused and announced** at ``cpu`` and ``paper`` (committed, hours to recompute); ``SHRINK_STALE=recompute``
recomputes them, ``SHRINK_STALE=reuse`` reuses them at every scale. A record made under another kernel set
(e.g. AVX512 kernels where it was made with AVX2) is reused and announced. Announcements are one line each,
once per record and process, starting with ``[shrink.results]``.

**Settings.** ``SHRINK_RECOMPUTE=1`` ignores existing records (they are overwritten only when the new run
finishes). ``SHRINK_RESULTS_MODE=load`` never computes: a missing record (or tensor) raises
:class:`~shrink.errors.RecordMissingError` — ``make check-records`` runs the cpu notebooks that way.

**Failures never lose a computed result.** The folder is checked for writability *before* ``fn`` runs, and the
config is checked to be storable. If writing fails after the compute (disk full, folder removed, a metric that
cannot be stored), the result is written to a fallback file under the system temp folder
(``<tmp>/shrink-fallback-<uid>/``) and :class:`~shrink.errors.RecordWriteError` is raised naming
``SHRINK_RESULTS``/``SHRINK_CACHE``, the free space and the fallback; the exception's ``result`` attribute
holds the result too. The next ``cached`` call for that record, once the folder is writable, moves the
fallback into place instead of recomputing (announced).

**Concurrent writers.** A process computing a record holds an exclusive ``fcntl`` lock on a lock file under
``<tmp>/shrink-locks/``; a second process asking for the same record waits (announced) and then reads the
first one's record, so the work is done once. The lock covers processes on one machine (the temp folder);
writers on different machines sharing a results folder may still compute a record twice (the rename keeps
the file whole either way).

Introduced in: notebooks/00-start/00-tour.md
"""

from __future__ import annotations

import contextlib
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
from .errors import CacheCorruptError, EnvError, RecordMissingError, RecordWriteError, UnstorableError
from .scales import SCALES

SCHEMA = 2  # 2: ``kernels`` field; tensor records
#: Largest committed tensor file (bytes of the safetensors file); larger tensors belong in ``$SHRINK_CACHE``.
TENSOR_LIMIT = 1 << 20
#: Chapter -> the subpackages its results depend on (besides the core); unknown chapters depend on all.
CHAPTER_PACKAGES = {"00-start": (), "01-weights": ("pruning",), "02-bits": ("quant",), "03-tokens": ("tokens",),
                    "04-data": ("selection",)}

_ANNOUNCED: set[tuple[str, str]] = set()


def chapter_code_hash(chapter: str) -> str:
    """The code hash a record of ``chapter`` is compared against (core + the chapter's package)."""
    return env.code_hash(CHAPTER_PACKAGES.get(chapter))


def results_root() -> Path:
    """``$SHRINK_RESULTS``, else ``results/`` of the checkout, else ``./results``.

    Raises :class:`~shrink.errors.EnvError` when it names a file."""
    if os.environ.get("SHRINK_RESULTS"):
        root = Path(os.environ["SHRINK_RESULTS"]).expanduser()
        var = f"SHRINK_RESULTS={os.environ['SHRINK_RESULTS']}"
    else:
        repo = env.repo_root()
        root = (repo / "results") if repo is not None else Path("results")
        var = "the results folder (SHRINK_RESULTS unset)"
    if root.exists() and not root.is_dir():
        raise EnvError(f"{var}: {root} is a file, not a folder. Point SHRINK_RESULTS at a folder (or move the "
                       "file away).")
    return root


def results_mode() -> str:
    """``"compute"`` (default) or ``"load"`` (``SHRINK_RESULTS_MODE=load``: never compute a missing record)."""
    value = os.environ.get("SHRINK_RESULTS_MODE", "").strip().lower()
    if value in ("", "compute"):
        return "compute"
    if value == "load":
        return "load"
    raise EnvError(f"SHRINK_RESULTS_MODE={value!r}: use 'load' (never compute, a missing record is an error) "
                   "or 'compute' (or leave it unset).")


def _announce(path: Path, kind: str, message: str) -> None:
    """Print ``[shrink.results] <message>`` once per (record, kind) and process."""
    if (str(path), kind) in _ANNOUNCED:
        return
    _ANNOUNCED.add((str(path), kind))
    print(f"[shrink.results] {message}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# Storable values and keys
# --------------------------------------------------------------------------------------------------------------
def _jsonable(obj: Any, where: str = "value") -> Any:
    """``obj`` as JSON-able data. Converted where unambiguous: dataclasses -> dicts, tuples -> lists, sets ->
    sorted lists, tensors and numpy arrays -> (nested) lists, numpy/torch scalars -> numbers, non-finite
    floats -> strings, dtypes and paths -> strings. Anything else raises :class:`UnstorableError` naming
    ``where`` (e.g. ``metrics['curve'][3]``)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj), where)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        items = [_jsonable(v, f"{where}{{…}}") for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist(), where)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, (torch.dtype, Path)):
        return str(obj)
    if type(obj).__module__ == "numpy":
        if hasattr(obj, "tolist"):  # ndarray and numpy scalars (np.float32(1).tolist() is a float)
            return _jsonable(obj.tolist(), where)
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return _jsonable(obj.item(), where)
        except (TypeError, ValueError):
            pass
    raise UnstorableError(f"cannot store {where} of type {type(obj).__name__} in a result record; convert it to "
                          "numbers, strings, lists or dicts (a tensor/array becomes a list automatically).")


def config_key(config: dict) -> str:
    """sha256 (first 16 hex) of the canonical JSON of ``config`` (raises :class:`UnstorableError` for a
    config that cannot be stored, before anything is computed)."""
    blob = json.dumps(_jsonable(config, "config"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; scales: {', '.join(SCALES)}")


def record_path(name: str, config: dict, *, scale: str, chapter: str) -> Path:
    _check_scale(scale)
    return results_root() / scale / chapter / f"{name}-{config_key(config)}.json"


def tensor_paths(name: str, config: dict, *, scale: str, chapter: str) -> tuple[Path, Path]:
    """(``.safetensors`` file, its ``.json`` record) of a committed tensor entry."""
    _check_scale(scale)
    stem = f"{name}-{config_key(config)}"
    folder = results_root() / scale / chapter / "tensors"
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


# --------------------------------------------------------------------------------------------------------------
# Writing: atomic, normal permissions, a fallback that keeps the result
# --------------------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, env.file_mode())  # mkstemp makes 0600; a shared results folder needs 0644
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace`` (mode 0644
    minus the umask)."""
    _atomic_write(Path(path), text.encode())


def fallback_dir() -> Path:
    """Where results that could not be written are kept: ``<system temp>/shrink-fallback-<uid>/``."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"shrink-fallback-{uid}"


def _fallback_path(path: Path) -> Path:
    return fallback_dir() / path.parent.parent.name / path.parent.name / path.name


def _keep(result: Any, path: Path, suffix: str, as_json: str | None = None) -> Path | None:
    """Write ``result`` (JSON text if given, else ``torch.save``) to the fallback folder; None if that fails."""
    target = _fallback_path(path).with_suffix(suffix)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if as_json is not None:
            _atomic_write(target, as_json.encode())
        else:
            torch.save(result, target)
        return target
    except Exception:  # noqa: BLE001 - the fallback is best effort; the exception still carries the result
        return None


def _write_failed(path: Path, exc: Exception, result: Any, var: str, fallback: Path | None) -> RecordWriteError:
    kept = (f"The result is kept in {fallback} and on this exception (`.result`)" if fallback else
            "Writing a fallback copy failed too; the result is only on this exception (`.result`)")
    err = RecordWriteError(
        f"could not write {path} ({getattr(exc, 'strerror', None) or exc}; free space there: "
        f"{env.free_space(path.parent)}). {kept}. Fix: free space or make the folder writable, or set {var} to "
        f"a writable folder, then rerun: the next run {'picks up the fallback' if fallback else 'recomputes'} "
        "instead of losing it.")
    err.result, err.fallback = result, fallback
    return err


def _base_record(name: str, config: dict, *, scale: str, chapter: str, seconds: float | None) -> dict:
    return {"schema": SCHEMA, "name": name, "scale": scale, "chapter": chapter, "key": config_key(config),
            "config": _jsonable(config, "config"), "versions": env.versions(), "git_sha": env.git_sha(),
            "code": chapter_code_hash(chapter), "kernels": env.kernel_set(), "device": env.device_name(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": seconds}


def _record_text(record: dict) -> str:
    return json.dumps(record, indent=1, sort_keys=True) + "\n"


def save(name: str, config: dict, metrics: dict, *, scale: str, chapter: str, seconds: float | None = None) -> Path:
    """Write a result record; returns its path.

    A metric that cannot be stored raises :class:`UnstorableError` (the metrics are kept in a fallback
    ``.pt`` file, named in the message); a failed write raises :class:`RecordWriteError` (the record is kept
    in a fallback ``.json``)."""
    path = record_path(name, config, scale=scale, chapter=chapter)
    try:
        stored = _jsonable(metrics, "metrics")
    except UnstorableError as exc:
        fb = _keep(metrics, path, ".pt")
        err = UnstorableError(f"{exc} Record {path.name} was not written; "
                              + (f"the computed metrics are kept in {fb} (torch.load it) and on this exception "
                                 "(`.result`)." if fb else "the computed metrics are on this exception (`.result`)."))
        err.result, err.fallback = metrics, fb
        raise err from None
    record = {**_base_record(name, config, scale=scale, chapter=chapter, seconds=seconds), "metrics": stored}
    text = _record_text(record)
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise _write_failed(path, exc, stored, "SHRINK_RESULTS", _keep(stored, path, ".json", text)) from exc
    return path


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------
def load(path: str | Path) -> dict:
    """Read a record. A file that is not a JSON object with ``metrics`` (e.g. ``[]``, ``null``, truncated
    JSON) or a folder in its place raises :class:`CacheCorruptError` naming it."""
    path = Path(path)
    fix = "Delete that one file and rerun (or `git checkout` it if it is committed); other records are untouched."
    if path.is_dir():
        raise CacheCorruptError(f"{path} is a folder where a result record (a JSON file) belongs. Remove it "
                                f"(`rm -r {path}`) and rerun.")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheCorruptError(f"result record {path} is corrupt ({exc}). {fix}") from exc
    except OSError as exc:
        raise CacheCorruptError(f"result record {path} cannot be read ({exc.strerror or exc}). Fix its permissions, "
                                f"or {fix[0].lower()}{fix[1:]}") from exc
    if not isinstance(record, dict) or "metrics" not in record:
        got = type(record).__name__ if not isinstance(record, dict) else "an object without 'metrics'"
        raise CacheCorruptError(f"result record {path} is corrupt (a JSON {got}, not a record). {fix}")
    return record


def stale_policy(scale: str) -> str:
    """``"reuse"`` or ``"recompute"`` for a record made by other code: ``$SHRINK_STALE`` if set (the old
    ``SHRINK_REUSE_STALE=1`` means ``reuse``), else recompute at ``tiny`` and reuse (announced) elsewhere."""
    value = os.environ.get("SHRINK_STALE") or ("reuse" if os.environ.get("SHRINK_REUSE_STALE") == "1" else "")
    if value not in ("", "reuse", "recompute"):
        raise EnvError(f"SHRINK_STALE={value!r}: use 'reuse' or 'recompute' (or leave it unset).")
    return value or ("recompute" if scale == "tiny" else "reuse")


_MISS = object()


def _usable(path: Path, record: dict, scale: str, chapter: str) -> bool:
    """Whether an existing record is reused (announcing a reuse across code or kernel sets)."""
    current = chapter_code_hash(chapter)
    if record.get("code") != current:
        if stale_policy(scale) != "reuse":
            _announce(path, f"recompute:{record.get('code')}", f"{path.name} was computed by other shrink code "
                      f"({record.get('code')} != {current}): recomputing.")
            return False
        _announce(path, f"reuse:{record.get('code')}", f"{path.name} was computed by other shrink code "
                  f"({record.get('code')} != {current}): reused (SHRINK_STALE=recompute recomputes it).")
    theirs, ours = env.kernel_signature(record.get("kernels")), env.kernel_signature(env.kernel_set())
    if theirs is None:  # made before records stored kernel sets: said once per process, not per record
        _announce(Path("<legacy>"), "kernels", f"{path.name} and other records made before kernel sets were recorded "
                  "are reused; their kernel set is unknown (README: Reproducing the committed digits).")
    elif theirs != ours:
        diff = ", ".join(f"{k} {theirs.get(k)} here {ours.get(k)}" for k in ours if theirs.get(k) != ours.get(k))
        _announce(path, f"kernels:{theirs}", f"{path.name} was made under another kernel set ({diff}): reused; its "
                  "last digits may differ from a recompute here (README: Reproducing the committed digits).")
    return True


def _lookup(path: Path, scale: str, chapter: str) -> Any:
    """The stored metrics of ``path`` if it exists and is reused, else ``_MISS``."""
    if not path.exists() and not path.is_symlink():
        return _MISS
    record = load(path)
    return record["metrics"] if _usable(path, record, scale, chapter) else _MISS


def _adopt_fallback(path: Path) -> bool:
    """Move a fallback record of ``path`` (left by an earlier failed write) into place; True if done."""
    fb = _fallback_path(path)
    if not fb.is_file():
        return False
    try:
        record = json.loads(fb.read_text())
        ok = isinstance(record, dict) and "metrics" in record and path.name == f"{record['name']}-{record['key']}.json"
    except (OSError, ValueError, KeyError):
        ok = False
    if not ok:
        return False
    try:
        atomic_write_text(path, fb.read_text())
    except OSError as exc:
        raise _write_failed(path, exc, record["metrics"], "SHRINK_RESULTS", fb) from exc
    fb.unlink()
    _announce(path, "fallback", f"{path.name}: restored from {fb} (kept there when an earlier write failed).")
    return True


@contextlib.contextmanager
def _lock(path: Path):
    """Exclusive ``fcntl`` lock for computing ``path`` (waits, announced, while another process holds it)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (concurrent writers may compute twice; files stay whole)
        yield
        return
    folder = Path(tempfile.gettempdir()) / "shrink-locks"
    try:
        if not folder.is_dir():
            folder.mkdir(exist_ok=True)
            os.chmod(folder, 0o1777)  # shared by every user, like /tmp
        lock = folder / (hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:32] + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # an unusable temp folder must not stop the computation
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _announce(path, "wait", f"{path.name}: another process is computing it; waiting for its result.")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _missing(path: Path, what: str) -> RecordMissingError:
    state = "was made by other code and must be recomputed (SHRINK_STALE)" if path.exists() else "does not exist"
    return RecordMissingError(
        f"{what} {path} {state} and SHRINK_RESULTS_MODE=load forbids computing it. Unset "
        "SHRINK_RESULTS_MODE to compute it (then commit it if it is a cpu/paper record), or check that the "
        "config that names it has not changed.")


def cached(name: str, config: dict, fn: Callable[[], dict], *, scale: str, chapter: str) -> dict:
    """Return the metrics of a stored run of ``fn`` with this ``config``, or run it and store them.

    Before ``fn`` runs: the config is checked to be storable (:class:`UnstorableError`), the results folder
    to be writable (:class:`~shrink.errors.EnvError`), and a lock is taken so that concurrent callers compute
    once. After: see :func:`save` (a failed write keeps the result in a fallback file).

    Args:
        name: experiment name (file stem).
        config: everything that determines the result (model, data, seeds, hyperparameters); never
            computed floats.
        fn: computes the metrics dict (JSON-able values; tensors, arrays and sets are converted).
        scale, chapter: where the record lives, ``results/<scale>/<chapter>/``.
    """
    path = record_path(name, config, scale=scale, chapter=chapter)
    recompute, mode = os.environ.get("SHRINK_RECOMPUTE") == "1", results_mode()
    if recompute and mode == "load":
        raise EnvError("SHRINK_RECOMPUTE=1 and SHRINK_RESULTS_MODE=load contradict each other: unset one.")
    if not recompute:
        hit = _lookup(path, scale, chapter)
        if hit is not _MISS:
            return hit
        if mode == "load":
            raise _missing(path, "result record")
    env.writable_dir(path.parent, "SHRINK_RESULTS")
    with _lock(path):
        if not recompute:  # another process may have written it while we waited, or a fallback waits
            if not path.exists() and _adopt_fallback(path):
                pass
            hit = _lookup(path, scale, chapter)
            if hit is not _MISS:
                return hit
        t0 = time.perf_counter()
        metrics = fn()
        seconds = round(time.perf_counter() - t0, 3)
        save(name, config, metrics, scale=scale, chapter=chapter, seconds=seconds)
    return _jsonable(metrics, "metrics")


# --------------------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------------------
def _split_tensors(value: Any) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``{name: Tensor | [Tensor, ...] | json}`` -> (flat tensors, layout, metadata)."""
    if not isinstance(value, dict):
        raise UnstorableError(f"cached_tensors(..., scale=...) needs fn to return a dict of tensors, lists of "
                              f"tensors and JSON-able values; got {type(value).__name__}.")
    tensors, layout, meta = {}, {}, {}
    for k, v in value.items():
        k = str(k)
        if "." in k:
            raise UnstorableError(f"tensor entry name {k!r} contains '.'; use names without dots.")
        if isinstance(v, torch.Tensor):
            tensors[k], layout[k] = v.detach().cpu().contiguous().clone(), "tensor"
        elif isinstance(v, (list, tuple)) and v and all(isinstance(t, torch.Tensor) for t in v):
            for i, t in enumerate(v):
                tensors[f"{k}.{i}"] = t.detach().cpu().contiguous().clone()
            layout[k] = ["list", len(v)]
        else:
            meta[k] = _jsonable(v, f"result[{k!r}]")
    return tensors, layout, meta


def _join_tensors(tensors: dict[str, torch.Tensor], layout: dict, meta: dict) -> dict:
    out = dict(meta)
    for k, how in layout.items():
        out[k] = tensors[k] if how == "tensor" else [tensors[f"{k}.{i}"] for i in range(how[1])]
    return out


def _load_tensor_record(file: Path, rec_path: Path, scale: str, chapter: str) -> Any:
    from safetensors.torch import load as st_load

    record = load(rec_path)
    info = record.get("tensors")
    fix = (f"Restore both files (`git checkout -- {file.parent}` for committed ones), or delete {file.name} and "
           f"{rec_path.name} to recompute them.")
    if not isinstance(info, dict) or "sha256" not in info or "layout" not in info:
        raise CacheCorruptError(f"tensor record {rec_path} has no 'tensors' entry (sha256, layout). {fix}")
    try:
        blob = file.read_bytes()
    except OSError as exc:
        raise CacheCorruptError(f"tensor file {file} of record {rec_path.name} cannot be read "
                                f"({exc.strerror or exc}). {fix}") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != info["sha256"]:
        raise CacheCorruptError(f"tensor file {file} does not match its record {rec_path.name} (sha256 "
                                f"{digest[:16]}… != {info['sha256'][:16]}…): it was changed or truncated. {fix}")
    if not _usable(rec_path, record, scale, chapter):
        return _MISS
    return _join_tensors(st_load(blob), info["layout"], record["metrics"])


def _cached_small_tensors(name: str, config: dict, fn: Callable[[], Any], scale: str, chapter: str) -> Any:
    from safetensors.torch import save as st_save

    file, rec_path = tensor_paths(name, config, scale=scale, chapter=chapter)
    recompute, mode = os.environ.get("SHRINK_RECOMPUTE") == "1", results_mode()
    if recompute and mode == "load":
        raise EnvError("SHRINK_RECOMPUTE=1 and SHRINK_RESULTS_MODE=load contradict each other: unset one.")

    def lookup():
        if recompute or not (rec_path.exists() or file.exists()):
            return _MISS
        if not rec_path.exists():
            raise CacheCorruptError(f"tensor file {file} has no record {rec_path.name} beside it (its config and "
                                    f"hash). Delete {file} and rerun, or restore the record (`git checkout`).")
        return _load_tensor_record(file, rec_path, scale, chapter)

    hit = lookup()
    if hit is not _MISS:
        return hit
    if mode == "load":
        raise _missing(rec_path, "tensor record")
    env.writable_dir(file.parent, "SHRINK_RESULTS")
    with _lock(rec_path):
        hit = lookup()
        if hit is not _MISS:
            return hit
        t0 = time.perf_counter()
        value = fn()
        seconds = round(time.perf_counter() - t0, 3)
        try:
            tensors, layout, meta = _split_tensors(value)
        except UnstorableError as exc:
            fb = _keep(value, file, ".pt")
            err = UnstorableError(f"{exc} Nothing was written" + (f"; the result is kept in {fb}." if fb else "."))
            err.result, err.fallback = value, fb
            raise err from None
        blob = st_save(tensors)
        if len(blob) > TENSOR_LIMIT:
            fb = _keep(value, file, ".pt")
            err = RecordWriteError(
                f"{name}: the tensors are {len(blob) / 2**20:.2f} MiB, over the {TENSOR_LIMIT / 2**20:.0f} MiB limit "
                f"for tensors committed under results/. Store them in $SHRINK_CACHE instead: call "
                f"cached_tensors({name!r}, config, fn) without scale/chapter. "
                + (f"This result is kept in {fb} and on this exception (`.result`)." if fb else
                   "This result is on this exception (`.result`)."))
            err.result, err.fallback = value, fb
            raise err
        record = {**_base_record(name, config, scale=scale, chapter=chapter, seconds=seconds), "metrics": meta,
                  "tensors": {"file": file.name, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
                              "layout": layout,
                              "shapes": {k: [str(t.dtype).removeprefix("torch."), list(t.shape)]
                                         for k, t in tensors.items()}}}
        try:
            _atomic_write(file, blob)  # the tensor file first: the JSON record beside it is the commit point
            atomic_write_text(rec_path, _record_text(record))
        except OSError as exc:
            raise _write_failed(rec_path, exc, value, "SHRINK_RESULTS", _keep(value, file, ".pt")) from exc
    return _join_tensors(tensors, layout, meta)


def cached_tensors(name: str, config: dict, fn: Callable[[], Any], *, scale: str | None = None,
                   chapter: str | None = None) -> Any:
    """Like :func:`cached` for torch objects.

    * With ``scale`` and ``chapter``: **small committed tensors** (at most :data:`TENSOR_LIMIT` bytes) that
      committed results depend on. ``fn`` returns ``{name: Tensor | list of Tensors | JSON-able}``; the
      tensors go to ``results/<scale>/<chapter>/tensors/<name>-<hash>.safetensors``, everything else (a
      training history, token ids) into the JSON record beside it, with the file's sha256 (checked on load:
      a mismatch raises :class:`CacheCorruptError`). Returns the same dict (lists of tensors stay lists).
    * Without: **large local tensors**, any picklable object, ``torch.save``-d under
      ``$SHRINK_CACHE/tensors/<name>-<hash>.pt`` (atomic write, normal permissions); not committed.

    Both check the folder is writable before computing, lock against concurrent writers, and under
    ``SHRINK_RESULTS_MODE=load`` raise :class:`RecordMissingError` instead of computing.
    """
    if (scale is None) != (chapter is None):
        raise ValueError("cached_tensors: pass both scale= and chapter= (committed small tensors) or neither "
                         "($SHRINK_CACHE)")
    if scale is not None:
        return _cached_small_tensors(name, config, fn, scale, chapter)
    folder = env.cache_dir("tensors")
    path = folder / f"{name}-{config_key(config)}.pt"
    recompute, mode = os.environ.get("SHRINK_RECOMPUTE") == "1", results_mode()

    def lookup():
        if recompute or not path.exists():
            return _MISS
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise CacheCorruptError(f"tensor cache {path} is corrupt ({exc}); delete that file and rerun.") from exc

    hit = lookup()
    if hit is not _MISS:
        return hit
    if mode == "load":
        raise _missing(path, "tensor cache entry")
    env.writable_dir(folder, "SHRINK_CACHE")
    with _lock(path):
        hit = lookup()
        if hit is not _MISS:
            return hit
        value = fn()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
        os.close(fd)
        try:
            torch.save(value, tmp)
            os.chmod(tmp, env.file_mode())
            os.replace(tmp, path)
        except OSError as exc:
            raise _write_failed(path, exc, value, "SHRINK_CACHE", _keep(value, path, ".pt")) from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return value


def records(scale: str, chapter: str | None = None) -> list[dict]:
    """All records of a scale (and chapter), sorted by path; tensor records (``tensors/*.json``) included."""
    base = results_root() / scale
    if chapter:
        base = base / chapter
    return [load(p) for p in sorted(base.rglob("*.json"))] if base.exists() else []


def load_bench(name: str) -> dict | None:
    """The committed benchmark record ``results/bench/<name>.json`` of this checkout (written by
    ``benchmarks/bench_<name>.py``; not under ``SHRINK_RESULTS``: benchmarks are not keyed by scale), or None when it
    has not been made. A file that does not parse raises :class:`CacheCorruptError` naming it and the fix."""
    repo = env.repo_root()
    path = (repo if repo is not None else Path(".")) / "results" / "bench" / f"{name}.json"
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheCorruptError(f"benchmark record {path} is corrupt ({exc}). Rerun benchmarks/bench_{name}.py "
                                "(or `git checkout` the file).") from exc
    if not isinstance(rec, dict):
        raise CacheCorruptError(f"benchmark record {path} is a JSON {type(rec).__name__}, not an object. Rerun "
                                f"benchmarks/bench_{name}.py (or `git checkout` the file).")
    return rec


# --------------------------------------------------------------------------------------------------------------
# make check-records: the committed records suffice to re-render the notebooks
# --------------------------------------------------------------------------------------------------------------
def _git_results_state(root: Path) -> dict[str, str]:
    """``{path: status}`` of new, changed or deleted files under ``results/`` (git porcelain)."""
    import subprocess

    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", "results/"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return {line[3:]: line[:2] for line in out.splitlines() if line.strip()}


def check_records(notebooks: list[str], scale: str = "cpu", out: str | None = None, clone: bool = True) -> dict:
    """Execute ``notebooks`` at ``scale`` with ``SHRINK_RESULTS_MODE=load`` and an empty temporary
    ``SHRINK_CACHE``, then compare ``git status results/`` before and after.

    ``clone=True`` (default) runs in a fresh ``git clone`` of the checkout's HEAD (its ``lib/`` first on
    ``PYTHONPATH``): it checks what is *committed*, and other processes writing records into the checkout
    cannot be mistaken for new records. ``clone=False`` runs in the checkout itself.

    Returns ``{"ok", "seconds", "notebooks": [...shrink run summary...], "missing": {notebook: [records]},
    "new_or_changed": [...]}``; ``ok`` is true when every notebook ran and no record was added or changed.
    """
    import re
    import shutil
    import subprocess
    import sys

    root = env.repo_root()
    if root is None:
        raise EnvError("check_records needs the git checkout (an editable install of shrink).")
    work = Path(tempfile.mkdtemp(prefix="shrink-check-"))
    cache = work / "cache"
    t0 = time.perf_counter()
    try:
        run_env = {**os.environ, "SHRINK_RESULTS_MODE": "load", "SHRINK_CACHE": str(cache)}
        for var in ("SHRINK_RECOMPUTE", "SHRINK_RESULTS", "SHRINK_STALE"):
            run_env.pop(var, None)
        if clone:
            subprocess.run(["git", "clone", "-q", str(root), str(work / "repo")], check=True)
            root = work / "repo"
            run_env["PYTHONPATH"] = os.pathsep.join([str(root / "lib"), *filter(None, [os.environ.get("PYTHONPATH")])])
        outdir = Path(out).absolute() if out else work / "executed"
        uncommitted = [nb for nb in notebooks if not (root / nb).is_file()]  # clone: only committed notebooks
        notebooks = [nb for nb in notebooks if nb not in uncommitted]
        before = _git_results_state(root)
        proc = subprocess.run([sys.executable, "-m", "shrink.cli", "run", *notebooks, "--scale", scale, "--out",
                               str(outdir)], cwd=root, env=run_env, capture_output=True, text=True)
        try:
            summary = json.loads(proc.stdout[proc.stdout.index("{"):])
        except ValueError:
            summary = {}
        if not summary.get("notebooks"):  # shrink run itself failed: say how
            summary = {"notebooks": [], "error": f"shrink run failed (exit {proc.returncode}): "
                                                 f"{summary.get('message') or proc.stderr[-2000:]}"}
        after = _git_results_state(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    changed = sorted(f"{st} {p}" for p, st in after.items() if before.get(p) != st)
    missing = {}
    for nb in summary.get("notebooks", []):
        if nb.get("status") != "ok":
            found = re.findall(r"(?:result record|tensor record|tensor cache entry) (\S+) ", nb.get("error") or "")
            missing[nb["notebook"]] = sorted(set(found)) or [(nb.get("error") or "?")[-300:]]
    ok = proc.returncode == 0 and not changed and not missing
    return {"ok": ok, "seconds": round(time.perf_counter() - t0, 1), "scale": scale,
            "notebooks": [{k: v for k, v in nb.items() if k != "error"} for nb in summary.get("notebooks", [])],
            "missing": missing, "new_or_changed": changed, "skipped_uncommitted": uncommitted,
            **({"error": summary["error"]} if "error" in summary else {})}


def main(argv=None) -> None:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m shrink.results",
                                description="check: execute notebooks with SHRINK_RESULTS_MODE=load and an empty "
                                            "SHRINK_CACHE; fail if a record is missing, new or changed.")
    p.add_argument("command", choices=["check"])
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--scale", default="cpu")
    p.add_argument("--out", default=None, help="folder for the executed notebooks (default: a temporary one)")
    p.add_argument("--in-place", action="store_true", help="run in this checkout instead of a fresh clone of HEAD")
    a = p.parse_args(argv)
    report = check_records(a.notebooks, a.scale, a.out, clone=not a.in_place)
    print(json.dumps(report, indent=1))
    if not report["ok"]:
        print("check-records FAILED: " + ("; ".join(f"{nb}: {', '.join(r)}" for nb, r in report["missing"].items())
                                        or "") + ("; new or changed under results/: " + ", ".join(report["new_or_changed"])
                                                  if report["new_or_changed"] else ""), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
