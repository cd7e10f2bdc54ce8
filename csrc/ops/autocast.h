// Autocast policy shared by the dcnv2 operators.
//
// Under CUDA autocast the floating inputs are cast to the autocast dtype
// (float16 or bfloat16): the CUDA kernels take those dtypes and accumulate in
// float32, so mixed precision actually saves time and memory. The CPU kernels
// take float32/float64 only, so CPU autocast runs them in float32.
#pragma once

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

namespace dcnv2 {
namespace ops {

template <c10::DispatchKey autocast_key>
at::ScalarType autocast_compute_dtype() {
  return autocast_key == c10::DispatchKey::AutocastCUDA ? at::autocast::get_autocast_dtype(at::kCUDA) : at::kFloat;
}

inline at::Tensor autocast_cast(const at::Tensor& t, at::ScalarType dtype) {
  return t.is_floating_point() ? t.to(dtype) : t;
}

inline std::optional<at::Tensor> autocast_cast(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t.has_value() ? std::optional<at::Tensor>(autocast_cast(*t, dtype)) : t;
}

}  // namespace ops
}  // namespace dcnv2
