"""``shrink select dsir --pool 'shards/*.jsonl.zst' --target 'target/*.jsonl' --k 1000`` (prints JSON).

Streams the pool shards (name order = global index order), fits DSIR in one pass, selects ``k``. Targets
are JSON-lines shards with a ``text`` field (``.jsonl`` / ``.jsonl.zst``) or plain ``.txt`` files (one
example per non-empty line).

``--ray local`` (a Ray instance on this machine with ``--workers N`` CPUs) or ``--ray ADDRESS`` (an existing
cluster: ``auto``, ``HOST:PORT``, ``ray://HOST:10001``; ``--workers N`` caps the shard tasks in flight) runs
the sharded path (:mod:`shrink.selection.scaleout`): one fit and one score task per shard, outputs under
``--out`` (default ``$SHRINK_CACHE/dsir-shards``; a rerun reuses every finished shard), and the same indices
as the in-process path. On a cluster the shards, ``--out`` and an installed ``shrink`` must be visible on
every node (README: "DSIR on a Ray cluster").
"""

from __future__ import annotations

import time
from pathlib import Path


def add_parser(sub) -> None:
    s = sub.add_parser("select", help="data selection over a sharded pool (DSIR), JSON out")
    s.add_argument("method", choices=["dsir"])
    s.add_argument("--pool", required=True, help="glob of JSON-lines shards with a 'text' field")
    s.add_argument("--target", required=True, help="glob of target shards (.jsonl[.zst]) or .txt files")
    s.add_argument("--k", type=int, required=True)
    s.add_argument("--mode", choices=["exact", "fast"], default="exact")
    s.add_argument("--top-k", action="store_true", help="deterministic top-k instead of Gumbel top-k")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--min-example-length", type=int, default=100)
    s.add_argument("--num-buckets", type=int, default=10000)
    s.add_argument("--ray", default=None, metavar="ADDRESS|local",
                   help="run the shards as Ray tasks: 'local' (a Ray instance here) or a cluster address "
                        "(auto, HOST:PORT, ray://HOST:10001)")
    s.add_argument("--workers", type=int, default=None,
                   help="with --ray: CPUs of the local instance / shard tasks in flight on a cluster")
    s.add_argument("--out", default=None, help="with --ray: folder of the per-shard outputs (resumable; "
                   "default $SHRINK_CACHE/dsir-shards)")
    s.add_argument("--ids", action="store_true", help="also print the selected records' ids")


def _targets(pattern: str):
    from . import pools

    paths = pools.shard_paths(pattern)
    for p in paths:
        if p.suffix == ".txt":
            yield from (line for line in Path(p).read_text(encoding="utf-8").splitlines() if line.strip())
        else:
            yield from (r["text"] for r in pools.iter_shard(p, "text"))


def cmd_select(args) -> dict:
    from . import pools
    from .dsir import DSIR
    from .errors import SelectionError

    if args.workers is not None and not args.ray:
        raise SelectionError("--workers applies to the Ray path only: add --ray local (or --ray ADDRESS), or drop "
                             "--workers.")
    if args.ray:
        return _cmd_select_ray(args)
    t0 = time.process_time()
    ids: list = []

    def texts():
        for r in pools.iter_shards(args.pool, "text"):
            ids.append(r.get("id"))
            yield r["text"]

    d = DSIR(mode=args.mode, num_buckets=args.num_buckets, min_example_length=args.min_example_length)
    d.fit(texts(), list(_targets(args.target)))
    idx = d.select(args.k, seed=args.seed, top_k=args.top_k)
    lw = d.log_weights()
    out = {"method": "dsir", "mode": args.mode, "top_k": args.top_k, "seed": args.seed, "k": args.k,
           "pool_chunks": len(ids), "eligible": int(d.eligible().sum()), "indices": idx.tolist(),
           "log_weight_range": [float(lw.min()), float(lw.max())], "cpu_seconds": round(time.process_time() - t0, 3),
           "shards": [str(p) for p in pools.shard_paths(args.pool)]}
    if args.ids:
        out["ids"] = [ids[i] for i in idx.tolist()]
    return out


def _cmd_select_ray(args) -> dict:
    from .. import distributed, env
    from . import pools
    from .scaleout import select_sharded

    if args.workers is not None and args.workers < 1:
        from .errors import SelectionError

        raise SelectionError(f"--workers {args.workers} must be a positive integer, e.g. --workers 2.")
    pools.shard_paths(args.pool)  # no shard: an error before any Ray start
    target = list(_targets(args.target))
    out_dir = args.out or str(env.cache_dir("dsir-shards"))
    t0 = time.time()
    with distributed.session(args.ray, args.workers) as ray:
        res = select_sharded(args.pool, target, args.k, out_dir=out_dir, seed=args.seed, top_k=args.top_k,
                             mode=args.mode, num_buckets=args.num_buckets,
                             min_example_length=args.min_example_length, ray=ray, max_in_flight=args.workers,
                             with_ids=args.ids)
        cpus = distributed.cluster_cpus(ray)
    res.update({"method": "dsir", "mode": args.mode, "top_k": args.top_k, "seed": args.seed, "k": args.k,
                "ray": args.ray, "workers": args.workers, "cluster_cpus": cpus,
                "wall_seconds": round(time.time() - t0, 3)})
    return res
