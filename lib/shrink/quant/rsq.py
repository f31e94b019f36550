"""RSQ (Sung, Yadav, Li, Yoon, Bansal, arXiv 2503.01820, 2025): Rotate, Scale tokens by importance, Quantize.

RSQ is GPTQ (:func:`shrink.quant.gptq_quantize`) on a **token-weighted Hessian** (RSQ Sec. 3, official
``fake_quant/gptq_utils.py::add_batch``)::

    H = 2/n * sum_t r_t x_t x_t^T          (r_t >= 0, renormalised to mean 1 per calibration sequence)

so that the layer-wise objective ``sum_t r_t ||W x_t - W_hat x_t||^2`` spends the rounding budget on the
tokens that matter. With ``r_t = 1`` it is GPTQ bit for bit (tested). Token-importance strategies
(:data:`STRATEGIES`; official ``fake_quant/input_weighting_module.py``):

* ``uniform``: ``r_t = 1`` (GPTQ);
* ``attncon`` — attention concentration (``OriginalAttentionWeighting``, ``normalize="default"``): the column
  sums of the block's attention matrix, summed over heads and queries, ``c_j = sum_h sum_i A_hij``, computed
  per calibration sequence on the block's input (the already-quantized stream, the block still in full
  precision), min-max normalised to ``[min_value, max_value]`` (``scripts/run_rsq.sh``: 0.005 and 1), then mean 1;
* ``firstn`` — the official heuristic (``configs/input_weighting/heuristic.yaml``, ``AdhocMaskingWeighting``
  with ``method_type="0_8"``): weight 1 on the first ``T/8`` tokens of every sequence, 0 elsewhere;
* ``dropsink`` — a handbook heuristic (not in the paper): weight 0 on the first ``sink`` positions (the attention
  sink), 1 elsewhere: the opposite bet to ``attncon``, which puts its largest weight on the sink.

Prefix positions (``skip``: a CushionCache prefix prepended to every calibration window) always get weight 0
and are left out of the attention columns and of the normalisation (only text queries and text keys count).

Rotation (RSQ's "R", QuaRot, Ashkboos et al. 2024, ``fake_quant/rotation_utils.py``), folded into the weights so
the full-precision function is unchanged (tested to 1e-4):

1. every RMSNorm's weight is folded into the linears that read it (``W <- W diag(g)``, ``g <- 1``);
   tied embeddings are untied first (the final norm folds into ``lm_head`` only);
2. the residual stream is rotated by an orthogonal ``Q [d, d]``: embeddings ``E <- E Q``, linears that read the
   stream ``W <- W Q`` (q/k/v, gate/up, lm_head), linears that write it ``W <- Q^T W`` (o_proj, down_proj);
   RMSNorm with unit weight commutes with ``Q`` (``||h Q|| = ||h||``);
3. value heads and the matching ``o_proj`` input columns are rotated per head by a ``d_head`` Hadamard
   (QuaRot's ``rotate_ov_proj``; exact because attention mixes positions, not head dimensions).

``Q = diag(s) H / sqrt(d)`` with random signs ``s`` and a Hadamard matrix ``H`` of order ``d`` (Sylvester for
powers of two, Paley I for ``q + 1`` with ``q`` prime ``= 3 mod 4``, Kronecker products of those: 576 = 24 x 24
for SmolLM2); ``mode="random"`` uses a Haar-random orthogonal matrix instead. **Not done** (QuaRot/RSQ do it
online): the Hadamard on ``down_proj``'s input (it needs an extra transform in the forward), and clipping search
(``--w_clip``); both are documented differences.

Introduced in: notebooks/02-bits/02h-rsq.md
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import results
from ..attention import layer_qkv, probs_from_qk
from ..eval import Spread
from ..models import BlockRunner, KVPrefix, _Captured
from ..scales import PresetError
from .gptq import WeightQuantSpec, quantize_model
from .quantizer import QuantError
from .weightonly import CHAPTER, WeightOnlyContext, WeightOnlyPreset, grid_spec, zero_shot_fields, zero_shot_key

STRATEGIES = ("uniform", "attncon", "firstn", "dropsink")
ROTATIONS = ("none", "hadamard", "random")


# --------------------------------------------------------------------------------------------------------------
# Token weights
# --------------------------------------------------------------------------------------------------------------
def minmax_normalize(c: torch.Tensor, min_value: float, max_value: float) -> torch.Tensor:
    """Min-max map ``c [T]`` onto ``[min_value, max_value]`` (official ``normalize_weight``; a constant ``c``
    maps to ``max_value``)."""
    lo, hi = c.min(), c.max()
    if float(hi - lo) == 0.0:
        return torch.full_like(c, max_value)
    return ((c - lo) / (hi - lo) * (max_value - min_value) + min_value).clamp(min_value, max_value)


def mean_one(w: torch.Tensor) -> torch.Tensor:
    """Renormalise the weights of one sequence ``w [T]`` to mean 1 (official ``add_batch``:
    ``w / w.sum() * T``); all-ones stays exactly ones."""
    s = w.sum()
    if float(s) <= 0:
        raise QuantError("every token weight of a calibration sequence is zero; use another strategy or longer "
                         "sequences (firstn needs T >= 8)")
    return w * w.numel() / s


def attention_concentration(model: nn.Module, layer: int, hidden: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """Column sums of block ``layer``'s attention ``[N, T - skip]`` fp32: ``c_j = sum_h sum_i A_hij`` over text
    queries ``i`` and text keys ``j`` (positions ``>= skip``), for the block input ``hidden [N, T, D]``.

    The probabilities are recomputed from the block's own q/k with RoPE and GQA (:mod:`shrink.attention`).
    With ``skip > 0`` the prefix columns are dropped *after* the softmax (the prefix still takes its share of
    attention, as it does in the model)."""
    out = []
    for n in range(hidden.shape[0]):  # one sequence at a time: [1, H, T, T] stays small
        A = probs_from_qk(layer_qkv(model, layer, hidden[n:n + 1].float().to(next(model.parameters()).dtype),
                                    values=False))
        out.append(A[0, :, skip:, skip:].sum((0, 1)).float().cpu())
    return torch.stack(out)


def token_weights(strategy: str, hidden: torch.Tensor | None = None, *, model: nn.Module | None = None,
                  layer: int = 0, n: int | None = None, t: int | None = None, skip: int = 0,
                  min_value: float = 0.005, max_value: float = 1.0, first_frac: float = 1 / 8,
                  sink: int = 1, prefix: KVPrefix | None = None) -> torch.Tensor:
    """Per-token Hessian weights ``[N, T]`` (fp32, mean 1 over the text positions of every sequence, 0 on the
    ``skip`` prefix positions) for one block.

    Args:
        strategy: one of :data:`STRATEGIES`.
        hidden: block input ``[N, T, D]`` (needed by ``attncon``; else only its shape is used).
        model, layer: the model and block index (``attncon``).
        n, t: shape when ``hidden`` is None.
        skip: prefix positions at the start of every sequence (weight 0).
        min_value, max_value: ``attncon``'s min-max range (official 0.005, 1).
        first_frac: ``firstn``'s kept fraction of the text (official 1/8).
        sink: ``dropsink``'s number of leading text positions with weight 0.
        prefix: a key/value prefix every sequence starts from (:class:`PrefixBlockRunner`): ``attncon`` then
            counts the text columns of the attention that includes the prefix keys.
    """
    if strategy not in STRATEGIES:
        raise QuantError(f"unknown RSQ token-weight strategy {strategy!r}; use one of {STRATEGIES}")
    if hidden is not None:
        n, t = hidden.shape[0], hidden.shape[1]
    if n is None or t is None or not 0 <= skip < t:
        raise QuantError(f"token weights need the input shape [N, T] with 0 <= skip < T (got N={n}, T={t}, "
                         f"skip={skip})")
    if not 0 <= min_value <= max_value or max_value <= 0:
        raise QuantError(f"need 0 <= min_value <= max_value and max_value > 0 (official 0.005, 1); got "
                         f"{min_value}, {max_value}")
    tt = t - skip
    if strategy == "uniform":
        w = torch.ones(n, tt)
    elif strategy == "attncon":
        if model is None or hidden is None:
            raise QuantError("attncon token weights need the model and the block input (model=, hidden=)")
        c = (attention_concentration_prefixed(model, layer, hidden, prefix) if prefix is not None
             else attention_concentration(model, layer, hidden, skip))
        w = torch.stack([minmax_normalize(row, min_value, max_value) for row in c])
    elif strategy == "firstn":
        k = int(tt * first_frac)
        if k < 1:
            raise QuantError(f"firstn keeps {first_frac} of {tt} text tokens = 0 tokens; use longer sequences")
        w = torch.zeros(n, tt)
        w[:, :k] = 1.0
    else:  # dropsink
        if not 0 < sink < tt:
            raise QuantError(f"dropsink needs 0 < sink < T_text, got sink={sink}, T_text={tt}")
        w = torch.ones(n, tt)
        w[:, :sink] = 0.0
    w = torch.stack([mean_one(row) for row in w])
    return torch.cat([torch.zeros(n, skip), w], 1) if skip else w


def token_weight_fn(model: nn.Module, strategy: str, *, skip: int = 0, min_value: float = 0.005,
                    max_value: float = 1.0, first_frac: float = 1 / 8, sink: int = 1, record: list | None = None,
                    prefix: KVPrefix | None = None):
    """The ``token_weights`` callback of :func:`shrink.quant.quantize_model` / :func:`shrink.blockwise.sequential`:
    ``(block index, block, inputs [N, T, D]) -> [N, T]``. ``record`` (a list) collects per-block summaries
    (share of the weight on the first text token, max weight)."""
    def fn(b, _block, x):
        w = token_weights(strategy, x, model=model, layer=b, skip=skip, min_value=min_value, max_value=max_value,
                          first_frac=first_frac, sink=sink, prefix=prefix)
        if record is not None:
            tot = w.sum(1)
            record.append({"block": b, "first_share": float((w[:, skip] / tot).mean()), "max": float(w.max())})
        return w
    return fn


# --------------------------------------------------------------------------------------------------------------
# Rotation (QuaRot-style, folded into the weights)
# --------------------------------------------------------------------------------------------------------------
def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q ** 0.5) + 1))


def _paley1(q: int) -> torch.Tensor:
    """Paley construction I: Hadamard matrix of order ``q + 1`` for a prime ``q = 3 mod 4`` (float64 +-1)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    Qm = chi[(idx[None, :] - idx[:, None]) % q]  # Jacobsthal matrix, skew-symmetric for q = 3 mod 4
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Qm
    return S + torch.eye(q + 1, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _hadamard(n: int) -> torch.Tensor | None:
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if n % 4 == 0 and _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _paley1(n - 1)
    for a in range(2, int(n ** 0.5) + 1):
        if n % a == 0:
            A, B = _hadamard(a), _hadamard(n // a)
            if A is not None and B is not None:
                return torch.kron(A, B)
    return None


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (float64 entries +-1, ``H H^T = n I``): Sylvester, Paley I and
    Kronecker products. Raises :class:`QuantError` when this construction has none (use ``mode="random"``)."""
    H = _hadamard(int(n))
    if H is None:
        raise QuantError(f"no Hadamard matrix of order {n} from Sylvester/Paley-I/Kronecker constructions; rotate "
                         "with mode='random' (a Haar-random orthogonal matrix) instead")
    return H.clone()


def orthogonal(n: int, mode: str = "hadamard", seed: int = 0) -> torch.Tensor:
    """Orthogonal ``[n, n]`` float64: ``"hadamard"`` = ``diag(s) H / sqrt(n)`` with seeded random signs ``s``
    (QuaRot's random Hadamard), ``"random"`` = QR of a seeded Gaussian (signs fixed: Haar)."""
    g = torch.Generator().manual_seed(seed)
    if mode == "hadamard":
        s = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
        return s[:, None] * hadamard(n) / math.sqrt(n)
    if mode == "random":
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))[None, :]
    raise QuantError(f"unknown rotation mode {mode!r}; use 'hadamard' or 'random'")


def _llama_parts(model: nn.Module):
    if not (hasattr(model, "model") and hasattr(model.model, "layers") and hasattr(model.model, "norm")):
        raise QuantError(f"rotation supports LLaMA-like decoders (model.model.layers, RMSNorm); got "
                         f"{type(model).__name__}. Use rotation='none' for this model.")
    for blk in model.model.layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            if "RMSNorm" not in type(getattr(blk, name)).__name__:
                raise QuantError(f"rotation needs RMSNorm (LayerNorm's mean subtraction does not commute with a "
                                 f"rotation); {name} is {type(getattr(blk, name)).__name__}")
    return model.model.embed_tokens, list(model.model.layers), model.model.norm, model.lm_head


@torch.no_grad()
def _set(lin: nn.Linear, W: torch.Tensor) -> None:
    lin.weight.data = W.to(lin.weight.dtype).contiguous()


@torch.no_grad()
def fold_norms(model: nn.Module) -> nn.Module:
    """Fold every RMSNorm weight into the linears that read it (``W <- W diag(g)``, ``g <- 1``), in place;
    unties ``lm_head`` from the embeddings first. The function is unchanged up to float rounding."""
    emb, layers, norm, head = _llama_parts(model)
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False
    for blk in layers:
        att, mlp = blk.self_attn, blk.mlp
        for ln, lins in ((blk.input_layernorm, (att.q_proj, att.k_proj, att.v_proj)),
                         (blk.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
            g = ln.weight.detach().double()
            for lin in lins:
                _set(lin, lin.weight.double() * g[None, :])
            ln.weight.data.fill_(1.0)
    g = norm.weight.detach().double()
    _set(head, head.weight.double() * g[None, :])
    norm.weight.data.fill_(1.0)
    return model


@torch.no_grad()
def rotate_model(model: nn.Module, mode: str = "hadamard", seed: int = 0, heads: bool = True) -> nn.Module:
    """QuaRot-style rotation folded into the weights (module docstring), in place; returns ``model``.

    Args:
        model: LLaMA-like causal LM (RMSNorm, no biases on the rotated linears).
        mode: ``"hadamard"`` (random-sign Hadamard) | ``"random"`` (Haar orthogonal).
        seed: seed of the random signs / matrix.
        heads: also rotate value heads and ``o_proj``'s input per head (``d_head`` Hadamard, same seed).
    """
    emb, layers, norm, head = _llama_parts(model)
    for blk in layers:
        for lin in (blk.self_attn.o_proj, blk.mlp.down_proj, blk.self_attn.v_proj):
            if lin.bias is not None:
                raise QuantError("rotate_model does not handle biases on o_proj/down_proj/v_proj (not LLaMA)")
    fold_norms(model)
    d = emb.weight.shape[1]
    Q = orthogonal(d, mode, seed)
    emb.weight.data = (emb.weight.double() @ Q).to(emb.weight.dtype)
    _set(head, head.weight.double() @ Q)
    for blk in layers:
        att, mlp = blk.self_attn, blk.mlp
        for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
            _set(lin, lin.weight.double() @ Q)
        for lin in (att.o_proj, mlp.down_proj):
            _set(lin, Q.T @ lin.weight.double())
        if heads:
            hd = att.head_dim
            Hh = orthogonal(hd, mode, seed + 1)
            n_kv = att.v_proj.weight.shape[0] // hd
            n_q = att.o_proj.weight.shape[1] // hd
            _set(att.v_proj, torch.block_diag(*[Hh.T] * n_kv) @ att.v_proj.weight.double())
            _set(att.o_proj, att.o_proj.weight.double() @ torch.block_diag(*[Hh] * n_q))
    return model


# --------------------------------------------------------------------------------------------------------------
# A CushionCache prefix in the block loop
# --------------------------------------------------------------------------------------------------------------
_CACHE_KEYS = ("cache", "past_key_values", "past_key_value")


class PrefixBlockRunner(BlockRunner):
    """:class:`shrink.models.BlockRunner` whose every block call starts from a fixed key/value prefix
    (CushionCache's design: the prefix is a stored full-precision cache, never recomputed by the quantized model).

    Every :meth:`run_block` gets a fresh cache holding the prefix (transformers caches are mutated in place), and
    the captured keyword arguments (mask over prefix + text, RoPE positions after the prefix) come from a real
    forward with that cache. ``logits(ids)`` equals :class:`shrink.models.PrefixedLM` (tested)."""

    def __init__(self, model: nn.Module, prefix: KVPrefix):
        super().__init__(model)
        self.prefix = prefix
        self._cache_key = "cache"

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        store: dict = {}

        def hook(_module, args, kwargs):
            store["hidden"] = args[0] if args else kwargs["hidden_states"]
            store["keys"] = [k for k in _CACHE_KEYS if k in kwargs]
            store["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states" and k not in _CACHE_KEYS}
            raise _Captured

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(input_ids=input_ids.to(self.device), past_key_values=self.prefix.cache(input_ids.shape[0]),
                       use_cache=True)
        except _Captured:
            pass
        finally:
            handle.remove()
        if not store.get("keys"):
            raise QuantError("the decoder blocks of this model receive no cache argument; a key/value prefix cannot "
                             "be replayed block by block (use a LLaMA-like model)")
        self._cache_key = store["keys"][0]
        self._kwargs.setdefault(tuple(input_ids.shape), store["kwargs"])
        return store["hidden"]

    def run_block(self, i: int, hidden: torch.Tensor, block: nn.Module | None = None) -> torch.Tensor:
        b, t, _ = hidden.shape
        kw = dict(self.block_kwargs(b, t))
        kw[self._cache_key] = self.prefix.cache(b)
        out = (block or self.blocks[i])(hidden, **kw)
        return out[0] if isinstance(out, tuple) else out


def attention_concentration_prefixed(model: nn.Module, layer: int, hidden: torch.Tensor,
                                     prefix: KVPrefix) -> torch.Tensor:
    """:func:`attention_concentration` when every sequence starts from the key/value ``prefix``: text queries
    attend to the prefix keys and the causal text keys; the column sums of the *text* keys ``[N, T]`` are
    returned (the prefix takes its share of every softmax row, as it does in the model)."""
    P = prefix.length
    dev = next(model.parameters()).device
    out = []
    for n in range(hidden.shape[0]):
        x = hidden[n:n + 1].to(dev)
        pos = torch.arange(P, P + x.shape[1], device=dev)[None]
        qk = layer_qkv(model, layer, x, position_ids=pos, values=False)
        kp = prefix.keys[layer].to(dev).float()
        kp = kp.repeat_interleave(qk.q.shape[1] // kp.shape[1], dim=1)
        logits_p = (qk.q.float() @ kp.transpose(-1, -2)) * qk.scaling               # [1, H, T, P]
        logits_t = (qk.q.float() @ qk.k.float().transpose(-1, -2)) * qk.scaling     # [1, H, T, T]
        t = logits_t.shape[-1]
        logits_t = logits_t.masked_fill(torch.ones(t, t, dtype=torch.bool, device=dev).triu(1), float("-inf"))
        A = torch.cat([logits_p, logits_t], -1).softmax(-1)[..., P:]
        out.append(A[0].sum((0, 1)).float().cpu())
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------------------
# Experiments (notebook 02h)
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RSQPreset(WeightOnlyPreset):
    """Knobs of notebook 02h (the 02g preset plus RSQ's): a grid of ``strategies`` x ``rotations`` at
    ``bits``/``grid`` over ``calib_seeds`` (a seed draws the calibration windows and the rotation's signs), and
    the CushionCache cross-question on ``cross_seeds`` (prefix tokens of 02d's search prepended)."""

    rsq_bits: int = 3
    rsq_grid: str = "channel"
    strategies: tuple = ("uniform", "attncon", "firstn", "dropsink")
    rotations: tuple = ("none", "hadamard")
    #: strategies measured with rotation (the rest without only); None = all
    rotated_strategies: tuple | None = None
    #: strategies measured on every calibration seed (the rest on the first seed only); None = all
    seeded_strategies: tuple | None = None
    #: rotations measured on every calibration seed (the rest on the first seed only); None = all
    seeded_rotations: tuple | None = None
    min_value: float = 0.005
    max_value: float = 1.0
    first_frac: float = 0.125
    sink: int = 1
    cross_strategies: tuple = ("uniform", "attncon")
    cross_seeds: tuple = (0,)
    with_ood: bool = True

    def check(self) -> None:
        super().check()
        grid_spec(self.rsq_grid, self.rsq_bits)
        bad = [s for s in (*self.strategies, *self.cross_strategies) if s not in STRATEGIES]
        if bad or "uniform" not in self.strategies:
            raise PresetError(f"strategies must be among {STRATEGIES} and include 'uniform' (the GPTQ baseline); "
                              f"got {self.strategies}, cross {self.cross_strategies}")
        if self.seeded_rotations is not None and not set(self.seeded_rotations) <= set(self.rotations):
            raise PresetError(f"seeded_rotations {self.seeded_rotations} must be a subset of rotations {self.rotations}")
        for name in ("rotated_strategies", "seeded_strategies"):
            v = getattr(self, name)
            if v is not None and not set(v) <= set(self.strategies):
                raise PresetError(f"{name} {v} must be a subset of strategies {self.strategies}")
        if any(r not in ROTATIONS for r in self.rotations):
            raise PresetError(f"rotations must be among {ROTATIONS}, got {self.rotations}")
        if not 0 <= self.min_value <= self.max_value:
            raise PresetError(f"need 0 <= min_value <= max_value (official 0.005, 1), got {self.min_value}, "
                              f"{self.max_value}")


class RSQContext(WeightOnlyContext):
    """Cells of notebook 02h on top of 02g's context (same model, perplexity function and windows)."""

    cfg: RSQPreset

    def rotated(self, strategy: str) -> bool:
        rs = self.cfg.rotated_strategies
        return rs is None or strategy in rs

    def seeds_of(self, strategy: str, rotation: str = "none") -> tuple:
        """Calibration seeds a cell is measured on: all, or the first only (``cfg.seeded_strategies``,
        ``cfg.seeded_rotations``)."""
        ss, sr = self.cfg.seeded_strategies, self.cfg.seeded_rotations
        full = (ss is None or strategy in ss) and (sr is None or rotation in sr)
        return tuple(self.cfg.calib_seeds) if full else tuple(self.cfg.calib_seeds[:1])

    def rsq_config(self, strategy: str, rotation: str, seed: int, prefix: tuple | None) -> dict:
        c = self.cfg
        base = self.config("gptq", c.rsq_bits, c.rsq_grid, seed)
        conf = {**base, "ood": base["ood"] if c.with_ood else None, "rsq": strategy, "rotation": rotation,
                "rotation_seed": seed if rotation != "none" else None,
                "weights": [c.min_value, c.max_value] if strategy == "attncon" else
                           c.first_frac if strategy == "firstn" else c.sink if strategy == "dropsink" else None,
                "prefix": list(prefix) if prefix else None}
        if prefix:
            conf["prefix_kv"] = "fp-cache"   # the prefix's cache is the full-precision model's, held fixed
        return conf

    def measure_rsq(self, strategy: str, rotation: str = "none", seed: int = 0, prefix: tuple | None = None) -> dict:
        """Cached cell: ``{"ppl", "ppl_ood", "err_calib", "first_share", "times"}``. ``prefix``: token ids whose
        key/value cache is computed once by the full-precision (rotated) model and then held fixed, CushionCache's
        design: every calibration block call (:class:`PrefixBlockRunner`) and every evaluation window start from
        it; the prefix never enters the Hessian."""
        c = self.cfg
        spec = WeightQuantSpec(method="gptq", grid=grid_spec(c.rsq_grid, c.rsq_bits), act_order=c.act_order)
        conf = {**self.rsq_config(strategy, rotation, seed, prefix), **zero_shot_key(c, self.scale)}

        def run():
            m = copy.deepcopy(self.model)
            if rotation != "none":
                rotate_model(m, rotation, seed)
            ids = self.calib(seed)
            kv = KVPrefix.from_tokens(m, list(prefix)) if prefix else None   # full precision, then fixed
            rec: list = []
            fn = token_weight_fn(m, strategy, min_value=c.min_value, max_value=c.max_value, first_frac=c.first_frac,
                                 sink=c.sink, record=rec, prefix=kv)
            res = quantize_model(m, ids, spec, token_weights=fn, runner=PrefixBlockRunner(m, kv) if kv else None,
                                 verbose=False)
            out = {"ppl": self._ppl_p(m, c.eval_corpus, c.eval_split, kv),
                   "ppl_ood": self._ppl_p(m, c.ood_corpus, c.ood_split, kv) if c.with_ood else None,
                   "err_calib": res["final"]["err_calib"], "first_share": [r["first_share"] for r in rec],
                   "times": res["times"]}
            if not prefix:  # lm-eval's requests carry no key/value prefix here
                out.update(zero_shot_fields(c, self.scale, m, self.tok))
            del m
            return out

        return results.cached("rsq", conf, run, scale=self.scale, chapter=CHAPTER)

    def _ppl_p(self, model, corpus, split, prefix) -> float:
        from .. import eval as ev
        c = self.cfg
        return ev.perplexity(model, self.stream(corpus, split), c.seqlen, max_windows=c.windows, prefix=prefix,
                             dataset=corpus, split=split).ppl

    def dense_p(self, prefix: tuple | None = None, rotation: str = "none", seed: int = 0) -> dict:
        """Full-precision perplexity (optionally rotated, optionally with the prefix): the controls."""
        c = self.cfg
        conf = {"model": c.model, "eval": [c.eval_corpus, c.eval_split, c.seqlen, c.windows],
                "ood": [c.ood_corpus, c.ood_split] if c.with_ood else None, "rotation": rotation,
                "rotation_seed": seed if rotation != "none" else None, "prefix": list(prefix) if prefix else None,
                "dense": True}

        def run():
            m = copy.deepcopy(self.model)
            if rotation != "none":
                rotate_model(m, rotation, seed)
            kv = KVPrefix.from_tokens(m, list(prefix)) if prefix else None
            return {"ppl": self._ppl_p(m, c.eval_corpus, c.eval_split, kv),
                    "ppl_ood": self._ppl_p(m, c.ood_corpus, c.ood_split, kv) if c.with_ood else None}
        return results.cached("rsq", conf, run, scale=self.scale, chapter=CHAPTER)

    def spread(self, strategy: str, rotation: str = "none", metric: str = "ppl", prefix: tuple | None = None,
               seeds: tuple | None = None) -> Spread:
        seeds = tuple(seeds or (self.cfg.cross_seeds if prefix else self.seeds_of(strategy, rotation)))
        return Spread(tuple(self.measure_rsq(strategy, rotation, s, prefix)[metric] for s in seeds),
                      kind="calibration draws" + (" and rotation signs" if rotation != "none" else ""), seeds=seeds)

    def paired_gap(self, strategy: str, rotation: str = "none", prefix: tuple | None = None,
                   seeds: tuple | None = None) -> Spread:
        """``ppl(strategy) - ppl(uniform)`` paired by calibration seed (same windows, same rotation)."""
        seeds = tuple(seeds or (self.cfg.cross_seeds if prefix else self.seeds_of(strategy, rotation)))
        return Spread(tuple(self.measure_rsq(strategy, rotation, s, prefix)["ppl"] -
                            self.measure_rsq("uniform", rotation, s, prefix)["ppl"] for s in seeds),
                      kind="paired by calibration draw", seeds=seeds)


__all__ = ["STRATEGIES", "ROTATIONS", "token_weights", "token_weight_fn", "attention_concentration",
           "attention_concentration_prefixed", "PrefixBlockRunner",
           "minmax_normalize", "mean_one", "hadamard", "orthogonal", "fold_norms", "rotate_model", "RSQPreset",
           "RSQContext"]
