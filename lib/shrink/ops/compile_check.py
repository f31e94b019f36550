"""Compile-only check of ``kernels/csrc`` (tier 2 of kernels.md §2.3): no GPU, no CUDA torch needed.

Every ``*.cu`` (torch-free kernels) and ``*.cpp`` (stable-ABI glue) is compiled with ``nvcc -c`` against
the installed torch wheel's headers (the CPU wheel ships the stable headers) for each arch in
``$SHRINK_CUDA_ARCHS`` (default ``80,90``: A100, H100), with the exact flags of the real build
(:data:`shrink.ops.cuda.NVCC_FLAGS`). Then a link-level check: every ``shrink_kernels::`` symbol the
glue object needs must be defined by one of the kernel objects (``nm``), so a launcher whose
declaration and definition drifted apart is caught without linking against libtorch/libcudart.

What it cannot catch: link errors against torch/CUDA libraries, runtime errors, wrong results.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import cuda

TIMEOUT_S = 300


def torch_include() -> Path:
    """``<site-packages>/torch/include`` of the torch that this Python imports (found without importing it)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("torch is not installed in this environment")
    return Path(list(spec.submodule_search_locations)[0]) / "include"


def archs() -> list[str]:
    raw = os.environ.get("SHRINK_CUDA_ARCHS", "80,90")
    return [a.strip() for a in raw.split(",") if a.strip()]


def _command(nvcc: str, src: Path, obj: Path, include: Path, arch_list: list[str]) -> list[str]:
    flags = list(cuda.NVCC_FLAGS)
    if src.suffix == ".cpp":  # host-only glue: same errors at -O0, at half the compile time
        flags = ["-O0" if f.startswith("-O") else f for f in flags]
    cmd = [nvcc, "-c", str(src), "-o", str(obj), *flags, "-Xcompiler", "-fPIC",
           f"-I{cuda.csrc_dir()}", f"-I{include}"]
    if src.suffix == ".cu":
        for a in arch_list:
            cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return cmd


def _compile(nvcc: str, src: Path, obj: Path, include: Path, arch_list: list[str]) -> dict:
    cmd = _command(nvcc, src, obj, include, arch_list)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
        rc, err = p.returncode, (p.stdout + p.stderr)
    except subprocess.TimeoutExpired:
        rc, err = -1, f"timed out after {TIMEOUT_S} s"
    warnings = len(re.findall(r"warning", err, flags=re.IGNORECASE))
    return {"file": str(src.relative_to(cuda.kernels_dir().parent)) if src.is_relative_to(cuda.kernels_dir().parent)
            else str(src), "ok": rc == 0, "seconds": round(time.perf_counter() - t0, 2), "warnings": warnings,
            "log_tail": err[-2000:] if (rc != 0 or warnings) else ""}


def _symbols(obj: Path, undefined: bool) -> set[str]:
    flag = "--undefined-only" if undefined else "--defined-only"
    out = subprocess.run(["nm", "-C", flag, str(obj)], capture_output=True, text=True, check=True).stdout
    syms = set()
    for line in out.splitlines():
        m = re.match(r"^\s*(?:[0-9a-fA-F]+\s+)?[A-Za-z]\s+(.+)$", line)
        name = m.group(1).strip() if m else ""
        if name.startswith("shrink_kernels::") and "(anonymous namespace)" not in name:
            syms.add(name)
    return syms


def _link_check(objs: dict[Path, Path]) -> dict:
    if shutil.which("nm") is None:
        return {"ok": True, "skipped": "nm not found"}
    needed, defined = set(), set()
    for src, obj in objs.items():
        if src.suffix == ".cpp":
            needed |= _symbols(obj, undefined=True)
        else:
            defined |= _symbols(obj, undefined=False)
    missing = sorted(needed - defined)
    return {"ok": not missing, "needed": len(needed), "missing": missing}


def run(jobs: int | None = None) -> tuple[int, dict]:
    """Run the check; returns ``(exit_code, summary)``. Exit 0 when nvcc is absent (skipped, said so)."""
    t0 = time.perf_counter()
    nvcc = cuda.find_nvcc()
    srcs = cuda.sources()
    if nvcc is None:
        return 0, {"status": "skipped", "reason": "nvcc not found (set SHRINK_NVCC or put nvcc on PATH); "
                   "nothing was compiled", "sources": len(srcs)}
    if not srcs:
        return 1, {"status": "failed", "reason": f"no sources in {cuda.csrc_dir()}"}
    include = torch_include()
    if not (include / "torch" / "csrc" / "stable" / "library.h").exists():
        return 1, {"status": "failed", "reason": f"{include} lacks torch's stable-ABI headers (need torch >= 2.10)"}
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", version)
    arch_list = archs()
    jobs = jobs or int(os.environ.get("SHRINK_COMPILE_JOBS", min(2, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="shrink-kcheck-") as tmp:
        objs = {s: Path(tmp) / (s.name + ".o") for s in srcs}
        # longest first (the glue with torch headers), so two workers finish together
        order = sorted(srcs, key=lambda s: (s.suffix != ".cpp", s.name))
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(lambda s: _compile(nvcc, s, objs[s], include, arch_list), order))
        compiled_ok = all(r["ok"] for r in results)
        link = _link_check(objs) if compiled_ok else {"ok": False, "skipped": "compile failed"}
    ok = compiled_ok and link["ok"]
    summary = {
        "status": "ok" if ok else "failed",
        "nvcc": nvcc,
        "cuda_version": m.group(1) if m else None,
        "archs": [f"sm_{a}" for a in arch_list],
        "torch_include": str(include),
        "flags": cuda.NVCC_FLAGS,
        "jobs": jobs,
        "files": results,
        "link_check": link,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return (0 if ok else 1), summary


def main(jobs: int | None = None) -> int:
    code, summary = run(jobs)
    if summary["status"] == "skipped":
        print(f"shrink.ops compile-check SKIPPED: {summary['reason']}")
    print(json.dumps(summary, indent=2))
    return code
