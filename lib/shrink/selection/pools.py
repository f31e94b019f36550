"""Offline selection pools: 128-word chunks with domain, licence and content hash, streamed from shards.

DSIR's paper pipeline (``experimental/data_selection/dsir_pipeline.py``) cuts The Pile into chunks of 128
space-delimited words; the maintainer recommends equal-length chunks because the log importance weight
grows linearly with length. We do the same with the offline corpora of :mod:`shrink.data`:

* every corpus is read through ``shrink.data`` (``load_documents`` / ``load_instructions``), its documents
  joined with a blank line into one stream, split on whitespace and cut into **full** chunks of
  ``words`` words (the short tail is dropped); instruction sets become ``instruction\\ninput\\noutput``;
* exact duplicates (same SHA-256 of the text) are dropped, the first occurrence kept;
* WikiText-2 validation is split into its articles (``" = Title = "`` lines): the **even** articles are the
  DSIR target, the **odd** ones are the ``wikitext2`` pool domain (only when ``with_wiki=True``), so the
  target never appears in the pool and the same target serves both settings;
* ``max_per_domain`` keeps a seeded random subset of each domain (tiny scale), in pool order.

A chunk is a plain dict ``{"id", "text", "domain", "licence", "sha256", "n_words"}``. Pools are written as
JSON-lines shards (``.jsonl`` or ``.jsonl.zst``) with :func:`write_shards` (atomic per shard) and read back
one line at a time with :func:`iter_shards`, never whole in memory. With ``SHRINK_ONLINE=1`` the same
builder streams ``datasets`` corpora (:func:`stream_hf_chunks`: The Pile / SlimPajama / C4).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import random
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from .. import data as D
from .errors import SelectionError, ShardError

#: Licence per corpus (from the offline data folder's MANIFEST.md).
LICENCES = {
    "wikitext2": "CC BY-SA 3.0",
    "shakespeare": "public domain",
    "fortunes": "BSD-style (Debian fortunes, see FORTUNES_COPYRIGHT.txt)",
    "pydocs": "PSF-2.0 (CPython documentation)",
    "lima": "CC BY-NC-SA (research use)",
    "gsm8k": "MIT",
    "gpteacher-roleplay": "MIT (GPT-4 generated)",
    "gpteacher-toolformer": "MIT (GPT-4 generated)",
    "selfinstruct-seed": "Apache-2.0",
}
#: Pool domains besides WikiText (which enters only with ``with_wiki=True``).
DOMAINS = ("shakespeare", "fortunes", "pydocs", "lima", "gsm8k", "gpteacher-roleplay", "gpteacher-toolformer",
           "selfinstruct-seed")
_ARTICLE = re.compile(r"^ = [^=].* = $")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def chunk_words(text: str, words: int = 128) -> list[str]:
    """Cut ``text`` into full chunks of ``words`` whitespace-separated words (joined by one space)."""
    if words <= 0:
        raise SelectionError(f"words per chunk must be positive, got {words}; use 128 (DSIR's pipeline).")
    toks = text.split()
    return [" ".join(toks[i:i + words]) for i in range(0, len(toks) - words + 1, words)]


def wikitext_articles(split: str = "validation") -> list[str]:
    """WikiText-2 (offline: tokenized validation) as a list of articles, in file order."""
    lines = D.load_text("wikitext2", split).split("\n")
    articles, cur = [], []
    for line in lines:
        if _ARTICLE.match(line) and cur:
            articles.append("\n".join(cur))
            cur = []
        cur.append(line)
    if cur:
        articles.append("\n".join(cur))
    return [a for a in articles if a.strip()]


def domain_text(domain: str) -> str:
    """One corpus as the stream its chunks are cut from."""
    if domain == "wikitext2":
        return "\n\n".join(wikitext_articles()[1::2])
    if domain == "wikitext2-target":
        return "\n\n".join(wikitext_articles()[0::2])
    kind = D.corpus(domain).kind
    if kind == "instructions":
        rows = D.load_instructions(domain, "train")
        return "\n\n".join("\n".join(x for x in (r["instruction"], r["input"], r["output"]) if x) for r in rows)
    return D.load_text(domain, "all")


def _records(domain: str, texts: Iterable[str], licence: str) -> Iterator[dict]:
    for i, t in enumerate(texts):
        yield {"id": f"{domain}/{i:06d}", "text": t, "domain": domain, "licence": licence, "sha256": sha256(t),
               "n_words": len(t.split())}


def build_pool(domains: Iterable[str] = DOMAINS, *, with_wiki: bool = False, words: int = 128,
               max_per_domain: int | None = None, seed: int = 0) -> list[dict]:
    """The raw pool: chunk records of every domain (WikiText's odd articles first when ``with_wiki``).

    Args:
        domains: corpus names of :mod:`shrink.data` (text or instruction sets).
        with_wiki: add the ``wikitext2`` domain (odd validation articles; the target is the even ones).
        words: words per chunk (DSIR: 128).
        max_per_domain: keep a seeded random subset of at most this many chunks per domain (None: all).
        seed: seed of that subset (a private ``random.Random``).

    Returns:
        list of chunk dicts; ids are ``"<domain>/<index within domain>"``; no two chunks share a sha256.
    """
    names = (["wikitext2"] if with_wiki else []) + [d for d in domains if d != "wikitext2"]
    unknown = [d for d in names if d not in LICENCES]
    if unknown:
        raise SelectionError(f"unknown pool domain(s) {unknown}; use known domains: {', '.join(LICENCES)} "
                             "(or stream an online corpus with stream_hf_chunks).")
    seen: set[str] = set()
    pool: list[dict] = []
    for d in names:
        recs = [r for r in _records(d, chunk_words(domain_text(d), words), LICENCES[d])]
        if max_per_domain is not None and len(recs) > max_per_domain:
            keep = sorted(random.Random(f"{seed}/{d}").sample(range(len(recs)), max_per_domain))
            recs = [recs[i] for i in keep]
        for r in recs:
            if r["sha256"] not in seen:
                seen.add(r["sha256"])
                pool.append(r)
    return pool


def target_chunks(words: int = 128, max_chunks: int | None = None) -> list[dict]:
    """The DSIR target: WikiText-2 validation, even articles, cut into the same chunks (all, or the first
    ``max_chunks``)."""
    recs = list(_records("wikitext2-target", chunk_words(domain_text("wikitext2-target"), words), LICENCES["wikitext2"]))
    return recs[:max_chunks] if max_chunks is not None else recs


def pool_hash(chunks: Iterable[dict]) -> str:
    """sha256 over the ordered chunk hashes: one fingerprint of a pool (first 16 hex)."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(c["sha256"].encode())
    return h.hexdigest()[:16]


def summary(chunks: list[dict]) -> list[dict]:
    """Per-domain rows: chunks, words, licence, share of the pool."""
    n = Counter(c["domain"] for c in chunks)
    lic = {c["domain"]: c["licence"] for c in chunks}
    total = sum(n.values())
    return [{"domain": d, "chunks": n[d], "words": sum(c["n_words"] for c in chunks if c["domain"] == d),
             "share": n[d] / total, "licence": lic[d]} for d in n]


# ----------------------------------------------------------------------------------------------- shards
def _open_write(path: Path):
    if path.name.endswith(".zst"):
        import zstandard

        raw = open(path, "wb")
        return io.TextIOWrapper(zstandard.ZstdCompressor(level=3).stream_writer(raw), encoding="utf-8")
    return open(path, "w", encoding="utf-8")


def write_shards(chunks: Iterable[dict], out_dir: str | Path, n_shards: int, *, compress: bool = True,
                 prefix: str = "pool") -> list[Path]:
    """Write chunks **contiguously** into ``n_shards`` JSON-lines shards.

    Chunk ``i`` of ``N`` goes to shard ``i * n_shards // N`` so concatenating the shards in name order
    gives the pool order back (the global index of a chunk is its line number across shards). Each shard
    is written to a temporary file and renamed, so a shard on disk is always complete.

    Returns:
        the shard paths, ``<prefix>-00000-of-00004.jsonl[.zst]``.
    """
    chunks = list(chunks)
    if n_shards <= 0 or n_shards > max(1, len(chunks)):
        raise SelectionError(f"n_shards={n_shards} must be in [1, {len(chunks)}] (the number of chunks); use "
                             "fewer shards or give more chunks.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ext = ".jsonl.zst" if compress else ".jsonl"
    paths = []
    n = len(chunks)
    for s in range(n_shards):
        lo, hi = -(-s * n // n_shards), -(-(s + 1) * n // n_shards)
        path = out_dir / f"{prefix}-{s:05d}-of-{n_shards:05d}{ext}"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=ext, dir=out_dir)
        os.close(fd)
        try:
            with _open_write(Path(tmp)) as f:
                for c in chunks[lo:hi]:
                    f.write(json.dumps(c, ensure_ascii=False) + "\n")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        paths.append(path)
    return paths


def shard_paths(pattern: str | list[str]) -> list[Path]:
    """Shard files matching a glob (sorted by name) or a list of paths; raises when none match."""
    paths = sorted(Path(p) for p in glob.glob(pattern)) if isinstance(pattern, str) else [Path(p) for p in pattern]
    if not paths:
        raise ShardError(f"no shard matches {pattern!r}; write a pool with shrink.selection.pools.write_shards "
                         "or give a glob such as 'shards/*.jsonl.zst'.")
    return paths


def _zst_lines(path: Path, block: int = 1 << 20) -> Iterator[str]:
    """Lines of a .zst file, decompressed incrementally; a truncated stream (no end of frame) raises."""
    import codecs

    import zstandard

    dobj = zstandard.ZstdDecompressor().decompressobj()
    dec = codecs.getincrementaldecoder("utf-8")()
    tail = ""
    with open(path, "rb") as raw:
        while True:
            buf = raw.read(block)
            if not buf:
                break
            text = tail + dec.decode(dobj.decompress(buf))
            lines = text.split("\n")
            tail = lines.pop()
            yield from (line + "\n" for line in lines)
    if not dobj.eof:
        raise ShardError(f"{path} is truncated (the zstd frame does not end); the shard is corrupt: regenerate "
                         "it (write_shards) or delete it.")
    tail += dec.decode(b"", final=True)
    if tail:
        yield tail


def iter_shard(path: str | Path, field: str | None = None) -> Iterator[dict]:
    """Stream one shard line by line (``.jsonl`` or ``.jsonl.zst``); a record lacking ``field``, a broken
    line or a truncated/corrupt compressed stream raises :class:`ShardError` naming the file and the fix."""
    path = Path(path)
    try:
        if path.name.endswith(".zst"):
            lines = _zst_lines(path)
        else:
            lines = open(path, encoding="utf-8")
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ShardError(f"{path}:{lineno} is not JSON ({exc}); the shard is corrupt: regenerate it "
                                 "(write_shards) or delete it.") from exc
            if field is not None and field not in rec:
                raise ShardError(f"{path}:{lineno} has no {field!r} field; pool records need "
                                 f"{field!r}: rebuild the shard with shrink.selection.pools.write_shards.")
            yield rec
    except ShardError:
        raise
    except Exception as exc:  # zstd errors have their own class
        if type(exc).__module__.startswith("zstandard") or isinstance(exc, (UnicodeDecodeError, OSError)):
            raise ShardError(f"{path} cannot be read ({type(exc).__name__}: {exc}); the shard is corrupt or "
                             "truncated: regenerate it (write_shards) or delete it.") from exc
        raise


def iter_shards(pattern: str | list[str], field: str | None = "text") -> Iterator[dict]:
    """Stream all shards of a pool in name order (the global chunk order)."""
    for p in shard_paths(pattern):
        yield from iter_shard(p, field)


def stream_hf_chunks(dataset: str, config: str | None = None, split: str = "train", *, text_field: str = "text",
                     words: int = 128, limit: int | None = None, domain_field: str | None = None) -> Iterator[dict]:
    """Online (``SHRINK_ONLINE=1``): stream a ``datasets`` corpus (The Pile / SlimPajama shards, C4) into
    the same chunk records, without holding it in memory. ``domain_field`` names a metadata field to use
    as the domain (e.g. The Pile's ``meta.pile_set_name``: give ``"meta.pile_set_name"``)."""
    from .. import env
    from ..errors import OfflineError

    if not env.online():
        raise OfflineError(f"streaming {dataset} needs the network: set SHRINK_ONLINE=1 on a machine with "
                           "internet, or build an offline pool with build_pool().")
    import datasets

    ds = datasets.load_dataset(dataset, config, split=split, streaming=True)
    n = 0
    for row in ds:
        dom = row
        for part in (domain_field or "").split("."):
            dom = dom.get(part, {}) if part and isinstance(dom, dict) else dom
        dom = dom if isinstance(dom, str) else dataset
        for t in chunk_words(row[text_field], words):
            yield {"id": f"{dataset}/{n:09d}", "text": t, "domain": dom, "licence": f"see {dataset}",
                   "sha256": sha256(t), "n_words": words}
            n += 1
            if limit is not None and n >= limit:
                return
