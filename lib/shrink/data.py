"""Corpus registry and the one calibration sampler.

Offline files are found through **one** environment variable, ``SHRINK_DATA`` (the shared data folder;
its ``MANIFEST.md`` lists the files and licences). With ``SHRINK_ONLINE=1`` the same names load through
``datasets`` instead. Nothing silently falls back: a corpus that is neither offline nor online here is an
error naming the fix, and every loader reports the source it used (``source()``).

Corpora (``CORPORA``) and splits::

    wikitext2    test (raw, rows joined with "\\n\\n" as GPTQ/SparseGPT/Wanda evaluate it),
                 validation (offline: the *tokenized* split with <unk>; the offline calibration text),
                 train (online only: wikitext-2-raw-v1 train)
    c4           train / validation (online: allenai/c4 shard 0; offline: local C4-format JSON files given
                 by ``SHRINK_C4_FILES`` or ``data_files=``, read through ``datasets``)
    pydocs       all (CPython's reference documentation topics; always available)
    shakespeare  all;  fortunes  all
    lima         train / test;  gsm8k  train;  gpteacher-roleplay, gpteacher-toolformer  train;
    selfinstruct-seed  train        (instruction sets: ``load_instructions``)

Introduced in: notebooks/00-start/00-tour.md
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import env
from .errors import BadInputError, DataCorruptError, DataMissingError, OfflineError, UnknownNameError, check_int


@dataclass(frozen=True)
class Corpus:
    """One registry entry. ``offline`` maps split -> file relative to ``SHRINK_DATA`` (None: built in)."""

    name: str
    kind: str  # "text" | "instructions"
    offline: dict
    online: dict  # split -> (dataset path, config, split) for datasets.load_dataset
    description: str


CORPORA: dict[str, Corpus] = {
    "wikitext2": Corpus("wikitext2", "text",
                        {"test": "wikitext-2/wiki.test.joined.txt", "validation": "wikitext-2/wiki.valid.tokens"},
                        {"test": ("wikitext", "wikitext-2-raw-v1", "test"),
                         "validation": ("wikitext", "wikitext-2-raw-v1", "validation"),
                         "train": ("wikitext", "wikitext-2-raw-v1", "train")},
                        "WikiText-2 (raw test for evaluation; offline validation is the tokenized split)"),
    "c4": Corpus("c4", "text", {},
                 {"train": ("allenai/c4", "en/c4-train.00000-of-01024.json.gz", "train"),
                  "validation": ("allenai/c4", "en/c4-validation.00000-of-00008.json.gz", "validation")},
                 "C4 (online: shard 0 as in SparseGPT/Wanda; offline: SHRINK_C4_FILES local JSON files)"),
    "pydocs": Corpus("pydocs", "text", {"all": None}, {}, "CPython reference documentation topics (built in)"),
    "shakespeare": Corpus("shakespeare", "text", {"all": "text/tiny_shakespeare.txt"}, {}, "Tiny Shakespeare"),
    "fortunes": Corpus("fortunes", "text", {"all": "text/fortunes.txt"}, {}, "Debian fortunes (items split on %)"),
    "lima": Corpus("lima", "instructions",
                   {"train": "instructions/lima_train.jsonl", "test": "instructions/lima_test.jsonl"},
                   {"train": ("GAIR/lima", None, "train"), "test": ("GAIR/lima", None, "test")}, "LIMA"),
    "gsm8k": Corpus("gsm8k", "instructions", {"train": "instructions/gsm8k_train_alpaca.json"},
                    {"train": ("openai/gsm8k", "main", "train")}, "GSM8K train, Alpaca format"),
    "gpteacher-roleplay": Corpus("gpteacher-roleplay", "instructions",
                                 {"train": "instructions/gpteacher_roleplay.json"}, {}, "GPTeacher role-play"),
    "gpteacher-toolformer": Corpus("gpteacher-toolformer", "instructions",
                                   {"train": "instructions/gpteacher_toolformer.json"}, {}, "GPTeacher toolformer"),
    "selfinstruct-seed": Corpus("selfinstruct-seed", "instructions",
                                {"train": "instructions/selfinstruct_seed_tasks.jsonl"}, {},
                                "Self-Instruct's 175 seed tasks"),
}


def corpus(name: str) -> Corpus:
    """The registry entry for ``name``; raises with the list of names if unknown."""
    if name not in CORPORA:
        raise UnknownNameError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")
    return CORPORA[name]


def data_dir() -> Path:
    """The offline data folder from ``SHRINK_DATA``; raises if unset or missing."""
    value = os.environ.get("SHRINK_DATA")
    if not value:
        raise DataMissingError("SHRINK_DATA is not set. Point it at the offline data folder, e.g. "
                               "`export SHRINK_DATA=$(realpath ../shared/data)` (the Makefile does this), "
                               "or set SHRINK_ONLINE=1 on a machine with internet.")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataMissingError(f"SHRINK_DATA={value} is not a folder. Point it at the offline data folder "
                               "that holds MANIFEST.md (../shared/data next to the checkout).")
    return path


def source(name: str, split: str) -> str:
    """Where ``(name, split)`` would load from here: ``"offline:<file>"``, ``"builtin"`` or ``"online:<id>"``.

    Offline files win when ``SHRINK_DATA`` holds them; otherwise ``datasets`` is used if ``SHRINK_ONLINE=1``.
    Raises (never guesses) when neither is possible.
    """
    c = corpus(name)
    splits = sorted(set(c.offline) | set(c.online))
    if split not in splits:
        raise UnknownNameError(f"corpus {name!r} has no split {split!r}; splits: {', '.join(splits)}")
    if split in c.offline:
        rel = c.offline[split]
        if rel is None:
            return "builtin"
        if os.environ.get("SHRINK_DATA"):
            path = data_dir() / rel
            if path.exists():
                if not path.is_file():
                    raise DataCorruptError(f"{path} is not a file (a {'folder' if path.is_dir() else 'special file'}"
                                           "). Restore the file from the shared data folder (see its MANIFEST.md).")
                return f"offline:{path}"
            if not env.online():
                raise DataMissingError(f"{path} is missing from SHRINK_DATA. Restore it from the shared data "
                                       "folder (see its MANIFEST.md) or set SHRINK_ONLINE=1.")
    if name == "c4" and _c4_files():
        return f"offline:{_c4_files()}"
    if split in c.online and env.online():
        ds, cfg, sp = c.online[split]
        return f"online:{ds}/{cfg}/{sp}"
    if split in c.offline:
        data_dir()  # raises the SHRINK_DATA message
    hint = " or give local C4-format files with SHRINK_C4_FILES" if name == "c4" else ""
    raise OfflineError(f"{name}/{split} is available online only: set SHRINK_ONLINE=1 on a machine with "
                       f"internet{hint}.")


# --------------------------------------------------------------------------------------------------
# Integrity: every offline file is checked against the sha256 in $SHRINK_DATA/MANIFEST.md
# --------------------------------------------------------------------------------------------------
_MANIFEST_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|.*\|\s*`([0-9a-f]{64})`\s*\|\s*$", re.M)
_VERIFIED: dict[str, tuple[int, int, str]] = {}  # path -> (size, mtime_ns, sha256) verified in this process


def manifest(root: Path | None = None) -> dict[str, str]:
    """``{relative path: sha256}`` from ``MANIFEST.md`` of the data folder (raises if it is missing)."""
    root = root or data_dir()
    path = root / "MANIFEST.md"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataMissingError(f"{path} cannot be read ({type(exc).__name__}); SHRINK_DATA={root} must be the "
                               "offline data folder with its MANIFEST.md (../shared/data next to the checkout).") \
            from None
    return dict(_MANIFEST_ROW.findall(text))


def _verdict_file() -> Path | None:
    try:
        return env.cache_dir() / "data-verified.json"
    except OSError:  # SHRINK_CACHE unusable: verify every time (same verdict, only slower)
        return None


sha256_file = env.sha256_file


def verify_file(path: Path) -> None:
    """Check an offline data file against the sha256 its ``MANIFEST.md`` row gives.

    The verdict is cached by ``(size, mtime)`` in this process and in ``$SHRINK_CACHE/data-verified.json``,
    so a file is hashed once per change. Files the manifest does not list are not checked. Raises
    :class:`DataCorruptError` naming the file and the fix on a mismatch.
    """
    root = data_dir()
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return
    want = manifest(root).get(rel)
    if want is None:
        return
    st = path.stat()
    key = str(path.resolve())
    stamp = (st.st_size, st.st_mtime_ns, want)
    if _VERIFIED.get(key) == stamp:
        return
    vf = _verdict_file()
    cache: dict = {}
    if vf is not None and vf.exists():
        try:
            cache = json.loads(vf.read_text())
        except (OSError, ValueError):
            cache = {}
    if not isinstance(cache, dict) or tuple(cache.get(key, ())) != stamp:
        got = sha256_file(path)
        if got != want:
            raise DataCorruptError(f"{path} does not match its sha256 in {root / 'MANIFEST.md'} (expected "
                                   f"{want[:12]}..., got {got[:12]}..., {st.st_size} bytes): the file is truncated "
                                   "or modified. Restore it from the shared data folder (copy it again).")
        if vf is not None:
            cache = cache if isinstance(cache, dict) else {}
            cache[key] = list(stamp)
            try:  # atomic, unique temp name: concurrent workers never see half a file
                fd, tmp = tempfile.mkstemp(prefix=".data-verified-", dir=vf.parent)
                with os.fdopen(fd, "w") as f:
                    json.dump(cache, f)
                os.replace(tmp, vf)
            except OSError:
                pass  # a read-only cache only costs a re-hash next time
    _VERIFIED[key] = stamp


def read_data_text(path: Path) -> str:
    """Read an offline data file as UTF-8 after :func:`verify_file`; errors name the file and the fix."""
    verify_file(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataCorruptError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}). Restore it from the "
                               "shared data folder, or convert it with `iconv -t utf-8`.") from None
    except OSError as exc:
        raise DataMissingError(f"{path} cannot be read ({exc.strerror or exc}). Check its permissions, or restore "
                               "it from the shared data folder.") from None


def _nonempty(docs: list[str], what: str) -> list[str]:
    if not docs or not any(d.strip() for d in docs):
        raise DataCorruptError(f"{what} holds no text (empty corpus). Restore the file from the shared data "
                               "folder, or give files with a non-empty 'text' field.")
    return docs


def _c4_files() -> str | None:
    return os.environ.get("SHRINK_C4_FILES") or None


def load_documents(name: str, split: str = "all", *, data_files: str | list[str] | None = None) -> list[str]:
    """The corpus as a list of documents (strings).

    ``wikitext2/test`` is one document (the joined raw test set); ``wikitext2/validation`` offline is one
    document (the tokenized file); ``fortunes`` is one document per fortune; ``pydocs`` one per topic;
    ``c4`` one per JSON row's ``text``.

    Args:
        data_files: C4 only: local JSON(.gz) files in C4's format, read through ``datasets`` (overrides
            ``SHRINK_C4_FILES``).
    """
    c = corpus(name)
    if c.kind != "text":
        raise UnknownNameError(f"{name!r} is an instruction set: use shrink.data.load_instructions({name!r})")
    if name == "c4" and data_files is not None:
        return _load_json_texts(data_files)
    src = source(name, split)
    if src == "builtin":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    if src.startswith("offline:"):
        if name == "c4":
            return _load_json_texts(src.removeprefix("offline:"))
        path = Path(src.removeprefix("offline:"))
        text = read_data_text(path)
        if name == "fortunes":
            return _nonempty([t.strip() for t in text.split("\n%\n") if t.strip()], str(path))
        return _nonempty([text], str(path))
    import datasets

    ds_name, cfg, sp = c.online[split]
    if name == "c4":
        ds = datasets.load_dataset(ds_name, data_files={sp: cfg}, split=sp)
        return list(ds["text"])
    ds = datasets.load_dataset(ds_name, cfg, split=sp)
    return ["\n\n".join(ds["text"])]  # wikitext: rows joined as GPTQ does


def _load_json_texts(files: str | list[str]) -> list[str]:
    import datasets

    paths = sorted(glob.glob(files)) if isinstance(files, str) else list(files)
    if not paths:
        raise DataMissingError(f"no C4-format files match {files!r}; give JSON lines files with a 'text' field.")
    for p in paths:
        if not Path(p).is_file():
            raise DataMissingError(f"C4-format file {p} is missing or not a file; give JSON lines files with a "
                                   "'text' field (data_files= or SHRINK_C4_FILES).")
    try:
        ds = datasets.load_dataset("json", data_files=paths, split="train")
    except Exception as exc:  # noqa: BLE001 - datasets raises several types for one cause: a bad file
        raise DataCorruptError(f"the C4-format files {paths} cannot be read as JSON lines "
                               f"({type(exc).__name__}: {str(exc)[:200]}); each line must be a JSON object with "
                               "a 'text' field. Fix or replace the files.") from None
    if "text" not in ds.column_names:
        raise DataMissingError(f"{paths[0]} has no 'text' field; C4-format files are JSON lines with 'text'.")
    return _nonempty(list(ds["text"]), f"the C4-format files {paths}")


def load_text(name: str, split: str = "all") -> str:
    """The corpus as one string (documents joined with ``"\\n\\n"``)."""
    return "\n\n".join(load_documents(name, split))


def tokenize_documents(tokenizer, docs: list[str]) -> list[torch.Tensor]:
    """Tokenize each document without special tokens: list of int64 tensors ``[n_i]``."""
    return [torch.tensor(tokenizer.encode(d, add_special_tokens=False), dtype=torch.long) for d in docs]


def eval_tokens(tokenizer, name: str = "wikitext2", split: str = "test") -> torch.Tensor:
    """The evaluation stream: the joined corpus tokenized once, int64 ``[N]`` (GPTQ/SparseGPT convention)."""
    return tokenize_documents(tokenizer, [load_text(name, split)])[0]


def calibration_windows(docs: list[torch.Tensor] | torch.Tensor, nsamples: int, seqlen: int,
                        seed: int = 0) -> torch.Tensor:
    """THE calibration sampler: ``nsamples`` random windows of ``seqlen`` tokens, seeded.

    Follows SparseGPT/GPTQ's C4 sampler: draw a random document, redraw until it is **longer** than the
    window, take a uniformly random window start. A single token stream (a 1-D tensor) is one document.

    Args:
        docs: list of int64 token tensors ``[n_i]`` (or one ``[N]`` tensor).
        nsamples: number of windows.
        seqlen: window length in tokens.
        seed: seed of a private ``random.Random`` (no global state is touched).

    Returns:
        int64 tensor ``[nsamples, seqlen]``.
    """
    check_int("nsamples", nsamples, fix="A calibration set needs at least one window (nsamples=16 is common).")
    check_int("seqlen", seqlen, minimum=2, fix="Calibration windows need at least 2 tokens (seqlen=256 is common).")
    if isinstance(docs, torch.Tensor):
        docs = [docs]
    long_docs = [d for d in docs if d.numel() > seqlen]
    if not long_docs:
        longest = max((d.numel() for d in docs), default=0)
        raise BadInputError(f"no document is longer than seqlen={seqlen} tokens (longest: {longest}); "
                            "use a shorter seqlen or a corpus with longer documents.")
    rng = random.Random(seed)
    out = torch.empty(nsamples, seqlen, dtype=torch.long)
    for s in range(nsamples):
        while True:
            d = docs[rng.randrange(len(docs))]
            if d.numel() > seqlen:
                break
        start = rng.randrange(0, d.numel() - seqlen)
        out[s] = d[start:start + seqlen]
    return out


def calibration_set(tokenizer, name: str = "wikitext2", split: str = "validation", *, nsamples: int = 16,
                    seqlen: int = 256, seed: int = 0, data_files=None) -> torch.Tensor:
    """Load, tokenize and sample a calibration set: int64 ``[nsamples, seqlen]``."""
    docs = load_documents(name, split, data_files=data_files) if name == "c4" else load_documents(name, split)
    return calibration_windows(tokenize_documents(tokenizer, docs), nsamples, seqlen, seed)


def load_instructions(name: str, split: str = "train") -> list[dict]:
    """An instruction set as ``[{"instruction", "input", "output"}]`` (LIMA: first turn / second turn;
    LIMA test has no output). Offline only for the GPTeacher and Self-Instruct files."""
    c = corpus(name)
    if c.kind != "instructions":
        raise UnknownNameError(f"{name!r} is a text corpus: use shrink.data.load_documents({name!r})")
    src = source(name, split)
    if not src.startswith("offline:"):
        import datasets

        ds_name, cfg, sp = c.online[split]
        rows = list(datasets.load_dataset(ds_name, cfg, split=sp))
    else:
        path = Path(src.removeprefix("offline:"))
        rows = _parse_instructions(path, read_data_text(path))
    return [_normalise_instruction(r) for r in rows]


def _parse_instructions(path: Path, text: str) -> list[dict]:
    """JSON lines (``.jsonl``) or one JSON list of objects; errors name the file and the line."""
    fix = "The file is truncated or not JSON: restore it from the shared data folder."
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise DataCorruptError(f"{path}:{i}: not a JSON object ({exc.msg}). {fix}") from None
    else:
        try:
            rows = json.loads(text)
        except ValueError as exc:
            raise DataCorruptError(f"{path}: invalid JSON at line {getattr(exc, 'lineno', '?')} "
                                   f"({getattr(exc, 'msg', exc)}). {fix}") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise DataCorruptError(f"{path} must hold a non-empty list of JSON objects (instruction rows). {fix}")
    return rows


def _normalise_instruction(r: dict) -> dict:
    if "conversations" in r:  # LIMA
        conv = r["conversations"]
        return {"instruction": conv[0], "input": "", "output": conv[1] if len(conv) > 1 else ""}
    if "question" in r and "answer" in r:  # GSM8K online format
        return {"instruction": r["question"], "input": "", "output": r["answer"]}
    if "instances" in r:  # Self-Instruct seed tasks
        inst = r["instances"][0] if r["instances"] else {}
        return {"instruction": r["instruction"], "input": inst.get("input", ""), "output": inst.get("output", "")}
    return {"instruction": r.get("instruction", ""), "input": r.get("input", ""), "output": r.get("output", "")}


def available() -> dict[str, dict]:
    """For ``shrink info``: which corpus/split pairs can be loaded here and from where."""
    out = {}
    for name, c in CORPORA.items():
        for split in sorted(set(c.offline) | set(c.online)):
            try:
                out[f"{name}/{split}"] = {"available": True, "source": source(name, split)}
            except (DataMissingError, DataCorruptError, OfflineError) as exc:
                out[f"{name}/{split}"] = {"available": False, "why": str(exc)}
    return out
