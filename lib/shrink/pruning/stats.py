"""Calibration statistics of linear-layer inputs, shared by linears that read the same tensor.

For every linear layer ``y = W x`` the pruners need statistics of its input ``X`` (``[tokens, in]``):

* Wanda: ``sq_norm_j = sum_t x_tj^2`` (``[in]``, fp32);
* SparseGPT: the Hessian of the layer-wise objective ``H = 2/n * X^T X`` (``[in, in]``, fp32, SparseGPT
  Sec. 3 / ``add_batch``; the overall scale is irrelevant to masks and updates, we keep ``X^T X / n``
  times 2 with ``n`` = tokens).

Linears that receive the *same input tensor* in one forward (q/k/v after the attention norm, gate/up after
the MLP norm in LLaMA; q/k/v in OPT) share one :class:`InputStats`: the statistics are computed once per
group, and SparseGPT solves the group in one pass (:func:`shrink.pruning.sparsegpt.sparsegpt_prune`).
Groups are found at run time from tensor identity, so no per-architecture name lists are needed.
"""

from __future__ import annotations

import torch
from torch import nn


class InputStats:
    """Running input statistics of one group of linears.

    Args:
        in_features: input width ``d``.
        hessian: also accumulate ``H`` (``[d, d]`` fp32; SparseGPT); otherwise only ``sq_norm``.
    """

    def __init__(self, in_features: int, hessian: bool):
        self.n = 0
        self.sq_norm = torch.zeros(in_features, dtype=torch.float32)
        self.sum = torch.zeros(in_features, dtype=torch.float32)
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32) if hessian else None

    @torch.no_grad()
    def add(self, x: torch.Tensor, token_weight: torch.Tensor | None = None) -> None:
        """Add a batch ``x`` ``[..., d]``; optional ``token_weight`` ``[...]`` scales each token's
        contribution (RSQ-style weighted Hessian ``X R X^T``; default 1)."""
        x = x.reshape(-1, x.shape[-1]).float().cpu()
        if token_weight is not None:
            x = x * token_weight.reshape(-1, 1).float().cpu().sqrt()
        self.n += x.shape[0]
        self.sq_norm += (x * x).sum(0)
        self.sum += x.sum(0)
        if self.H is not None:
            self.H += x.T @ x

    def mean(self) -> torch.Tensor:
        """Mean input ``[d]`` (FLAP-style bias compensation)."""
        return self.sum / max(self.n, 1)

    def hessian(self) -> torch.Tensor:
        """``H = 2/n X^T X`` fp32 ``[d, d]``."""
        if self.H is None:
            raise RuntimeError("this InputStats was created without hessian=True")
        return self.H * (2.0 / max(self.n, 1))


class StatsCollector:
    """Forward hooks on named linears that accumulate :class:`InputStats`, one per shared input.

    Usage::

        with StatsCollector(linears, hessian=True) as sc:
            block(x)                  # any number of forwards
        sc.groups   # list of lists of names sharing one input;  sc.stats[name] -> InputStats (shared object)
    """

    def __init__(self, linears: dict[str, nn.Linear], hessian: bool, enabled: bool = True):
        self.linears, self.hessian, self.enabled = linears, hessian, enabled
        self.stats: dict[str, InputStats] = {}
        self._seen: dict[tuple, tuple] = {}
        self._handles: list = []

    def _hook(self, name):
        def hook(_mod, args, _out):
            if not self.enabled:
                return
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x._version)
            st = self._seen.get(key, (None,))[0]
            if st is None:
                st = self.stats.get(name) or InputStats(x.shape[-1], self.hessian)
                st.add(x.detach())
                self._seen[key] = (st, x)  # keep x alive: its memory cannot be reused in this batch
            elif name in self.stats and self.stats[name] is not st:
                raise RuntimeError(f"input sharing of {name} changed between forwards")
            self.stats[name] = st
        return hook

    def __enter__(self):
        for name, mod in self.linears.items():
            self._handles.append(mod.register_forward_hook(self._hook(name)))
        return self

    def end_batch(self) -> None:
        """Forget tensor identities (call after each forward so freed memory is not mistaken for sharing)."""
        self._seen.clear()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    @property
    def groups(self) -> list[list[str]]:
        """Names grouped by shared input, in first-seen order."""
        out: dict[int, list[str]] = {}
        for name, st in self.stats.items():
            out.setdefault(id(st), []).append(name)
        return list(out.values())
