"""The sequential block loop with two activation streams, shared by every block-wise compression method.

Used by pruning (:func:`shrink.pruning.prune_model`: "Rethinking Pruning LLMs", SparseGPT's
``opt_sequential``, Wanda's ``prune_wanda``) and by weight-only quantization (:func:`shrink.quant.quantize_model`:
GPTQ's ``llama_sequential``). Axes never import each other; this core module is where they meet.
Per unit (one block; two consecutive blocks for CR windows):

1. **statistics**: the still-uncompressed block runs on the *compressed stream* ``x_i`` (output of the already
   compressed blocks) over the first ``n_cal`` calibration sequences; forward hooks accumulate the method's input
   statistics (:class:`shrink.obs.StatsCollector`). The same forward gives the block-reconstruction target
   ``g_i(w_bar_i; x_i)`` (Rethinking Eq. 2). Extra sequences (self-generated data) never enter the statistics;
2. the **dense stream** ``x_bar_{i+1} = g_i(w_bar_i; x_bar_i)`` is advanced before the block is compressed (or read
   from a cache of the dense model's activations, :func:`dense_streams`): the global-propagation (GP) target;
3. **compress** the block (the method's callback: prune, quantize);
4. optionally **reconstruct** the unit against its target (the method's callback);
5. advance the compressed stream and log the normalised error (Rethinking App. A, :func:`block_error`) against
   the dense stream on the calibration sequences and on held-out sequences.

The reconstruction-error metric (App. A). The paper's normalised error after block ``i``::

    err_i = 1/(N H T) * || g_i(w_bar_i; x_bar_i) - g_i(m_i . w_i; x_i) ||_2^2

= element-wise mean squared difference between the dense model's hidden state (dense stream ``x_bar``)
and the compressed model's hidden state after block ``i``; tables report it at the final block. On SmolLM2
one token (position 0, the attention sink, ``|h| ~ 2.5e4`` in one channel from block index 11 on) dominates
this metric, so :func:`block_error` also returns the relative error and the share of the squared error that
sits on position 0.

Activation buffers live on ``act_device`` (default CPU) and move to the model's device batch by batch.

Introduced in: notebooks/01-weights/01b-reconstruction.md
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .models import BlockRunner
from .obs import StatsCollector


@torch.no_grad()
def block_error(sparse: torch.Tensor, dense: torch.Tensor, chunk: int = 8) -> dict:
    """Error between the sparse and the dense stream after one block.

    Args:
        sparse: float ``[N, T, H]`` (pruned model's hidden states).
        dense: float ``[N, T, H]`` (dense model's hidden states, same inputs ids).
        chunk: sequences per step (bounds memory).
    Returns:
        dict: ``err`` (paper App. A: mean over N, T, H), ``rel`` (``||d||^2 / ||h_dense||^2``), ``tok0_share``
        (fraction of ``||d||^2`` at position 0), ``err_no_tok0`` (App. A metric without position 0).
    """
    if sparse.shape != dense.shape:
        raise ValueError(f"shapes differ: sparse {tuple(sparse.shape)} vs dense {tuple(dense.shape)}")
    n, t, h = dense.shape
    per_pos = torch.zeros(t, dtype=torch.float64)
    ref = 0.0
    for s in range(0, n, chunk):
        d = (sparse[s:s + chunk].double() - dense[s:s + chunk].double())
        per_pos += (d * d).sum((0, 2))
        ref += float((dense[s:s + chunk].double() ** 2).sum())
    tot = float(per_pos.sum())
    rest = float(per_pos[1:].sum())
    return {"err": tot / (n * t * h), "rel": tot / max(ref, 1e-30), "tok0_share": float(per_pos[0]) / max(tot, 1e-30),
            "err_no_tok0": rest / (n * max(t - 1, 1) * h)}


@torch.no_grad()
def map_block(runner: BlockRunner, i: int, x: torch.Tensor, batch: int, block: nn.Module | None = None,
              out_device=None, on_batch=None, before_batch=None) -> torch.Tensor:
    """Run block ``i`` over ``x`` ``[N, T, D]`` in chunks of ``batch`` -> ``[N, T, D]`` on ``x``'s device
    (``before_batch(s)`` / ``on_batch(s)`` are called before / after the chunk starting at sequence ``s``)."""
    dev = runner.device
    out = torch.empty_like(x, device=out_device or x.device)
    for s in range(0, x.shape[0], batch):
        if before_batch is not None:
            before_batch(s)
        out[s:s + batch] = runner.run_block(i, x[s:s + batch].to(dev), block=block).to(out.device)
        if on_batch is not None:
            on_batch(s)
    return out


@torch.no_grad()
def embed_all(runner: BlockRunner, ids: torch.Tensor, batch: int = 8, act_device="cpu") -> torch.Tensor:
    """Block-0 inputs of ``ids`` ``[N, T]`` -> float ``[N, T, D]`` on ``act_device``."""
    return torch.cat([runner.embed(ids[s:s + batch]).to(act_device) for s in range(0, ids.shape[0], batch)])


@torch.no_grad()
def dense_streams(model: nn.Module, ids: torch.Tensor, batch: int = 8, act_device="cpu") -> list[torch.Tensor]:
    """The dense model's hidden states at every block boundary: list of ``L+1`` float ``[N, T, D]``
    (``[0]`` = embeddings, ``[i+1]`` = after block ``i``). Compute once per model and calibration set and pass
    to :func:`sequential` (``dense=``) to avoid re-running dense blocks across methods and schemes."""
    runner = BlockRunner(model)
    hs = [embed_all(runner, ids, batch, act_device)]
    for i in range(len(runner)):
        hs.append(map_block(runner, i, hs[-1], batch))
    return hs


def memory_estimate(n: int, t: int, d: int, *, scheme: str, heldout: tuple[int, int] = (0, 0),
                    dense_cached_blocks: int = 0) -> float:
    """Activation-buffer estimate in MB (fp32): compressed + dense streams, the next dense activation, the BR
    target and a scratch output for the calibration set, plus two streams for held-out data."""
    per = n * t * d * 4
    bufs = 4 + (1 if scheme == "BR" else 0)
    held = heldout[0] * heldout[1] * d * 4 * 3
    return (bufs * per + held + dense_cached_blocks * per) / 2 ** 20


class DenseStream:
    """Dense stream: from a cache (list of ``L+1`` tensors) or advanced lazily with the still-dense blocks."""

    def __init__(self, runner, x0, cache, batch):
        self.runner, self.batch, self.cache = runner, batch, cache
        self.acts = {0: x0} if cache is None else None

    def ensure(self, i: int) -> None:
        """Make activation ``i`` available; must be called while block ``i-1`` is still dense."""
        if self.cache is not None or i in self.acts:
            return
        self.acts[i] = map_block(self.runner, i - 1, self.acts[i - 1], self.batch)
        for k in [k for k in self.acts if k < i - 2]:
            del self.acts[k]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.cache[i] if self.cache is not None else self.acts[i]


def cr_windows(L: int) -> tuple[list[list[int]], list[int | None]]:
    """Units and the block finished after each: ``[0], [0,1], [1,2], ..., [L-2,L-1], [L-1]`` (official CR)."""
    if L <= 1:
        return [[0]], [0]
    return [[0]] + [[k, k + 1] for k in range(L - 1)] + [[L - 1]], [None] + list(range(L - 1)) + [L - 1]


@dataclass
class SequentialResult:
    """What :func:`sequential` returns: one dict per block (``block``, ``err_calib``, ``rel_calib``,
    ``tok0_calib``, ``err_calib_no_tok0`` and with held-out data the ``*_test`` fields), the reconstruction
    losses per unit, and times in seconds (``stats``, ``solve``, ``recon``, ``eval``, ``total``)."""

    blocks: list[dict]
    losses: list[list[float]]
    times: dict


def sequential(runner: BlockRunner, ids: torch.Tensor, n_cal: int, *,
               linears: Callable[[nn.Module], dict], compress: Callable[[int, nn.Module, dict, StatsCollector], None],
               needs_stats: bool, hessian: bool, block_target: bool = False,
               reconstruct: Callable[[list[int], torch.Tensor, torch.Tensor], list[float]] | None = None,
               gp: bool = False, cr: bool = False, batch: int = 8,
               dense: list[torch.Tensor] | None = None, heldout_ids: torch.Tensor | None = None,
               dense_heldout: list[torch.Tensor] | None = None, act_device: str | torch.device = "cpu",
               token_weights: Callable[[int, nn.Module, torch.Tensor], torch.Tensor] | None = None,
               recon_heldout: bool = False, verbose: bool = True) -> SequentialResult:
    """Compress a model block by block on two activation streams (see the module docstring).

    Args:
        runner: :class:`shrink.models.BlockRunner` of the model (blocks are modified in place).
        ids: int64 ``[N, T]``: calibration windows, then any extra sequences (reconstruction loss only).
        n_cal: how many of ``ids`` are calibration windows (statistics, ``err_calib``).
        linears: ``block -> {name: nn.Linear}`` the method compresses.
        compress: ``(block index, block, linears, stats) -> None`` compresses the block in place.
        needs_stats, hessian: collect input statistics (and the Hessian) for ``compress``.
        block_target: also keep the block's output on the compressed stream (the BR target).
        reconstruct: ``(unit, unit input [N, T, D], target [N, T, D]) -> losses``; None = layer-wise only.
        gp: reconstruct towards the dense stream (GP) instead of the block target.
        cr: two-block windows (:func:`cr_windows`).
        batch: sequences per no-grad forward.
        dense, dense_heldout: caches from :func:`dense_streams` (optional).
        heldout_ids: int64 ``[Nh, Th]`` held-out windows for ``err_test`` per block (optional).
        act_device: where activation buffers live.
        token_weights: ``(block index, block, calibration inputs [n_cal, T, D]) -> [n_cal, T]`` per-token weights
            of the statistics (RSQ's ``H = sum_t r_t x_t x_t^T``), computed on the compressed stream before the
            statistics forward of each block; None = unweighted (GPTQ, SparseGPT).
        recon_heldout: also pass ``heldout=(held-out unit input, held-out target)`` to ``reconstruct`` (the
            held-out curve of :func:`shrink.reconstruction.fit_unit`): the target is the dense stream (GP) or
            the still-uncompressed block on the held-out compressed stream (BR). Needs ``heldout_ids``; one-block
            units only (not CR).
        verbose: one line per few blocks.
    """
    L = len(runner)
    if recon_heldout and (heldout_ids is None or cr or reconstruct is None):
        raise ValueError("recon_heldout needs heldout_ids, a reconstruct callback and one-block units (cr=False)")
    times = {"stats": 0.0, "solve": 0.0, "recon": 0.0, "eval": 0.0}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    x = dense[0].clone() if dense is not None else embed_all(runner, ids, batch, act_device)
    dstream = DenseStream(runner, x.clone() if dense is None else None, dense, batch)
    hx = hd = None
    if heldout_ids is not None:
        hx = dense_heldout[0].clone() if dense_heldout is not None else embed_all(runner, heldout_ids, batch,
                                                                                   act_device)
        hd = DenseStream(runner, hx.clone() if dense_heldout is None else None, dense_heldout, batch)
    times["eval"] += time.perf_counter() - t0

    units, done_after = cr_windows(L) if cr else ([[i] for i in range(L)], list(range(L)))
    compressed: set[int] = set()
    blocks_out: list[dict] = []
    losses: list[list[float]] = []
    cur_in = x  # compressed-stream input of units[u][0]

    for unit, done in zip(units, done_after):
        # --- compress the unit's new block (at most one per unit) ------------------------------------
        unit_in = cur_in
        br_target = h_target = None
        for pos, b in enumerate(unit):
            if pos > 0:  # input of the second block of a CR window: first block (current state) on the stream
                t0 = time.perf_counter()
                unit_in_b = map_block(runner, unit[0], cur_in, batch)
                times["stats"] += time.perf_counter() - t0
            else:
                unit_in_b = cur_in
            if b in compressed:
                continue
            block = runner.blocks[b]
            lin = linears(block)
            t0 = time.perf_counter()
            dstream.ensure(b + 1)
            if hd is not None:
                hd.ensure(b + 1)
            sc = StatsCollector(lin, hessian=hessian, enabled=needs_stats)
            tw = token_weights(b, block, unit_in_b[:n_cal]) if (token_weights is not None and needs_stats) else None

            def set_weights(s, sc=sc, tw=tw):
                sc.token_weight = None if tw is None else tw[s:s + batch]
            if needs_stats or block_target:
                with sc, torch.no_grad():  # statistics from the calibration sequences only (never the extra ones)
                    out = map_block(runner, b, unit_in_b[:n_cal], batch, on_batch=lambda s: sc.end_batch(),
                                    before_batch=set_weights)
                if block_target and ids.shape[0] > n_cal:
                    with torch.no_grad():
                        out = torch.cat([out, map_block(runner, b, unit_in_b[n_cal:], batch)])
                if block_target:
                    br_target = out
                    if recon_heldout:
                        with torch.no_grad():
                            h_target = map_block(runner, b, hx, batch)
            times["stats"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad():
                compress(b, block, lin, sc)
            times["solve"] += time.perf_counter() - t0
            compressed.add(b)
        # --- reconstruct -----------------------------------------------------------------------------
        if reconstruct is not None:
            target = dstream[unit[-1] + 1] if gp else br_target
            t0 = time.perf_counter()
            if recon_heldout:
                h_t = hd[unit[-1] + 1] if gp else h_target
                losses.append(reconstruct(unit, unit_in, target, heldout=(hx, h_t)))
            else:
                losses.append(reconstruct(unit, unit_in, target))
            times["recon"] += time.perf_counter() - t0
        # --- finalise a block: advance the compressed streams and log errors --------------------------
        if done is None:
            continue
        t0 = time.perf_counter()
        with torch.no_grad():
            cur_in = map_block(runner, done, cur_in, batch)
            if hd is not None:
                hd.ensure(done + 1)
            dstream.ensure(done + 1)
            e = block_error(cur_in[:n_cal], dstream[done + 1][:n_cal])
            row = {"block": done, "err_calib": e["err"], "rel_calib": e["rel"], "tok0_calib": e["tok0_share"],
                   "err_calib_no_tok0": e["err_no_tok0"]}
            if hx is not None:
                hx = map_block(runner, done, hx, batch)
                e = block_error(hx, hd[done + 1])
                row.update(err_test=e["err"], rel_test=e["rel"], tok0_test=e["tok0_share"],
                           err_test_no_tok0=e["err_no_tok0"])
        blocks_out.append(row)
        times["eval"] += time.perf_counter() - t0
        if verbose and (done in (0, L - 1) or done % max(1, L // 5) == 0):
            print(f"  block {done:2d}: err_calib={row['err_calib']:.4g}" +
                  (f" err_test={row['err_test']:.4g}" if hx is not None else ""))
    times["total"] = time.perf_counter() - t_all
    return SequentialResult(blocks_out, losses, times)
