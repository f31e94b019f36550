"""The ``shrink`` command: ``info``, ``ppl`` and ``run``; every command prints JSON on stdout.

    shrink info
    shrink ppl --model smollm2-135m --data wikitext2 --split test --seqlen 2048 --windows 8
    shrink run notebooks/00-start/00-tour.md --scale tiny [--out build/executed]

Errors from bad input print ``{"error": ..., "fix": ...}`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import ShrinkError


def _print(obj) -> None:
    print(json.dumps(obj, indent=1, default=str))


def cmd_info(_args) -> dict:
    from . import data, env, models

    return {"versions": env.versions(), "device": env.device_name(), "online": env.online(),
            "shrink_data": os.environ.get("SHRINK_DATA"), "cache": str(env.cache_dir()),
            "models": models.available(), "corpora": data.available()}


def cmd_ppl(args) -> dict:
    from . import data, eval, models

    model, tok = models.load(args.model)
    tokens = data.eval_tokens(tok, args.data, args.split)
    result = eval.perplexity(model, tokens, args.seqlen, max_windows=args.windows, batch_size=args.batch_size,
                             dataset=args.data, split=args.split, progress=False)
    out = result.to_dict()
    out["load_seconds"] = model.shrink_info["load_seconds"]
    return out


def notebook_output(nb: Path, scale: str, out_root: Path) -> Path:
    """``notebooks/<chapter>/<name>.md`` -> ``<out_root>/<scale>/<chapter>/<name>.ipynb``."""
    return out_root / scale / nb.parent.name / (nb.stem + ".ipynb")


def cmd_run(args) -> dict:
    import jupytext
    import papermill

    from .scales import check_scale

    check_scale(args.scale)
    os.environ.setdefault("SHRINK_HEADLESS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend captures figures; Agg would drop them
    summary = []
    for i, name in enumerate(args.notebooks, 1):
        nb = Path(name)
        if not nb.exists() or nb.suffix != ".md":
            raise ShrinkError(f"{nb} is not a MyST notebook (.md) in notebooks/; list them with "
                              "`ls notebooks/*/*.md`.")
        out = notebook_output(nb, args.scale, Path(args.out))
        out.parent.mkdir(parents=True, exist_ok=True)
        src = out.with_suffix(".src.ipynb")
        jupytext.write(jupytext.read(nb), src)
        print(f"[{i}/{len(args.notebooks)}] {nb} (scale={args.scale}) -> {out}", file=sys.stderr, flush=True)
        t0, status, err = time.perf_counter(), "ok", None
        try:
            papermill.execute_notebook(str(src), str(out), parameters={"scale": args.scale}, kernel_name="python3",
                                       cwd=str(nb.parent), progress_bar=False, log_output=args.log_output)
        except Exception as exc:  # noqa: BLE001 - report per notebook, keep going
            status, err = "failed", f"{type(exc).__name__}: {str(exc)[-2000:]}"
            if out.exists():  # keep it for inspection, but never let Make take it as done
                os.replace(out, out.with_suffix(".failed.ipynb"))
        finally:
            src.unlink(missing_ok=True)
        if status == "ok":
            out.with_suffix(".failed.ipynb").unlink(missing_ok=True)
        summary.append({"notebook": str(nb), "output": str(out), "status": status,
                        "seconds": round(time.perf_counter() - t0, 1), "error": err})
        print(f"    {status} in {summary[-1]['seconds']} s", file=sys.stderr, flush=True)
    failed = [s for s in summary if s["status"] != "ok"]
    result = {"scale": args.scale, "ran": len(summary), "failed": len(failed), "notebooks": summary}
    if failed:
        _print(result)
        sys.exit(1)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="shrink", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device, available models and corpora")
    q = sub.add_parser("ppl", help="perplexity with the handbook's one perplexity function")
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--data", default="wikitext2")
    q.add_argument("--split", default="test")
    q.add_argument("--seqlen", type=int, default=2048)
    q.add_argument("--windows", type=int, default=None, help="first N windows only (default: all)")
    q.add_argument("--batch-size", type=int, default=1)
    r = sub.add_parser("run", help="execute notebooks with papermill at a scale")
    r.add_argument("notebooks", nargs="+")
    r.add_argument("--scale", default="cpu")
    r.add_argument("--out", default="build/executed")
    r.add_argument("--log-output", action="store_true")
    args = p.parse_args(argv)
    try:
        _print({"info": cmd_info, "ppl": cmd_ppl, "run": cmd_run}[args.cmd](args))
    except ShrinkError as exc:
        _print({"error": type(exc).__name__, "message": str(exc)})
        sys.exit(2)


if __name__ == "__main__":
    main()
