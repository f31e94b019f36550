"""GPU rows of the kernels tables: K2 vs fp16/bf16 cuBLAS at LLaMA-7B shapes, 2:4 semi-structured vs dense, the
token-gather kernel vs torch.gather (issue 14 §3). The measurement is :func:`shrink.ops.gpu_bench.run`.

    .venv/bin/python benchmarks/bench_gpu.py [--repeats 20]        # on a CUDA machine: results/bench/gpu.json
    .venv/bin/python benchmarks/bench_gpu.py --smoke --device cpu  # the harness on small shapes (no record)

Before the first GPU run build the kernels (``SHRINK_KERNELS_BUILD=1``, see kernels/README.md) and run
``pytest tests/kernels -m gpu``; notebook 02l shows the record's rows, marked with the device they ran on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shrink import env
from shrink.ops import gpu_bench


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--smoke", action="store_true", help="small shapes, no record (checks the harness)")
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args(argv)
    import torch

    if a.device is None and not torch.cuda.is_available():
        print("no CUDA device here: nothing measured, no record written (the GPU rows stay 'not measured'); "
              "`--smoke --device cpu` checks the harness on small shapes")
        return {}
    rec = gpu_bench.run(a.device, smoke=a.smoke, repeats=a.repeats)
    for r in rec["k2"]:
        print(f"K2 {r['shape']:8s} M={r['M']:5d}: {r['k2_ms']:.3f} ms ({r['k2_backend']}), "
              f"{r['k2_speedup_vs_dense']:.2f}x vs dense; equals reference: {r['k2_equals_reference']}")
    for r in rec["semi_structured_2to4"]:
        print(f"2:4 {r['shape']:8s} M={r['M']:5d}: {r['status']}" +
              (f", {r['speedup']:.2f}x vs dense" if r["status"] == "measured" else f" ({r['error']})"))
    for r in rec["gather"]:
        print(f"gather B={r['B']} T={r['T']} D={r['D']} K={r['K']}: {r['speedup']:.2f}x vs torch.gather "
              f"({r['backend']}), equal: {r['equal']}")
    if a.smoke or rec["device"] == "cpu":
        print("smoke run / CPU: no record written")
        return rec
    rec |= {"benchmark": "gpu-kernels", "versions": env.versions(), "kernels": env.kernel_set()}
    out = Path(env.repo_root() or ".") / "results" / "bench" / "gpu.json"
    out.write_text(json.dumps(rec, indent=1, default=str) + "\n")
    print(f"wrote {out}")
    return rec


if __name__ == "__main__":
    main()
