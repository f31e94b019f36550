"""GPU rows of the kernels tables (notebook 02l, ``benchmarks/bench_gpu.py``; issue 14 §3).

Three comparisons, each on identical inputs in one process, CUDA events, median of ``repeats`` after warm-up:

* **K2 vs cuBLAS** at LLaMA-7B layer shapes (q/k/v/o ``4096 x 4096``, gate/up ``11008 x 4096``, down
  ``4096 x 11008``) and ``M`` tokens: ``shrink.ops.int8_matmul_dequant`` (the K2 kernel when loaded) against the
  fp16 and bf16 ``F.linear`` (cuBLAS) of the same shapes, and against ``torch._int_mm`` + the reference epilogue.
  Exactness: K2's output equals the float64 reference bit for bit on one shape.
* **2:4 semi-structured**: a 2:4 mask from ``shrink.ops.nm_prune_mask`` (the pruning chapter's N:M rule),
  ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS inside libtorch) against the dense fp16 GEMM of
  the same masked weight; outputs compared.
* **token gather** (K3): ``shrink.ops.gather_tokens`` against ``torch.gather`` on ``[B, T, D]`` hidden states;
  outputs equal.

On a CPU (``device="cpu"``, ``smoke=True``: small shapes) the same code runs with wall-clock timing, the ops take
their CPU backends, and 2:4 is recorded as ``unsupported`` with torch's message (``to_sparse_semi_structured`` is
CUDA-only): that run checks the harness, it measures nothing a GPU row would say. A record says which device and
which backend every row used; the notebook marks GPU rows by their device.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from . import backend, cuda_status, gather_tokens, int8_matmul_dequant, nm_prune_mask, reference

#: LLaMA-7B decoder linears: name -> (out_features N, in_features K)
SHAPES_7B = {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)}
SMOKE_SHAPES = {"q/k/v/o": (64, 64), "gate/up": (128, 64), "down": (64, 128)}


def _timer(device: torch.device, fn, repeats: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, perf_counter on a CPU)."""
    for _ in range(warmup):
        fn()
    out = []
    if device.type == "cuda":
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(1000 * (time.perf_counter() - t0))
    return statistics.median(out)


def k2_vs_cublas(device, shapes: dict, tokens: tuple, repeats: int, warmup: int) -> list[dict]:
    """One row per (shape, M): ms of K2, fp16 / bf16 cuBLAS, ``_int_mm`` + epilogue; ratios vs fp16."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for name, (n, k) in shapes.items():
        w_q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
        s_w = (torch.rand(n, generator=g) * 1e-2 + 1e-3).to(device)
        w16 = torch.randn(n, k, generator=g).to(device, torch.float16)
        for m in tokens:
            x_q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(device)
            s_x = (torch.rand(m, generator=g) * 1e-2 + 1e-3).to(device)
            x16 = torch.randn(m, k, generator=g).to(device, torch.float16)
            row = {"shape": name, "N": n, "K": k, "M": m, "device": str(device),
                   "k2_backend": backend("int8_matmul_dequant", device)}
            row["k2_ms"] = _timer(device, lambda: int8_matmul_dequant(x_q, w_q, s_x, s_w), repeats, warmup)
            dense = {"fp16_ms": torch.float16, "bf16_ms": torch.bfloat16}
            if device.type == "cpu":
                dense = {"fp32_ms": torch.float32}
            for key, dt in dense.items():
                xd, wd = x16.to(dt), w16.to(dt)
                row[key] = _timer(device, lambda: F.linear(xd, wd), repeats, warmup)
            try:
                row["int_mm_ms"] = _timer(device, lambda: reference.dequant_epilogue(torch._int_mm(x_q, w_q.t()),
                                                                                     s_x, s_w), repeats, warmup)
            except RuntimeError as exc:  # e.g. cuBLASLt's M > 16 limit
                row["int_mm_ms"], row["int_mm_error"] = None, str(exc).splitlines()[0][:200]
            base = row.get("fp16_ms", row.get("fp32_ms"))
            row["k2_speedup_vs_dense"] = base / row["k2_ms"]
            rows.append(row)
    n, k = next(iter(shapes.values()))
    x_q = torch.randint(-127, 128, (16, k), generator=g, dtype=torch.int8)
    w_q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s_x, s_w = torch.rand(16, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5
    want = reference.int8_matmul_dequant(x_q, w_q, s_x, s_w)
    got = int8_matmul_dequant(x_q.to(device), w_q.to(device), s_x.to(device), s_w.to(device)).cpu()
    for r in rows:
        r["k2_equals_reference"] = bool(torch.equal(got, want))
    return rows


def semi_structured(device, shapes: dict, tokens: tuple, repeats: int, warmup: int) -> list[dict]:
    """One row per (shape, M): dense fp16 GEMM of a 2:4-masked weight vs its ``to_sparse_semi_structured`` form."""
    g = torch.Generator(device="cpu").manual_seed(1)
    rows = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, generator=g)
        mask = nm_prune_mask(w, None, 2, 4)
        w16 = (w * mask).to(device, torch.float16)
        try:
            from torch.sparse import to_sparse_semi_structured

            ws = to_sparse_semi_structured(w16)
            err = None
        except (RuntimeError, NotImplementedError) as exc:
            ws, err = None, str(exc).splitlines()[0][:200]
        for m in tokens:
            x = torch.randn(m, k, generator=g).to(device, torch.float16)
            row = {"shape": name, "N": n, "K": k, "M": m, "device": str(device), "mask_is_2to4": True}
            row["dense_ms"] = _timer(device, lambda: F.linear(x, w16), repeats, warmup)
            if ws is None:
                row |= {"status": "unsupported", "error": err}
            else:
                row["sparse_ms"] = _timer(device, lambda: F.linear(x, ws), repeats, warmup)
                row["speedup"] = row["dense_ms"] / row["sparse_ms"]
                d, s = F.linear(x, w16).float(), F.linear(x, ws).float()
                row["max_rel_diff"] = float((d - s).abs().max() / d.abs().max())
                row["status"] = "measured"
            rows.append(row)
    return rows


def gather(device, sizes: tuple, repeats: int, warmup: int) -> list[dict]:
    """One row per ``(B, T, D, K)``: K3 vs ``torch.gather``; outputs must be equal."""
    g = torch.Generator(device="cpu").manual_seed(2)
    rows = []
    for b, t, d, k in sizes:
        h = torch.randn(b, t, d, generator=g).to(device, torch.float16)
        idx = torch.stack([torch.randperm(t, generator=g)[:k].sort().values for _ in range(b)]).to(device)
        ref = lambda: torch.gather(h, 1, idx.unsqueeze(-1).expand(b, k, d))  # noqa: E731
        row = {"B": b, "T": t, "D": d, "K": k, "device": str(device), "backend": backend("gather_tokens", device),
               "k3_ms": _timer(device, lambda: gather_tokens(h, idx), repeats, warmup),
               "torch_gather_ms": _timer(device, ref, repeats, warmup),
               "equal": bool(torch.equal(gather_tokens(h, idx), ref()))}
        row["speedup"] = row["torch_gather_ms"] / row["k3_ms"]
        rows.append(row)
    return rows


def run(device: str | None = None, *, smoke: bool = False, repeats: int = 20, warmup: int = 5) -> dict:
    """All three comparisons on ``device`` (default: CUDA if available). ``smoke``: small shapes (any device)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = SMOKE_SHAPES if smoke else SHAPES_7B
    tokens = (32, 64) if smoke else (16, 128, 2048)
    sizes = ((2, 64, 32, 16),) if smoke else ((1, 4096, 4096, 1024), (8, 2048, 4096, 512))
    if smoke:
        repeats, warmup = min(repeats, 3), min(warmup, 1)
    out = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "smoke": smoke, "repeats": repeats, "warmup": warmup, "cuda_status": cuda_status(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    out["k2"] = k2_vs_cublas(dev, shapes, tokens, repeats, warmup)
    out["semi_structured_2to4"] = semi_structured(dev, shapes, tokens, repeats, warmup)
    out["gather"] = gather(dev, sizes, repeats, warmup)
    return out
