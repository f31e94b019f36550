// K3: token compaction gather, out[b, k, :] = h[b, idx[b, k], :] (hidden states or a KV-cache slice).
// Spec: reference.gather_tokens. Pure data movement: one block copies one output row with the widest
// access the row length and pointer alignment allow (16, 4 or 1 bytes).
#include "common.cuh"

namespace shrink_kernels {

namespace {

constexpr int kThreads = 128;

template <typename V>
__global__ void gather_rows_kernel(const V* __restrict__ h, const int64_t* __restrict__ idx,
                                   V* __restrict__ out, int64_t B, int64_t T, int64_t K,
                                   int64_t row_words) {
  for (int64_t row = blockIdx.x; row < B * K; row += gridDim.x) {
    const int64_t b = row / K;
    const int64_t t = idx[row];
    V* dst = out + row * row_words;
    if (t < 0 || t >= T) {  // the façade validates indices; never read out of bounds anyway
      for (int64_t j = threadIdx.x; j < row_words; j += blockDim.x) dst[j] = V{};
      continue;
    }
    const V* src = h + (b * T + t) * row_words;
    for (int64_t j = threadIdx.x; j < row_words; j += blockDim.x) dst[j] = src[j];
  }
}

template <typename V>
int launch_typed(const void* h, const int64_t* idx, void* out, int64_t B, int64_t T, int64_t K,
                 int64_t row_bytes, cudaStream_t stream) {
  const int64_t rows = B * K;
  const unsigned int grid = rows > 65535LL * 32 ? 65535u * 32u : static_cast<unsigned int>(rows);
  gather_rows_kernel<V><<<grid, kThreads, 0, stream>>>(static_cast<const V*>(h), idx,
                                                       static_cast<V*>(out), B, T, K,
                                                       row_bytes / static_cast<int64_t>(sizeof(V)));
  return static_cast<int>(cudaGetLastError());
}

inline bool aligned(const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

}  // namespace

int launch_gather_rows(const void* h, const int64_t* idx, void* out, int64_t B, int64_t T,
                       int64_t K, int64_t row_bytes, void* stream) {
  if (B == 0 || K == 0 || row_bytes == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (row_bytes % 16 == 0 && aligned(h, 16) && aligned(out, 16))
    return launch_typed<uint4>(h, idx, out, B, T, K, row_bytes, s);
  if (row_bytes % 4 == 0 && aligned(h, 4) && aligned(out, 4))
    return launch_typed<uint32_t>(h, idx, out, B, T, K, row_bytes, s);
  return launch_typed<unsigned char>(h, idx, out, B, T, K, row_bytes, s);
}

}  // namespace shrink_kernels
