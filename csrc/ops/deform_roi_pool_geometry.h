// Sizes of one deformable RoI pooling and the checks that derive them,
// shared by the CPU and CUDA kernels (the Python wrapper checks the same
// things first with friendlier messages; these guard direct op calls).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include "ops/shape_checks.h"

namespace dcnv2 {
namespace ops {

struct PoolGeometry {
  int64_t batch, channels, height, width;
  int64_t num_rois, pooled_h, pooled_w;
  double spatial_scale, gamma;
  int64_t sampling_ratio;

  C10_HOST_DEVICE int64_t bins() const { return pooled_h * pooled_w; }
};

inline PoolGeometry check_and_make_geometry(
    const at::Tensor& input, const at::Tensor& rois, const std::optional<at::Tensor>& offset,
    const std::optional<at::Tensor>& mask, int64_t pooled_height, int64_t pooled_width, double spatial_scale,
    int64_t sampling_ratio, double gamma) {
  TORCH_CHECK(input.dim() == 4, "deform_roi_pool: input must be 4-D, got ", input.dim(), "-D");
  TORCH_CHECK(
      rois.device() == input.device() && (!offset.has_value() || offset->device() == input.device()) &&
          (!mask.has_value() || mask->device() == input.device()),
      "deform_roi_pool: input, rois, offset and mask must be on one device");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, "deform_roi_pool: rois must be [K, 5], got ", rois.sizes());
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, "deform_roi_pool: output size must be positive");
  TORCH_CHECK(input.scalar_type() == rois.scalar_type(), "deform_roi_pool: rois must have input's dtype");
  PoolGeometry g{};
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.height = input.size(2);
  g.width = input.size(3);
  g.num_rois = rois.size(0);
  g.pooled_h = pooled_height;
  g.pooled_w = pooled_width;
  g.spatial_scale = spatial_scale;
  g.sampling_ratio = sampling_ratio;
  g.gamma = gamma;
  if (offset.has_value()) {
    check_shape(*offset, {g.num_rois, 2, pooled_height, pooled_width}, "deform_roi_pool: offset");
  }
  if (mask.has_value()) {
    check_shape(*mask, {g.num_rois, 1, pooled_height, pooled_width}, "deform_roi_pool: mask");
  }
  TORCH_CHECK(g.height * g.width < (int64_t(1) << 31), "deform_roi_pool: input plane too large");
  return g;
}

// The backward's incoming gradient must have the output's shape.
inline void check_output_grad(const at::Tensor& grad, const PoolGeometry& g) {
  check_shape(grad, {g.num_rois, g.channels, g.pooled_h, g.pooled_w}, "deform_roi_pool backward: grad");
}

}  // namespace ops
}  // namespace dcnv2
