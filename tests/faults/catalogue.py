"""The fault catalogue (issue 10 §5): one row per bad input or fault, across the CLI, the library, ``make``,
signals and the disk. Every row expects class ``clear`` (see :mod:`harness`). Rows use only APIs that
existed before issue 10 wherever possible, so that ``census.py`` can count the classes of the old code too.

New chapters add their rows to :data:`ROWS` (or a ``ROWS`` list in their own module, collected by
``test_catalogue.py``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import ROOT, Outcome, Row, cli_inprocess, cli_subprocess, tiny_notebook

DATA = Path(os.environ.get("SHRINK_DATA") or ROOT.parent / "shared" / "data")
ROWS: list[Row] = []


def row(id, layer, names=(), what="", slow=False):
    def deco(fn):
        ROWS.append(Row(id, layer, fn, tuple(names), what or (fn.__doc__ or "").strip(), slow))
        return fn
    return deco


def cli_row(id, argv, names=(), env=None, what="", subprocess_=False):
    fn = (lambda ctx: cli_subprocess(argv, env)) if subprocess_ else (lambda ctx: cli_inprocess(argv, env))
    ROWS.append(Row(id, "cli", fn, tuple(names), what or "shrink " + " ".join(argv)))


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def tiny():
    from shrink import models

    return models.load("tiny-llama")


def tokens(n=600, seed=0):
    import torch

    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def data_copy(ctx, corrupt: str, how, *, update_manifest=False) -> Path:
    """A data folder where every file is a symlink to the shared one except ``corrupt`` (a real, damaged copy);
    with ``update_manifest`` its sha256 row is rewritten (so only the damage itself is detected)."""
    import hashlib

    root = ctx.tmp / "data"
    for src in DATA.rglob("*"):
        if src.is_file() and src.name != "MANIFEST.md":
            dst = root / src.relative_to(DATA)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.relative_to(DATA).as_posix() == corrupt:
                how(src, dst)
            else:
                dst.symlink_to(src)
    manifest = (DATA / "MANIFEST.md").read_text()
    if update_manifest and (root / corrupt).is_file():
        old = hashlib.sha256((DATA / corrupt).read_bytes()).hexdigest()
        manifest = manifest.replace(old, hashlib.sha256((root / corrupt).read_bytes()).hexdigest())
    (root / "MANIFEST.md").write_text(manifest)
    ctx.mp.setenv("SHRINK_DATA", str(root))
    try:
        import shrink.data as D

        getattr(D, "_VERIFIED", {}).clear()
    except ImportError:
        pass
    return root


def truncate(frac):
    def how(src, dst):
        b = src.read_bytes()
        dst.write_bytes(b[: int(len(b) * frac)])
    return how


def empty(src, dst):
    dst.write_bytes(b"")


def as_dir(src, dst):
    dst.mkdir(parents=True)


def latin1(src, dst):
    dst.write_bytes(src.read_bytes()[:5000] + b"\xff\xfe caf\xe9 \x80\x81" + src.read_bytes()[5000:10000])


def nan_model():
    import torch

    model, tok = tiny()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :8] = float("nan")
    return model, tok


class OtherTokenizer:
    """A tokenizer whose ids are beyond the tiny models' 259-entry vocabulary (e.g. SmolLM2's)."""

    def encode(self, text, add_special_tokens=False):
        return [1000 + (b % 5000) for b in text.encode()]


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
T = ["ppl", "--model", "tiny-llama", "--data", "shakespeare", "--split", "all"]
cli_row("cli-ppl-batch-negative", [*T, "--seqlen", "64", "--batch-size", "-1"], ("batch_size",))
cli_row("cli-ppl-batch-zero", [*T, "--seqlen", "64", "--batch-size", "0"], ("batch_size",))
cli_row("cli-ppl-seqlen-zero", [*T, "--seqlen", "0"], ("seqlen",))
cli_row("cli-ppl-seqlen-one", [*T, "--seqlen", "1", "--windows", "2"], ("seqlen",))
cli_row("cli-ppl-seqlen-negative", [*T, "--seqlen", "-64"], ("seqlen",))
cli_row("cli-ppl-windows-zero", [*T, "--seqlen", "64", "--windows", "0"], ("windows",))
cli_row("cli-ppl-windows-negative", [*T, "--seqlen", "64", "--windows", "-1"], ("windows",))
cli_row("cli-ppl-windows-not-a-number", [*T, "--windows", "abc"], ("windows",))
cli_row("cli-ppl-seqlen-over-context", [*T, "--seqlen", "4096", "--windows", "1"], ("seqlen", "context"))
cli_row("cli-ppl-unknown-model", ["ppl", "--model", "no-such-model"], ("no-such-model",))
cli_row("cli-ppl-unknown-corpus", ["ppl", "--model", "tiny-llama", "--data", "wikitext3"], ("wikitext3",))
cli_row("cli-ppl-unknown-split", ["ppl", "--model", "tiny-llama", "--split", "tset"], ("tset",))
cli_row("cli-ppl-instruction-set", ["ppl", "--model", "tiny-llama", "--data", "lima", "--split", "train"],
        ("lima", "instruction"))
cli_row("cli-ppl-c4-offline", ["ppl", "--model", "tiny-llama", "--data", "c4", "--split", "validation"],
        ("SHRINK_ONLINE",))
cli_row("cli-ppl-hub-id-offline", ["ppl", "--model", "facebook/opt-125m"], ("SHRINK_ONLINE",))
cli_row("cli-ppl-threads-abc", [*T, "--seqlen", "64", "--windows", "1"], ("SHRINK_THREADS",),
        env={"SHRINK_THREADS": "abc"})
cli_row("cli-ppl-threads-zero", [*T, "--seqlen", "64", "--windows", "1"], ("SHRINK_THREADS",),
        env={"SHRINK_THREADS": "0"})
cli_row("cli-ppl-data-unset", [*T, "--seqlen", "64"], ("SHRINK_DATA",), env={"SHRINK_DATA": None})
cli_row("cli-ppl-data-not-a-folder", [*T, "--seqlen", "64"], ("SHRINK_DATA",),
        env={"SHRINK_DATA": str(ROOT / "README.md")})
cli_row("cli-run-missing-notebook", ["run", "notebooks/none.md", "--scale", "tiny"], ("none.md",))
cli_row("cli-run-not-a-notebook", ["run", "README.md", "--scale", "tiny"], ("README.md",))
cli_row("cli-run-a-folder", ["run", "notebooks/00-start", "--scale", "tiny"], ("notebooks/00-start",))
cli_row("cli-run-unknown-scale", ["run", "notebooks/00-start/00-tour.md", "--scale", "huge"], ("huge",))
cli_row("cli-unknown-command", ["frobnicate"], ("frobnicate",))
cli_row("cli-ppl-threads-abc-subprocess", [*T, "--seqlen", "64", "--windows", "1"], ("SHRINK_THREADS",),
        env={"SHRINK_THREADS": "abc"}, subprocess_=True, what="a real process: JSON on stdout, exit 2")


# shrink select dsir --ray (the sharded Ray path): every row fails before a Ray instance is started
def _select_pool(ctx) -> list[str]:
    from shrink.selection import pools

    recs = [{"id": str(i), "text": f"word{i} " * 120} for i in range(6)]
    pools.write_shards(recs, ctx.tmp / "pool", 2)
    (ctx.tmp / "t.txt").write_text("word1 " * 120)
    return ["select", "dsir", "--pool", str(ctx.tmp / "pool" / "*.jsonl.zst"), "--target", str(ctx.tmp / "t.txt"),
            "--k", "2"]


@row("cli-select-ray-no-shard", "cli", ("no shard matches", "write_shards"))
def _(ctx):
    """--ray with a glob that matches nothing: the shard error, before Ray starts."""
    return cli_inprocess(["select", "dsir", "--pool", str(ctx.tmp / "none" / "*.jsonl.zst"), "--target",
                          str(ctx.tmp / "t.txt"), "--k", "2", "--ray", "local"])


@row("cli-select-ray-bad-address", "cli", ("127.0.0.1:1", "ray start --head", "RAY_ADDRESS"))
def _(ctx):
    """--ray at an address where no cluster listens: an error within seconds (Ray alone retries for minutes)."""
    return cli_inprocess([*_select_pool(ctx), "--ray", "127.0.0.1:1"])


@row("cli-select-ray-address-not-host-port", "cli", ("not HOST:PORT", "ray start --head"))
def _(ctx):
    return cli_inprocess([*_select_pool(ctx), "--ray", "headnode"])


@row("cli-select-ray-not-installed", "cli", ("Ray is not installed", "pip install"))
def _(ctx):
    """--ray in an environment without Ray."""
    ctx.mp.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    return cli_inprocess([*_select_pool(ctx), "--ray", "local"])


@row("cli-select-workers-without-ray", "cli", ("--workers", "--ray local"))
def _(ctx):
    return cli_inprocess([*_select_pool(ctx), "--workers", "2"])


# shrink sweep: bad input fails before a Ray instance is started
cli_row("cli-sweep-unknown-experiment", ["sweep", "dsir-kll", "--scale", "tiny"], ("dsir-kll", "dsir-kl"))
cli_row("cli-sweep-only-not-key-value", ["sweep", "dsir-kl", "--scale", "tiny", "--only", "seed"],
        ("KEY=VALUE", "--only seed=0"))
cli_row("cli-sweep-unknown-scale", ["sweep", "dsir-kl", "--scale", "huge"], ("huge",))


@row("cli-ppl-nan-model", "cli", ("NaN",))
def _(ctx):
    """The model produces NaN logits: the CLI must not print NaN (invalid JSON) with exit 0."""
    from shrink import models

    mt = nan_model()
    ctx.mp.setattr(models, "load", lambda name, **k: _with_info(mt))
    return cli_inprocess([*T, "--seqlen", "64", "--windows", "2"])


@row("cli-ppl-foreign-token-ids", "cli", ("tokenizer",))
def _(ctx):
    """Token ids from another tokenizer (beyond the model's vocabulary)."""
    from shrink import models

    model, _ = tiny()
    ctx.mp.setattr(models, "load", lambda name, **k: _with_info((model, OtherTokenizer())))
    return cli_inprocess([*T, "--seqlen", "64", "--windows", "2"])


def _with_info(mt):
    mt[0].shrink_info = {"name": "tiny-llama", "load_seconds": 0.0}
    return mt


@row("cli-internal-error-is-json", "cli", ("bug",))
def _(ctx):
    """A bug (not bad input) inside a command: stdout must still be JSON, exit 1, the last line named."""
    from shrink import models

    def boom(*a, **k):
        raise RuntimeError("simulated bug")

    ctx.mp.setattr(models, "load", boom)
    return _internal_json(ctx, boom)


def _internal_json(ctx, boom):
    import contextlib
    import io

    from shrink import cli

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            cli.main([*T, "--seqlen", "64"])
    except SystemExit as exc:
        try:
            obj = json.loads(buf.getvalue())
        except ValueError:
            return Outcome("traceback", "stdout not JSON")
        if exc.code == 1 and obj.get("error") == "internal" and "simulated bug" in obj.get("message", ""):
            return Outcome("clear-msg", obj["message"] + " " + obj.get("fix", ""))
        return Outcome("traceback", f"exit {exc.code}: {obj}")
    except Exception as exc:  # noqa: BLE001
        return Outcome("traceback", f"{type(exc).__name__}: {exc}")
    return Outcome("silent", "exit 0")


# --------------------------------------------------------------------------------------------------
# Library: perplexity
# --------------------------------------------------------------------------------------------------
def _ppl(**kw):
    from shrink import eval

    model, _ = tiny()
    args = dict(seqlen=64, max_windows=2, batch_size=1)
    args.update(kw)
    toks = args.pop("tokens", tokens())
    return eval.perplexity(model, toks, args.pop("seqlen"), progress=False, **args)


for _id, _kw, _names in [
        ("lib-ppl-max-windows-negative", {"max_windows": -1}, ("max_windows",)),
        ("lib-ppl-batch-negative", {"batch_size": -1}, ("batch_size",)),
        ("lib-ppl-batch-zero", {"batch_size": 0}, ("batch_size",)),
        ("lib-ppl-seqlen-one", {"seqlen": 1}, ("seqlen",)),
        ("lib-ppl-max-windows-float", {"max_windows": 1.5}, ("max_windows",)),
]:
    ROWS.append(Row(_id, "library", (lambda kw: lambda ctx: _ppl(**kw))(_kw), _names, f"perplexity({_kw})"))


@row("lib-ppl-2d-tokens", "library", ("1-D",))
def _(ctx):
    """Tokens given as a [B, T] batch instead of the 1-D stream."""
    return _ppl(tokens=tokens().view(6, 100))


@row("lib-ppl-float-tokens", "library", ("int64",))
def _(ctx):
    """Float tokens (e.g. a tensor of scores passed by mistake)."""
    return _ppl(tokens=tokens().float())


@row("lib-ppl-foreign-token-ids", "library", ("tokenizer",))
def _(ctx):
    """Ids from another tokenizer (>= the model's vocabulary)."""
    return _ppl(tokens=tokens() + 1000)


@row("lib-ppl-nan-weights", "library", ("NaN",))
def _(ctx):
    """NaN weights: the perplexity must not be returned as NaN."""
    from shrink import eval

    model, _ = nan_model()
    return eval.perplexity(model, tokens(), 64, max_windows=2, progress=False)


@row("lib-ppl-too-few-tokens", "library", ("seqlen",))
def _(ctx):
    """Fewer tokens than one window."""
    return _ppl(tokens=tokens(30))


# --------------------------------------------------------------------------------------------------
# Library: data
# --------------------------------------------------------------------------------------------------
def _calib(nsamples=4, seqlen=32):
    from shrink import data

    return data.calibration_windows([tokens(500)], nsamples, seqlen)


ROWS += [
    Row("lib-calib-nsamples-zero", "library", lambda ctx: _calib(nsamples=0), ("nsamples",), "nsamples=0"),
    Row("lib-calib-nsamples-negative", "library", lambda ctx: _calib(nsamples=-2), ("nsamples",), "nsamples=-2"),
    Row("lib-calib-seqlen-zero", "library", lambda ctx: _calib(seqlen=0), ("seqlen",), "seqlen=0"),
    Row("lib-calib-seqlen-too-long", "library", lambda ctx: _calib(seqlen=10_000), ("seqlen",),
        "no document is longer than the window"),
]


def _text(name, split="all"):
    from shrink import data

    return data.load_text(name, split)


@row("data-truncated-wikitext", "library", ("wiki.test.joined.txt", "sha256"))
def _(ctx):
    """A truncated WikiText-2 test file (gives fewer windows and another perplexity)."""
    data_copy(ctx, "wikitext-2/wiki.test.joined.txt", truncate(0.6))
    return _text("wikitext2", "test")


@row("data-modified-valid", "library", ("wiki.valid.tokens", "sha256"))
def _(ctx):
    """One byte changed in the calibration text."""
    def flip(src, dst):
        b = bytearray(src.read_bytes())
        b[1000] ^= 1
        dst.write_bytes(bytes(b))
    data_copy(ctx, "wikitext-2/wiki.valid.tokens", flip)
    return _text("wikitext2", "validation")


@row("data-emptied-fortunes", "library", ("fortunes.txt",))
def _(ctx):
    """An emptied corpus (returns no documents)."""
    data_copy(ctx, "text/fortunes.txt", empty)
    from shrink import data

    return data.load_documents("fortunes")


@row("data-emptied-fortunes-manifest-updated", "library", ("fortunes.txt",))
def _(ctx):
    """An emptied corpus whose manifest row was updated too (only the emptiness is left to catch)."""
    data_copy(ctx, "text/fortunes.txt", empty, update_manifest=True)
    from shrink import data

    return data.load_documents("fortunes")


@row("data-not-utf8", "library", ("tiny_shakespeare.txt", "UTF-8"))
def _(ctx):
    """A corpus file that is not UTF-8 (manifest updated, so the encoding itself must be caught)."""
    data_copy(ctx, "text/tiny_shakespeare.txt", latin1, update_manifest=True)
    return _text("shakespeare")


@row("data-file-is-a-folder", "library", ("tiny_shakespeare.txt",))
def _(ctx):
    """A corpus path that is a folder."""
    data_copy(ctx, "text/tiny_shakespeare.txt", as_dir)
    return _text("shakespeare")


@row("data-missing-file", "library", ("tiny_shakespeare.txt",))
def _(ctx):
    """A corpus file deleted from the data folder."""
    data_copy(ctx, "text/tiny_shakespeare.txt", lambda s, d: None)
    return _text("shakespeare")


@row("data-truncated-json", "library", ("gsm8k_train_alpaca.json",))
def _(ctx):
    """A truncated instruction JSON file (manifest updated: the JSON error itself must name the file)."""
    data_copy(ctx, "instructions/gsm8k_train_alpaca.json", truncate(0.5), update_manifest=True)
    from shrink import data

    return data.load_instructions("gsm8k")


@row("data-truncated-jsonl", "library", ("lima_train.jsonl",))
def _(ctx):
    """A truncated instruction JSONL file (the last line is cut; manifest updated)."""
    data_copy(ctx, "instructions/lima_train.jsonl", truncate(0.5), update_manifest=True)
    from shrink import data

    return data.load_instructions("lima")


@row("data-truncated-jsonl-manifest", "library", ("selfinstruct_seed_tasks.jsonl",))
def _(ctx):
    """A truncated JSONL file, manifest untouched (the checksum catches it)."""
    data_copy(ctx, "instructions/selfinstruct_seed_tasks.jsonl", truncate(0.3))
    from shrink import data

    return data.load_instructions("selfinstruct-seed")


@row("data-json-not-a-list", "library", ("gpteacher_roleplay.json",))
def _(ctx):
    """An instruction file holding ``null`` (manifest updated)."""
    data_copy(ctx, "instructions/gpteacher_roleplay.json", lambda s, d: d.write_text("null"), update_manifest=True)
    from shrink import data

    return data.load_instructions("gpteacher-roleplay")


@row("data-no-manifest", "library", ("MANIFEST.md",))
def _(ctx):
    """SHRINK_DATA points at a folder with the files but no MANIFEST.md (nothing can be verified)."""
    root = data_copy(ctx, "text/fortunes.txt", lambda s, d: shutil.copy(s, d))
    (root / "MANIFEST.md").unlink()
    return _text("fortunes")


@row("data-c4-no-files", "library", ("nothing-here",))
def _(ctx):
    """C4 data_files that match nothing."""
    from shrink import data

    return data.load_documents("c4", "train", data_files=str(ctx.tmp / "nothing-here-*.json"))


@row("data-c4-not-json", "library", ("JSON",))
def _(ctx):
    """A C4-format file that is not JSON lines."""
    from shrink import data

    p = ctx.tmp / "c4-broken.json"
    p.write_text('{"text": "a"}\n{"text": "b"\nnot json at all\n')
    return data.load_documents("c4", "train", data_files=[str(p)])


@row("data-c4-empty-texts", "library", ("text",))
def _(ctx):
    """C4-format rows whose texts are all empty."""
    from shrink import data

    p = ctx.tmp / "c4-empty.json"
    p.write_text('{"text": ""}\n{"text": ""}\n')
    return data.load_documents("c4", "train", data_files=[str(p)])


@row("data-instruction-set-as-text", "library", ("load_instructions",))
def _(ctx):
    """An instruction set asked for as a text corpus."""
    from shrink import data

    return data.load_documents("lima", "train")


@row("data-concurrent-verification", "disk", ())
def _(ctx):
    """Eight threads verify the same data file at once with a fresh cache: every load succeeds, the verdict
    file stays valid JSON (concurrent writers)."""
    ctx.mp.setenv("SHRINK_CACHE", str(ctx.tmp / "cache"))
    from shrink import data

    getattr(data, "_VERIFIED", {}).clear()
    errs, outs = [], []

    def work():
        try:
            outs.append(len(data.load_text("shakespeare")))
        except Exception as exc:  # noqa: BLE001
            errs.append(exc)
    ts = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    if errs:
        raise errs[0]
    vf = ctx.tmp / "cache" / "data-verified.json"
    if vf.exists():
        json.loads(vf.read_text())
    ok = len(set(outs)) == 1 and len(outs) == 8
    return Outcome("clear" if ok else "lost", f"{len(outs)} loads, sizes {set(outs)}")


# --------------------------------------------------------------------------------------------------
# Library: models and the model cache
# --------------------------------------------------------------------------------------------------
def _load(*a, **k):
    from shrink import models

    return models.load(*a, **k)


ROWS += [
    Row("model-cuda-without-cuda", "library", lambda ctx: _load("tiny-llama", device="cuda"), ("cuda",),
        'device="cuda" on a machine without CUDA'),
    Row("model-bad-device", "library", lambda ctx: _load("tiny-llama", device="gpu0"), ("gpu0",),
        "a device string that is not a device"),
    Row("model-unknown-name", "library", lambda ctx: _load("tiny-lama"), ("tiny-lama",), "a typo in a model name"),
    Row("model-hub-offline", "library", lambda ctx: _load("facebook/opt-125m"), ("SHRINK_ONLINE",),
        "a Hub id while offline"),
    Row("model-int-dtype", "library", lambda ctx: _load("tiny-llama", dtype=__import__("torch").int8), ("dtype",),
        "an integer dtype"),
]


@row("model-online-without-network", "library", ("network",))
def _(ctx):
    """SHRINK_ONLINE=1 on a machine without network (simulated with HF_HUB_OFFLINE=1 and an empty HF cache)."""
    ctx.mp.setenv("SHRINK_ONLINE", "1")
    ctx.mp.setenv("HF_HUB_OFFLINE", "1")
    ctx.mp.setenv("HF_HOME", str(ctx.tmp / "hf"))
    import huggingface_hub.constants as hc

    ctx.mp.setattr(hc, "HF_HUB_OFFLINE", True)
    ctx.mp.setattr(hc, "HF_HUB_CACHE", str(ctx.tmp / "hf" / "hub"))
    return _load("some-org/some-model-that-is-not-cached")


def _fake_cache(ctx, corrupt):
    """A SmolLM2 cache entry built from the tiny model (same files and markers as a real one), then damaged."""
    import hashlib

    from shrink import models

    ctx.mp.setenv("SHRINK_CACHE", str(ctx.tmp / "cache"))
    folder = models.smollm2_cache_path()
    model, _ = tiny()
    model.save_pretrained(folder)
    from transformers import AutoTokenizer  # noqa: F401 - the real entry has a tokenizer; tiny has none

    files = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in folder.iterdir() if p.is_file()}
    (folder / "DONE").write_text(json.dumps({"from": models.SMOLLM2_GGUF, "files": files}))
    corrupt(folder / "model.safetensors")
    return folder


def _zero_middle(p):
    with open(p, "r+b") as f:
        size = p.stat().st_size
        f.seek(size // 2)
        f.write(b"\0" * (size // 4))


def _truncate_file(p):
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


@row("cache-zeroed-bytes", "library", ("sha256",))
def _(ctx):
    """A model cache with a quarter of its weights zeroed (a wrong perplexity, or NaN, with exit 0)."""
    _fake_cache(ctx, _zero_middle)
    return _load("smollm2-135m")


@row("cache-truncated-weights", "library", ("rm -r",))
def _(ctx):
    """A model cache whose safetensors file was truncated."""
    _fake_cache(ctx, _truncate_file)
    return _load("smollm2-135m")


@row("cache-missing-weights", "library", ("rm -r",))
def _(ctx):
    """A model cache whose weights file was deleted."""
    _fake_cache(ctx, lambda p: p.unlink())
    return _load("smollm2-135m")


@row("cache-garbage-done-marker", "library", ("rm -r",))
def _(ctx):
    """A DONE marker that is garbage (and a broken config)."""
    folder = _fake_cache(ctx, lambda p: None)
    (folder / "DONE").write_text("\x00\x01garbage")
    (folder / "config.json").write_text("{broken")
    return _load("smollm2-135m")


# --------------------------------------------------------------------------------------------------
# Library: presets
# --------------------------------------------------------------------------------------------------
def _preset(exp, scale="tiny"):
    from shrink import scales

    return scales.get(exp, scale)


ROWS += [
    Row("preset-typo-field", "library", lambda ctx: _preset("tour").with_(seqlenn=64), ("seqlenn", "seqlen"),
        "with_(seqlenn=64): a typo in a field name"),
    Row("preset-seqlen-zero", "library", lambda ctx: _preset("tour").with_(seqlen=0), ("seqlen",), "seqlen=0"),
    Row("preset-seqlen-over-context", "library", lambda ctx: _preset("tour").with_(seqlen=4096),
        ("seqlen", "context"), "tiny-llama has 512 positions"),
    Row("preset-group-size-zero", "library", lambda ctx: _preset("bits").with_(w_group_size=0), ("group_size",),
        "w_group_size=0"),
    Row("preset-bits-one", "library", lambda ctx: _preset("bits").with_(low_bits=(1,)), ("bits",), "low_bits=(1,)"),
    Row("preset-unknown-corpus", "library", lambda ctx: _preset("bits").with_(calib_corpus="wiki"), ("wiki",),
        "calib_corpus='wiki'"),
    Row("preset-unknown-split", "library", lambda ctx: _preset("bits").with_(calib_split="valid"), ("valid",),
        "calib_split='valid'"),
    Row("preset-bad-pattern", "library", lambda ctx: _preset("pruning-baselines").with_(pattern="2:2"),
        ("pattern",), "pattern='2:2'"),
    Row("preset-sparsity-string", "library", lambda ctx: _preset("pruning-baselines").with_(sparsity="abc"),
        ("sparsity",), "sparsity='abc'"),
    Row("preset-unknown-experiment", "library", lambda ctx: _preset("tuor"), ("tuor",), "get('tuor', ...)"),
    Row("preset-unknown-scale", "library", lambda ctx: _preset("tour", "huge"), ("huge",), "get(..., 'huge')"),
]


# --------------------------------------------------------------------------------------------------
# Library: pruning
# --------------------------------------------------------------------------------------------------
def _spec(**kw):
    from shrink.pruning import PruneSpec

    return PruneSpec(**kw).check()


def _prune(calib, spec=None, model=None):
    from shrink.pruning import PruneSpec, prune_model

    model = model or tiny()[0]
    return prune_model(model, calib, spec or PruneSpec(pruner="wanda"), verbose=False)


ROWS += [
    Row("prune-sparsity-string", "library", lambda ctx: __import__("shrink.pruning", fromlist=["x"])
        .parse_pattern("unstructured", "abc"), ("sparsity",), "parse_pattern(sparsity='abc')"),
    Row("prune-spec-sparsity-string", "library", lambda ctx: _spec(sparsity="abc"), ("sparsity",),
        "PruneSpec(sparsity='abc')"),
    Row("prune-blocksize-zero", "library", lambda ctx: _spec(pruner="sparsegpt", blocksize=0), ("blocksize",),
        "PruneSpec(blocksize=0)"),
    Row("prune-batch-zero", "library", lambda ctx: _spec(batch=0), ("batch",), "PruneSpec(batch=0)"),
    Row("prune-unknown-pruner", "library", lambda ctx: _spec(pruner="wandaa"), ("wandaa",), "pruner='wandaa'"),
    Row("prune-bad-nm", "library", lambda ctx: _spec(pattern="4:2"), ("4:2",), "pattern='4:2'"),
    Row("prune-empty-calibration", "library",
        lambda ctx: _prune(__import__("torch").zeros(0, 32, dtype=__import__("torch").long)), ("calib",),
        "prune_model with a [0, T] calibration set"),
    Row("prune-float-calibration", "library", lambda ctx: _prune(__import__("torch").rand(2, 32)), ("int64",),
        "float calibration ids"),
]


@row("prune-nan-weights", "library", ("NaN",))
def _(ctx):
    """NaN weights (once reported as a broken mask invariant)."""
    import torch

    model, _ = tiny()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, :5] = float("nan")
    return _prune(torch.randint(0, 256, (2, 32)), model=model)


@row("prune-sparsegpt-blocksize-zero", "library", ("blocksize",))
def _(ctx):
    """sparsegpt_prune(blocksize=0) called directly."""
    import torch

    from shrink.pruning import parse_pattern
    from shrink.pruning.sparsegpt import sparsegpt_prune

    w = torch.randn(8, 16)
    return sparsegpt_prune([w], torch.eye(16), parse_pattern("unstructured", 0.5), blocksize=0)


# --------------------------------------------------------------------------------------------------
# Library: quantization and ops
# --------------------------------------------------------------------------------------------------
def _fq(x, **spec):
    from shrink.quant import QuantSpec, fake_quant

    return fake_quant(x, QuantSpec(**spec))


def _t():
    import torch

    return torch


ROWS += [
    Row("quant-integer-tensor", "library", lambda ctx: _fq(_t().arange(-50, 50).view(4, 25)), ("float",),
        "fake_quant on an int64 tensor (truncates silently)"),
    Row("quant-nan-row", "library",
        lambda ctx: _fq(_t().tensor([[1.0, float("nan"), 3.0], [1.0, 2.0, 3.0]])), ("NaN",),
        "one NaN poisons its whole row"),
    Row("quant-inf", "library", lambda ctx: _fq(_t().tensor([[1.0, float("inf"), 3.0]]), granularity="tensor"),
        ("inf",), "an inf makes the per-tensor scale infinite"),
    Row("quant-bits-one", "library", lambda ctx: _fq(_t().randn(2, 4), bits=1), ("bits",), "QuantSpec(bits=1)"),
    Row("quant-group-size-zero", "library", lambda ctx: _fq(_t().randn(2, 4), granularity="group", group_size=0),
        ("group_size",), "QuantSpec(group_size=0)"),
    Row("quant-unknown-granularity", "library", lambda ctx: _fq(_t().randn(2, 4), granularity="row"), ("row",),
        "granularity='row'"),
]


def _mm(s_x=0.1, s_w=0.1):
    from shrink import ops

    torch = _t()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (4, 16), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (3, 16), dtype=torch.int8, generator=g)
    return ops.int8_matmul_dequant(x, w, s_x, s_w)


ROWS += [
    Row("ops-matmul-scale-nan", "library", lambda ctx: _mm(s_x=float("nan")), ("s_x",),
        "int8_matmul_dequant(s_x=nan) returns all NaN"),
    Row("ops-matmul-scale-inf", "library", lambda ctx: _mm(s_w=float("inf")), ("s_w",), "s_w=inf"),
    Row("ops-matmul-scale-vector-nan", "library",
        lambda ctx: _mm(s_x=_t().tensor([0.1, float("nan"), 0.1, 0.1])), ("s_x",), "one NaN in a per-row scale"),
    Row("ops-quantize-nan-scale", "library",
        lambda ctx: __import__("shrink.ops", fromlist=["x"]).quantize_per_tensor_static_int8(_t().randn(4),
                                                                                            float("nan")),
        ("scale",), "static INT8 quantization with a NaN scale"),
]


@row("quant-calibrate-empty", "library", ("calib_ids",))
def _(ctx):
    """Static calibration on an empty calibration set."""
    import torch

    from shrink.quant import QuantSpec, calibrate, wrap_model

    model, _ = tiny()
    wrap_model(model, QuantSpec(8, True, "token"), QuantSpec(8, False, "tensor", static=True))
    return calibrate(model, torch.zeros(0, 16, dtype=torch.long))


def _search(ctx, ck_text):
    import torch

    from shrink.quant import greedy_search

    model, _ = tiny()
    ck = ctx.tmp / "search.json"
    ck.write_text(ck_text)
    texts = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    return greedy_search(model, texts, torch.arange(4), tau=0.999, max_len=2, batch_size=4, checkpoint=ck)


ROWS += [
    Row("ckpt-truncated", "library", lambda ctx: _search(ctx, '{"settings": {"tau": 0.999, "max_'), ("search.json",),
        "a CushionCache search checkpoint cut mid-write"),
    Row("ckpt-is-a-list", "library", lambda ctx: _search(ctx, "[]"), ("search.json",), "a checkpoint holding []"),
    Row("ckpt-is-null", "library", lambda ctx: _search(ctx, "null"), ("search.json",), "a checkpoint holding null"),
    Row("ckpt-wrong-fields", "library", lambda ctx: _search(ctx, '{"settings": null, "tokens": "x"}'),
        (), "a checkpoint with foreign settings is ignored (not an error): the search runs from step 0"),
]
ROWS[-1].action = (lambda f: lambda ctx: (f(ctx), Outcome("clear", "ignored, searched afresh"))[1])(ROWS[-1].action)


@row("prefix-file-corrupt", "library", ("prefix.pt",))
def _(ctx):
    """A KVPrefix file that is not a torch file."""
    from shrink.models import KVPrefix

    p = ctx.tmp / "prefix.pt"
    p.write_bytes(b"not a torch file")
    return KVPrefix.load(p)


# --------------------------------------------------------------------------------------------------
# Library: notebook setup
# --------------------------------------------------------------------------------------------------
def _setup(ctx, threads=None, scale="tiny"):
    import torch

    from shrink import notebook

    if threads is not None:
        ctx.mp.setenv("SHRINK_THREADS", threads)
    n = torch.get_num_threads()
    try:
        return notebook.setup(seed=0, scale=scale, quiet=True)
    finally:
        torch.set_num_threads(n)


ROWS += [
    Row("setup-threads-abc", "library", lambda ctx: _setup(ctx, "abc"), ("SHRINK_THREADS",), "SHRINK_THREADS=abc"),
    Row("setup-threads-zero", "library", lambda ctx: _setup(ctx, "0"), ("SHRINK_THREADS",), "SHRINK_THREADS=0"),
    Row("setup-threads-negative", "library", lambda ctx: _setup(ctx, "-2"), ("SHRINK_THREADS",), "SHRINK_THREADS=-2"),
    Row("setup-unknown-scale", "library", lambda ctx: _setup(ctx, None, "medium"), ("medium",), "scale='medium'"),
]


# --------------------------------------------------------------------------------------------------
# shrink run: half-run notebooks never look done (in-process, papermill simulated: fast)
# --------------------------------------------------------------------------------------------------
def _half_run_nb(src_nb: Path, dst: Path, executed: int, error: bool = False):
    """Write what papermill leaves after ``executed`` code cells (the rest without execution_count)."""
    import jupytext
    import nbformat

    nb = jupytext.read(src_nb)
    k = 0
    for c in nb.cells:
        if c.cell_type == "code":
            k += 1
            c.execution_count = k if k <= executed else None
            c.outputs = []
            if error and k == executed:
                c.outputs = [nbformat.v4.new_output("error", ename="AssertionError", evalue="x", traceback=[])]
        c.metadata.setdefault("papermill", {})["status"] = "completed"
    nbformat.write(nb, str(dst))


def _run_simulated(ctx, behaviour, *, heading=True, n_code=6):
    """``shrink run`` with papermill replaced by ``behaviour(input, output)``; returns what is on disk."""
    import papermill

    nbdir = ctx.tmp / "nbs" / "notebooks" / "99-fault"
    nb = tiny_notebook(nbdir / "99x-sim.md", body=[f"y{i} = {i}" for i in range(n_code)] + ["x = 1"],
                       heading=heading)
    ctx.mp.setattr(papermill, "execute_notebook", lambda inp, out, **k: behaviour(nb, Path(out)))
    ctx.mp.chdir(ctx.tmp / "nbs")
    ctx.expect_interrupt = True
    try:
        res = cli_inprocess(["run", "notebooks/99-fault/99x-sim.md", "--scale", "tiny", "--out", "out"])
    except KeyboardInterrupt:
        res = Outcome("traceback", "KeyboardInterrupt escaped")
    finally:
        ctx.expect_interrupt = False
    out_dir = ctx.tmp / "nbs" / "out" / "tiny" / "99-fault"
    files = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
    done = (out_dir / "99x-sim.ipynb").exists()
    return res, files, done


def _looks_done_outcome(res, files, done):
    if done:
        return Outcome("looks-done", f"99x-sim.ipynb exists; files {files}")
    if any(f.endswith(".ipynb") and not f.endswith(".failed.ipynb") for f in files):
        return Outcome("looks-done", f"a *.ipynb is left: {files}")
    return Outcome("clear", f"nothing looks done; files {files}; {res.detail[:200]}")


@row("run-interrupt-midway", "signals")
def _(ctx):
    """Ctrl-C while papermill is executing (in-process KeyboardInterrupt after it wrote 2 of 8 cells)."""
    def behaviour(nb, out):
        _half_run_nb(nb, out, 2)
        raise KeyboardInterrupt
    return _looks_done_outcome(*_run_simulated(ctx, behaviour))


@row("run-half-executed-without-error", "signals")
def _(ctx):
    """papermill returns normally but cells never ran (a dead kernel marked as completed)."""
    return _looks_done_outcome(*_run_simulated(ctx, lambda nb, out: _half_run_nb(nb, out, 3)))


@row("run-no-sanity-cells", "signals")
def _(ctx):
    """A notebook without a sanity-check section: it must not be published as verified."""
    return _looks_done_outcome(*_run_simulated(ctx, lambda nb, out: _half_run_nb(nb, out, 99), heading=False))


@row("run-disk-full", "disk")
def _(ctx):
    """The disk fills up while papermill writes the output (injected OSError ENOSPC)."""
    def behaviour(nb, out):
        out.write_text('{"cells": [')  # half a file
        raise OSError(errno.ENOSPC, "No space left on device")
    res, files, done = _run_simulated(ctx, behaviour)
    o = _looks_done_outcome(res, files, done)
    if o.cls == "clear" and "No space left" not in res.detail:
        return Outcome("unclear", res.detail)
    return o


@row("run-failure-keeps-old-output-out", "signals")
def _(ctx):
    """A re-run that fails must not leave the previous (now stale) output looking done."""
    out_dir = ctx.tmp / "nbs" / "out" / "tiny" / "99-fault"
    out_dir.mkdir(parents=True)
    (out_dir / "99x-sim.ipynb").write_text("{}")

    def behaviour(nb, out):
        _half_run_nb(nb, out, 1, error=True)
        raise RuntimeError("PapermillExecutionError (simulated)")
    return _looks_done_outcome(*_run_simulated(ctx, behaviour))


@row("contract-half-run-notebook", "signals")
def _(ctx):
    """The contract test / make book must refuse a notebook with 4 of 11 code cells executed."""
    p = ctx.tmp / "half.ipynb"
    nb = tiny_notebook(ctx.tmp / "half.md", body=[f"y{i} = {i}" for i in range(8)] + ["x = 1"])
    _half_run_nb(nb, p, 4)
    return _contract_verdict(p)


def _contract_verdict(p: Path) -> Outcome:
    try:
        from shrink.notebook import check_executed
    except ImportError:  # the old contract test's criterion: no error output and >= 3 executed cells
        cells = json.loads(p.read_text())["cells"]
        errors = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])
                  if o["output_type"] == "error"]
        n = sum(1 for c in cells if c["cell_type"] == "code" and c.get("execution_count"))
        return Outcome("looks-done", "old contract accepts it") if not errors and n >= 3 else \
            Outcome("clear", "old contract refuses it")
    try:
        check_executed(p)
    except Exception as exc:  # noqa: BLE001
        from harness import classify_exception

        return classify_exception(exc, ("never ran",))
    return Outcome("looks-done", "check_executed accepted a half-run notebook")


# --------------------------------------------------------------------------------------------------
# Signals: a real `shrink run` process on a tiny notebook (kernel start: several seconds each)
# --------------------------------------------------------------------------------------------------
def _slow_nb(ctx) -> Path:
    return tiny_notebook(ctx.tmp / "nbs" / "notebooks" / "99-fault" / "99s-slow.md",
                         body="import time\nfor _ in range(1200):\n    time.sleep(0.1)\nx = 1")


def _spawn_run(ctx, nb: Path, env=None):
    e = dict(os.environ, **(env or {}))
    e.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.Popen([sys.executable, "-m", "shrink.cli", "run", str(nb.relative_to(ctx.tmp / "nbs")),
                             "--scale", "tiny", "--out", "out"], cwd=ctx.tmp / "nbs", env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_started(p, out_dir: Path, timeout=180):
    """Until the kernel is executing (papermill wrote its first output file), or the process ended."""
    t0 = time.time()
    while time.time() - t0 < timeout and p.poll() is None:
        if out_dir.exists() and any(f.name.startswith(".99s-slow.ipynb") or f.name == "99s-slow.ipynb"
                                    for f in out_dir.iterdir()):
            time.sleep(2.0)
            return True
        time.sleep(0.3)
    return False


def _signal_row(ctx, sig):
    nb = _slow_nb(ctx)
    out_dir = ctx.tmp / "nbs" / "out" / "tiny" / "99-fault"
    p = _spawn_run(ctx, nb)
    try:
        if not _wait_started(p, out_dir):
            return Outcome("traceback", f"run did not start: {p.communicate(timeout=30)}")
        p.send_signal(sig)
        try:
            stdout, stderr = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            return Outcome("traceback", "the run did not stop after the signal")
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the kernel too, whatever happened
        except (ProcessLookupError, PermissionError):
            pass
    files = sorted(f.name for f in out_dir.iterdir()) if out_dir.exists() else []
    if any(f.endswith(".ipynb") for f in files):
        return Outcome("looks-done", f"after {sig.name}: {files} (rc {p.returncode})")
    if p.returncode == 0:
        return Outcome("silent", f"rc 0 after {sig.name}")
    return Outcome("clear", f"rc {p.returncode}, files {files}")


@row("signal-sigint", "signals", slow=True)
def _(ctx):
    """SIGINT (Ctrl-C) during `shrink run`: no file looks done, exit non-zero."""
    return _signal_row(ctx, signal.SIGINT)


@row("signal-sigterm", "signals", slow=True)
def _(ctx):
    """SIGTERM during `shrink run` (a job scheduler's stop): no file looks done, exit non-zero."""
    return _signal_row(ctx, signal.SIGTERM)


@row("signal-sigkill-then-rerun", "signals", slow=True)
def _(ctx):
    """SIGKILL during `shrink run` leaves only a hidden temp file; a rerun completes and removes it."""
    o = _signal_row(ctx, signal.SIGKILL)
    if o.cls != "clear":
        return o
    nb = tiny_notebook(ctx.tmp / "nbs" / "notebooks" / "99-fault" / "99s-slow.md")  # now quick
    p = _spawn_run(ctx, nb)
    stdout, stderr = p.communicate(timeout=300)
    out_dir = ctx.tmp / "nbs" / "out" / "tiny" / "99-fault"
    files = sorted(f.name for f in out_dir.iterdir())
    if p.returncode != 0 or files != ["99s-slow.ipynb"]:
        return Outcome("lost", f"rerun rc {p.returncode}, files {files}: {stdout[-300:]} {stderr[-300:]}")
    return Outcome("clear", f"rerun resumed: {files}")


# --------------------------------------------------------------------------------------------------
# make
# --------------------------------------------------------------------------------------------------
def _make(args, cwd=ROOT, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    env.pop("PYTEST_CURRENT_TEST", None)  # inside `make test`: a clean make, not the parent's flags or overrides
    p = subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
    return p.returncode, p.stdout + p.stderr


def _make_row(args, names):
    def act(ctx):
        rc, out = _make(["-n", *args])
        if rc == 0:
            return Outcome("silent", f"rc 0: {out[-200:]}")
        return Outcome("clear-msg", out.strip().splitlines()[-1] if out.strip() else "")
    return act


ROWS += [
    Row("make-scale-huge", "make", _make_row(["notebooks", "SCALE=huge"], ("huge",)), ("huge",), "make SCALE=huge"),
    Row("make-book-scale-typo", "make", _make_row(["book", "BOOK_SCALE=cpu2"], ("cpu2",)), ("cpu2",),
        "make book BOOK_SCALE=cpu2"),
    Row("make-chapter-99", "make", _make_row(["notebooks", "CHAPTER=99", "SCALE=tiny"], ("99",)), ("CHAPTER=99",),
        "make CHAPTER=99"),
    Row("make-nb-readme", "make", _make_row(["notebooks", "NB=README.md", "SCALE=tiny"], ("README.md",)),
        ("README.md",), "make NB=README.md"),
    Row("make-nb-missing", "make", _make_row(["notebooks", "NB=notebooks/00-start/00-tuor.md", "SCALE=tiny"], ()),
        ("00-tuor.md",), "make NB=<a typo>"),
]


@row("make-delete-on-error", "make")
def _(ctx):
    """The Makefile declares .DELETE_ON_ERROR (a failed or interrupted recipe leaves no target behind)."""
    rc, out = _make(["-pn", "help"])
    declared = "\n.DELETE_ON_ERROR:" in out
    return Outcome("clear" if declared else "looks-done", "declared" if declared else "not declared")


def _stamp():
    rc, out = _make(["--eval", "print-stamp: ; @echo $(STAMP)", "print-stamp"])
    return out.strip().splitlines()[-1]


def _make_sandbox(ctx) -> Path:
    """A folder where ROOT's Makefile runs on a fault notebook with the real venv and no reinstall."""
    box = ctx.tmp / "mk"
    (box / "lib").mkdir(parents=True)
    for f in ("pyproject.toml", "Makefile"):
        (box / f).write_text("")
        os.utime(box / f, (1, 1))  # older than the venv stamp: `make` never reinstalls
    return box


@row("make-shows-why-a-notebook-failed", "make", ("x is not 2",), slow=True)
def _(ctx):
    """A notebook fails under make: the output names the notebook and its error (was hidden in /dev/null),
    and no build/executed/.../*.ipynb is left looking done."""
    box = _make_sandbox(ctx)
    tiny_notebook(box / "notebooks" / "99-fault" / "99f-fail.md", sanity='assert x == 2, "x is not 2"')
    venv = Path(sys.executable).parents[1]  # the venv running the tests (never reinstalled: see _make_sandbox)
    rc, out = _make(["-f", str(ROOT / "Makefile"), f"VENV={venv}", "notebooks", "SCALE=tiny",
                     "NB=notebooks/99-fault/99f-fail.md"], cwd=box)
    if (box / "build" / "executed" / "tiny" / "99-fault" / "99f-fail.ipynb").exists():
        return Outcome("looks-done", "make left the failed notebook as a target")
    if rc == 0:
        return Outcome("silent", out[-300:])
    return Outcome("clear-msg", out[-1500:])
