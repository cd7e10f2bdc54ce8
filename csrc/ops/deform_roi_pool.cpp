// Schemas of (modulated) deformable RoI pooling (DCNv2, Eq. 2) and its
// autocast kernels (float32, like torchvision's roi_align). Device kernels are registered in cpu/ and cuda/; autograd
// and fake kernels from Python (dcnv2_plugin/ops/_library.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops/autocast.h"

namespace dcnv2 {
namespace ops {

TORCH_LIBRARY_FRAGMENT(dcnv2, m) {
  // rois: [K, 5] (batch index, x1, y1, x2, y2); offset: [K, 2, ph, pw]
  // normalized (dx, dy); mask: [K, 1, ph, pw]. Sampling follows RoIAlign
  // with aligned=True, so no offset and no mask is ROIAlignV2.
  m.def(
      "deform_roi_pool(Tensor input, Tensor rois, Tensor? offset, Tensor? mask, int pooled_height, "
      "int pooled_width, float spatial_scale, int sampling_ratio, float gamma) -> Tensor");
  // Returns (grad_input, grad_offset, grad_mask); the last two are empty when
  // offset / mask are None.
  m.def(
      "_deform_roi_pool_backward(Tensor grad, Tensor input, Tensor rois, Tensor? offset, Tensor? mask, "
      "int pooled_height, int pooled_width, float spatial_scale, int sampling_ratio, float gamma) "
      "-> (Tensor, Tensor, Tensor)");
}

namespace {

template <c10::DispatchKey autocast_key>
at::Tensor deform_roi_pool_autocast(
    const at::Tensor& input, const at::Tensor& rois, const std::optional<at::Tensor>& offset,
    const std::optional<at::Tensor>& mask, int64_t pooled_height, int64_t pooled_width, double spatial_scale,
    int64_t sampling_ratio, double gamma) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dcnv2::deform_roi_pool", "")
                       .typed<decltype(deform_roi_pool_autocast<autocast_key>)>();
  // RoI coordinates lose too much precision in half types, and pooling is
  // cheap next to the convolutions: it runs in float32, like RoIAlign.
  const auto dtype = at::kFloat;
  return op.call(
      autocast_cast(input, dtype), autocast_cast(rois, dtype), autocast_cast(offset, dtype), autocast_cast(mask, dtype),
      pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, AutocastCPU, m) {
  m.impl("deform_roi_pool", deform_roi_pool_autocast<c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(dcnv2, AutocastCUDA, m) {
  m.impl("deform_roi_pool", deform_roi_pool_autocast<c10::DispatchKey::AutocastCUDA>);
}

}  // namespace ops
}  // namespace dcnv2
