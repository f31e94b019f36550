// Stable-ABI glue: registers the CUDA implementations of the `shrink::` ops.
//
// The op schemas, the CPU implementations (= the pure-PyTorch references) and the fake (meta)
// implementations are defined in Python (lib/shrink/ops/_library.py); this file only adds the CUDA
// kernels with STABLE_TORCH_LIBRARY_IMPL(shrink, CUDA, m). It includes nothing but torch's stable
// headers and shrink_kernels.h (no CUDA headers), and is built with
//   -DUSE_CUDA -DTORCH_TARGET_VERSION=0x020a000000000000   (stable API of PyTorch >= 2.10)
// Input validation (value ranges, finiteness) happens in the Python façade; here only the structural
// preconditions the kernels rely on are checked.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <vector>

#include "shrink_kernels.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

void* current_stream(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return stream;
}

void check_cuda(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.is_cuda(), "shrink CUDA op: ", name, " must be a CUDA tensor");
}

int float_code(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case ScalarType::Float: return shrink_kernels::kFloat32;
    case ScalarType::Half: return shrink_kernels::kFloat16;
    case ScalarType::BFloat16: return shrink_kernels::kBFloat16;
    case ScalarType::Double: return shrink_kernels::kFloat64;
    default: STD_TORCH_CHECK(false, "shrink CUDA op: ", name, " must be float32/float16/bfloat16/float64");
  }
  return -1;
}

void check_launch(int code, const char* op) {
  STD_TORCH_CHECK(code == 0, "shrink CUDA op ", op, " failed to launch: ",
                  shrink_kernels::error_string(code));
}

std::vector<int64_t> shape_of(const Tensor& t) {
  std::vector<int64_t> s;
  for (int64_t i = 0; i < t.dim(); ++i) s.push_back(t.size(i));
  return s;
}

Tensor quantize_per_tensor_static_int8_cuda(const Tensor& x, double scale) {
  check_cuda(x, "x");
  const int code = float_code(x, "x");
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  Tensor xc = torch::stable::contiguous(x);
  Tensor out = torch::stable::new_empty(xc, shape_of(xc), ScalarType::Char);
  check_launch(shrink_kernels::launch_quantize_static_int8(
                   xc.data_ptr(), code, xc.numel(), static_cast<float>(scale),
                   static_cast<int8_t*>(out.data_ptr()), current_stream(xc)),
               "quantize_per_tensor_static_int8");
  return out;
}

Tensor fake_quant_per_tensor_cuda(const Tensor& x, double scale, int64_t zero_point, int64_t qmin,
                                  int64_t qmax) {
  check_cuda(x, "x");
  const int code = float_code(x, "x");
  STD_TORCH_CHECK(qmin <= zero_point && zero_point <= qmax, "zero_point outside [qmin, qmax]");
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  Tensor xc = torch::stable::contiguous(x);
  Tensor out = torch::stable::empty_like(xc);
  check_launch(shrink_kernels::launch_fake_quant_per_tensor(
                   xc.data_ptr(), code, xc.numel(), static_cast<float>(scale),
                   static_cast<int>(zero_point), static_cast<int>(qmin), static_cast<int>(qmax),
                   out.data_ptr(), current_stream(xc)),
               "fake_quant_per_tensor");
  return out;
}

Tensor fake_quant_per_token_cuda(const Tensor& x, int64_t bits, bool symmetric) {
  check_cuda(x, "x");
  const int code = float_code(x, "x");
  STD_TORCH_CHECK(x.dim() >= 1, "x must have a feature dimension");
  STD_TORCH_CHECK(bits >= 2 && bits <= 16, "bits must be in [2, 16]");
  torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  Tensor xc = torch::stable::contiguous(x);
  Tensor out = torch::stable::empty_like(xc);
  const int64_t d = xc.size(xc.dim() - 1);
  const int64_t rows = d == 0 ? 0 : xc.numel() / d;
  check_launch(shrink_kernels::launch_fake_quant_per_token(xc.data_ptr(), code, rows, d,
                                                           static_cast<int>(bits), symmetric,
                                                           out.data_ptr(), current_stream(xc)),
               "fake_quant_per_token");
  return out;
}

Tensor int8_matmul_dequant_cuda(const Tensor& x_q, const Tensor& w_q, const Tensor& s_x,
                                const Tensor& s_w) {
  check_cuda(x_q, "x_q");
  check_cuda(w_q, "w_q");
  check_cuda(s_x, "s_x");
  check_cuda(s_w, "s_w");
  STD_TORCH_CHECK(x_q.scalar_type() == ScalarType::Char && w_q.scalar_type() == ScalarType::Char,
                  "x_q and w_q must be int8");
  STD_TORCH_CHECK(s_x.scalar_type() == ScalarType::Float && s_w.scalar_type() == ScalarType::Float,
                  "s_x and s_w must be float32");
  STD_TORCH_CHECK(x_q.dim() == 2 && w_q.dim() == 2 && x_q.size(1) == w_q.size(1),
                  "need x_q [M, K] and w_q [N, K]");
  const int64_t M = x_q.size(0), K = x_q.size(1), N = w_q.size(0);
  STD_TORCH_CHECK(s_x.dim() == 1 && s_x.size(0) == M, "s_x must be [M]");
  STD_TORCH_CHECK(s_w.dim() == 1 && s_w.size(0) == N, "s_w must be [N]");
  torch::stable::accelerator::DeviceGuard guard(x_q.get_device_index());
  Tensor xc = torch::stable::contiguous(x_q), wc = torch::stable::contiguous(w_q);
  Tensor sxc = torch::stable::contiguous(s_x), swc = torch::stable::contiguous(s_w);
  Tensor out = torch::stable::new_empty(xc, std::vector<int64_t>{M, N}, ScalarType::Float);
  check_launch(shrink_kernels::launch_int8_gemm_dequant(
                   static_cast<const int8_t*>(xc.data_ptr()), static_cast<const int8_t*>(wc.data_ptr()),
                   static_cast<const float*>(sxc.data_ptr()), static_cast<const float*>(swc.data_ptr()),
                   static_cast<float*>(out.data_ptr()), M, N, K, current_stream(xc)),
               "int8_matmul_dequant");
  return out;
}

Tensor gather_tokens_cuda(const Tensor& h, const Tensor& keep_idx) {
  check_cuda(h, "h");
  check_cuda(keep_idx, "keep_idx");
  STD_TORCH_CHECK(keep_idx.scalar_type() == ScalarType::Long, "keep_idx must be int64");
  STD_TORCH_CHECK(h.dim() >= 2 && keep_idx.dim() == 2 && keep_idx.size(0) == h.size(0),
                  "need h [B, T, ...] and keep_idx [B, K]");
  torch::stable::accelerator::DeviceGuard guard(h.get_device_index());
  Tensor hc = torch::stable::contiguous(h), ic = torch::stable::contiguous(keep_idx);
  const int64_t B = hc.size(0), T = hc.size(1), K = ic.size(1);
  std::vector<int64_t> shape = shape_of(hc);
  shape[1] = K;
  Tensor out = torch::stable::new_empty(hc, shape);
  int64_t row_elems = 1;
  for (int64_t i = 2; i < hc.dim(); ++i) row_elems *= hc.size(i);
  const int64_t row_bytes = row_elems * static_cast<int64_t>(hc.element_size());
  check_launch(shrink_kernels::launch_gather_rows(hc.data_ptr(),
                                                  static_cast<const int64_t*>(ic.data_ptr()),
                                                  out.data_ptr(), B, T, K, row_bytes,
                                                  current_stream(hc)),
               "gather_tokens");
  return out;
}

Tensor nm_prune_mask_cuda(const Tensor& scores, int64_t n, int64_t m) {
  check_cuda(scores, "scores");
  const int code = float_code(scores, "scores");
  STD_TORCH_CHECK(scores.dim() == 2, "scores must be [R, C]");
  STD_TORCH_CHECK(m >= 1 && m <= 1024 && n >= 0 && n <= m, "need 0 <= n <= m <= 1024");
  STD_TORCH_CHECK(scores.size(1) % m == 0, "C must be a multiple of m");
  torch::stable::accelerator::DeviceGuard guard(scores.get_device_index());
  Tensor sc = torch::stable::contiguous(scores);
  Tensor mask = torch::stable::new_empty(sc, shape_of(sc), ScalarType::Bool);
  check_launch(shrink_kernels::launch_nm_mask(sc.data_ptr(), code, sc.size(0), sc.size(1),
                                              static_cast<int>(n), static_cast<int>(m),
                                              static_cast<bool*>(mask.data_ptr()),
                                              current_stream(sc)),
               "nm_prune_mask");
  return mask;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(shrink, CUDA, m) {
  m.impl("quantize_per_tensor_static_int8", TORCH_BOX(&quantize_per_tensor_static_int8_cuda));
  m.impl("fake_quant_per_tensor", TORCH_BOX(&fake_quant_per_tensor_cuda));
  m.impl("fake_quant_per_token", TORCH_BOX(&fake_quant_per_token_cuda));
  m.impl("int8_matmul_dequant", TORCH_BOX(&int8_matmul_dequant_cuda));
  m.impl("gather_tokens", TORCH_BOX(&gather_tokens_cuda));
  m.impl("nm_prune_mask", TORCH_BOX(&nm_prune_mask_cuda));
}
