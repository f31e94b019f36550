"""The ``shrink`` command: ``info``, ``ppl``, ``run`` and ``check``; every command prints JSON on stdout.

    shrink info
    shrink ppl --model smollm2-135m --data wikitext2 --split test --seqlen 2048 --windows 8
    shrink run notebooks/00-start/00-tour.md --scale tiny [--out build/executed]
    shrink check build/executed/tiny/00-start/00-tour.ipynb     # is an executed notebook complete?
    shrink export OUT_DIR --model smollm2-135m --prune wanda:0.5    # or sparsegpt:2:4, magnitude:0.5
    shrink export OUT_DIR --model smollm2-135m --quant w8a8         # or w8, w4g128 (compressed-tensors)
    shrink export OUT_DIR --model smollm2-135m --quant w3 --method gptq   # GPTQ's own grids (asymmetric)
    shrink select dsir --pool 'shards/*.jsonl.zst' --target t.txt --k 1000 [--ray ADDRESS|local]
    shrink sweep dsir-kl --scale tiny [--ray ADDRESS|local|none] [--only seed=0]   # a grid as Ray tasks

Bad input prints ``{"error": <ShrinkError class>, "message": <problem and fix>}`` and exits with status 2;
any other exception is a bug: ``{"error": "internal", "type": ..., "message": <its last line>}``, status 1.
stdout is always valid JSON (a NaN is never printed: a non-finite result is an error naming the cause).

``shrink run`` executes each notebook into a hidden temporary file next to the output
(``.<name>.ipynb.<pid>.partial``, a name that neither Make nor the book picks up), checks it is complete
(:func:`shrink.notebook.check_executed`) and only then renames it into place. A failure keeps
``<name>.failed.ipynb`` for inspection; Ctrl-C / SIGTERM remove the temporary file and exit 130 / 143.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from .errors import BadInputError, EnvError, ShrinkError, env_int


def _print(obj) -> None:
    print(json.dumps(obj, indent=1, default=str, allow_nan=False))


QUANT_RECIPES = ("w8a8", "w8", "w4", "w4g128", "w4g32", "w3", "w3g64", "w2g32")  # examples of w<BITS>[g<N>][a8]
QUANT_METHODS = ("rtn", "gptq")


def _parse_quant(text: str, method: str, grid: str | None, group_default: int = 32):
    """``w<BITS>[g<GROUP>][a8]`` -> ``(weight QuantSpec, activation QuantSpec | None)``.

    ``--grid`` defaults to ``sym`` for RTN (the W8A8 chapter's grid) and ``asym`` for GPTQ (notebook 02g's grid).
    """
    import re

    from .quant import QuantSpec

    if method not in QUANT_METHODS:
        raise BadInputError(f"--method {method!r} is not one of {', '.join(QUANT_METHODS)}.")
    m = re.fullmatch(r"w([2-8])(?:g(\d+))?(a8)?", text or "")
    if not m or (m.group(3) and (m.group(1) != "8" or m.group(2))):
        raise BadInputError(f"--quant {text!r} is not a recipe: use w<BITS>[g<GROUP>] with 2-8 bits (e.g. "
                            f"{', '.join(QUANT_RECIPES[1:])}) or w8a8.")
    if m.group(3) and method != "rtn":
        raise BadInputError("--quant w8a8 declares dynamic activations on RTN weights; use --method rtn (GPTQ is "
                            "weight-only here).")
    bits, group = int(m.group(1)), int(m.group(2)) if m.group(2) else None
    if group == 0:
        raise BadInputError(f"--quant {text!r}: the group size must be a positive integer.")
    grid = grid or ("asym" if method == "gptq" else "sym")
    if grid not in ("sym", "asym"):
        raise BadInputError(f"--grid {grid!r} is not sym or asym.")
    w = QuantSpec(bits=bits, symmetric=grid == "sym", granularity="group" if group else "channel",
                  group_size=group or group_default)
    return w, (QuantSpec(bits=8, granularity="token") if m.group(3) else None)


def _parse_prune(text: str):
    from .pruning import PruneSpec

    pruner, _, rest = text.partition(":")
    if not rest:
        raise BadInputError(f"--prune {text!r} needs PRUNER:SPARSITY or PRUNER:N:M, e.g. wanda:0.5 or sparsegpt:2:4.")
    if rest.count(":") == 1:
        return PruneSpec(pruner=pruner, pattern=rest).check()
    try:
        sparsity = float(rest)
    except ValueError:
        raise BadInputError(f"--prune {text!r}: {rest!r} is not a sparsity; use e.g. wanda:0.5.") from None
    return PruneSpec(pruner=pruner, sparsity=sparsity).check()


def cmd_export(args) -> dict:
    from . import data, export, models

    if (args.prune is None) == (args.quant is None):
        raise BadInputError("shrink export needs exactly one of --prune PRUNER:SPARSITY (e.g. wanda:0.5) or "
                            f"--quant RECIPE ({', '.join(QUANT_RECIPES)}).")
    qspec = _parse_quant(args.quant, args.method, args.grid) if args.quant is not None else None
    spec = _parse_prune(args.prune) if args.prune is not None else None
    export.check_out_dir(args.out_dir, args.overwrite)  # before any compute: a bad folder costs nothing
    model, tok = models.load(args.model)
    if spec is not None:
        from .pruning import prune_model
        from .pruning.export import export_pruned

        calib = data.calibration_set(tok, nsamples=args.calib, seqlen=args.seqlen)
        res = prune_model(model, calib, spec, verbose=False)
        man = export_pruned(model, res.masks, args.out_dir, tokenizer=tok, overwrite=True,
                            what={"prune_spec": {"pruner": spec.pruner, "sparsity": spec.sparsity,
                                                 "pattern": spec.pattern, "scheme": spec.scheme},
                                  "calibration": ["wikitext2", "validation", args.calib, args.seqlen]})
    else:
        from .quant import WeightQuantSpec, quantize_model
        from .quant.export import export_quantized

        w, a = qspec
        what = {"recipe": args.quant, "method": args.method}
        if args.method == "gptq":
            calib = data.calibration_set(tok, nsamples=args.calib, seqlen=args.seqlen)
            res = quantize_model(model, calib, WeightQuantSpec(method="gptq", grid=w), verbose=False)
            what["calibration"] = ["wikitext2", "validation", args.calib, args.seqlen]
            man = export_quantized(model, args.out_dir, grids=res["grids"], tokenizer=tok, overwrite=True, what=what)
        else:
            man = export_quantized(model, args.out_dir, w, a, tokenizer=tok, overwrite=True, what=what)
    what = man["what"]
    return {"out_dir": str(args.out_dir), "kind": what["kind"], "sparsity": what.get("sparsity"),
            "format": what.get("format"), "files": man["files"]}


def cmd_info(_args) -> dict:
    from . import data, env, models

    return {"versions": env.versions(), "device": env.device_name(), "online": env.online(),
            "shrink_data": os.environ.get("SHRINK_DATA"), "cache": str(env.cache_dir()),
            "models": models.available(), "corpora": data.available()}


def cmd_ppl(args) -> dict:
    from . import data, eval, models

    threads = env_int("SHRINK_THREADS", minimum=1)
    if threads:
        import torch

        torch.set_num_threads(threads)
    # cheap argument checks first, so that a typo costs no model load
    eval.check_perplexity_args(args.seqlen, args.windows, args.batch_size)
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


def partial_path(out: Path) -> Path:
    """Temporary file a run executes into: ``.<name>.ipynb.<pid>.partial`` (never matches ``*.ipynb``; one per
    process, so two runs of the same notebook never write into each other's file)."""
    return out.with_name(f".{out.name}.{os.getpid()}.partial")


def _remove_stale_partials(out: Path) -> None:
    """Delete the temporary files of earlier runs of this notebook whose process is gone (SIGKILL, a crash)."""
    for f in [*out.parent.glob(f".{out.name}.*.partial"), *out.parent.glob(f".{out.stem}.src.*.partial")]:
        try:
            pid = int(f.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            f.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            pass


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP during ``shrink run``: unwinds the stack (like Ctrl-C) so that papermill shuts
    the kernel down and every temporary file is removed."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def _run_one(nb: Path, out: Path, scale: str, log_output: bool) -> tuple[str, str | None]:
    """Execute ``nb`` into ``partial_path(out)``, check it, rename into ``out``. Returns ``(status, error)``."""
    import jupytext
    import nbformat
    import papermill

    from .notebook import check_executed

    import warnings

    warnings.filterwarnings("ignore", message="The specified file .* does not end in")  # our .partial names
    tmp, failed = partial_path(out), out.with_suffix(".failed.ipynb")
    src = out.with_name(f".{out.stem}.src.{os.getpid()}.partial")
    _remove_stale_partials(out)
    out.unlink(missing_ok=True)  # an old output must not survive a re-run that fails
    try:
        nbformat.write(jupytext.read(nb), str(src))
        try:
            papermill.execute_notebook(str(src), str(tmp), parameters={"scale": scale}, kernel_name="python3",
                                       cwd=str(nb.parent), progress_bar=False, log_output=log_output)
            check_executed(tmp)
        except Exception as exc:  # noqa: BLE001 - report per notebook, keep going
            if tmp.exists():  # keep it for inspection, under a name Make and the book never take as done
                os.replace(tmp, failed)
            return "failed", f"{type(exc).__name__}: {str(exc)[-2000:]}"
        os.replace(tmp, out)  # atomic: `out` exists only once the notebook is complete
        failed.unlink(missing_ok=True)
        return "ok", None
    finally:  # also on KeyboardInterrupt / Interrupted / SystemExit
        src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def cmd_run(args) -> dict:
    from .scales import check_scale

    check_scale(args.scale)
    env_int("SHRINK_THREADS", minimum=1)  # a bad value fails here, not inside every kernel
    os.environ.setdefault("SHRINK_HEADLESS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend captures figures; Agg would drop them
    nbs = [Path(n) for n in args.notebooks]
    for nb in nbs:  # check every argument before running anything
        if nb.suffix != ".md" or not nb.is_file() or nb.resolve().parent.parent.name != "notebooks":
            raise BadInputError(f"{nb} is not a MyST notebook: give notebooks/<chapter>/<name>.md files that exist "
                                "(list them with `ls notebooks/*/*.md`).")
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    summary = []
    try:
        for i, nb in enumerate(nbs, 1):
            out = notebook_output(nb, args.scale, Path(args.out))
            out.parent.mkdir(parents=True, exist_ok=True)
            print(f"[{i}/{len(nbs)}] {nb} (scale={args.scale}) -> {out}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            status, err = _run_one(nb, out, args.scale, args.log_output)
            summary.append({"notebook": str(nb), "output": str(out) if status == "ok" else
                            str(out.with_suffix(".failed.ipynb")), "status": status,
                            "seconds": round(time.perf_counter() - t0, 1), "error": err})
            print(f"    {status} in {summary[-1]['seconds']} s", file=sys.stderr, flush=True)
            if err:
                print(f"    {nb}: {err[-600:]}", file=sys.stderr, flush=True)
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"shrink run: {signal.Signals(signum).name}: stopped; no partial notebook was left as done. "
              "Re-run the same command to resume (finished notebooks and cached results are kept).",
              file=sys.stderr, flush=True)
        _print({"error": "interrupted", "signal": signal.Signals(signum).name, "scale": args.scale,
                "notebooks": summary})
        sys.exit(128 + int(signum))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    failed = [s for s in summary if s["status"] != "ok"]
    result = {"scale": args.scale, "ran": len(summary), "failed": len(failed), "notebooks": summary}
    if failed:
        _print(result)
        sys.exit(1)
    return result


def cmd_check(args) -> dict:
    from .notebook import check_executed

    return {str(p): check_executed(p) for p in args.paths}


def _positive_or_all(text: str):
    """argparse type for ``--windows``: an integer (validated by the perplexity function) or ``all``."""
    if text.strip().lower() in ("all", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a number of windows or 'all'") from None


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as the CLI's JSON (exit 2) instead of plain text."""

    def error(self, message):
        _print({"error": "UsageError", "message": f"{message}. See `{self.prog} --help`."})
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    p = _Parser(prog="shrink", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, device, available models and corpora")
    q = sub.add_parser("ppl", help="perplexity with the handbook's one perplexity function")
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--data", default="wikitext2")
    q.add_argument("--split", default="test")
    q.add_argument("--seqlen", type=int, default=2048)
    q.add_argument("--windows", type=_positive_or_all, default=None, help="first N windows only (default: all)")
    q.add_argument("--batch-size", type=int, default=1)
    r = sub.add_parser("run", help="execute notebooks with papermill at a scale")
    r.add_argument("notebooks", nargs="+")
    r.add_argument("--scale", default="cpu")
    r.add_argument("--out", default="build/executed")
    r.add_argument("--log-output", action="store_true")
    c = sub.add_parser("check", help="exit 2 unless every executed notebook given is complete")
    c.add_argument("paths", nargs="+")
    e = sub.add_parser("export", help="save a pruned or quantized model that transformers (and vLLM) reload")
    e.add_argument("out_dir")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--prune", default=None, help="PRUNER:SPARSITY or PRUNER:N:M (magnitude, wanda, sparsegpt)")
    e.add_argument("--quant", default=None, help=f"recipe w<BITS>[g<GROUP>][a8], e.g. {', '.join(QUANT_RECIPES)}")
    e.add_argument("--method", default="rtn", help="quantizer for --quant: rtn (round at export) | gptq "
                                                   "(calibrated; its grids are stored as they are)")
    e.add_argument("--grid", default=None, help="sym | asym (default: sym for rtn, asym for gptq)")
    e.add_argument("--calib", type=int, default=16, help="calibration windows (pruning, gptq)")
    e.add_argument("--seqlen", type=int, default=256)
    e.add_argument("--overwrite", action="store_true")
    from .selection.cli import add_parser as _select_parser, cmd_select
    from .sweep import add_parser as _sweep_parser, cmd_sweep
    _select_parser(sub)
    _sweep_parser(sub)
    args = p.parse_args(argv)
    try:
        result = {"info": cmd_info, "ppl": cmd_ppl, "run": cmd_run, "check": cmd_check, "select": cmd_select,
                  "sweep": cmd_sweep, "export": cmd_export}[args.cmd](args)
        text = json.dumps(result, indent=1, default=str, allow_nan=False)
    except ShrinkError as exc:
        _print({"error": type(exc).__name__, "message": str(exc)})
        sys.exit(2)
    except ValueError as exc:
        if "JSON compliant" in str(exc):  # a NaN/inf slipped into a result: never print invalid JSON
            _print({"error": "NumericalError", "message": f"the result holds NaN or inf ({exc}); this is a bug "
                    "or a corrupt input: rerun with a fresh cache (delete $SHRINK_CACHE/models) and report it."})
            sys.exit(2)
        _internal(exc)
    except (KeyboardInterrupt, Interrupted):
        _print({"error": "interrupted", "message": "stopped by a signal; nothing was written as done. Re-run."})
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - a bug: still JSON on stdout, the traceback on stderr
        _internal(exc)
    else:
        print(text)


def _internal(exc: BaseException) -> None:
    traceback.print_exc(file=sys.stderr)
    last = (traceback.format_exception_only(type(exc), exc) or [""])[-1].strip()
    _print({"error": "internal", "type": type(exc).__name__, "message": last,
            "fix": "this is a bug in Shrink, not your input: report it with the traceback printed on stderr."})
    sys.exit(1)


if __name__ == "__main__":
    main()
