"""Training-free low-rank (EoRA) and bias compensation of a compressed linear layer — shared by the axes.

Both keep the compressed weight untouched (a pruning mask is never broken, a quantized weight stays on its grid)
and add a small dense correction beside it. Used by the weights chapter (:mod:`shrink.pruning.compensate`,
pruned layers, notebook 01e) and the bits chapter (GPTQ / PB-LLM outputs, notebook 02k); axes never import
each other, this module is where they meet.

* **EoRA** (Liu et al., arXiv:2410.21271, Sec. 3): with ``dW = W - W_c`` and the input Gram matrix
  ``G = X^T X = Q diag(lam) Q^T`` (inputs of the *compressed* model, as in ``NVlabs/EoRA``), take the rank-``r``
  SVD of ``dW Q diag(lam)^(1/2) = U S V^T`` and map back: ``B = U_r S_r``, ``A = V_r^T diag(lam)^(-1/2) Q^T``.
  ``B A`` is the rank-``r`` matrix minimising ``||(dW - B A) X^T||_F`` (activation-space error), which plain
  SVD of ``dW`` (:func:`svd_factors`, the baseline of EoRA's ablation) does not. Extra parameters:
  ``r * (out + in)`` per layer.
* **Bias compensation** (FLAP, An et al., AAAI 2024, Sec. 3.3, "baseline" compensation for removed channels):
  ``b += dW @ mean(x)``, which removes the *mean* output error; one vector of ``out`` extra parameters
  (zero if the layer already has a bias).

Introduced in: notebooks/01-weights/01e-where-it-hurts.md (moved here from ``shrink.pruning.compensate``)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import ShrinkError

LOWRANK_METHODS = ("eora", "svd")


class LowRankError(ShrinkError, ValueError):
    """Bad input to a low-rank or bias compensation (shapes, rank, nothing to do)."""


def _check(delta: torch.Tensor, rank: int, gram: torch.Tensor | None = None, who: str = "eora_factors") -> None:
    out_f, in_f = delta.shape
    if (gram is not None and gram.shape != (in_f, in_f)) or isinstance(rank, bool) or not isinstance(rank, int) \
            or not 1 <= rank <= min(out_f, in_f):
        raise LowRankError(f"{who}: need gram [{in_f}, {in_f}] and an integer 1 <= rank <= {min(out_f, in_f)}; got "
                           f"{None if gram is None else tuple(gram.shape)}, rank {rank!r}")


def eora_factors(delta: torch.Tensor, gram: torch.Tensor, rank: int, eps: float = 1e-6
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA factors of the compression residual (EoRA Sec. 3, eigenspace projection).

    Args:
        delta: float ``[out, in]``, ``W_dense - W_compressed``.
        gram: float ``[in, in]``, ``X^T X`` of the compressed layer's inputs (any positive scale).
        rank: ``r``, ``1 <= r <= min(out, in)``.
        eps: eigenvalues below ``eps * max`` are clamped (directions the data never excites).
    Returns:
        ``(B [out, r], A [r, in])`` float32 with ``B @ A ~= delta`` in the activation-weighted norm.
    """
    _check(delta, rank, gram)
    lam, Q = torch.linalg.eigh(gram.double())
    lam = lam.clamp_min(eps * lam.max().clamp_min(1e-30))
    M = delta.double() @ Q * lam.sqrt()
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    B = U[:, :rank] * S[:rank]
    A = (Vh[:rank] / lam.sqrt()) @ Q.T
    return B.float(), A.float()


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain truncated SVD of the residual (the data-free baseline): ``(B [out, r], A [r, in])`` float32,
    ``B A`` the best rank-``r`` approximation of ``delta`` in the Frobenius norm."""
    _check(delta, rank, who="svd_factors")
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (U[:, :rank] * S[:rank]).float(), Vh[:rank].float()


class LowRankAdd(nn.Module):
    """``y = linear(x) + (x A^T) B^T`` with the compressed linear kept as it is (adapter beside the weight)."""

    def __init__(self, linear: nn.Linear, B: torch.Tensor, A: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.A = nn.Parameter(A.to(linear.weight.dtype), requires_grad=False)
        self.B = nn.Parameter(B.to(linear.weight.dtype), requires_grad=False)

    @property
    def weight(self):
        return self.linear.weight

    def forward(self, x):
        return self.linear(x) + (x @ self.A.T) @ self.B.T


def bias_compensation(delta: torch.Tensor, mean_x: torch.Tensor) -> torch.Tensor:
    """FLAP-style bias correction ``dW @ E[x]``: float ``[out]`` from ``delta [out, in]``, ``mean_x [in]``."""
    if mean_x.shape != delta.shape[1:]:
        raise LowRankError(f"mean_x must be [{delta.shape[1]}], got {tuple(mean_x.shape)}")
    return delta.float() @ mean_x.float()


def extra_parameters(out_f: int, in_f: int, rank: int) -> int:
    """Extra parameters of a rank-``r`` adapter on one ``[out, in]`` layer: ``r (out + in)``."""
    return rank * (out_f + in_f)


def all_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of a block, names relative to the block."""
    out = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    if not out:
        raise LowRankError(f"no linear layers in {type(block).__name__}")
    return out


@torch.no_grad()
def compensate_model(compressed: nn.Module, reference: nn.Module, calib_ids: torch.Tensor, *, rank: int = 0,
                     bias: bool = False, linears: Callable[[nn.Module], dict] | None = None, method: str = "eora",
                     batch: int = 8) -> dict:
    """Attach rank-``r`` adapters (``rank > 0``) and/or bias corrections to every compressed linear, block by block.

    Statistics come from the *compressed* model's own stream (inputs of block ``i`` = calibration text through
    the already compensated blocks ``0..i-1``), as ``NVlabs/EoRA`` does. The compressed weights are not modified.

    Args:
        compressed: the pruned or quantized model (modified in place: linears wrapped in :class:`LowRankAdd`,
            biases added).
        reference: the uncompressed model with the same architecture (source of ``W``).
        calib_ids: int64 ``[N, T]``.
        rank: adapter rank (0: none; clipped to ``min(out, in)`` per layer). bias: add ``dW @ E[x]`` to each bias.
        linears: ``block -> {name: nn.Linear}`` to compensate (default :func:`all_linears`).
        method: ``eora`` (activation-aware, :func:`eora_factors`) | ``svd`` (plain SVD of ``dW``, data-free).
    Returns:
        dict with ``extra_params`` (number of added parameters).
    """
    from .blockwise import embed_all, map_block
    from .models import BlockRunner
    from .obs import StatsCollector

    if rank <= 0 and not bias:
        raise LowRankError("compensate_model needs rank > 0 or bias=True")
    if method not in LOWRANK_METHODS:
        raise LowRankError(f"unknown low-rank method {method!r}; use one of {LOWRANK_METHODS}")
    linears = linears or all_linears
    runner = BlockRunner(compressed)
    ref_blocks = BlockRunner(reference).blocks
    x = embed_all(runner, calib_ids, batch)
    extra = 0
    for i, block in enumerate(runner.blocks):
        lin = linears(block)
        rlin = linears(ref_blocks[i])
        sc = StatsCollector(lin, hessian=rank > 0 and method == "eora")
        with sc:
            map_block(runner, i, x, batch, on_batch=lambda s: sc.end_batch())
        for name, mod in lin.items():
            delta = rlin[name].weight.float() - mod.weight.float()
            st = sc.stats[name]
            if rank > 0:
                r = min(rank, *delta.shape)
                B, A = eora_factors(delta, st.H, r) if method == "eora" else svd_factors(delta, r)
                parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
                setattr(parent, name.rsplit(".", 1)[-1], LowRankAdd(mod, B, A))
                extra += B.numel() + A.numel()
                delta = delta - B @ A  # the bias corrects what the adapter leaves
            if bias:
                b = bias_compensation(delta, st.mean()).to(mod.weight.dtype)
                if mod.bias is None:
                    mod.bias = nn.Parameter(b, requires_grad=False)
                    extra += b.numel()
                else:
                    mod.bias.add_(b)
        x = map_block(runner, i, x, batch)
    return {"extra_params": extra}


__all__ = ["LowRankError", "LOWRANK_METHODS", "eora_factors", "svd_factors", "LowRankAdd", "bias_compensation",
           "extra_parameters", "all_linears", "compensate_model"]
