"""shrink.ops: references vs independent naive loops, properties, dispatch, opcheck, CUDA parity (gpu)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import shrink.ops as ops
from shrink.errors import ShrinkError
from shrink.ops import reference as ref

F32 = np.float32


# ----------------------------------------------------------------------------- naive implementations
def naive_quant_int8(x: torch.Tensor, scale: float) -> torch.Tensor:
    flat = x.float().reshape(-1).tolist()
    s = F32(scale)
    out = [int(min(max(np.rint(F32(v) / s), -128), 127)) for v in flat]
    return torch.tensor(out, dtype=torch.int8).reshape(x.shape)


def naive_fake_affine(x: torch.Tensor, scale: float, zp: int, qmin: int, qmax: int) -> torch.Tensor:
    s = F32(scale)
    out = []
    for v in x.float().reshape(-1).tolist():
        q = min(max(np.rint(F32(v) / s) + F32(zp), F32(qmin)), F32(qmax))
        out.append(F32(F32(q - F32(zp)) * s))
    return torch.tensor(np.array(out, dtype=np.float32)).reshape(x.shape).to(x.dtype)


def naive_fake_per_token(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    rows = x.float().reshape(-1, x.shape[-1]).tolist()
    out = []
    for row in rows:
        r = [F32(v) for v in row]
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            qmin = -qmax - 1
            s = F32(max(abs(v) for v in r)) / F32(qmax)
            s = F32(1) if s == 0 else s
            z = F32(0)
        else:
            qmin, qmax = 0, 2**bits - 1
            hi, lo = F32(max(max(r), 0)), F32(min(min(r), 0))
            s = F32(hi - lo) / F32(qmax)
            s = F32(1) if s == 0 else s
            z = np.rint(F32(-lo) / s)
        for v in r:
            q = min(max(F32(np.rint(v / s) + z), F32(qmin)), F32(qmax))
            out.append(F32(F32(q - z) * s))
    return torch.tensor(np.array(out, dtype=np.float32)).reshape(x.shape).to(x.dtype)


def naive_int8_mm(xq, wq, sx, sw) -> torch.Tensor:
    M, K = xq.shape
    N = wq.shape[0]
    a, b = xq.tolist(), wq.tolist()
    sxl, swl = sx.tolist(), sw.tolist()
    out = np.zeros((M, N), dtype=np.float32)
    for i in range(M):
        for j in range(N):
            acc = sum(a[i][k] * b[j][k] for k in range(K))
            out[i, j] = F32(F32(F32(acc) * F32(sxl[i])) * F32(swl[j]))
    return torch.from_numpy(out)


def naive_gather(h, idx):
    B, K = idx.shape
    out = torch.empty((B, K, *h.shape[2:]), dtype=h.dtype)
    for b in range(B):
        for k in range(K):
            out[b, k] = h[b, int(idx[b, k])]
    return out


def naive_nm(scores, n, m):
    R, C = scores.shape
    s = scores.tolist()
    mask = torch.zeros(R, C, dtype=torch.bool)
    for r in range(R):
        for g in range(0, C, m):
            cols = sorted(range(g, g + m), key=lambda c: (-s[r][c], c))[:n]
            for c in cols:
                mask[r, c] = True
    return mask


def _x(shape, seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


# ----------------------------------------------------------------------------- K1 and fake quant
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_quantize_static_int8_matches_naive(dtype):
    x = _x((3, 5, 16), seed=1, scale=40.0, dtype=dtype)  # saturates both ends at scale 0.37
    q = ops.quantize_per_tensor_static_int8(x, 0.37)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert torch.equal(q, naive_quant_int8(x, 0.37))
    assert q.min() == -128 and q.max() == 127


def test_round_half_to_even_and_clamp():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -128.5, -129.0, 1e6])
    q = ops.quantize_per_tensor_static_int8(x, 1.0)
    assert q.tolist() == [0, 2, 2, 0, -2, -2, 126, 127, -128, -128, 127]
    fq = ops.fake_quant_per_tensor(x, 1.0, 0, bits=4, signed=True)  # grid [-8, 7]
    assert fq.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 7.0, 7.0, -8.0, -8.0, 7.0]


@pytest.mark.parametrize("bits,signed,zp", [(8, True, 0), (4, True, -2), (8, False, 128), (3, False, 1), (16, True, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_per_tensor_matches_naive(bits, signed, zp, dtype):
    x = _x((4, 33), seed=bits, scale=2.0, dtype=dtype)
    scale = 0.0731
    qmin, qmax = ref.signed_range(bits) if signed else ref.unsigned_range(bits)
    out = ops.fake_quant_per_tensor(x, scale, zp, bits, signed)
    assert out.dtype == dtype
    assert torch.equal(out, naive_fake_affine(x, scale, zp, qmin, qmax))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fake_quant_per_token_matches_naive(symmetric, bits, dtype):
    x = _x((2, 3, 24), seed=bits, dtype=dtype)
    x[0, 1] = 0  # an all-zero token: scale 1, exact zeros
    x[1, 2] = x[1, 2].abs() + 0.5  # an all-positive token (asym range still includes 0)
    x[0, 2] = -x[0, 2].abs() - 0.5  # an all-negative token
    out = ops.fake_quant_per_token(x, bits, symmetric)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, naive_fake_per_token(x, bits, symmetric))
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 8])
def test_fake_quant_per_token_properties(symmetric, bits):
    x = _x((6, 64), seed=7)
    q, s, z = ops.quantize_per_token(x, bits, symmetric)
    qmin, qmax = ref.signed_range(bits) if symmetric else ref.unsigned_range(bits)
    # codes are integers in range; the output is exactly (q - z) * s
    assert torch.equal(q, q.round()) and q.min() >= qmin and q.max() <= qmax
    assert torch.equal(z, z.round())
    out = ops.fake_quant_per_token(x, bits, symmetric)
    assert torch.equal(out, (q - z) * s)
    # the error is at most half a step per element (values inside the range)
    assert bool(((out - x).abs() <= s / 2 * (1 + 1e-6)).all())
    # idempotence: same codes; values agree to float rounding of the re-derived scale
    q2, s2, z2 = ops.quantize_per_token(out, bits, symmetric)
    assert torch.equal(q2 - z2, q - z)
    torch.testing.assert_close(ops.fake_quant_per_token(out, bits, symmetric), out, rtol=2e-7, atol=0)


def test_fake_quant_per_tensor_idempotent_exact():
    x = _x((5, 40), seed=3)
    once = ops.fake_quant_per_tensor(x, 0.05, 3, bits=6)
    assert torch.equal(ops.fake_quant_per_tensor(once, 0.05, 3, bits=6), once)
    codes = once / torch.tensor(0.05) + 3
    assert torch.allclose(codes, codes.round(), atol=1e-4)


def test_symmetric_lower_clamp_never_binds():
    """Per-token symmetric uses |x/s| <= qmax, so the most negative code -2**(b-1) is never produced."""
    x = _x((50, 16), seed=11)
    q, _, _ = ops.quantize_per_token(x, 4, True)
    assert q.min() >= -7 and q.max() <= 7 and (q.abs() == 7).any()


# ----------------------------------------------------------------------------- K2
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 7, 3), (17, 40, 9)])
def test_int8_matmul_dequant_matches_naive(M, K, N):
    g = torch.Generator().manual_seed(M * 100 + K)
    xq = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    wq = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    sx = torch.rand(M, generator=g) * 0.1 + 1e-3
    sw = torch.rand(N, generator=g) * 0.01 + 1e-4
    expect = naive_int8_mm(xq, wq, sx, sw)
    assert torch.equal(ref.int8_matmul_dequant(xq, wq, sx, sw), expect)
    assert torch.equal(ops.int8_matmul_dequant(xq, wq, sx, sw), expect)
    with ops.reference_only():
        assert torch.equal(ops.int8_matmul_dequant(xq, wq, sx, sw), expect)
    # scalar activation scale == the broadcast vector
    assert torch.equal(ops.int8_matmul_dequant(xq, wq, 0.02, sw), naive_int8_mm(xq, wq, torch.full((M,), 0.02), sw))


def test_int8_matmul_extreme_accumulator_exact():
    """All -128 x -128 over K=4096: acc = 2**26, exact in int32 on every path."""
    xq = torch.full((3, 4096), -128, dtype=torch.int8)
    wq = torch.full((2, 4096), -128, dtype=torch.int8)
    acc = ref.int32_accumulate(xq, wq)
    assert acc.dtype == torch.int32 and bool((acc == 2**26).all())
    out = ops.int8_matmul_dequant(xq, wq, 1.0, 1.0)
    assert bool((out == 2.0**26).all())


@pytest.mark.parametrize("K", [1, 1023, 1024, 1025, 3000])
def test_f32_exact_accumulation_is_exact_across_chunks(K):
    """The cpu_f32_exact path at the accumulator's extremes (all codes -128: |partial sums| = 2**24 per chunk)
    and on random codes equals the float64 reference exactly, whatever the CPU."""
    from shrink.ops import _f32_exact_accumulate

    g = torch.Generator().manual_seed(K)
    extreme = torch.full((3, K), -128, dtype=torch.int8)
    assert torch.equal(_f32_exact_accumulate(extreme, extreme), ref.int32_accumulate(extreme, extreme))
    a = torch.randint(-128, 128, (17, K), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (9, K), dtype=torch.int8, generator=g)
    assert torch.equal(_f32_exact_accumulate(a, b), ref.int32_accumulate(a, b))


def test_int8_matmul_fast_path_equals_reference_at_layer_shape():
    g = torch.Generator().manual_seed(5)
    xq = torch.randint(-128, 128, (64, 576), dtype=torch.int8, generator=g)
    wq = torch.randint(-128, 128, (192, 576), dtype=torch.int8, generator=g)
    sx, sw = torch.rand(64, generator=g), torch.rand(192, generator=g)
    fast = ops.int8_matmul_dequant(xq, wq, sx, sw)
    assert ops.last_backend("int8_matmul_dequant") == ops.backend("int8_matmul_dequant", "cpu")
    assert torch.equal(fast, ref.int8_matmul_dequant(xq, wq, sx, sw))


def test_w8a8_real_path_equals_fake_quant_path():
    """quantize -> int8 GEMM -> dequant equals fake-quant operands in float64 up to float32 rounding."""
    x, w = _x((8, 64), seed=1), _x((16, 64), seed=2, scale=0.05)
    sx = float(x.abs().max()) / 127
    sw = w.abs().amax(dim=1) / 127
    xq = ops.quantize_per_tensor_static_int8(x, sx)
    wq = torch.round(w / sw[:, None]).clamp(-127, 127).to(torch.int8)
    real = ops.int8_matmul_dequant(xq, wq, sx, sw)
    fake = (ops.fake_quant_per_tensor(x, sx, 0, 8).double() @ (wq.double() * sw.double()[:, None]).t())
    torch.testing.assert_close(real.double(), fake, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- K3
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_gather_tokens_matches_naive(dtype):
    h = (torch.arange(2 * 7 * 5 * 3).reshape(2, 7, 5, 3)).to(dtype)  # [B, T, H, d]: trailing dims copied
    idx = torch.tensor([[0, 6, 3, 3], [5, 1, 2, 0]])
    out = ops.gather_tokens(h, idx)
    assert out.shape == (2, 4, 5, 3) and out.dtype == dtype
    assert torch.equal(out, naive_gather(h, idx))
    h3 = _x((3, 9, 8))
    idx3 = torch.stack([torch.randperm(9, generator=torch.Generator().manual_seed(i))[:4].sort().values
                        for i in range(3)])
    assert torch.equal(ops.gather_tokens(h3, idx3), naive_gather(h3, idx3))
    assert torch.equal(ops.gather_tokens(h3, torch.empty(3, 0, dtype=torch.long)), h3[:, :0])


# ----------------------------------------------------------------------------- N:M
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (0, 4), (4, 4), (3, 5)])
def test_nm_mask_matches_naive_and_counts(n, m):
    w = _x((6, 4 * m), seed=m)
    scores = w.abs() * torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1))
    mask = ops.nm_prune_mask(w, scores, n, m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(mask, naive_nm(scores, n, m))
    assert bool((mask.reshape(w.shape[0], -1, m).sum(-1) == n).all())
    # every kept score >= every pruned score within its group
    g = scores.reshape(w.shape[0], -1, m)
    gm = mask.reshape(g.shape)
    if 0 < n < m:
        kept_min = torch.where(gm, g, torch.inf).amin(-1)
        pruned_max = torch.where(gm, -torch.inf, g).amax(-1)
        assert bool((kept_min >= pruned_max).all())


def test_nm_mask_ties_keep_lower_index_and_default_magnitude():
    s = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, -0.0, 2.0, 0.0]])
    mask = ops.nm_prune_mask(s, s, 2, 4)
    assert mask.tolist() == [[True, True, False, False, True, False, True, False]]
    w = torch.tensor([[0.1, -3.0, 2.0, -0.5]])
    assert ops.nm_prune_mask(w, None, 2, 4).tolist() == [[False, True, True, False]]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call", [
    lambda: ops.quantize_per_tensor_static_int8(torch.tensor([1.0, float("nan")]), 0.1),
    lambda: ops.quantize_per_tensor_static_int8(torch.ones(3), 0.0),
    lambda: ops.quantize_per_tensor_static_int8(torch.ones(3, dtype=torch.int32), 0.1),
    lambda: ops.fake_quant_per_tensor(torch.ones(3), 0.1, 300, bits=8),
    lambda: ops.fake_quant_per_token(torch.ones(3, 4), bits=1),
    lambda: ops.fake_quant_per_token(torch.tensor([[1.0, float("inf")]]), bits=8),
    lambda: ops.int8_matmul_dequant(torch.ones(2, 3, dtype=torch.int8), torch.ones(2, 4, dtype=torch.int8), 1.0, 1.0),
    lambda: ops.int8_matmul_dequant(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.int8), 1.0, 1.0),
    lambda: ops.int8_matmul_dequant(torch.ones(2, 3, dtype=torch.int8), torch.ones(4, 3, dtype=torch.int8), 1.0,
                                    torch.ones(3)),
    lambda: ops.gather_tokens(torch.ones(2, 5, 3), torch.tensor([[0, 5], [1, 2]])),
    lambda: ops.gather_tokens(torch.ones(2, 5, 3), torch.tensor([[0, -1], [1, 2]])),
    lambda: ops.gather_tokens(torch.ones(2, 5, 3), torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)),
    lambda: ops.nm_prune_mask(torch.ones(2, 6), None, 2, 4),
    lambda: ops.nm_prune_mask(torch.ones(2, 8), None, 5, 4),
    lambda: ops.nm_prune_mask(torch.ones(2, 8), torch.full((2, 8), float("nan")), 2, 4),
    lambda: ops.backend("no_such_op"),
])
def test_bad_input_raises_shrink_error(call):
    with pytest.raises(ShrinkError):
        call()


# ----------------------------------------------------------------------------- dispatch
def test_dispatch_on_cpu_reports_reference():
    for name in ops.OP_NAMES:
        expected = {"reference", "cpu_int_mm", "cpu_f32_exact"} if name == "int8_matmul_dequant" else {"reference"}
        assert ops.backend(name, "cpu") in expected
        with ops.reference_only():
            assert ops.backend(name, "cpu") == "reference"
    ops.gather_tokens(torch.ones(1, 3, 2), torch.tensor([[2]]))
    assert ops.last_backend("gather_tokens") == "reference"
    with ops.reference_only():
        ops.int8_matmul_dequant(torch.ones(2, 3, dtype=torch.int8), torch.ones(2, 3, dtype=torch.int8), 1.0, 1.0)
    assert ops.last_backend("int8_matmul_dequant") == "reference"
    if not torch.cuda.is_available():
        assert ops.cuda_status()["loaded"] is False
        assert ops.backend("gather_tokens", "cuda") == "reference"


def test_registered_ops_cpu_are_the_references_and_pass_opcheck():
    lib = torch.ops.shrink
    x = _x((3, 8))
    xq = torch.randint(-5, 5, (3, 8), dtype=torch.int8)
    wq = torch.randint(-5, 5, (4, 8), dtype=torch.int8)
    cases = [
        (lib.quantize_per_tensor_static_int8.default, (x, 0.1), ref.quantize_per_tensor_static_int8(x, 0.1)),
        (lib.fake_quant_per_tensor.default, (x, 0.1, 0, -8, 7), ref.fake_quant_per_tensor(x, 0.1, 0, 4)),
        (lib.fake_quant_per_token.default, (x, 4, False), ref.fake_quant_per_token(x, 4, False)),
        (lib.int8_matmul_dequant.default, (xq, wq, torch.ones(3), torch.ones(4)),
         ref.int8_matmul_dequant(xq, wq, 1.0, 1.0)),
        (lib.gather_tokens.default, (x[None], torch.tensor([[2, 0]])), x[None][:, [2, 0]]),
        (lib.nm_prune_mask.default, (x, 2, 4), ref.nm_prune_mask(x, x, 2, 4)),
    ]
    for op, args, expect in cases:
        assert torch.equal(op(*args), expect), op
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- compile-check CLI
def test_compile_check_skips_without_nvcc(monkeypatch):
    from shrink.ops import compile_check

    monkeypatch.setenv("SHRINK_NVCC", "/nonexistent/nvcc")
    code, summary = compile_check.run()
    assert code == 0 and summary["status"] == "skipped" and "nvcc not found" in summary["reason"]


def test_compile_check_fails_on_broken_source(tmp_path, monkeypatch):
    from shrink.ops import compile_check, cuda

    if cuda.find_nvcc() is None:
        pytest.skip("nvcc not installed")
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "broken.cu").write_text("__global__ void k(int* p) { p[0] = undeclared; }\n")
    monkeypatch.setenv("SHRINK_KERNELS_DIR", str(tmp_path))
    monkeypatch.setenv("SHRINK_CUDA_ARCHS", "80")
    code, summary = compile_check.run(jobs=1)
    assert code == 1 and summary["status"] == "failed"
    assert not summary["files"][0]["ok"] and "undeclared" in summary["files"][0]["log_tail"]


def test_cli_status_runs():
    p = subprocess.run([sys.executable, "-m", "shrink.ops", "--status"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert set(d["backends"]["cpu"]) == set(ops.OP_NAMES)


# ----------------------------------------------------------------------------- CUDA parity (GPU only)
needs_cuda_ext = pytest.mark.skipif(not (torch.cuda.is_available() and ops.cuda_status()["loaded"]),
                                    reason="needs a CUDA device and the compiled kernels "
                                           "(python -m shrink.ops --build)")


def _cuda_vs_ref(fn, *args):
    got = fn(*args)
    with ops.reference_only():
        want = fn(*args)
    return got, want


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_quant_ops_equal_reference(dtype):
    x = _x((37, 4099), seed=3, scale=5.0, dtype=dtype).cuda()
    for fn, args in [
        (ops.quantize_per_tensor_static_int8, (x, 0.031)),
        (ops.fake_quant_per_tensor, (x, 0.031, 3, 6, True)),
        (ops.fake_quant_per_tensor, (x, 0.2, 128, 8, False)),
        (ops.fake_quant_per_token, (x, 8, True)),
        (ops.fake_quant_per_token, (x, 4, False)),
        (ops.fake_quant_per_token, (x[:, :1], 3, True)),
    ]:
        got, want = _cuda_vs_ref(fn, *args)
        assert ops.backend(fn.__name__, "cuda") == "cuda"
        assert got.dtype == want.dtype and torch.equal(got, want), fn.__name__


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (33, 70, 65), (2048, 576, 1536), (130, 4096, 257)])
def test_cuda_int8_matmul_equals_reference(M, K, N):
    g = torch.Generator().manual_seed(M)
    xq = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g).cuda()
    wq = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g).cuda()
    sx, sw = torch.rand(M, generator=g).cuda(), torch.rand(N, generator=g).cuda()
    got, want = _cuda_vs_ref(ops.int8_matmul_dequant, xq, wq, sx, sw)
    assert torch.equal(got, want)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("shape", [(2, 50, 576), (3, 17, 3, 5), (2, 9, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_cuda_gather_equals_reference(shape, dtype):
    h = _x(shape, seed=1).to(dtype).cuda()
    idx = torch.randint(0, shape[1], (shape[0], 11), generator=torch.Generator().manual_seed(0)).cuda()
    got, want = _cuda_vs_ref(ops.gather_tokens, h, idx)
    assert torch.equal(got, want)
    got, want = _cuda_vs_ref(ops.gather_tokens, h[:, 1:], idx.clamp(max=shape[1] - 2))  # non-contiguous h
    assert torch.equal(got, want)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (0, 4), (3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_cuda_nm_mask_equals_reference(n, m, dtype):
    w = _x((64, 40 * m), seed=m).to(dtype).cuda()
    s = (w.abs() * 4).round() / 4  # many ties
    got, want = _cuda_vs_ref(ops.nm_prune_mask, w, s, n, m)
    assert torch.equal(got, want)
