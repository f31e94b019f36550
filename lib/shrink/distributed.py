"""Ray plumbing shared by the scale-out paths (DSIR over a sharded pool, ``shrink sweep``).

Three pieces, nothing chapter-specific:

* :func:`session` — a Ray session: ``address=None`` / ``"local"`` starts a local instance with ``workers``
  CPUs (no dashboard, a small object store, ``SHRINK_THREADS=1`` in the workers), anything else connects to an
  existing cluster (``"auto"`` = ``$RAY_ADDRESS`` or the cluster started on this machine with
  ``ray start --head``; ``"HOST:PORT"``; ``"ray://HOST:10001"`` for Ray Client). An address that does not
  answer is a :class:`~shrink.errors.BadInputError` within seconds (Ray itself retries for minutes), naming
  ``ray start --head`` and ``RAY_ADDRESS``. If Ray is already initialised in this process the session is
  reused and left running (tests share one session per module).
* :func:`run_tasks` — run ``fn(*args)`` for a list of argument tuples, as Ray tasks with the given resources
  and at most ``max_in_flight`` at a time (the "number of workers" on a shared cluster), or in this process
  when ``ray`` is None. Results come back in input order; a task that raises becomes a :class:`TaskFailure`
  in its slot and never loses the others.
* :func:`atomic_save_npz` / :func:`atomic_save_npy` / :func:`load_npz` — per-task outputs written to a
  temporary file in the destination folder and renamed (``os.replace``), so an output on disk is always whole;
  a file that does not load (truncated by a copy, a disk error) reads as missing and is recomputed.

Ray is pinned to 2.40.0 (the ``ray`` extra): from 2.5x the raylet aborts when its dashboard agent takes more
than about 15 s to write its port file, which happens on a loaded 2-core machine (measured here at load 9).

Introduced in: notebooks/04-data/04l-selection-speed.md
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import BadInputError, EnvError

#: The tested Ray version (pyproject extra ``ray``).
RAY_SPEC = "ray==2.40.0"
_FIX_ADDRESS = ("start a head node with `ray start --head` (it prints the address, e.g. 10.0.0.1:6379) and pass "
                "that address (or export RAY_ADDRESS=... and pass auto); or use `local` to start a Ray instance "
                "on this machine")


def ray_module():
    """``import ray``, or :class:`EnvError` naming the install command."""
    try:
        import ray
    except ImportError as exc:
        raise EnvError(f"Ray is not installed in this environment ({exc}); install it with "
                       f"`.venv/bin/pip install '{RAY_SPEC}'` (or `pip install -e '.[ray]'`), or run without --ray "
                       "(in-process).") from None
    return ray


def check_address(address: str, timeout: float = 3.0) -> None:
    """Fail fast when ``HOST:PORT`` / ``ray://HOST:PORT`` does not accept a TCP connection."""
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BadInputError(f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT, auto or local; "
                            f"{_FIX_ADDRESS}.")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise BadInputError(f"no Ray cluster answers at {address!r} ({exc.strerror or exc}); {_FIX_ADDRESS}.") from None


def local_init_kwargs(workers: int | None) -> dict:
    """``ray.init`` arguments of the local instance: ``workers`` CPUs, no dashboard, 128 MB object store."""
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise BadInputError(f"workers={workers!r} must be a positive integer (the number of Ray workers), e.g. 2.")
    # address="local": always a new instance, never a cluster that `ray start` left on this machine
    return {"address": "local", "num_cpus": workers or os.cpu_count() or 1, "include_dashboard": False,
            "object_store_memory": 128 * 2**20, "log_to_driver": False,
            "runtime_env": {"env_vars": {"SHRINK_THREADS": "1", "OMP_NUM_THREADS": "1"}}}


def init_local(workers: int | None = None):
    """``ray.init`` of a local instance (:func:`local_init_kwargs`); returns the ``ray`` module.

    The raylet waits ``RAY_agent_register_timeout_ms`` for its runtime-env agent (default 30 s, which a
    Python agent on a loaded 2-core machine misses: measured at load 14); it is raised to 5 min unless set."""
    ray = ray_module()
    os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")
    ray.init(**local_init_kwargs(workers))
    return ray


@contextmanager
def session(address: str | None = None, workers: int | None = None) -> Iterator[Any]:
    """A Ray session (module docstring); yields the ``ray`` module."""
    ray = ray_module()
    if ray.is_initialized():
        yield ray
        return
    if address in (None, "", "local"):
        init_local(workers)
    else:
        if address != "auto":
            check_address(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as exc:
            raise BadInputError(f"could not connect to Ray at {address!r} ({exc}); {_FIX_ADDRESS}.") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_cpus(ray) -> int:
    """CPUs of the connected cluster (``ray.cluster_resources()['CPU']``)."""
    return int(ray.cluster_resources().get("CPU", 0))


@dataclass
class TaskFailure:
    """A task that raised: its position in the input, the exception's class and message, and the traceback."""

    index: int
    error: str
    message: str
    traceback: str = ""

    def as_dict(self) -> dict:
        return {"index": self.index, "error": self.error, "message": self.message}


def _capture(fn: Callable, *args) -> Any:
    """Run ``fn(*args)``; an exception becomes a TaskFailure (index filled in by the caller). Arguments are
    passed top level, so Ray resolves ``ObjectRef`` arguments (``ray.put`` of a shared array) before the call."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported per task, the others go on
        return TaskFailure(-1, type(exc).__name__, str(exc), traceback.format_exc())


def run_tasks(fn: Callable, calls: Sequence[tuple], *, ray=None, max_in_flight: int | None = None,
              resources: dict | None = None) -> list:
    """``[fn(*args) for args in calls]`` as Ray tasks (or in this process when ``ray`` is None).

    Args:
        fn: a module-level function (picklable by reference; Ray ships it to the workers).
        calls: argument tuples, one per task.
        ray: the ``ray`` module of a :func:`session`, or None (sequential, in this process).
        max_in_flight: at most this many tasks submitted at once (None: all; Ray then runs as many as the
            cluster has CPUs for).
        resources: ``ray.remote`` options, e.g. ``{"num_cpus": 1, "num_gpus": 0, "memory": 2 * 2**30}``.

    Returns:
        one entry per call, in order: the task's return value or a :class:`TaskFailure`.
    """
    out: list = [None] * len(calls)
    if ray is None:
        for i, args in enumerate(calls):
            r = _capture(fn, *args)
            if isinstance(r, TaskFailure):
                r.index = i
            out[i] = r
        return out
    remote = ray.remote(**({"num_cpus": 1} | (resources or {})))(_capture)
    fn_ref = ray.put(fn)
    limit = max_in_flight or len(calls) or 1
    pending: dict = {}
    todo = list(enumerate(calls))
    while todo or pending:
        while todo and len(pending) < limit:
            i, args = todo.pop(0)
            pending[remote.remote(fn_ref, *args)] = i
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i = pending.pop(ref)
            try:
                r = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a worker that died (killed, out of memory), unpicklable
                cause = getattr(exc, "cause", None) or exc
                lines = [ln for ln in str(cause).splitlines() if ln.strip()]
                r = TaskFailure(i, type(cause).__name__, lines[-1] if lines else "")
            if isinstance(r, TaskFailure):
                r.index = i
            out[i] = r
    return out


# ------------------------------------------------------------------------------------------ atomic outputs
def _atomic(path: Path, write: Callable[[str], None], suffix: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    """``np.savez`` to ``path`` atomically (temporary file in the same folder + rename)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return _atomic(Path(path), write, ".npz")


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    """``np.save`` to ``path`` atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array))

    return _atomic(Path(path), write, ".npy")


def load_npz(path: str | Path, keys: Sequence[str]) -> dict | None:
    """The arrays ``keys`` of an ``.npz`` output, or None when it is missing or does not load whole."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def load_npy(path: str | Path) -> np.ndarray | None:
    """An ``.npy`` output, or None when it is missing or does not load whole."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None


def _status_mb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def stamp(reset_peak: bool = False) -> dict:
    """What a task reports about where and how long it ran: pid, host, process CPU and wall clock now, and
    the process's peak RSS in MiB (Linux ``VmHWM``; ``reset_peak`` resets it first, so that a reused worker
    process reports the peak of this task; NaN where ``/proc`` has no such field)."""
    if reset_peak:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
    return {"pid": os.getpid(), "host": socket.gethostname(), "cpu": time.process_time(), "wall": time.time(),
            "peak_rss_mb": _status_mb("VmHWM")}
