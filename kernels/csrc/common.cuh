// Shared helpers for the Shrink kernels (torch-free; only the CUDA runtime).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "shrink_kernels.h"

namespace shrink_kernels {

inline unsigned int grid_for(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > 65535LL * 16) blocks = 65535LL * 16;  // grid-stride loops cover the rest
  return static_cast<unsigned int>(blocks);
}

}  // namespace shrink_kernels
