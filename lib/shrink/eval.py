"""The one perplexity function of the handbook.

Convention (GPTQ / SparseGPT / Wanda, and so the papers' tables): the evaluation stream is cut into
**non-overlapping** windows of ``seqlen`` tokens, the tail shorter than a window is dropped, every window is
scored independently (no carried context), and

.. math::  \\mathrm{PPL} = \\exp\\Big(\\frac{1}{W (L-1)} \\sum_{w=1}^{W} \\sum_{t=2}^{L} -\\log p(x_{w,t} \\mid x_{w,<t})\\Big)

which equals GPTQ's ``exp(mean_w(mean_t nll) )`` because every window contributes ``L-1`` predictions.

With ``prefix=`` (a :class:`shrink.models.KVPrefix`) every window starts from a fresh copy of the prefix's
key/value cache; the scored tokens are the same, so numbers with and without a prefix are comparable.

Introduced in: notebooks/00-start/00-tour.md
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import env
from .models import KVPrefix, max_context, model_name


@dataclass
class Perplexity:
    """A perplexity measurement and everything needed to reproduce it."""

    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    n_windows: int
    n_tokens: int  # predicted tokens = n_windows * (seqlen - 1)
    seqlen: int
    dataset: str
    split: str
    model: str
    dtype: str
    prefix_len: int = 0
    seconds: float = 0.0
    versions: dict = field(default_factory=env.versions)

    def to_dict(self) -> dict:
        return asdict(self)

    def __float__(self) -> float:
        return self.ppl


def num_windows(n_tokens: int, seqlen: int, max_windows: int | None = None) -> int:
    """Number of non-overlapping full windows of ``seqlen`` in ``n_tokens`` (capped by ``max_windows``)."""
    n = n_tokens // seqlen
    return n if max_windows is None else min(n, max_windows)


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int = 2048, *, max_windows: int | None = None,
               batch_size: int = 1, prefix: KVPrefix | None = None, dataset: str = "?", split: str = "?",
               progress: bool | None = None) -> Perplexity:
    """Perplexity of ``model`` on ``tokens`` over non-overlapping windows.

    Args:
        model: a causal LM returning ``.logits`` ``[B, T, V]``.
        tokens: int64 ``[N]``, the tokenized evaluation stream (see :func:`shrink.data.eval_tokens`).
        seqlen: window length ``L``; must fit the model's context together with the prefix.
        max_windows: score only the first ``max_windows`` windows (None: all).
        batch_size: windows per forward.
        prefix: optional key/value prefix every window starts from (fresh cache per forward).
        dataset, split: recorded in the result.
        progress: show a progress bar (default: on unless headless).

    Returns:
        :class:`Perplexity` (``float(result)`` is the perplexity).
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D stream [N], got shape {tuple(tokens.shape)}; "
                         "flatten it or use shrink.data.eval_tokens().")
    plen = prefix.length if prefix is not None else 0
    if seqlen + plen > max_context(model):
        raise ValueError(f"seqlen={seqlen} (+ prefix {plen}) exceeds the context of {model_name(model)} "
                         f"({max_context(model)} positions); use seqlen <= {max_context(model) - plen}.")
    n = num_windows(tokens.numel(), seqlen, max_windows)
    if n == 0:
        raise ValueError(f"{tokens.numel()} tokens hold no full window of {seqlen}; lower seqlen.")
    if progress is None:
        progress = not env.headless()
    device = next(model.parameters()).device
    windows = tokens[: n * seqlen].view(n, seqlen)
    total, t0 = 0.0, time.perf_counter()
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"ppl {dataset}/{split} L={seqlen}", leave=False)
    for s in starts:
        ids = windows[s:s + batch_size].to(device)
        kwargs = {} if prefix is None else {"past_key_values": prefix.cache(ids.shape[0]), "use_cache": True}
        logits = model(input_ids=ids, **kwargs).logits
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                 reduction="sum").item()
    n_pred = n * (seqlen - 1)
    nll = total / n_pred
    return Perplexity(ppl=math.exp(nll), nll=nll, n_windows=n, n_tokens=n_pred, seqlen=seqlen, dataset=dataset,
                      split=split, model=model_name(model), dtype=str(next(model.parameters()).dtype),
                      prefix_len=plen, seconds=round(time.perf_counter() - t0, 3))
