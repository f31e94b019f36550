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
from dataclasses import dataclass
from pathlib import Path

import torch

from . import env
from .errors import DataMissingError, OfflineError, UnknownNameError


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
        text = Path(src.removeprefix("offline:")).read_text(encoding="utf-8")
        if name == "fortunes":
            return [t.strip() for t in text.split("\n%\n") if t.strip()]
        return [text]
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
    ds = datasets.load_dataset("json", data_files=paths, split="train")
    if "text" not in ds.column_names:
        raise DataMissingError(f"{paths[0]} has no 'text' field; C4-format files are JSON lines with 'text'.")
    return list(ds["text"])


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
    if isinstance(docs, torch.Tensor):
        docs = [docs]
    long_docs = [d for d in docs if d.numel() > seqlen]
    if not long_docs:
        longest = max((d.numel() for d in docs), default=0)
        raise ValueError(f"no document is longer than seqlen={seqlen} tokens (longest: {longest}); "
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
        text = path.read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(text)
    return [_normalise_instruction(r) for r in rows]


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
            except (DataMissingError, OfflineError) as exc:
                out[f"{name}/{split}"] = {"available": False, "why": str(exc)}
    return out
