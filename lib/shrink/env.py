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

import functools
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
    root = Path(os.environ.get("SHRINK_CACHE") or Path.home() / ".cache" / "shrink").expanduser()
    path = root.joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        from .errors import EnvError

        raise EnvError(f"SHRINK_CACHE={os.environ.get('SHRINK_CACHE', '<unset>')}: {exc.filename or path} is a "
                       "file, not a folder. Point SHRINK_CACHE at a folder (or move that file).") from exc
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


# ----------------------------------------------------------------------------------------------------------
# Kernel set: what decides the last digits of a CPU float computation
# ----------------------------------------------------------------------------------------------------------
#: Environment variables that cap the instruction set of ATen, MKL and oneDNN (see README, "Reproducing the
#: committed digits").
ISA_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA")
#: The fields of :func:`kernel_set` that :func:`shrink.results.cached` compares when it reuses a record.
KERNEL_FIELDS = ("device", "cpu_capability", "mkl_isa", "dnnl_isa", "cpu_vendor")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> tuple[str, frozenset[str]]:
    """(vendor, flags) from ``/proc/cpuinfo`` (Linux); ``("?", set())`` elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "?", frozenset()
    vendor, flags = "?", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and vendor == "?":
            vendor = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
        if vendor != "?" and flags:
            break
    return vendor, frozenset(flags)


def _best_isa(flags: frozenset[str]) -> str:
    if "amx_tile" in flags:
        return "AVX512_CORE_AMX"
    if "avx512f" in flags:
        return "AVX512"
    if "avx2" in flags:
        return "AVX2"
    if "avx" in flags:
        return "AVX"
    return "SSE4_2" if "sse4_2" in flags else ("?" if not flags else "DEFAULT")


def kernel_set() -> dict:
    """The kernel set of this process: which CPU code paths PyTorch, MKL and oneDNN take.

    ``cpu_capability`` is ATen's dispatch level (``torch.backends.cpu.get_cpu_capability()``, capped by
    ``ATEN_CPU_CAPABILITY``); ``mkl_isa`` / ``dnnl_isa`` are the instruction sets MKL and oneDNN dispatch to:
    the value of ``MKL_ENABLE_INSTRUCTIONS`` / ``DNNL_MAX_CPU_ISA`` (``ONEDNN_MAX_CPU_ISA``) when set, else
    the best the CPU offers (from its flags; torch does not expose the libraries' runtime choice).
    ``env`` holds the ISA variables that are set, ``threads`` the torch thread count. Stored in every result
    record (``kernels``); the fields in :data:`KERNEL_FIELDS` are compared when a record is reused.
    """
    vendor, flags = _cpu_flags()
    best = _best_isa(flags)
    set_env = {k: os.environ[k] for k in ISA_ENV if os.environ.get(k)}
    dnnl = set_env.get("ONEDNN_MAX_CPU_ISA") or set_env.get("DNNL_MAX_CPU_ISA")
    return {
        "device": f"cuda: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": bool(torch.backends.mkl.is_available()),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "mkl_isa": (set_env.get("MKL_ENABLE_INSTRUCTIONS") or best).upper(),
        "dnnl_isa": (dnnl or best).upper(),
        "cpu_vendor": vendor,
        "cpu_best_isa": best,
        "env": set_env,
        "threads": torch.get_num_threads(),
    }


def kernel_signature(kernels: dict | None) -> dict | None:
    """The compared part of a :func:`kernel_set` (None for a record that has none)."""
    if not kernels:
        return None
    return {k: kernels.get(k) for k in KERNEL_FIELDS}


# ----------------------------------------------------------------------------------------------------------
# Folders and files that other users and processes can share
# ----------------------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of a new file: ``0o666`` minus the umask (``0o644`` by default), like ``open()`` makes."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """Mode of a new folder: ``0o777`` minus the umask (``0o755`` by default), like ``mkdir`` makes."""
    return 0o777 & ~_umask()


def fix_permissions(path: str | Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the normal modes :func:`file_mode` /
    :func:`dir_mode`: ``mkstemp``/``mkdtemp`` create 0600/0700, which a shared cache cannot use."""
    path = Path(path)
    fm, dm = file_mode(), dir_mode()
    if path.is_dir():
        os.chmod(path, dm)
        for p in path.rglob("*"):
            os.chmod(p, dm if p.is_dir() else fm)
    else:
        os.chmod(path, fm)


def free_space(path: str | Path) -> str:
    """Free space on the file system holding ``path`` (its nearest existing ancestor), e.g. ``"1.2 GB"``."""
    import shutil

    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            return f"{free:.1f} {unit}" if unit != "B" else f"{free} B"
        free /= 1024
    return "unknown"


def writable_dir(path: str | Path, var: str) -> Path:
    """Create ``path`` if needed and check that a file can be written there, **before** any compute.

    ``var`` names the setting that chose the folder (``SHRINK_RESULTS``, ``SHRINK_CACHE``). Raises
    :class:`~shrink.errors.EnvError` naming the folder, the variable, the free space and the fix.
    """
    import tempfile

    from .errors import EnvError

    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise EnvError(f"{p} is a file, not a folder, so {path} cannot be created ({var}="
                               f"{os.environ.get(var, '<unset>')}). Point {var} at a folder (or move the file).")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".shrink-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise EnvError(f"cannot write in {path} ({exc.strerror or exc}; free space there: {free_space(path)}). "
                       f"Make it writable, or set {var} to a writable folder with space.") from exc
    return path


def temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new temporary folder ``<parent>/<prefix><pid>-XXXX`` for an atomic build (rename when done).

    The pid in the name lets :func:`clean_stale_temps` remove the folders of killed builds. Normal
    permissions (:func:`dir_mode`), not ``mkdtemp``'s 0700.
    """
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    os.chmod(tmp, dir_mode())
    return tmp


def clean_stale_temps(parent: str | Path, prefix: str, max_age_s: float = 6 * 3600) -> list[Path]:
    """Remove the temporary folders of killed builds under ``parent``: ``<prefix><pid>-*`` whose process is
    gone, and ``<prefix>*`` without a pid (older code) untouched for ``max_age_s``. Returns what it removed."""
    import shutil
    import time

    removed = []
    parent = Path(parent)
    if not parent.is_dir():
        return removed
    for p in parent.glob(f"{prefix}*"):
        if not p.is_dir():
            continue
        head = p.name[len(prefix):].split("-", 1)[0]
        if head.isdigit():
            pid = int(head)
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except PermissionError:  # another user's live process
                alive = True
            if alive:
                continue
        else:
            try:
                if time.time() - p.stat().st_mtime < max_age_s:
                    continue
            except OSError:
                continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def sha256_file(path) -> str:
    """sha256 hex digest of a file, read in 4 MiB chunks (data files, model caches, committed tensors)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
