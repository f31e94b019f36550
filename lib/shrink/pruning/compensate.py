"""Training-free compensation of a pruned linear layer: EoRA low-rank and FLAP-style bias.

Both keep the sparse weight untouched (the mask is never broken) and add a small dense correction.

* **EoRA** (Liu et al., arXiv:2410.21271, Sec. 3): with ``dW = W - W_c`` and the input Gram matrix
  ``G = X^T X = Q diag(lam) Q^T`` (inputs of the *compressed* model, as in ``NVlabs/EoRA``), take the rank-``r``
  SVD of ``dW Q diag(lam)^(1/2) = U S V^T`` and map back: ``B = U_r S_r``, ``A = V_r^T diag(lam)^(-1/2) Q^T``.
  ``B A`` is the rank-``r`` matrix minimising ``||(dW - B A) X^T||_F`` (activation-space error), which plain
  SVD of ``dW`` does not. Extra parameters: ``r * (out + in)`` per layer.
* **Bias compensation** (FLAP, An et al., AAAI 2024, Sec. 3.3, "baseline" compensation for removed channels):
  ``b += dW @ mean(x)``, which removes the *mean* output error; one vector of ``out`` extra parameters
  (zero if the layer already has a bias). FLAP applies it to structurally removed channels; here to the
  unstructured residual ``dW``.
"""

from __future__ import annotations

import torch
from torch import nn

from .masks import PruningError


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
    out_f, in_f = delta.shape
    if gram.shape != (in_f, in_f) or not 1 <= rank <= min(out_f, in_f):
        raise PruningError(f"eora_factors: need gram [{in_f}, {in_f}] and 1 <= rank <= {min(out_f, in_f)}; got "
                           f"{tuple(gram.shape)}, rank {rank}")
    lam, Q = torch.linalg.eigh(gram.double())
    lam = lam.clamp_min(eps * lam.max().clamp_min(1e-30))
    M = delta.double() @ Q * lam.sqrt()
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    B = U[:, :rank] * S[:rank]
    A = (Vh[:rank] / lam.sqrt()) @ Q.T
    return B.float(), A.float()


class LowRankAdd(nn.Module):
    """``y = linear(x) + (x A^T) B^T`` with the sparse linear kept as it is (adapter beside the weight)."""

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
        raise PruningError(f"mean_x must be [{delta.shape[1]}], got {tuple(mean_x.shape)}")
    return delta.float() @ mean_x.float()


def extra_parameters(out_f: int, in_f: int, rank: int) -> int:
    """Extra parameters of a rank-``r`` EoRA adapter on one ``[out, in]`` layer: ``r (out + in)``."""
    return rank * (out_f + in_f)


@torch.no_grad()
def compensate_model(sparse_model: nn.Module, dense_model: nn.Module, calib_ids: torch.Tensor, *, rank: int = 0,
                     bias: bool = False, targets: str = "all", batch: int = 8) -> dict:
    """Attach EoRA adapters (``rank > 0``) and/or bias corrections to every pruned linear, block by block.

    Statistics come from the *compressed* model's own stream (inputs of block ``i`` = calibration text through
    the already compensated blocks ``0..i-1``), as ``NVlabs/EoRA`` does. The sparse weights are not modified.

    Args:
        sparse_model: the pruned model (modified in place: linears wrapped in :class:`LowRankAdd`, biases added).
        dense_model: the dense model with the same architecture (source of ``W_dense``).
        calib_ids: int64 ``[N, T]``.
        rank: EoRA rank (0: none). bias: add ``dW @ E[x]`` to each layer's bias.
        targets: ``all`` | ``attn`` | ``mlp`` (as in :func:`shrink.pruning.select_linears`).
    Returns:
        dict with ``extra_params`` (number of added parameters).
    """
    from ..models import BlockRunner
    from ..blockwise import embed_all, map_block
    from .sequential import select_linears
    from ..obs import StatsCollector

    if rank <= 0 and not bias:
        raise PruningError("compensate_model needs rank > 0 or bias=True")
    runner = BlockRunner(sparse_model)
    dense_blocks = BlockRunner(dense_model).blocks
    x = embed_all(runner, calib_ids, batch)
    extra = 0
    for i, block in enumerate(runner.blocks):
        lin = select_linears(block, targets)
        dlin = select_linears(dense_blocks[i], targets)
        sc = StatsCollector(lin, hessian=rank > 0)
        with sc:
            map_block(runner, i, x, batch, on_batch=lambda s: sc.end_batch())
        for name, mod in lin.items():
            delta = dlin[name].weight.float() - mod.weight.float()
            st = sc.stats[name]
            if rank > 0:
                B, A = eora_factors(delta, st.H, min(rank, *delta.shape))
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
