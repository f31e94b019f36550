// Raw-pointer launchers of the Shrink CUDA kernels (torch-free, Marlin-style split).
//
// The .cu files include only the CUDA runtime, so `nvcc -c` checks them in about a second each; the
// stable-ABI glue (shrink_ops.cpp) includes only torch's stable headers and this file, so it compiles
// without nvcc or CUDA headers. Every launcher returns a cudaError_t as int (0 = success) and takes
// the stream as void* (a cudaStream_t).
//
// The numerics of every kernel are specified by lib/shrink/ops/reference.py and must match it bit for
// bit (build with --fmad=false so that no multiply-add is contracted).
#pragma once
#include <cstdint>

namespace shrink_kernels {

// Element dtype codes of the float inputs the kernels accept.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Human-readable message for a launcher's return code.
const char* error_string(int code);

// K1: out[i] = (int8) clamp(rint((float)x[i] / scale), -128, 127).  x: n contiguous elements.
int launch_quantize_static_int8(const void* x, int dtype, int64_t n, float scale, int8_t* out,
                                void* stream);

// out[i] = (T)((clamp(rint((float)x[i] / scale) + zp, qmin, qmax) - zp) * scale).  Same dtype in/out.
int launch_fake_quant_per_tensor(const void* x, int dtype, int64_t n, float scale, int zero_point,
                                 int qmin, int qmax, void* out, void* stream);

// Per-token (row of length d) dynamic fake quant; rows x d contiguous. See reference.quantize_per_token.
int launch_fake_quant_per_token(const void* x, int dtype, int64_t rows, int64_t d, int bits,
                                bool symmetric, void* out, void* stream);

// K2: out[m, n] = ((float)sum_k xq[m, k] * wq[n, k] * sx[m]) * sw[n]; xq [M, K], wq [N, K] row-major,
// sx [M], sw [N] float32, out [M, N] float32.
int launch_int8_gemm_dequant(const int8_t* xq, const int8_t* wq, const float* sx, const float* sw,
                             float* out, int64_t M, int64_t N, int64_t K, void* stream);

// K3: out[b, k, :] = h[b, idx[b, k], :]; a row is row_bytes bytes; h [B, T, row], idx [B, K] int64.
int launch_gather_rows(const void* h, const int64_t* idx, void* out, int64_t B, int64_t T,
                       int64_t K, int64_t row_bytes, void* stream);

// N:M keep-mask over scores [R, C] (C % m == 0): in each group of m columns keep the n largest,
// ties -> lower column index. mask is bool (1 byte) [R, C].
int launch_nm_mask(const void* scores, int dtype, int64_t R, int64_t C, int n, int m, bool* mask,
                   void* stream);

}  // namespace shrink_kernels
