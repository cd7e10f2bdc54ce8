// Sizes of one deformable convolution and the checks that derive them,
// shared by the CPU and CUDA kernels (the Python wrapper checks the same
// things first with friendlier messages; these guard direct op calls).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include "ops/shape_checks.h"

namespace dcnv2 {
namespace ops {

struct ConvGeometry {
  int64_t batch, channels, height, width;
  int64_t out_channels, kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t groups, offset_groups;
  int64_t out_h, out_w;

  C10_HOST_DEVICE int64_t kernel_points() const { return kernel_h * kernel_w; }
  C10_HOST_DEVICE int64_t positions() const { return out_h * out_w; }
  C10_HOST_DEVICE int64_t plane() const { return height * width; }
  C10_HOST_DEVICE int64_t channels_per_group() const { return channels / groups; }
  C10_HOST_DEVICE int64_t channels_per_offset_group() const { return channels / offset_groups; }
  C10_HOST_DEVICE int64_t row_length() const { return channels * kernel_points(); }  // of the column buffer
};

inline ConvGeometry check_and_make_geometry(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w, int64_t groups, int64_t offset_groups) {
  TORCH_CHECK(input.dim() == 4, "deform_conv2d: input must be 4-D, got ", input.dim(), "-D");
  check_like_input(weight, input, "deform_conv2d", "weight");
  check_like_input(offset, input, "deform_conv2d", "offset");
  check_like_input(mask, input, "deform_conv2d", "mask");
  check_like_input(bias, input, "deform_conv2d", "bias");
  TORCH_CHECK(weight.dim() == 4, "deform_conv2d: weight must be 4-D, got ", weight.dim(), "-D");
  TORCH_CHECK(offset.dim() == 4, "deform_conv2d: offset must be 4-D, got ", offset.dim(), "-D");
  TORCH_CHECK(stride_h > 0 && stride_w > 0, "deform_conv2d: stride must be positive");
  TORCH_CHECK(dilation_h > 0 && dilation_w > 0, "deform_conv2d: dilation must be positive");
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, "deform_conv2d: padding must be non-negative");
  TORCH_CHECK(groups > 0 && offset_groups > 0, "deform_conv2d: groups and offset_groups must be positive");
  ConvGeometry g{};
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.out_channels = weight.size(0);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.stride_h = stride_h;
  g.stride_w = stride_w;
  g.pad_h = pad_h;
  g.pad_w = pad_w;
  g.dilation_h = dilation_h;
  g.dilation_w = dilation_w;
  g.groups = groups;
  g.offset_groups = offset_groups;
  g.out_h = (g.height + 2 * pad_h - (dilation_h * (g.kernel_h - 1) + 1)) / stride_h + 1;
  g.out_w = (g.width + 2 * pad_w - (dilation_w * (g.kernel_w - 1) + 1)) / stride_w + 1;
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, "deform_conv2d: the output would be empty");
  TORCH_CHECK(
      g.channels % groups == 0 && weight.size(1) * groups == g.channels, "deform_conv2d: weight has ", weight.size(1),
      " input channels per group; input has ", g.channels, " channels and groups=", groups);
  TORCH_CHECK(g.out_channels % groups == 0, "deform_conv2d: out_channels must be divisible by groups");
  TORCH_CHECK(g.channels % offset_groups == 0, "deform_conv2d: in_channels must be divisible by offset_groups");
  check_shape(offset, {g.batch, 2 * offset_groups * g.kernel_points(), g.out_h, g.out_w}, "deform_conv2d: offset");
  if (bias.has_value()) {
    check_shape(*bias, {g.out_channels}, "deform_conv2d: bias");
  }
  if (mask.has_value()) {
    check_shape(*mask, {g.batch, offset_groups * g.kernel_points(), g.out_h, g.out_w}, "deform_conv2d: mask");
  }
  // Tap indices are int32 within one channel plane.
  TORCH_CHECK(g.height * g.width < (int64_t(1) << 31), "deform_conv2d: input plane too large");
  return g;
}

// The backward's incoming gradient must have the output's shape.
inline void check_output_grad(const at::Tensor& grad, const ConvGeometry& g) {
  check_shape(grad, {g.batch, g.out_channels, g.out_h, g.out_w}, "deform_conv2d backward: grad");
}

}  // namespace ops
}  // namespace dcnv2
