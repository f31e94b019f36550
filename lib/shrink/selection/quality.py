"""Instruction-data quality scores with a causal LM (SmolLM2 at ``cpu`` scale): response perplexity and IFD.

* :func:`response_nll` — mean next-token NLL (nats) of the response tokens, conditioned on the Alpaca
  prompt (``conditioned=True``, the SFT loss of :func:`shrink.train.tokenize_sft`) or on nothing but one
  start token (``conditioned=False``: BOS, else EOS, so that every response token is predicted in both cases
  and the two means cover the same tokens).
* :func:`response_ppl` — ``exp(response_nll)``.
* :func:`ifd` — Instruction-Following Difficulty (Li et al., "From Quantity to Quality", NAACL 2024, Eq. 4;
  Superfiltering, ACL 2024, scores it with a small LM):

  .. math::  \\mathrm{IFD}(Q, A) = \\frac{\\mathrm{PPL}(A \\mid Q)}{\\mathrm{PPL}(A)}
             = \\exp\\big(\\mathrm{NLL}(A \\mid Q) - \\mathrm{NLL}(A)\\big).

  ``IFD < 1``: the instruction helps predict the answer; ``IFD >= 1`` (the instruction does not help) is
  what Cherry-LLM/Superfiltering filter out. Which sign is "quality" is the caller's choice (kMQ in the
  Diversify-and-Conquer notes uses ``-IFD`` or ``-PPL``); this module only measures.

All return float64 ``[N]``; examples are dicts with ``instruction`` (optional ``input``) and ``output``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import SelectionError


def _start_id(tok) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        v = getattr(tok, name, None)
        if v is not None:
            return int(v)
    raise SelectionError("the tokenizer has neither a BOS nor an EOS token to start an unconditioned response; "
                         "use a tokenizer with one (SmolLM2's or the ByteTokenizer).")


def _tokenize(tok, example: dict, conditioned: bool, max_prompt: int, max_response: int) -> dict:
    import torch

    from ..train import tokenize_sft

    if "output" not in example or not str(example["output"]).strip():
        raise SelectionError("an example has no 'output' (response) to score; drop examples with empty responses.")
    if conditioned:
        return tokenize_sft(tok, example, max_prompt=max_prompt, max_response=max_response)
    r = tok.encode(str(example["output"]), add_special_tokens=False)[:max_response]
    ids = torch.tensor([_start_id(tok)] + r, dtype=torch.long)
    labels = ids.clone()
    labels[0] = -100
    return {"input_ids": ids, "labels": labels}


def response_nll(model, tok, examples: Sequence[dict], *, conditioned: bool = True, max_prompt: int = 256,
                 max_response: int = 256, batch_size: int = 8) -> np.ndarray:
    """Mean NLL (nats) per example over its response tokens: float64 ``[N]`` (forward passes only).

    ``conditioned=True`` scores the response after the Alpaca prompt (EOS appended, as in SFT);
    ``conditioned=False`` after a single start token and without the EOS, so that ``ifd`` compares the same
    response tokens (the EOS is conditioned on the prompt only in the first case).
    """
    import torch

    from ..train import collate, sample_losses, token_losses

    if not examples:
        raise SelectionError("no examples to score; pass at least one instruction example.")
    tk = [_tokenize(tok, e, conditioned, max_prompt, max_response) for e in examples]
    if conditioned and getattr(tok, "eos_token_id", None) is not None:
        for t in tk:  # drop the EOS from the counted tokens: IFD compares the same response tokens
            t["labels"] = t["labels"].clone()
            t["labels"][-1] = -100
    out = np.empty(len(tk))
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(tk), batch_size):
            b = collate(tk[s:s + batch_size])
            logits = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev)).logits
            tl, m = token_losses(logits, b["labels"].to(dev))
            if not m.any(1).all():
                raise SelectionError("an example's response is empty after tokenization (or truncated away); raise "
                                     "max_response or drop it.")
            out[s:s + len(b["labels"])] = sample_losses(tl, m).double().cpu().numpy()
    model.train(was)
    return out


def response_ppl(model, tok, examples: Sequence[dict], **kw) -> np.ndarray:
    """``exp`` of :func:`response_nll` (conditioned on the prompt by default)."""
    return np.exp(response_nll(model, tok, examples, **kw))


def ifd(model, tok, examples: Sequence[dict], *, return_parts: bool = False, **kw):
    """IFD ``= PPL(A|Q) / PPL(A)`` per example, float64 ``[N]`` (``return_parts``: also the two NLLs)."""
    cond = response_nll(model, tok, examples, conditioned=True, **kw)
    unc = response_nll(model, tok, examples, conditioned=False, **kw)
    score = np.exp(cond - unc)
    return (score, cond, unc) if return_parts else score
