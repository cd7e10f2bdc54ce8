// Sizes of one deformable RoI pooling, the checks that derive them, and the
// RoI offset rules (bin shift and its gradient), shared by the CPU and CUDA
// kernels (the Python wrapper checks the same things first with friendlier
// messages; these guard direct op calls). Where a RoI samples is in
// sampling.h (RoiLayout).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include "ops/sampling.h"
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
  check_like_input(rois, input, "deform_roi_pool", "rois");
  check_like_input(offset, input, "deform_roi_pool", "offset");
  check_like_input(mask, input, "deform_roi_pool", "mask");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, "deform_roi_pool: rois must be [K, 5], got ", rois.sizes());
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0, "deform_roi_pool: output size must be positive");
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

// Every RoI's batch index must name an image of the input. The kernels take
// its integer part (as RoIAlign does), so the valid values are those in
// (-1, batch); NaN and infinities are not. Both devices raise the same error
// (naming the first bad RoI). The RoIs' first column is reduced to one flag
// where it lies; on CUDA, copying that flag to the host is one device sync
// per call (the kernels also skip bad indices, so a caller that cannot sync
// may skip this check: see the CUDA kernels).
inline void check_roi_batch_indices(const at::Tensor& rois, int64_t batch) {
  if (rois.size(0) == 0) {
    return;
  }
  const at::Tensor index = rois.select(1, 0);
  const at::Tensor bad = index.gt(-1).logical_and(index.lt(batch)).logical_not();
  if (!bad.any().item<bool>()) {
    return;
  }
  const int64_t k = bad.nonzero()[0][0].item<int64_t>();
  TORCH_CHECK(
      false, "deform_roi_pool: rois[", k, ", 0] = ", index[k].item<double>(),
      " is not a batch index of input (batch size ", batch, ")");
}

// DCNv2 Eq. 2's shift of bin `bin` of RoI `k`, in feature pixels: (dy, dx) =
// gamma * offset * (roi height, roi width). Computed in acc_t (the kernels'
// accumulation type) from offsets stored as scalar_t.
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline void bin_shift(
    const PoolGeometry& g, const scalar_t* offset, const RoiLayout<acc_t>& r, int64_t k, int64_t bin, acc_t& dy,
    acc_t& dx) {
  dy = dx = acc_t(0);
  if (offset) {
    dx = acc_t(g.gamma) * acc_t(offset[(k * 2 + 0) * g.bins() + bin]) * r.width;
    dy = acc_t(g.gamma) * acc_t(offset[(k * 2 + 1) * g.bins() + bin]) * r.height;
  }
}

// The gradients of the offsets (x, y) of one bin, from the sums over its
// samples and channels of the incoming gradient times the samples'
// derivatives (acc_x, acc_y): the chain rule through the bin's average
// (inv_count), its modulation m and the shift, d(shift)/d(offset) = gamma *
// roi size. A RoI with no size (also a non-finite one, see roi_layout) gets
// zero.
template <typename acc_t>
C10_HOST_DEVICE inline void offset_grads(
    const PoolGeometry& g, const RoiLayout<acc_t>& r, acc_t acc_x, acc_t acc_y, acc_t m, acc_t& grad_x, acc_t& grad_y) {
  grad_x = acc_x * r.inv_count * m * acc_t(g.gamma) * r.width;
  grad_y = acc_y * r.inv_count * m * acc_t(g.gamma) * r.height;
}

// The backward's incoming gradient must have the output's shape.
inline void check_output_grad(const at::Tensor& grad, const PoolGeometry& g) {
  check_shape(grad, {g.num_rois, g.channels, g.pooled_h, g.pooled_w}, "deform_roi_pool backward: grad");
}

}  // namespace ops
}  // namespace dcnv2
