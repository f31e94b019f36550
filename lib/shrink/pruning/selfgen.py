"""Self-generated calibration data ("Rethinking Pruning LLMs", Shin et al. 2024, Sec. 4 and App. C).

Recipe of the official ``generate_data.py`` (after LLM-QAT): draw a random first token, continue it greedily
to a short prefix (1 random + 4 greedy tokens), accept the prefix only if it looks like English, then sample
the rest (``do_sample=True``, temperature 1.0, top-k 50: the ``transformers`` defaults of the paper's pin).

Offline deviation (documented, parameter ``min_alpha``): the paper's language filter is ``langdetect ==
'en'``; offline we accept a prefix when at least ``min_alpha`` of its decoded characters are ASCII letters or
spaces (a heuristic: it rejects code, digits and non-Latin scripts, not every non-English Latin text).
Generation is batched: all accepted prefixes are sampled together.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ShrinkError


def looks_english(text: str, min_alpha: float = 0.8) -> bool:
    """Offline stand-in for ``langdetect.detect(text) == 'en'``: fraction of ASCII letters/spaces."""
    text = text.strip()
    if not text:
        return False
    ok = sum(c.isascii() and (c.isalpha() or c == " ") for c in text)
    return ok / len(text) >= min_alpha


@torch.no_grad()
def self_generate(model: nn.Module, tokenizer, nsamples: int, seqlen: int, *, seed: int = 0, prefix_len: int = 5,
                  top_k: int = 50, temperature: float = 1.0, min_alpha: float = 0.8, batch_size: int = 16,
                  max_tries: int = 50) -> torch.Tensor:
    """Generate ``nsamples`` sequences of exactly ``seqlen`` tokens from ``model`` itself.

    Args:
        model, tokenizer: the dense model and its tokenizer.
        nsamples, seqlen: output shape.
        seed: seeds the start tokens and the sampling (private generators; global RNG state restored).
        prefix_len: 1 random + ``prefix_len - 1`` greedy tokens (paper: 5).
        top_k, temperature: sampling parameters (HF defaults 50 / 1.0).
        min_alpha: language-filter threshold (see module docstring); 0 disables the filter.
        batch_size: sequences sampled per ``generate`` call.
        max_tries: start tokens tried per accepted prefix before giving up.
    Returns:
        int64 ``[nsamples, seqlen]``. EOS is suppressed so that every sequence has ``seqlen`` tokens
        (the paper keeps only texts longer than the window; suppressing EOS is the fixed-length equivalent).
    """
    if nsamples <= 0 or seqlen <= prefix_len:
        raise ShrinkError(f"self_generate needs nsamples > 0 and seqlen > prefix_len ({prefix_len}); "
                          f"got {nsamples}, {seqlen}")
    device = next(model.parameters()).device
    vocab = int(getattr(tokenizer, "vocab_size", None) or model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    prefixes, tries = [], 0
    while len(prefixes) < nsamples:
        tries += 1
        if tries > max_tries * nsamples:
            raise ShrinkError(f"only {len(prefixes)} of {nsamples} prefixes passed the language filter after "
                              f"{tries} tries; lower min_alpha (now {min_alpha}) or set it to 0.")
        start = torch.randint(0, vocab, (1, 1), generator=g)
        ids = start.to(device)
        for _ in range(prefix_len - 1):  # greedy continuation
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
        if min_alpha <= 0 or looks_english(tokenizer.decode(ids[0].tolist()), min_alpha):
            prefixes.append(ids[0].cpu())
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for s in range(0, nsamples, batch_size):
            ids = torch.stack(prefixes[s:s + batch_size]).to(device)
            ids = _sample(model, ids, seqlen, top_k, temperature, eos)
            out.append(ids.cpu())
    return torch.cat(out)


def _sample(model, ids, seqlen, top_k, temperature, eos):
    """Top-k sampling with a KV cache until ``seqlen`` tokens (EOS suppressed)."""
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    logits = out.logits[:, -1]
    while ids.shape[1] < seqlen:
        logits = logits.float() / temperature
        if eos is not None and eos < logits.shape[-1]:
            logits[:, eos] = -float("inf")
        if top_k:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        nxt = torch.multinomial(torch.softmax(logits, -1), 1)
        ids = torch.cat([ids, nxt], 1)
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    return ids
