// K1 (static per-tensor INT8 quantize) and the fused fake-quant kernels of the bits chapter.
// Spec: lib/shrink/ops/reference.py (quantize_per_tensor_static_int8, fake_quant_per_tensor,
// quantize_per_token / fake_quant_per_token). All arithmetic in float32 with explicitly rounded
// intrinsics (__fdiv_rn, __fadd_rn, __fmul_rn) so that no flag can turn x / s into x * (1 / s) or fuse
// a multiply-add; rint() rounds half to even like torch.round.
#include "float_types.cuh"

namespace shrink_kernels {

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void quantize_static_int8_kernel(const T* __restrict__ x, int64_t n, float scale,
                                            int8_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    float q = rintf(__fdiv_rn(to_float(x[i]), scale));
    q = fminf(fmaxf(q, -128.0f), 127.0f);
    out[i] = static_cast<int8_t>(static_cast<int>(q));
  }
}

template <typename T>
__global__ void fake_quant_per_tensor_kernel(const T* __restrict__ x, int64_t n, float scale,
                                             float zp, float qmin, float qmax, T* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    float q = __fadd_rn(rintf(__fdiv_rn(to_float(x[i]), scale)), zp);
    q = fminf(fmaxf(q, qmin), qmax);
    out[i] = from_float<T>(__fmul_rn(__fsub_rn(q, zp), scale));
  }
}

// One block per token (row). Reduces max|x| (symmetric) or max/min (asymmetric) over the row, then
// quantizes and dequantizes the row in place of the output.
template <typename T>
__global__ void fake_quant_per_token_kernel(const T* __restrict__ x, int64_t rows, int64_t d,
                                            int bits, bool symmetric, T* __restrict__ out) {
  __shared__ float s_hi[kThreads];
  __shared__ float s_lo[kThreads];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * d;
    T* outr = out + r * d;
    float hi = -INFINITY, lo = INFINITY;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      float v = to_float(xr[j]);
      if (symmetric) {
        hi = fmaxf(hi, fabsf(v));
      } else {
        hi = fmaxf(hi, v);
        lo = fminf(lo, v);
      }
    }
    s_hi[threadIdx.x] = hi;
    s_lo[threadIdx.x] = lo;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) {
        s_hi[threadIdx.x] = fmaxf(s_hi[threadIdx.x], s_hi[threadIdx.x + stride]);
        s_lo[threadIdx.x] = fminf(s_lo[threadIdx.x], s_lo[threadIdx.x + stride]);
      }
      __syncthreads();
    }
    hi = s_hi[0];
    lo = s_lo[0];
    __syncthreads();  // s_hi/s_lo are rewritten by the next row

    float scale, zero, qmin, qmax;
    if (symmetric) {
      qmax = static_cast<float>((1 << (bits - 1)) - 1);
      qmin = -qmax - 1.0f;
      scale = __fdiv_rn(hi, qmax);
      if (scale == 0.0f) scale = 1.0f;
      zero = 0.0f;
    } else {
      qmax = static_cast<float>((1 << bits) - 1);
      qmin = 0.0f;
      hi = fmaxf(hi, 0.0f);
      lo = fminf(lo, 0.0f);
      scale = __fdiv_rn(__fsub_rn(hi, lo), qmax);
      if (scale == 0.0f) scale = 1.0f;
      zero = rintf(__fdiv_rn(-lo, scale));
    }
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      float q = __fadd_rn(rintf(__fdiv_rn(to_float(xr[j]), scale)), zero);
      q = fminf(fmaxf(q, qmin), qmax);
      outr[j] = from_float<T>(__fmul_rn(__fsub_rn(q, zero), scale));
    }
  }
}

}  // namespace

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int launch_quantize_static_int8(const void* x, int dtype, int64_t n, float scale, int8_t* out,
                                void* stream) {
  if (n == 0) return 0;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    quantize_static_int8_kernel<T><<<grid_for(n, kThreads), kThreads, 0,
                                     static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), n, scale, out);
    return static_cast<int>(cudaGetLastError());
  });
}

int launch_fake_quant_per_tensor(const void* x, int dtype, int64_t n, float scale, int zero_point,
                                 int qmin, int qmax, void* out, void* stream) {
  if (n == 0) return 0;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    fake_quant_per_tensor_kernel<T><<<grid_for(n, kThreads), kThreads, 0,
                                      static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), n, scale, static_cast<float>(zero_point), static_cast<float>(qmin),
        static_cast<float>(qmax), static_cast<T*>(out));
    return static_cast<int>(cudaGetLastError());
  });
}

int launch_fake_quant_per_token(const void* x, int dtype, int64_t rows, int64_t d, int bits,
                                bool symmetric, void* out, void* stream) {
  if (rows == 0 || d == 0) return 0;
  if (bits < 2 || bits > 16) return static_cast<int>(cudaErrorInvalidValue);
  unsigned int grid = rows > 65535LL * 16 ? 65535u * 16u : static_cast<unsigned int>(rows);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    fake_quant_per_token_kernel<T><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), rows, d, bits, symmetric, static_cast<T*>(out));
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace shrink_kernels
