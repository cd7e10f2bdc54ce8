// CUDA kernels of modulated deformable convolution (DCNv2, Eq. 1):
//
//   y(p) = sum_k w_k * x(p + p_k + dp_k) * dm_k
//
// Deformable im2col + cuBLAS GEMM on chunks of images whose column buffer
// stays under a fixed budget (so memory does not grow with the batch). Half
// and bfloat16 inputs keep their columns in the input dtype for the tensor
// cores; bilinear sampling and every reduction accumulate in float32
// (at::acc_type), and the input gradient is accumulated in a float32 buffer.
// Indices are 64-bit throughout: large batches must not overflow them.
//
// The input gradient scatters with atomicAdd, so under
// torch.use_deterministic_algorithms(True) the backward raises instead.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <ATen/cuda/Atomic.cuh>

#include <algorithm>

#include "ops/cuda/launch.cuh"
#include "ops/deform_conv2d_geometry.h"
#include "ops/sampling.h"

namespace dcnv2 {
namespace ops {

namespace {

constexpr int64_t kColumnBudgetBytes = int64_t(256) << 20;

// Sampling point of (image b, group, kernel point k, position p), with its
// taps computed in the accumulation type.
template <typename scalar_t, typename acc_t>
__device__ inline void point_taps(
    const ConvGeometry& g, const scalar_t* offset, int64_t b, int64_t group, int64_t k, int64_t p, Taps<acc_t>& taps) {
  const int64_t P = g.positions();
  const int64_t i = k / g.kernel_w, j = k % g.kernel_w;
  const int64_t h = p / g.out_w, w = p % g.out_w;
  const scalar_t* dy = offset + ((b * g.offset_groups + group) * g.kernel_points() + k) * 2 * P;
  const acc_t y = acc_t(h * g.stride_h - g.pad_h + i * g.dilation_h) + acc_t(dy[p]);
  const acc_t x = acc_t(w * g.stride_w - g.pad_w + j * g.dilation_w) + acc_t(dy[P + p]);
  deform_conv_taps(y, x, g.height, g.width, taps);
}

// columns[(c * kk + k)][bl * P + p] = x_c(sampling point) * mask
template <typename scalar_t>
__global__ void deformable_im2col_kernel(
    ConvGeometry g, const scalar_t* input, const scalar_t* offset, const scalar_t* mask, int64_t b0, int64_t n,
    scalar_t* columns) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t kk = g.kernel_points(), P = g.positions(), plane = g.height * g.width;
  const int64_t total = g.channels * kk * n * P;
  CUDA_KERNEL_LOOP_64(index, total) {
    const int64_t p = index % P;
    const int64_t bl = (index / P) % n;
    const int64_t k = (index / (P * n)) % kk;
    const int64_t c = index / (P * n * kk);
    const int64_t b = b0 + bl;
    const int64_t group = c / (g.channels / g.offset_groups);
    Taps<acc_t> taps;
    point_taps<scalar_t, acc_t>(g, offset, b, group, k, p, taps);
    acc_t v = gather(taps.weight, taps.index, input + (b * g.channels + c) * plane);
    if (mask) {
      v *= acc_t(mask[((b * g.offset_groups + group) * kk + k) * P + p]);
    }
    columns[index] = scalar_t(v);
  }
}

// grad_input += grad_columns * mask * tap weight, scattered with atomics.
template <typename scalar_t>
__global__ void deformable_col2im_kernel(
    ConvGeometry g, const scalar_t* grad_columns, const scalar_t* offset, const scalar_t* mask, int64_t b0, int64_t n,
    at::acc_type<scalar_t, true>* grad_input) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t kk = g.kernel_points(), P = g.positions(), plane = g.height * g.width;
  const int64_t total = g.channels * kk * n * P;
  CUDA_KERNEL_LOOP_64(index, total) {
    const int64_t p = index % P;
    const int64_t bl = (index / P) % n;
    const int64_t k = (index / (P * n)) % kk;
    const int64_t c = index / (P * n * kk);
    const int64_t b = b0 + bl;
    const int64_t group = c / (g.channels / g.offset_groups);
    Taps<acc_t> taps;
    point_taps<scalar_t, acc_t>(g, offset, b, group, k, p, taps);
    acc_t gv = acc_t(grad_columns[index]);
    if (mask) {
      gv *= acc_t(mask[((b * g.offset_groups + group) * kk + k) * P + p]);
    }
    acc_t* gx = grad_input + (b * g.channels + c) * plane;
    for (int t = 0; t < 4; ++t) {
      if (taps.weight[t] != acc_t(0)) {
        gpuAtomicAdd(gx + taps.index[t], taps.weight[t] * gv);
      }
    }
  }
}

// Offset and mask gradients: one thread per sampling point, summing over the
// channels of its offset group (deterministic, no atomics).
template <typename scalar_t>
__global__ void deformable_col2im_coord_kernel(
    ConvGeometry g, const scalar_t* grad_columns, const scalar_t* input, const scalar_t* offset, const scalar_t* mask,
    int64_t b0, int64_t n, scalar_t* grad_offset, scalar_t* grad_mask) {
  using acc_t = at::acc_type<scalar_t, true>;
  const int64_t kk = g.kernel_points(), P = g.positions(), plane = g.height * g.width;
  const int64_t cpg = g.channels / g.offset_groups;
  const int64_t total = n * g.offset_groups * kk * P;
  CUDA_KERNEL_LOOP_64(index, total) {
    const int64_t p = index % P;
    const int64_t k = (index / P) % kk;
    const int64_t group = (index / (P * kk)) % g.offset_groups;
    const int64_t bl = index / (P * kk * g.offset_groups);
    const int64_t b = b0 + bl;
    Taps<acc_t> taps;
    point_taps<scalar_t, acc_t>(g, offset, b, group, k, p, taps);
    acc_t acc_y = 0, acc_x = 0, acc_m = 0;
    for (int64_t c = group * cpg; c < (group + 1) * cpg; ++c) {
      const scalar_t* x = input + (b * g.channels + c) * plane;
      const acc_t gv = acc_t(grad_columns[((c * kk + k) * n + bl) * P + p]);
      acc_y += gv * gather(taps.d_dy, taps.index, x);
      acc_x += gv * gather(taps.d_dx, taps.index, x);
      acc_m += gv * gather(taps.weight, taps.index, x);
    }
    const int64_t point = ((b * g.offset_groups + group) * kk + k);
    const acc_t m = mask ? acc_t(mask[point * P + p]) : acc_t(1);
    grad_offset[(point * 2) * P + p] = scalar_t(acc_y * m);
    grad_offset[(point * 2 + 1) * P + p] = scalar_t(acc_x * m);
    if (grad_mask) {
      grad_mask[point * P + p] = scalar_t(acc_m);
    }
  }
}

int64_t images_per_chunk(const ConvGeometry& g, int64_t element_size) {
  const int64_t per_image = g.channels * g.kernel_points() * g.positions() * element_size;
  return std::max<int64_t>(1, std::min<int64_t>(g.batch, kColumnBudgetBytes / std::max<int64_t>(per_image, 1)));
}

at::Tensor group_weight(const at::Tensor& weight, const ConvGeometry& g, int64_t group) {
  return weight.view({g.groups, g.out_channels / g.groups, -1}).select(0, group);
}

at::Tensor group_columns(const at::Tensor& columns, const ConvGeometry& g, int64_t group) {
  const int64_t rows = g.channels / g.groups * g.kernel_points();
  return columns.narrow(0, group * rows, rows);
}

at::Tensor deform_conv2d_forward_kernel(
    const at::Tensor& input_, const at::Tensor& weight_, const at::Tensor& offset_,
    const std::optional<at::Tensor>& mask_, const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t groups, int64_t offset_groups) {
  const ConvGeometry g = check_and_make_geometry(
      input_, weight_, offset_, mask_, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
      offset_groups);
  c10::cuda::CUDAGuard device_guard(input_.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor input = input_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  if (g.batch == 0) {
    return output;
  }
  const int64_t P = g.positions(), cout_g = g.out_channels / g.groups, kk = g.kernel_points();
  const int64_t chunk = images_per_chunk(g, input.element_size());
  at::Tensor columns = at::empty({g.channels * kk, chunk * P}, input.options());
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_forward_cuda", [&] {
    for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
      const int64_t n = std::min(chunk, g.batch - b0);
      at::Tensor cols = columns.narrow(1, 0, n * P);
      if (n < chunk) {
        cols = at::empty({g.channels * kk, n * P}, input.options());
      }
      const int64_t total = g.channels * kk * n * P;
      deformable_im2col_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
          g, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(),
          mask.defined() ? mask.data_ptr<scalar_t>() : nullptr, b0, n, cols.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor out = output.narrow(0, b0, n).view({n, g.groups, cout_g, P});
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        out.select(1, grp).copy_(
            at::mm(group_weight(weight, g, grp), group_columns(cols, g, grp)).view({cout_g, n, P}).transpose(0, 1));
      }
    }
  });
  if (bias.has_value()) {
    output.add_(bias->view({1, g.out_channels, 1, 1}));
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_kernel(
    const at::Tensor& grad_, const at::Tensor& input_, const at::Tensor& weight_, const at::Tensor& offset_,
    const std::optional<at::Tensor>& mask_, const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t groups, int64_t offset_groups) {
  const ConvGeometry g = check_and_make_geometry(
      input_, weight_, offset_, mask_, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
      offset_groups);
  check_output_grad(grad_, g);
  at::globalContext().alertNotDeterministic("dcnv2::_deform_conv2d_backward (CUDA input gradient uses atomicAdd)");
  c10::cuda::CUDAGuard device_guard(input_.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  const auto acc_dtype = at::toOpMathType(input.scalar_type());

  at::Tensor grad_input_acc = at::zeros(input.sizes(), input.options().dtype(acc_dtype));
  at::Tensor grad_weight_acc = at::zeros(weight.sizes(), weight.options().dtype(acc_dtype));
  at::Tensor grad_offset = at::zeros_like(offset);
  at::Tensor grad_mask = mask.defined() ? at::zeros_like(mask) : at::empty({0}, input.options());
  at::Tensor grad_bias = grad.sum({0, 2, 3}, /*keepdim=*/false, acc_dtype).to(input.scalar_type());
  if (g.batch == 0) {
    return {
        grad_input_acc.to(input.scalar_type()), grad_weight_acc.to(weight.scalar_type()), grad_offset, grad_mask,
        grad_bias};
  }
  const int64_t P = g.positions(), cout_g = g.out_channels / g.groups, kk = g.kernel_points();
  const int64_t chunk = images_per_chunk(g, input.element_size());
  at::Tensor columns = at::empty({g.channels * kk, chunk * P}, input.options());
  at::Tensor grad_columns = at::empty_like(columns);
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const scalar_t* mask_ptr = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
      const int64_t n = std::min(chunk, g.batch - b0);
      at::Tensor cols = columns.narrow(1, 0, n * P);
      at::Tensor grad_cols = grad_columns.narrow(1, 0, n * P);
      if (n < chunk) {
        cols = at::empty({g.channels * kk, n * P}, input.options());
        grad_cols = at::empty_like(cols);
      }
      const int64_t total = g.channels * kk * n * P;
      deformable_im2col_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
          g, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), mask_ptr, b0, n, cols.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // [n, C_out, P] -> [C_out, n * P], the columns' layout.
      const at::Tensor grad_out =
          grad.narrow(0, b0, n).view({n, g.out_channels, P}).transpose(0, 1).contiguous().view({g.out_channels, n * P});
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        const at::Tensor grad_out_g = grad_out.narrow(0, grp * cout_g, cout_g);
        group_weight(grad_weight_acc, g, grp).add_(at::mm(grad_out_g, group_columns(cols, g, grp).t()));
        at::Tensor grad_cols_g = group_columns(grad_cols, g, grp);
        at::mm_out(grad_cols_g, group_weight(weight, g, grp).t(), grad_out_g);
      }
      deformable_col2im_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
          g, grad_cols.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), mask_ptr, b0, n,
          grad_input_acc.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t points = n * g.offset_groups * kk * P;
      deformable_col2im_coord_kernel<scalar_t><<<blocks_for(points), kThreads, 0, stream>>>(
          g, grad_cols.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), mask_ptr, b0, n,
          grad_offset.data_ptr<scalar_t>(), mask.defined() ? grad_mask.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {
      grad_input_acc.to(input.scalar_type()), grad_weight_acc.to(weight.scalar_type()), grad_offset, grad_mask,
      grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, CUDA, m) {
  m.impl("deform_conv2d", deform_conv2d_forward_kernel);
  m.impl("_deform_conv2d_backward", deform_conv2d_backward_kernel);
}

}  // namespace ops
}  // namespace dcnv2
