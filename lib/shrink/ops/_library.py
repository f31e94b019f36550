"""The ``shrink::`` op namespace in the PyTorch dispatcher.

Schemas, CPU kernels (the pure-PyTorch references) and fake/meta kernels (for ``torch.compile``) are
defined here, in Python; the compiled extension (``kernels/csrc/shrink_ops.cpp``) adds only the CUDA
kernels with ``STABLE_TORCH_LIBRARY_IMPL(shrink, CUDA, m)``. This is the split that kernels.md §2.2
recommends: the .so stays small and loading it is optional.

The ops take already-normalised arguments (scales as float32 tensors, explicit ``qmin/qmax``); the
user-facing functions with validation live in :mod:`shrink.ops`.
"""

from __future__ import annotations

import torch

from . import reference as ref

NAMESPACE = "shrink"

SCHEMAS = {
    "quantize_per_tensor_static_int8": "quantize_per_tensor_static_int8(Tensor x, float scale) -> Tensor",
    "fake_quant_per_tensor": "fake_quant_per_tensor(Tensor x, float scale, int zero_point, int qmin, int qmax) -> Tensor",
    "fake_quant_per_token": "fake_quant_per_token(Tensor x, int bits, bool symmetric) -> Tensor",
    "int8_matmul_dequant": "int8_matmul_dequant(Tensor x_q, Tensor w_q, Tensor s_x, Tensor s_w) -> Tensor",
    "gather_tokens": "gather_tokens(Tensor h, Tensor keep_idx) -> Tensor",
    "nm_prune_mask": "nm_prune_mask(Tensor scores, int n, int m) -> Tensor",
}

OP_NAMES = tuple(SCHEMAS)


# CPU kernels: exactly the references (argument order of the schemas).
def _cpu_quantize(x, scale):
    return ref.quantize_per_tensor_static_int8(x, scale)


def _cpu_fq_tensor(x, scale, zero_point, qmin, qmax):
    return ref.fake_quant_affine(x, scale, zero_point, qmin, qmax)


def _cpu_fq_token(x, bits, symmetric):
    return ref.fake_quant_per_token(x, bits, symmetric)


def _cpu_int8_mm(x_q, w_q, s_x, s_w):
    return ref.int8_matmul_dequant(x_q, w_q, s_x, s_w)


def _cpu_gather(h, keep_idx):
    return ref.gather_tokens(h, keep_idx)


def _cpu_nm(scores, n, m):
    return ref.nm_prune_mask(scores, scores, n, m)


_CPU = {
    "quantize_per_tensor_static_int8": _cpu_quantize,
    "fake_quant_per_tensor": _cpu_fq_tensor,
    "fake_quant_per_token": _cpu_fq_token,
    "int8_matmul_dequant": _cpu_int8_mm,
    "gather_tokens": _cpu_gather,
    "nm_prune_mask": _cpu_nm,
}


# Fake (meta) kernels: shapes and dtypes only.
def _fake_quantize(x, scale):
    return torch.empty_like(x, dtype=torch.int8)


def _fake_same(x, *args):
    return torch.empty_like(x)


def _fake_int8_mm(x_q, w_q, s_x, s_w):
    torch._check(x_q.dim() == 2 and w_q.dim() == 2 and x_q.shape[1] == w_q.shape[1],
                 lambda: "need x_q [M, K] and w_q [N, K]")
    return x_q.new_empty((x_q.shape[0], w_q.shape[0]), dtype=torch.float32)


def _fake_gather(h, keep_idx):
    return h.new_empty((h.shape[0], keep_idx.shape[1], *h.shape[2:]))


def _fake_nm(scores, n, m):
    return torch.empty_like(scores, dtype=torch.bool)


_FAKE = {
    "quantize_per_tensor_static_int8": _fake_quantize,
    "fake_quant_per_tensor": _fake_same,
    "fake_quant_per_token": _fake_same,
    "int8_matmul_dequant": _fake_int8_mm,
    "gather_tokens": _fake_gather,
    "nm_prune_mask": _fake_nm,
}

_LIB: torch.library.Library | None = None


def define() -> torch.library.Library:
    """Define the ``shrink::`` ops once per process (idempotent)."""
    global _LIB
    if _LIB is None:
        lib = torch.library.Library(NAMESPACE, "DEF")
        for name, schema in SCHEMAS.items():
            lib.define(schema)
            lib.impl(name, _CPU[name], "CPU")
            torch.library.register_fake(f"{NAMESPACE}::{name}", _FAKE[name], lib=lib)
        _LIB = lib
    return _LIB


def op(name: str):
    """``torch.ops.shrink.<name>.default``."""
    define()
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def has_kernel(name: str, dispatch_key: str = "CUDA") -> bool:
    """Whether the dispatcher has a kernel for ``shrink::<name>`` under ``dispatch_key``."""
    define()
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", dispatch_key))
