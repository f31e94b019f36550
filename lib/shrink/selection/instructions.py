"""The instruction pool of the recovery experiments (notebooks 04c PASER, 04d Diversify & Conquer).

Sources (all Alpaca format ``{"instruction", "input", "output"}``, read through :func:`shrink.data.load_instructions`):
LIMA (first turn pair of each conversation), GSM8K train (the final answer is the last number of ``output``),
GPTeacher role-play and toolformer, Self-Instruct's seed tasks. A source may also be

* a path to a local **Alpaca-format** JSON / JSON-lines file (``.json`` / ``.jsonl``, e.g. a copy of
  ``alpaca_data_cleaned.json`` or LaMini rows renamed to ``instruction``/``output``), or
* ``hf:<dataset id>`` — a Hub dataset in Alpaca format (``yahma/alpaca-cleaned``), read through ``datasets``
  only with ``SHRINK_ONLINE=1`` (paper scale).

Construction (deterministic in ``seed``):

1. every source is loaded, rows with an empty instruction or output are dropped and exact duplicates
   (sha256 of instruction + input + output) removed, first occurrence kept;
2. a permutation of the source's rows is drawn with ``np.random.default_rng([seed, crc32(source name)])``;
   the first ``heldout`` rows of it are the source's **held-out split**, the next ``n`` the **pool**
   (so the two are disjoint by construction — a test checks it by id and by content hash);
3. each example keeps ``source`` and ``id = "<source>:<row index in the source file>"``.

Responses are truncated at tokenisation (``max_response`` tokens, :func:`shrink.train.tokenize_sft`), not in
the text, so every tokenizer sees the same examples. :meth:`InstructionPool.sha256` fingerprints the pool and
the held-out split (ordered content hashes) for records.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import data as D
from .errors import SelectionError

#: The offline instruction sources, in pool order.
SOURCES = ("lima", "gsm8k", "gpteacher-roleplay", "gpteacher-toolformer", "selfinstruct-seed")


def example_sha(ex: dict) -> str:
    """sha256 of ``instruction \\x1f input \\x1f output`` (the content hash of one example)."""
    s = "\x1f".join((ex["instruction"], ex.get("input", "") or "", ex["output"]))
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


def _load_source(name: str) -> list[dict]:
    """Alpaca-format rows of one source (registry corpus, local file or ``hf:`` dataset)."""
    if name in D.CORPORA:
        return D.load_instructions(name, "train")
    if name.startswith("hf:"):
        from .. import env

        if not env.online():
            raise SelectionError(f"source {name!r} is a Hub dataset: set SHRINK_ONLINE=1 on a machine with "
                                 "internet, or pass a local Alpaca-format JSON file path instead.")
        import datasets

        return [D._normalise_instruction(dict(r)) for r in datasets.load_dataset(name[3:], split="train")]
    p = Path(name)
    if p.suffix in (".json", ".jsonl"):
        if not p.is_file():
            raise SelectionError(f"instruction file {p} does not exist; pass an existing Alpaca-format "
                                 "JSON (list of {instruction, input, output}) or JSON-lines file.")
        rows = D._parse_instructions(p, p.read_text(encoding="utf-8"))
        out = [D._normalise_instruction(r) for r in rows]
        if not any(r["instruction"] and r["output"] for r in out):
            raise SelectionError(f"{p} has no row with both 'instruction' and 'output': it is not in Alpaca "
                                 "format; rename its fields to instruction / input / output.")
        return out
    raise SelectionError(f"unknown instruction source {name!r}: use one of {list(SOURCES)} (offline), a path to "
                         "an Alpaca-format .json/.jsonl file, or hf:<dataset id> with SHRINK_ONLINE=1.")


def source_label(name: str) -> str:
    """Short label of a source (a file's stem, an ``hf:`` id's last part)."""
    if name in D.CORPORA:
        return name
    if name.startswith("hf:"):
        return name[3:].split("/")[-1]
    return Path(name).stem


@dataclass
class InstructionPool:
    """The pool (``train``) and the held-out split (``heldout``), lists of example dicts
    ``{"instruction", "input", "output", "source", "id", "sha256"}``."""

    train: list[dict]
    heldout: list[dict]
    config: dict

    @property
    def sources(self) -> list[str]:
        """Source label of every pool example (``[n]``)."""
        return [e["source"] for e in self.train]

    def heldout_by_source(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for e in self.heldout:
            out.setdefault(e["source"], []).append(e)
        return out

    def sha256(self) -> str:
        """sha256 over the ordered content hashes of the pool, then of the held-out split (first 16 hex)."""
        h = hashlib.sha256()
        for part in (self.train, self.heldout):
            for e in part:
                h.update(e["sha256"].encode())
            h.update(b"|")
        return h.hexdigest()[:16]

    def summary(self) -> list[dict]:
        """One row per source: pool and held-out sizes, mean characters of instruction+input and output."""
        rows = []
        tr, ho = Counter(self.sources), Counter(e["source"] for e in self.heldout)
        for s in dict.fromkeys(self.sources + [e["source"] for e in self.heldout]):
            ex = [e for e in self.train if e["source"] == s]
            rows.append({"source": s, "pool": tr[s], "held-out": ho[s],
                         "prompt chars": float(np.mean([len(e["instruction"]) + len(e["input"]) for e in ex])) if ex else 0.0,
                         "output chars": float(np.mean([len(e["output"]) for e in ex])) if ex else 0.0})
        return rows

    def texts(self, field: str = "instruction") -> list[str]:
        """``instruction`` (+ ``input``) texts of the pool (``field="prompt"``), or the instruction only."""
        if field == "prompt":
            return [(e["instruction"] + ("\n" + e["input"] if e["input"] else "")) for e in self.train]
        return [e[field] for e in self.train]


def _counts(value, sources: Sequence[str], what: str) -> dict[str, int]:
    if isinstance(value, dict):
        missing = [s for s in sources if s not in value]
        if missing:
            raise SelectionError(f"{what} has no entry for sources {missing}; give one count per source.")
        d = {s: value[s] for s in sources}
    else:
        d = {s: value for s in sources}
    for s, v in d.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0):
            raise SelectionError(f"{what}[{s!r}]={v!r} must be a non-negative integer (or None: all rows).")
    return d


def build_pool(sources: Sequence[str] = SOURCES, *, per_source=200, heldout=20, seed: int = 0) -> InstructionPool:
    """The deterministic pool and held-out split (see the module docstring).

    Args:
        sources: source names (offline corpora, Alpaca-format file paths, ``hf:`` ids).
        per_source: pool examples per source (an int, or ``{source: int}``; ``None``: every row left after
            the held-out split). A source with fewer rows gives what it has.
        heldout: held-out examples per source (int or dict), drawn first.
        seed: the subsample seed.

    Returns:
        :class:`InstructionPool`.
    """
    sources = list(sources)
    if not sources or len(set(sources)) != len(sources):
        raise SelectionError(f"sources={sources!r} must be a non-empty list of distinct names.")
    n_pool, n_held = _counts(per_source, sources, "per_source"), _counts(heldout, sources, "heldout")
    train, held = [], []
    for name in sources:
        label = source_label(name)
        rows, seen = [], set()
        for i, r in enumerate(_load_source(name)):
            if not str(r["instruction"]).strip() or not str(r["output"]).strip():
                continue
            ex = {"instruction": str(r["instruction"]), "input": str(r.get("input", "") or ""),
                  "output": str(r["output"]), "source": label, "id": f"{label}:{i}"}
            ex["sha256"] = example_sha(ex)
            if ex["sha256"] in seen:
                continue
            seen.add(ex["sha256"])
            rows.append(ex)
        if not rows:
            raise SelectionError(f"source {name!r} has no example with a non-empty instruction and output.")
        perm = np.random.default_rng([seed, zlib.crc32(label.encode())]).permutation(len(rows))
        h = min(n_held[name] or 0, len(rows) - 1) if n_held[name] is not None else 0
        held.extend(rows[j] for j in perm[:h])
        rest = perm[h:]
        k = len(rest) if n_pool[name] is None else min(n_pool[name], len(rest))
        train.extend(rows[j] for j in rest[:k])
    config = {"sources": sources, "per_source": {s: n_pool[s] for s in sources},
              "heldout": {s: n_held[s] for s in sources}, "seed": seed}
    return InstructionPool(train, held, config)


def write_alpaca_json(path: str | Path, examples: Sequence[dict]) -> Path:
    """Write ``examples`` as one Alpaca-format JSON list (``instruction``, ``input``, ``output``)."""
    path = Path(path)
    path.write_text(json.dumps([{"instruction": e["instruction"], "input": e.get("input", ""),
                                 "output": e["output"]} for e in examples], ensure_ascii=False), encoding="utf-8")
    return path
