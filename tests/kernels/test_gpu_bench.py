"""The GPU benchmark harness (``shrink.ops.gpu_bench``, ``benchmarks/bench_gpu.py``) on small CPU shapes: every
comparison runs, checks what it compares, and says that 2:4 semi-structured is CUDA-only instead of timing
something else. The GPU rows themselves need a GPU (no record yet)."""

from shrink.ops import gpu_bench


def test_smoke_run_on_cpu():
    rec = gpu_bench.run("cpu", smoke=True, repeats=1)
    assert rec["device"] == "cpu" and rec["smoke"]
    k2 = rec["k2"]
    assert len(k2) == len(gpu_bench.SMOKE_SHAPES) * 2 and all(r["k2_equals_reference"] for r in k2)
    assert all(r["k2_backend"] in ("cpu_int_mm", "cpu_f32_exact", "reference") and r["k2_ms"] > 0 for r in k2)
    ss = rec["semi_structured_2to4"]
    assert ss and all(r["status"] == "unsupported" and "cuda" in r["error"].lower() for r in ss)
    assert all(r["equal"] for r in rec["gather"])

