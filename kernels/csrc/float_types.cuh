// Float element types (float32, float16, bfloat16, float64) for the kernels that read activations or
// scores: exact conversions and a runtime dtype dispatch. Kept apart from common.cuh because the fp16/bf16
// headers are the slowest part of compiling a small kernel.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

namespace shrink_kernels {

// Exact conversions to float (fp16/bf16 -> float is exact; double -> float rounds to nearest even,
// as torch's Tensor.float()).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(double v) { return __double2float_rn(v); }

// float -> T with round-to-nearest-even, as torch's Tensor.to(dtype).
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ double from_float<double>(float v) { return static_cast<double>(v); }

// Calls f(T{}) with T the element type of the runtime dtype code (see shrink_kernels.h).
template <typename F>
inline int dispatch_float(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(float{});
    case kFloat16: return f(__half{});
    case kBFloat16: return f(__nv_bfloat16{});
    case kFloat64: return f(double{});
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace shrink_kernels
