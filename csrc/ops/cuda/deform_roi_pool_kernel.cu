// CUDA kernels of (modulated) deformable RoI pooling (DCNv2, Eq. 2):
//
//   y(k) = sum_j x(p_kj + dp_k) * dm_k / n_k
//
// One thread per output element in forward. Backward scatters the input
// gradient with atomicAdd into a float32 buffer (so under
// torch.use_deterministic_algorithms(True) it raises instead), and sums the
// offset and mask gradients of each bin over channels in one thread
// (deterministic). A RoI batch index outside the input raises, as on the CPU
// (check_roi_batch_indices, one sync per call), except while a CUDA graph
// is captured, where syncing is not allowed: there such RoIs pool to zero
// and get zero gradients.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <ATen/cuda/Atomic.cuh>

#include <algorithm>

#include "ops/cuda/launch.cuh"
#include "ops/deform_roi_pool_geometry.h"
#include "ops/sampling.h"

namespace dcnv2 {
namespace ops {

namespace {

template <typename acc_t, typename scalar_t>
__device__ inline RoiLayout<acc_t> device_roi_layout(const PoolGeometry& g, const scalar_t* roi_) {
  const acc_t roi[5] = {acc_t(roi_[0]), acc_t(roi_[1]), acc_t(roi_[2]), acc_t(roi_[3]), acc_t(roi_[4])};
  return roi_layout(roi, acc_t(g.spatial_scale), g.pooled_h, g.pooled_w, g.sampling_ratio);
}

// The batch index check, unless the current stream is being captured into
// a CUDA graph (no host sync allowed there; the kernels skip bad indices).
inline void check_batch_indices_unless_capturing(const at::Tensor& rois, const PoolGeometry& g) {
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    check_roi_batch_indices(rois, g.batch);
  }
}

template <typename scalar_t>
__global__ void deform_roi_pool_forward_kernel_impl(
    PoolGeometry g, const scalar_t* input, const scalar_t* rois, const scalar_t* offset, const scalar_t* mask,
    scalar_t* output) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t bins = g.bins(), plane = g.height * g.width;
  CUDA_KERNEL_LOOP_64(index, g.num_rois * g.channels * bins) {
    const int64_t bin = index % bins;
    const int64_t c = (index / bins) % g.channels;
    const int64_t k = index / (bins * g.channels);
    const RoiLayout<acc_t> r = device_roi_layout<acc_t>(g, rois + k * 5);
    if (r.batch_index < 0 || r.batch_index >= g.batch) {
      output[index] = scalar_t(0);
      continue;
    }
    acc_t dy, dx;
    bin_shift(g, offset, r, k, bin, dy, dx);
    const int64_t ph = bin / g.pooled_w, pw = bin % g.pooled_w;
    const scalar_t* x = input + (r.batch_index * g.channels + c) * plane;
    acc_t sum = 0;
    Taps<acc_t> taps;
    for (int64_t iy = 0; iy < r.grid_h; ++iy) {
      for (int64_t ix = 0; ix < r.grid_w; ++ix) {
        roi_align_taps(r.sample_y(ph, iy, dy), r.sample_x(pw, ix, dx), g.height, g.width, taps);
        sum += gather(taps.weight, taps.index, x);
      }
    }
    const acc_t m = mask ? acc_t(mask[k * bins + bin]) : acc_t(1);
    output[index] = scalar_t(sum * r.inv_count * m);
  }
}

template <typename scalar_t>
__global__ void deform_roi_pool_input_grad_kernel(
    PoolGeometry g, const scalar_t* grad, const scalar_t* rois, const scalar_t* offset, const scalar_t* mask,
    at::acc_type<scalar_t, true>* grad_input) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t bins = g.bins(), plane = g.height * g.width;
  CUDA_KERNEL_LOOP_64(index, g.num_rois * g.channels * bins) {
    const int64_t bin = index % bins;
    const int64_t c = (index / bins) % g.channels;
    const int64_t k = index / (bins * g.channels);
    const RoiLayout<acc_t> r = device_roi_layout<acc_t>(g, rois + k * 5);
    if (r.batch_index < 0 || r.batch_index >= g.batch) {
      continue;
    }
    acc_t dy, dx;
    bin_shift(g, offset, r, k, bin, dy, dx);
    const int64_t ph = bin / g.pooled_w, pw = bin % g.pooled_w;
    const acc_t m = mask ? acc_t(mask[k * bins + bin]) : acc_t(1);
    const acc_t gv = acc_t(grad[index]) * r.inv_count * m;
    acc_t* gx = grad_input + (r.batch_index * g.channels + c) * plane;
    Taps<acc_t> taps;
    for (int64_t iy = 0; iy < r.grid_h; ++iy) {
      for (int64_t ix = 0; ix < r.grid_w; ++ix) {
        roi_align_taps(r.sample_y(ph, iy, dy), r.sample_x(pw, ix, dx), g.height, g.width, taps);
        for (int t = 0; t < 4; ++t) {
          if (taps.weight[t] != acc_t(0)) {
            gpuAtomicAdd(gx + taps.index[t], taps.weight[t] * gv);
          }
        }
      }
    }
  }
}

template <typename scalar_t>
__global__ void deform_roi_pool_offset_grad_kernel(
    PoolGeometry g, const scalar_t* grad, const scalar_t* input, const scalar_t* rois, const scalar_t* offset,
    const scalar_t* mask, scalar_t* grad_offset, scalar_t* grad_mask) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t bins = g.bins(), plane = g.height * g.width;
  CUDA_KERNEL_LOOP_64(index, g.num_rois * bins) {
    const int64_t bin = index % bins;
    const int64_t k = index / bins;
    const RoiLayout<acc_t> r = device_roi_layout<acc_t>(g, rois + k * 5);
    if (r.batch_index < 0 || r.batch_index >= g.batch) {
      continue;
    }
    acc_t dy, dx;
    bin_shift(g, offset, r, k, bin, dy, dx);
    const int64_t ph = bin / g.pooled_w, pw = bin % g.pooled_w;
    acc_t acc_y = 0, acc_x = 0, acc_v = 0;
    Taps<acc_t> taps;
    for (int64_t iy = 0; iy < r.grid_h; ++iy) {
      for (int64_t ix = 0; ix < r.grid_w; ++ix) {
        roi_align_taps(r.sample_y(ph, iy, dy), r.sample_x(pw, ix, dx), g.height, g.width, taps);
        for (int64_t c = 0; c < g.channels; ++c) {
          const scalar_t* x = input + (r.batch_index * g.channels + c) * plane;
          const acc_t gv = acc_t(grad[(k * g.channels + c) * bins + bin]);
          acc_y += gv * gather(taps.d_dy, taps.index, x);
          acc_x += gv * gather(taps.d_dx, taps.index, x);
          acc_v += gv * gather(taps.weight, taps.index, x);
        }
      }
    }
    const acc_t m = mask ? acc_t(mask[k * bins + bin]) : acc_t(1);
    if (grad_offset) {
      acc_t grad_x, grad_y;
      offset_grads(g, r, acc_x, acc_y, m, grad_x, grad_y);
      grad_offset[(k * 2 + 0) * bins + bin] = scalar_t(grad_x);
      grad_offset[(k * 2 + 1) * bins + bin] = scalar_t(grad_y);
    }
    if (grad_mask) {
      grad_mask[k * bins + bin] = scalar_t(acc_v * r.inv_count);
    }
  }
}

at::Tensor deform_roi_pool_forward_kernel(
    const at::Tensor& input_, const at::Tensor& rois_, const std::optional<at::Tensor>& offset_,
    const std::optional<at::Tensor>& mask_, int64_t pooled_height, int64_t pooled_width, double spatial_scale,
    int64_t sampling_ratio, double gamma) {
  const PoolGeometry g = check_and_make_geometry(
      input_, rois_, offset_, mask_, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma);
  c10::cuda::CUDAGuard device_guard(input_.device());
  check_batch_indices_unless_capturing(rois_, g);
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.contiguous();
  const at::Tensor offset = offset_.has_value() ? offset_->contiguous() : at::Tensor();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  at::Tensor output = at::zeros({g.num_rois, g.channels, g.pooled_h, g.pooled_w}, input.options());
  const int64_t total = output.numel();
  if (total == 0 || g.height * g.width == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_roi_pool_forward_cuda", [&] {
    deform_roi_pool_forward_kernel_impl<scalar_t>
        <<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            g, input.data_ptr<scalar_t>(), rois.data_ptr<scalar_t>(),
            offset.defined() ? offset.data_ptr<scalar_t>() : nullptr,
            mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, output.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> deform_roi_pool_backward_kernel(
    const at::Tensor& grad_, const at::Tensor& input_, const at::Tensor& rois_,
    const std::optional<at::Tensor>& offset_, const std::optional<at::Tensor>& mask_, int64_t pooled_height,
    int64_t pooled_width, double spatial_scale, int64_t sampling_ratio, double gamma) {
  const PoolGeometry g = check_and_make_geometry(
      input_, rois_, offset_, mask_, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma);
  check_output_grad(grad_, g);
  at::globalContext().alertNotDeterministic("dcnv2::_deform_roi_pool_backward (CUDA input gradient uses atomicAdd)");
  c10::cuda::CUDAGuard device_guard(input_.device());
  check_batch_indices_unless_capturing(rois_, g);
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.contiguous();
  const at::Tensor offset = offset_.has_value() ? offset_->contiguous() : at::Tensor();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  const auto acc_dtype = at::toOpMathType(input.scalar_type());
  at::Tensor grad_input_acc = at::zeros(input.sizes(), input.options().dtype(acc_dtype));
  at::Tensor grad_offset = offset.defined() ? at::zeros_like(offset) : at::empty({0}, input.options());
  at::Tensor grad_mask = mask.defined() ? at::zeros_like(mask) : at::empty({0}, input.options());
  const int64_t total = grad.numel();
  if (total > 0 && g.height * g.width > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "deform_roi_pool_backward_cuda", [&] {
          using acc_t = at::acc_type<scalar_t, true>;
          const scalar_t* offset_ptr = offset.defined() ? offset.data_ptr<scalar_t>() : nullptr;
          const scalar_t* mask_ptr = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
          deform_roi_pool_input_grad_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
              g, grad.data_ptr<scalar_t>(), rois.data_ptr<scalar_t>(), offset_ptr, mask_ptr,
              grad_input_acc.data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (offset_ptr || mask_ptr) {
            deform_roi_pool_offset_grad_kernel<scalar_t><<<blocks_for(g.num_rois * g.bins()), kThreads, 0, stream>>>(
                g, grad.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), rois.data_ptr<scalar_t>(), offset_ptr,
                mask_ptr, offset_ptr ? grad_offset.data_ptr<scalar_t>() : nullptr,
                mask_ptr ? grad_mask.data_ptr<scalar_t>() : nullptr);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        });
  }
  return {grad_input_acc.to(input.scalar_type()), grad_offset, grad_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, CUDA, m) {
  m.impl("deform_roi_pool", deform_roi_pool_forward_kernel);
  m.impl("_deform_roi_pool_backward", deform_roi_pool_backward_kernel);
}

}  // namespace ops
}  // namespace dcnv2
