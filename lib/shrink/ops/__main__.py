"""``python -m shrink.ops``: ``--compile-check`` (CI, no GPU), ``--build`` (GPU machines), ``--status``."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m shrink.ops", description=__doc__)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--compile-check", action="store_true",
                   help="nvcc -c every kernels/csrc source against this torch's headers; JSON summary; "
                        "non-zero exit on a compile failure; exit 0 with SKIPPED when nvcc is absent")
    g.add_argument("--build", action="store_true",
                   help="compile and load kernels/csrc into kernels/build/shrink_kernels.so (needs CUDA torch)")
    g.add_argument("--status", action="store_true", help="print the CUDA-extension status and the backend per op")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles for --compile-check (default 2)")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.compile_check:
        from .compile_check import main as check

        return check(a.jobs)
    import shrink.ops as ops

    if a.build:
        path = ops.cuda.build(verbose=a.verbose)
        print(json.dumps({"built": path, "status": ops.cuda_status()}, indent=2))
        return 0
    print(json.dumps({"cuda_extension": ops.cuda_status(),
                      "backends": {d: {n: ops.backend(n, d) for n in ops.OP_NAMES} for d in ("cpu", "cuda")}},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
