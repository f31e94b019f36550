"""Finding, building and loading the compiled CUDA kernels of ``kernels/csrc`` (GPU machines only).

The extension is one shared library, ``shrink_kernels.so``, built from the torch-free ``*.cu`` kernels
plus the stable-ABI glue ``shrink_ops.cpp`` (flags below). Loading it registers CUDA kernels for the
``shrink::`` ops defined in :mod:`shrink.ops._library`. Everything here is best effort: on a machine
without CUDA (or with the CPU torch wheel, which cannot load a CUDA-linked .so) :func:`load` returns a
status saying why, and ``shrink.ops`` keeps using the references. Nothing is built implicitly unless
``SHRINK_KERNELS_BUILD=1``.

Where the .so is looked for, in order: ``$SHRINK_KERNELS_LIB`` (a path), then
``<kernels dir>/build/shrink_kernels*.so`` (written by ``python -m shrink.ops --build``). The kernels dir
is ``$SHRINK_KERNELS_DIR`` or ``kernels/`` at the repository root.
"""

from __future__ import annotations

import glob
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from shrink.errors import ShrinkError

from . import _library

#: Stable ABI of PyTorch >= 2.10 (format: [major][minor][patch][5-byte ABI tag]).
TORCH_TARGET_VERSION = "0x020a000000000000"
#: Flags shared by the host (.cpp) and device (.cu) compiles. USE_CUDA declares
#: aoti_torch_get_current_cuda_stream in torch's C shim.
COMMON_FLAGS = ["-O3", "-std=c++17", "-DUSE_CUDA", f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]
#: --fmad=false: no multiply-add contraction, so the kernels match reference.py bit for bit.
NVCC_FLAGS = COMMON_FLAGS + ["--fmad=false"]
LIB_NAME = "shrink_kernels"


class KernelBuildError(ShrinkError):
    """The CUDA extension could not be built or loaded where it was explicitly asked for."""


@dataclass
class CudaStatus:
    loaded: bool = False
    path: str | None = None
    reason: str = "not attempted"

    def to_dict(self) -> dict:
        return asdict(self)


STATUS = CudaStatus()


def kernels_dir() -> Path:
    env = os.environ.get("SHRINK_KERNELS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "kernels"


def csrc_dir() -> Path:
    return kernels_dir() / "csrc"


def sources() -> list[Path]:
    """All sources of the extension: every ``*.cu`` and ``*.cpp`` in ``kernels/csrc`` (sorted)."""
    d = csrc_dir()
    return sorted(d.glob("*.cu")) + sorted(d.glob("*.cpp"))


def find_nvcc() -> str | None:
    """``$SHRINK_NVCC``, else ``nvcc`` on PATH, else ``$CUDA_HOME/bin/nvcc``, else /usr/local/cuda/bin/nvcc."""
    env = os.environ.get("SHRINK_NVCC")
    if env is not None:
        return env if os.path.isfile(env) and os.access(env, os.X_OK) else None
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"),
                 "/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def cuda_home(nvcc: str | None = None) -> str | None:
    """The toolkit directory behind nvcc (resolving symlinks such as /usr/local/bin/nvcc), see kernels.md §2.2."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = nvcc or find_nvcc()
    if not nvcc:
        return None
    home = Path(os.path.realpath(nvcc)).parent.parent
    return str(home) if (home / "include" / "cuda_runtime.h").exists() else None


def _prebuilt() -> str | None:
    env = os.environ.get("SHRINK_KERNELS_LIB")
    if env:
        return env
    hits = sorted(glob.glob(str(kernels_dir() / "build" / f"{LIB_NAME}*.so")))
    return hits[-1] if hits else None


def build(build_dir: str | os.PathLike | None = None, verbose: bool = False) -> str:
    """Compile ``kernels/csrc`` into ``shrink_kernels.so`` with ``torch.utils.cpp_extension.load`` and load it.

    Needs a CUDA build of torch and nvcc (GPU machines). ``TORCH_CUDA_ARCH_LIST`` picks the archs (unset:
    the visible GPU's); ``MAX_JOBS`` caps ninja. Returns the .so path; raises :class:`KernelBuildError`.
    """
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise KernelBuildError("this torch is a CPU build; install a CUDA wheel of torch to build the kernels")
    nvcc = find_nvcc()
    home = cuda_home(nvcc)
    if home is None:
        raise KernelBuildError("no CUDA toolkit found: set CUDA_HOME to the toolkit directory (with include/ and "
                               "lib64/) or put nvcc on PATH")
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    out = Path(build_dir) if build_dir else kernels_dir() / "build"
    out.mkdir(parents=True, exist_ok=True)
    _library.define()
    try:
        path = cpp_extension.load(
            name=LIB_NAME,
            sources=[str(s) for s in sources()],
            extra_cflags=COMMON_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS,
            extra_include_paths=[str(csrc_dir())],
            build_directory=str(out),
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as e:  # compiler errors surface as RuntimeError/subprocess errors
        raise KernelBuildError(f"building {LIB_NAME} from {csrc_dir()} failed: {e}") from e
    so = path if isinstance(path, str) else str(out / f"{LIB_NAME}.so")
    STATUS.loaded, STATUS.path, STATUS.reason = True, so, "built and loaded"
    return so


def load(build_if_missing: bool | None = None) -> CudaStatus:
    """Load the CUDA kernels if this process can use them; never raises. Returns :data:`STATUS`.

    ``build_if_missing`` defaults to ``SHRINK_KERNELS_BUILD=1``. ``SHRINK_OPS_BACKEND=reference`` skips
    loading entirely.
    """
    import torch

    if STATUS.loaded:
        return STATUS
    if os.environ.get("SHRINK_OPS_BACKEND", "auto") == "reference":
        STATUS.reason = "SHRINK_OPS_BACKEND=reference"
        return STATUS
    if torch.version.cuda is None or not torch.cuda.is_available():
        STATUS.reason = "no CUDA device or CPU-only torch build"
        return STATUS
    _library.define()
    so = _prebuilt()
    if so:
        try:
            torch.ops.load_library(so)
            STATUS.loaded, STATUS.path, STATUS.reason = True, so, "loaded prebuilt library"
        except Exception as e:  # a .so built for another torch/CUDA
            STATUS.reason = f"failed to load {so}: {e}"
    elif build_if_missing if build_if_missing is not None else os.environ.get("SHRINK_KERNELS_BUILD") == "1":
        try:
            build()
        except KernelBuildError as e:
            STATUS.reason = str(e)
    else:
        STATUS.reason = ("no compiled library found: run `python -m shrink.ops --build` on this GPU machine "
                         "(or set SHRINK_KERNELS_BUILD=1)")
    if STATUS.loaded and not all(_library.has_kernel(n, "CUDA") for n in _library.OP_NAMES):
        missing = [n for n in _library.OP_NAMES if not _library.has_kernel(n, "CUDA")]
        STATUS.loaded, STATUS.reason = False, f"library {STATUS.path} lacks CUDA kernels for {missing}"
    return STATUS
