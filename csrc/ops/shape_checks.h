// The shape check both operators' geometry headers make of their offset,
// mask and incoming-gradient tensors.
#pragma once

#include <ATen/ATen.h>

namespace dcnv2 {
namespace ops {

// `what` (e.g. "deform_conv2d: offset") must have exactly the shape `expected`.
inline void check_shape(const at::Tensor& tensor, at::IntArrayRef expected, const char* what) {
  TORCH_CHECK(tensor.sizes() == expected, what, " has shape ", tensor.sizes(), ", expected ", expected);
}

}  // namespace ops
}  // namespace dcnv2
