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
from .errors import BadInputError, NumericalError, check_int
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


def check_perplexity_args(seqlen, max_windows=None, batch_size=1) -> None:
    """Validate the perplexity knobs: ``seqlen >= 2`` (one predicted token needs two), ``max_windows`` a
    positive integer or None, ``batch_size`` positive. Raises :class:`shrink.errors.BadInputError`."""
    check_int("seqlen", seqlen, minimum=2, fix="A window needs at least 2 tokens (one prediction); the papers "
              "use seqlen=2048 (`--seqlen 2048`).")
    check_int("max_windows", max_windows, allow_none=True, fix="Give a number of windows >= 1 (`--windows 8`) "
              "or None / `--windows all` for every window.")
    check_int("batch_size", batch_size, fix="Use batch_size=1 or more (`--batch-size 1`).")


def check_token_ids(tokens: torch.Tensor, model: nn.Module) -> None:
    """Raise :class:`BadInputError` unless every id lies in ``[0, vocab_size)`` of ``model`` (ids from
    another tokenizer otherwise index out of range, or silently score the wrong tokens)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if tokens.numel() == 0 or vocab is None:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab:
        raise BadInputError(f"token ids span [{lo}, {hi}] but {model_name(model)} has a vocabulary of {vocab}: "
                            "they come from another tokenizer. Tokenize with the tokenizer returned by "
                            "shrink.models.load() together with this model.")


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
    check_perplexity_args(seqlen, max_windows, batch_size)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
        raise BadInputError(f"tokens must be a 1-D int64 stream [N], got "
                            f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}"
                            f"{' ' + str(tokens.dtype) if isinstance(tokens, torch.Tensor) else ''}; "
                            "flatten it or use shrink.data.eval_tokens().")
    plen = prefix.length if prefix is not None else 0
    if seqlen + plen > max_context(model):
        raise BadInputError(f"seqlen={seqlen} (+ prefix {plen}) exceeds the context of {model_name(model)} "
                            f"({max_context(model)} positions); use seqlen <= {max_context(model) - plen}.")
    n = num_windows(tokens.numel(), seqlen, max_windows)
    if n == 0:
        raise BadInputError(f"{tokens.numel()} tokens hold no full window of seqlen={seqlen}; use a seqlen <= "
                            f"{tokens.numel()} or a longer evaluation text.")
    check_token_ids(tokens[: n * seqlen], model)
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
    if not math.isfinite(nll):
        raise NumericalError(f"perplexity of {model_name(model)} on {dataset}/{split} is not finite (mean NLL "
                             f"{nll}): the model produced NaN/inf logits. Check its weights for NaN/inf (a corrupt "
                             "cache: delete $SHRINK_CACHE/models and reload; a diverged reconstruction: lower lr).")
    return Perplexity(ppl=math.exp(nll), nll=nll, n_windows=n, n_tokens=n_pred, seqlen=seqlen, dataset=dataset,
                      split=split, model=model_name(model), dtype=str(next(model.parameters()).dtype),
                      prefix_len=plen, seconds=round(time.perf_counter() - t0, 3))


#: The seven zero-shot tasks of Wanda / SparseGPT follow-ups, "Rethinking Pruning LLMs" and CushionCache.
ZERO_SHOT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def zero_shot(model: nn.Module, tokenizer, tasks=ZERO_SHOT_TASKS, *, batch_size: int = 8, limit: int | None = None,
              num_fewshot: int = 0, prefix: KVPrefix | None = None) -> dict:
    """Zero-shot accuracy through ``lm-eval`` (EleutherAI harness) wrapping the in-memory model with HFLM.

    Paper scale only: lm-eval downloads its task data, so it needs ``SHRINK_ONLINE=1`` and
    ``pip install -e .[eval]``. With ``prefix`` every request starts from the key/value prefix
    (:class:`shrink.models.PrefixedLM`), as CushionCache's Table 2 evaluates.

    Returns:
        ``{"tasks": {task: {"acc": float, "acc_norm": float|None}}, "mean_acc": float, "lm_eval": version,
        "limit": limit}``; ``mean_acc`` averages ``acc`` over tasks as the papers' tables do.
    """
    from .errors import OfflineError, ShrinkError

    if not env.online():
        raise OfflineError("zero-shot evaluation downloads lm-eval task data: set SHRINK_ONLINE=1 on a machine "
                           "with internet (paper scale).")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ShrinkError("zero-shot evaluation needs lm-eval: `pip install -e .[eval]`.") from exc
    from .models import PrefixedLM

    lm = HFLM(pretrained=model if prefix is None else PrefixedLM(model, prefix), tokenizer=tokenizer,
              batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit)
    per_task = {}
    for task in tasks:
        r = out["results"][task]
        acc = r.get("acc,none", r.get("acc"))
        per_task[task] = {"acc": float(acc), "acc_norm": r.get("acc_norm,none", r.get("acc_norm"))}
    mean = sum(t["acc"] for t in per_task.values()) / len(per_task)
    return {"tasks": per_task, "mean_acc": mean, "lm_eval": getattr(lm_eval, "__version__", "?"), "limit": limit,
            "prefix_len": 0 if prefix is None else prefix.length}


def zero_shot_key() -> str:
    """What a paper-scale record's zero-shot field will hold, for its cache key: ``"lm-eval"`` online, else
    ``"offline"`` (so a record made offline is not reused by an online rerun, which computes the accuracies)."""
    return "lm-eval" if env.online() else "offline"


def paper_zero_shot(model: nn.Module, tokenizer, tasks=ZERO_SHOT_TASKS, **kw) -> dict | str:
    """:func:`zero_shot` when online; offline, the recorded reason it was not run (never a silent skip)."""
    if not env.online():
        return "not run: offline (SHRINK_ONLINE=1 and internet are needed for lm-eval's task data)"
    return zero_shot(model, tokenizer, tasks, **kw)


# --------------------------------------------------------------------------------------------------------------
# Numbers with their noise (issue 9): a measurement repeated over seeds / perturbations / calibration draws.
# --------------------------------------------------------------------------------------------------------------

def _plural(kind: str, n: int) -> str:
    if n == 1:
        return kind[:-1] if kind.endswith("s") else kind
    return kind if kind.endswith("s") else kind + "s"


@dataclass(frozen=True)
class Spread:
    """One quantity measured ``n`` times under a named source of noise.

    ``values`` are the ``n`` measurements (floats, in the order of ``seeds``); ``kind`` names what varied
    between them: ``"seeds"``, ``"range perturbation"`` (every calibrated range scaled by ``1 + eps*u``),
    ``"calibration draws"``, ``"kernel set"``, ... ``seeds`` optionally records which seed gave which value.

    ``std`` is the sample standard deviation (``ddof=1``; 0 for ``n == 1``). ``lo``/``hi`` are min/max: the
    interval :func:`separated` compares. ``float(spread)`` is the mean, so a Spread can stand where a number
    is expected (tables, asserts on the mean).
    """

    values: tuple
    kind: str = "seeds"
    seeds: tuple = ()

    def __post_init__(self):
        from .errors import ShrinkError

        vals = tuple(float(v) for v in self.values)
        if not vals:
            raise ShrinkError("Spread needs at least one value; pass the measurements, e.g. "
                              "Spread([34.4, 34.0, 34.8], kind='range perturbation').")
        if any(math.isnan(v) for v in vals):
            raise ShrinkError(f"Spread values contain NaN ({vals}); fix the measurement that produced it "
                              "instead of averaging it away.")
        if self.seeds and len(self.seeds) != len(vals):
            raise ShrinkError(f"Spread got {len(vals)} values but {len(self.seeds)} seeds; pass one seed per "
                              "value (or none).")
        object.__setattr__(self, "values", vals)
        object.__setattr__(self, "seeds", tuple(self.seeds))

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return math.fsum(self.values) / self.n

    @property
    def std(self) -> float:
        if self.n < 2:
            return 0.0
        m = self.mean
        return math.sqrt(math.fsum((v - m) ** 2 for v in self.values) / (self.n - 1))

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    @property
    def width(self) -> float:
        """``hi - lo`` (the full range)."""
        return self.hi - self.lo

    @property
    def rel_width(self) -> float:
        """``(hi - lo) / |mean|``: the range as a fraction of the mean."""
        return self.width / abs(self.mean) if self.mean else math.inf

    def map(self, fn) -> "Spread":
        """The same draws through ``fn`` (e.g. ``math.log`` for log-perplexity); keeps kind and seeds."""
        return Spread(tuple(fn(v) for v in self.values), self.kind, self.seeds)

    def fmt(self, digits: int = 1) -> str:
        """``"34.4 ± 0.4 [34.0, 34.8], n=3 range perturbations"`` (mean ± std [min, max], n and kind)."""
        d = digits
        if self.n == 1:
            return f"{self.mean:.{d}f} (n=1 {_plural(self.kind, 1)})"
        return (f"{self.mean:.{d}f} ± {self.std:.{d}f} [{self.lo:.{d}f}, {self.hi:.{d}f}], "
                f"n={self.n} {_plural(self.kind, self.n)}")

    def to_dict(self) -> dict:
        return {"values": list(self.values), "kind": self.kind, "seeds": list(self.seeds), "mean": self.mean,
                "std": self.std, "lo": self.lo, "hi": self.hi, "n": self.n}

    @classmethod
    def from_dict(cls, d: dict) -> "Spread":
        return cls(tuple(d["values"]), d.get("kind", "seeds"), tuple(d.get("seeds", ())))

    def __float__(self) -> float:
        return self.mean

    def __str__(self) -> str:
        return self.fmt()


def spread(fn, seeds, *, kind: str = "seeds") -> Spread:
    """Call ``fn(seed)`` for every seed and return the :class:`Spread` of the (float) results.

    ``fn`` may return anything ``float()`` accepts (a :class:`Perplexity` gives its perplexity).
    """
    seeds = tuple(seeds)
    if not seeds:
        from .errors import ShrinkError

        raise ShrinkError("spread() got no seeds; pass e.g. seeds=range(3).")
    return Spread(tuple(float(fn(s)) for s in seeds), kind, seeds)


def separated(a: Spread, b: Spread) -> bool:
    """True when the intervals ``[a.lo, a.hi]`` and ``[b.lo, b.hi]`` do not overlap (touching counts as overlap).

    Plain numbers are accepted as one-point intervals.
    """
    a_lo, a_hi = (a.lo, a.hi) if isinstance(a, Spread) else (float(a), float(a))
    b_lo, b_hi = (b.lo, b.hi) if isinstance(b, Spread) else (float(b), float(b))
    return a_hi < b_lo or b_hi < a_lo
