// K2: W8A8 GEMM with the dequant epilogue fused: out[m, n] = ((float)acc[m, n] * sx[m]) * sw[n],
// acc = sum_k xq[m, k] * wq[n, k] in exact int32 (dp4a). Spec: reference.int8_matmul_dequant.
//
// A teaching kernel, not a cuBLASLt/CUTLASS competitor: 64 x 64 output tile per block, 256 threads,
// each computing a 4 x 4 micro-tile; K is staged through shared memory 32 bytes at a time and
// consumed four int8 lanes per __dp4a. Edges are zero-padded, so any M, N, K works.
#include "common.cuh"

namespace shrink_kernels {

namespace {

constexpr int BM = 64, BN = 64, BK = 32, TPB = 256;
constexpr int PAD = 4;  // row stride BK + PAD bytes (multiple of 4: int32 loads stay aligned)

__global__ void __launch_bounds__(TPB)
int8_gemm_dequant_kernel(const int8_t* __restrict__ xq, const int8_t* __restrict__ wq,
                         const float* __restrict__ sx, const float* __restrict__ sw,
                         float* __restrict__ out, int64_t M, int64_t N, int64_t K) {
  __shared__ __align__(16) int8_t As[BM][BK + PAD];
  __shared__ __align__(16) int8_t Bs[BN][BK + PAD];

  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;

  int acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0;

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    // Each of the 256 threads stages 8 bytes of A and 8 bytes of B (64 rows x 32 bytes each).
#pragma unroll
    for (int t = 0; t < (BM * BK) / TPB; ++t) {
      const int e = threadIdx.x + t * TPB;
      const int r = e / BK, c = e % BK;
      const int64_t gm = m0 + r, gn = n0 + r, gk = k0 + c;
      As[r][c] = (gm < M && gk < K) ? xq[gm * K + gk] : static_cast<int8_t>(0);
      Bs[r][c] = (gn < N && gk < K) ? wq[gn * K + gk] : static_cast<int8_t>(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 4) {
      int a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = *reinterpret_cast<const int*>(&As[ty + 16 * i][kk]);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = *reinterpret_cast<const int*>(&Bs[tx + 16 * j][kk]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __dp4a(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gm = m0 + ty + 16 * i;
    if (gm >= M) continue;
    const float sxm = sx[gm];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gn = n0 + tx + 16 * j;
      if (gn < N) out[gm * N + gn] = __fmul_rn(__fmul_rn(__int2float_rn(acc[i][j]), sxm), sw[gn]);
    }
  }
}

}  // namespace

int launch_int8_gemm_dequant(const int8_t* xq, const int8_t* wq, const float* sx, const float* sw,
                             float* out, int64_t M, int64_t N, int64_t K, void* stream) {
  if (M == 0 || N == 0) return 0;
  const int64_t gx = (N + BN - 1) / BN, gy = (M + BM - 1) / BM;
  if (gy > 65535 || gx > 2147483647LL) return static_cast<int>(cudaErrorInvalidConfiguration);
  dim3 grid(static_cast<unsigned int>(gx), static_cast<unsigned int>(gy));
  int8_gemm_dequant_kernel<<<grid, TPB, 0, static_cast<cudaStream_t>(stream)>>>(xq, wq, sx, sw, out, M,
                                                                                 N, K);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace shrink_kernels
