// N:M semi-structured keep-mask: per row, in each group of m consecutive columns keep the n largest
// scores; ties go to the lower column index (the order of a stable descending sort).
// Spec: reference.nm_prune_mask. One thread per group; an element is kept iff fewer than n elements
// of its group rank before it, i.e. #{k : s[k] > s[j] or (s[k] == s[j] and k < j)} < n.
#include "float_types.cuh"

namespace shrink_kernels {

namespace {

constexpr int kThreads = 256;

// Comparison type: float for float/half/bfloat16 (exact, order preserving), double for double.
__device__ __forceinline__ float cmp_value(float v) { return v; }
__device__ __forceinline__ float cmp_value(__half v) { return __half2float(v); }
__device__ __forceinline__ float cmp_value(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double cmp_value(double v) { return v; }

template <typename T>
__global__ void nm_mask_kernel(const T* __restrict__ s, int64_t groups, int n, int m,
                               bool* __restrict__ mask) {
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const T* sg = s + g * m;
    bool* mg = mask + g * m;
    for (int j = 0; j < m; ++j) {
      const auto vj = cmp_value(sg[j]);
      int rank = 0;
      for (int k = 0; k < m && rank < n; ++k) {
        const auto vk = cmp_value(sg[k]);
        rank += (vk > vj || (vk == vj && k < j)) ? 1 : 0;
      }
      mg[j] = rank < n;
    }
  }
}

}  // namespace

int launch_nm_mask(const void* scores, int dtype, int64_t R, int64_t C, int n, int m, bool* mask,
                   void* stream) {
  if (m <= 0 || n < 0 || n > m || C % m != 0) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t groups = R * (C / m);
  if (groups == 0) return 0;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    nm_mask_kernel<T><<<grid_for(groups, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(scores), groups, n, m, mask);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace shrink_kernels
