// Schemas of modulated deformable convolution (DCNv2, Eq. 1) and its
// autocast kernels. Device kernels are registered in cpu/ and cuda/; autograd
// and fake kernels from Python (dcnv2_plugin/ops/_library.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops/autocast.h"

namespace dcnv2 {
namespace ops {

TORCH_LIBRARY_FRAGMENT(dcnv2, m) {
  // Argument order and layouts follow torchvision::deform_conv2d; a missing
  // mask is DCNv1.
  m.def(
      "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor? mask, Tensor? bias, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
      "int groups, int offset_groups) -> Tensor");
  // Returns (grad_input, grad_weight, grad_offset, grad_mask, grad_bias);
  // grad_mask is empty when mask is None.
  m.def(
      "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, "
      "Tensor? mask, Tensor? bias, int stride_h, int stride_w, int pad_h, int pad_w, "
      "int dilation_h, int dilation_w, int groups, int offset_groups) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {

template <c10::DispatchKey autocast_key>
at::Tensor deform_conv2d_autocast(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dilation_h, int64_t dilation_w, int64_t groups, int64_t offset_groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dcnv2::deform_conv2d", "")
                       .typed<decltype(deform_conv2d_autocast<autocast_key>)>();
  const auto dtype = autocast_compute_dtype<autocast_key>();
  return op.call(
      autocast_cast(input, dtype), autocast_cast(weight, dtype), autocast_cast(offset, dtype),
      autocast_cast(mask, dtype), autocast_cast(bias, dtype), stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
      groups, offset_groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, AutocastCPU, m) {
  m.impl("deform_conv2d", deform_conv2d_autocast<c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(dcnv2, AutocastCUDA, m) {
  m.impl("deform_conv2d", deform_conv2d_autocast<c10::DispatchKey::AutocastCUDA>);
}

}  // namespace ops
}  // namespace dcnv2
