// The argument checks both operators' geometry headers make: shapes of
// their offset, mask and incoming-gradient tensors, and dtypes and devices
// of every tensor argument against the input's. Errors name the argument,
// as the Python wrappers' (dcnv2_plugin/ops/_checks.py) do; these guard
// direct op calls, the same on every device.
#pragma once

#include <ATen/ATen.h>

namespace dcnv2 {
namespace ops {

// `what` (e.g. "deform_conv2d: offset") must have exactly the shape `expected`.
inline void check_shape(const at::Tensor& tensor, at::IntArrayRef expected, const char* what) {
  TORCH_CHECK(tensor.sizes() == expected, what, " has shape ", tensor.sizes(), ", expected ", expected);
}

// Argument `name` of operator `op` must have the dtype and device of
// `input` (the kernels read every tensor as the input's scalar type; under
// autocast the operators' autocast kernels cast them all first). A dtype
// mismatch is a TypeError, as in the Python wrappers.
inline void check_like_input(const at::Tensor& tensor, const at::Tensor& input, const char* op, const char* name) {
  TORCH_CHECK_TYPE(
      tensor.scalar_type() == input.scalar_type(), op, ": ", name, " has dtype ", tensor.scalar_type(),
      " but input has dtype ", input.scalar_type());
  TORCH_CHECK(
      tensor.device() == input.device(), op, ": ", name, " is on ", tensor.device(), " but input is on ",
      input.device());
}

inline void check_like_input(
    const std::optional<at::Tensor>& tensor, const at::Tensor& input, const char* op, const char* name) {
  if (tensor.has_value()) {
    check_like_input(*tensor, input, op, name);
  }
}

}  // namespace ops
}  // namespace dcnv2
