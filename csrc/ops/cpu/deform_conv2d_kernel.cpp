// CPU kernels of modulated deformable convolution (DCNv2, Eq. 1):
//
//   y(p) = sum_k w_k * x(p + p_k + dp_k) * dm_k
//
// "Deformable im2col + GEMM", channels-last: the input is viewed as
// [B, H, W, C], so the four bilinear taps of a sampling point, computed once,
// serve all channels of its offset group in contiguous (SIMD) loops. The
// column buffer is [rows = output positions, C * kh * kw], ordered
// (group, kernel point, channel in group) so each conv group's block is a
// plain GEMM operand.
//
// Forward fuses the gather with the GEMM per tile of output positions (the
// tile's columns stay in cache); memory is one tile per thread, whatever the
// batch. Backward works on chunks of images whose buffers stay under a fixed
// budget: the input gradient is scattered by channel ranges and the offset /
// mask gradients are summed per sampling point, so no two tasks write the
// same element and no atomics are needed.
//
// All work is split into pieces whose sizes depend on the shapes only, and
// each GEMM runs single-threaded inside its piece, so results are identical
// at any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/deform_conv2d_geometry.h"
#include "ops/sampling.h"

namespace dcnv2 {
namespace ops {

namespace {

// Target size of one forward tile's column buffer: large enough that each
// GEMM amortizes reading the weights, small enough to stay in cache.
constexpr int64_t kTileBytes = int64_t(4) << 20;
// Upper bound on the column buffers of one backward chunk of images.
constexpr int64_t kColumnBudgetBytes = int64_t(64) << 20;
// Work per task of the backward GEMMs: weight-gradient columns, and
// column-gradient rows (output positions). Shapes chosen so that each
// operand is read in BLAS's preferred (non-transposed) layout.
constexpr int64_t kGemmWeightBlock = 576;
constexpr int64_t kGemmPositionBlock = 512;

// A run of channels [begin, end) within one conv group and one offset group:
// the unit of the contiguous inner loops.
struct ChannelRun {
  int64_t begin, end, group, offset_group;
};

std::vector<ChannelRun> channel_runs(const ConvGeometry& g, int64_t begin, int64_t end) {
  std::vector<ChannelRun> runs;
  const int64_t cpg = g.channels_per_group(), cpog = g.channels_per_offset_group();
  for (int64_t c = begin; c < end;) {
    const int64_t stop = std::min({end, (c / cpg + 1) * cpg, (c / cpog + 1) * cpog});
    runs.push_back({c, stop, c / cpg, c / cpog});
    c = stop;
  }
  return runs;
}

// Offset of channel c's column for kernel point k within a column row.
inline int64_t column_index(const ConvGeometry& g, const ChannelRun& run, int64_t k, int64_t c) {
  const int64_t cpg = g.channels_per_group();
  return (run.group * g.kernel_points() + k) * cpg + (c - run.group * cpg);
}

// Taps of every sampling point of output rows [row0, row0 + rows), a row
// being image * positions + position; laid out [row][offset group][k].
template <typename T>
void sampling_taps(const ConvGeometry& g, const T* offset, int64_t row0, int64_t rows, Taps<T>* taps) {
  const int64_t kk = g.kernel_points(), P = g.positions();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = (row0 + r) / P, p = (row0 + r) % P;
    const int64_t h = p / g.out_w, w = p % g.out_w;
    for (int64_t og = 0; og < g.offset_groups; ++og) {
      // offset[b][og][k][(dy, dx)][position]
      const T* dy = offset + (b * g.offset_groups + og) * kk * 2 * P + p;
      for (int64_t k = 0; k < kk; ++k) {
        const int64_t i = k / g.kernel_w, j = k % g.kernel_w;
        const T y = T(h * g.stride_h - g.pad_h + i * g.dilation_h) + dy[2 * k * P];
        const T x = T(w * g.stride_w - g.pad_w + j * g.dilation_w) + dy[(2 * k + 1) * P];
        deform_conv_taps(y, x, g.height, g.width, taps[(r * g.offset_groups + og) * kk + k]);
      }
    }
  }
}

// Modulation of (row, offset group, kernel point); 1 for DCNv1.
template <typename T>
inline T modulation(const ConvGeometry& g, const T* mask, int64_t row, int64_t og, int64_t k) {
  if (!mask) {
    return T(1);
  }
  const int64_t b = row / g.positions(), p = row % g.positions();
  return mask[((b * g.offset_groups + og) * g.kernel_points() + k) * g.positions() + p];
}

// The taps of a point that contribute anything (a tap outside the map has
// all-zero coefficients and is skipped, so non-finite values elsewhere in the
// input cannot leak in through a zero weight).
template <typename T>
inline int active_taps(const Taps<T>& t, int* which) {
  int n = 0;
  for (int i = 0; i < 4; ++i) {
    if (t.weight[i] != T(0) || t.d_dy[i] != T(0) || t.d_dx[i] != T(0)) {
      which[n++] = i;
    }
  }
  return n;
}

// columns[row][group][k][channel] = x(sampling point) * mask, for `rows` rows
// starting at global row `row0`. x is channels-last.
template <typename T>
void gather_columns(
    const ConvGeometry& g, const std::vector<ChannelRun>& runs, const T* x_nhwc, const T* mask, const Taps<T>* taps,
    int64_t row0, int64_t rows, T* columns) {
  const int64_t kk = g.kernel_points(), C = g.channels;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = row0 + r;
    const T* x = x_nhwc + (row / g.positions()) * g.plane() * C;
    T* col_row = columns + r * g.row_length();
    for (const ChannelRun& run : runs) {
      for (int64_t k = 0; k < kk; ++k) {
        const Taps<T>& t = taps[(r * g.offset_groups + run.offset_group) * kk + k];
        const T m = modulation(g, mask, row, run.offset_group, k);
        T* dst = col_row + column_index(g, run, k, run.begin) - run.begin;
        int which[4];
        const int n = active_taps(t, which);
        const T w0 = t.weight[0] * m, w1 = t.weight[1] * m, w2 = t.weight[2] * m, w3 = t.weight[3] * m;
        if (n == 4) {
          const T *x0 = x + int64_t(t.index[0]) * C, *x1 = x + int64_t(t.index[1]) * C;
          const T *x2 = x + int64_t(t.index[2]) * C, *x3 = x + int64_t(t.index[3]) * C;
#pragma omp simd
          for (int64_t c = run.begin; c < run.end; ++c) {
            dst[c] = w0 * x0[c] + w1 * x1[c] + w2 * x2[c] + w3 * x3[c];
          }
          continue;
        }
        std::fill(dst + run.begin, dst + run.end, T(0));
        for (int a = 0; a < n; ++a) {
          const T wa = t.weight[which[a]] * m;
          const T* xa = x + int64_t(t.index[which[a]]) * C;
#pragma omp simd
          for (int64_t c = run.begin; c < run.end; ++c) {
            dst[c] += wa * xa[c];
          }
        }
      }
    }
  }
}

// The group's block of `rows` column rows, [rows, kk * C_in / groups].

template <typename T>
at::Tensor group_columns(T* columns, int64_t rows, const ConvGeometry& g, int64_t group, const at::TensorOptions& options) {
  const int64_t width = g.kernel_points() * g.channels_per_group();
  return at::from_blob(columns + group * width, {rows, width}, {g.row_length(), 1}, options);
}

// `weight_t`: per group [kk * C_in / groups, C_out / groups] (see
// weight_in_column_order), so the tile's GEMM reads both operands row-major.
template <typename T>
void forward_tile(
    const ConvGeometry& g, const std::vector<ChannelRun>& runs, const T* x_nhwc, const T* offset, const T* mask,
    const at::Tensor& weight_t, int64_t row0, int64_t rows, std::vector<Taps<T>>& taps, std::vector<T>& columns,
    T* output) {
  sampling_taps(g, offset, row0, rows, taps.data());
  gather_columns(g, runs, x_nhwc, mask, taps.data(), row0, rows, columns.data());
  // Plain GEMMs on raw buffers: below autograd, whatever thread runs them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto options = weight_t.options();
  const int64_t P = g.positions(), b = row0 / P, p0 = row0 % P, cout_g = g.out_channels / g.groups;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    // output[b][group's channels][p0 : p0 + rows] = (columns_g @ W_g^T)^T
    at::Tensor out = at::from_blob(output + (b * g.out_channels + grp * cout_g) * P + p0, {cout_g, rows}, {P, 1}, options);
    out.t().copy_(at::mm(group_columns(columns.data(), rows, g, grp, options), weight_t.select(0, grp)));
  }
}

// Output positions per forward tile: a column buffer of about kTileBytes.
int64_t tile_positions(const ConvGeometry& g, int64_t element_size) {
  const int64_t tile = std::max<int64_t>(16, kTileBytes / std::max<int64_t>(g.row_length() * element_size, 1)) / 16 * 16;
  return std::min(tile, g.positions());
}

int64_t images_per_chunk(const ConvGeometry& g, int64_t element_size) {
  const int64_t per_image = 2 * g.row_length() * g.positions() * element_size;  // columns and their gradient
  return std::max<int64_t>(1, std::min<int64_t>(g.batch, kColumnBudgetBytes / std::max<int64_t>(per_image, 1)));
}

// weight [C_out, C_in / groups, kh, kw] -> [groups, C_out / groups, kk * C_in / groups]
// in the columns' (k, channel) order.
at::Tensor weight_in_column_order(const at::Tensor& weight, const ConvGeometry& g) {
  return weight.reshape({g.groups, g.out_channels / g.groups, g.channels_per_group(), g.kernel_points()})
      .permute({0, 1, 3, 2})
      .contiguous()
      .view({g.groups, g.out_channels / g.groups, -1});
}

at::Tensor deform_conv2d_forward_kernel(
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offset_,
    const std::optional<at::Tensor>& mask_,
    const std::optional<at::Tensor>& bias,
    int64_t stride_h,
    int64_t stride_w,
    int64_t pad_h,
    int64_t pad_w,
    int64_t dilation_h,
    int64_t dilation_w,
    int64_t groups,
    int64_t offset_groups) {
  const ConvGeometry g = check_and_make_geometry(
      input, weight, offset_, mask_, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
      offset_groups);
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  if (g.batch == 0) {
    return output;
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x_nhwc = input.permute({0, 2, 3, 1}).contiguous();
  const at::Tensor weight_t = weight_in_column_order(weight, g).transpose(1, 2).contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  const int64_t P = g.positions();
  const int64_t tile = tile_positions(g, input.element_size());
  const int64_t tiles_per_image = (P + tile - 1) / tile;
  const auto runs = channel_runs(g, 0, g.channels);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_forward_cpu", [&] {
    const scalar_t* mask_ptr = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, g.batch * tiles_per_image, 1, [&](int64_t begin, int64_t end) {
      std::vector<Taps<scalar_t>> taps(tile * g.offset_groups * g.kernel_points());
      std::vector<scalar_t> columns(tile * g.row_length());
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / tiles_per_image, p0 = (t % tiles_per_image) * tile;
        forward_tile<scalar_t>(
            g, runs, x_nhwc.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), mask_ptr, weight_t, b * P + p0,
            std::min(tile, P - p0), taps, columns, output.data_ptr<scalar_t>());
      }
    });
  });
  if (bias.has_value()) {
    output.add_(bias->view({1, g.out_channels, 1, 1}));
  }
  return output;
}

// Per group, grad_weight += grad_out @ columns (by blocks of weight
// columns) and grad_columns = grad_out^T @ weight (by blocks of positions),
// each block multiplied on one thread, so the sums do not depend on the
// thread count. grad_out is [C_out, rows]; grad_out_t is [rows, C_out].
template <typename T>
void backward_gemms(
    const ConvGeometry& g, const at::Tensor& weight_kc, const at::Tensor& grad_out, const at::Tensor& grad_out_t,
    T* columns, T* grad_columns, int64_t rows, at::Tensor& grad_weight_kc) {
  const int64_t cout_g = g.out_channels / g.groups, width = g.kernel_points() * g.channels_per_group();
  const int64_t weight_blocks = (width + kGemmWeightBlock - 1) / kGemmWeightBlock;
  const int64_t column_blocks = (rows + kGemmPositionBlock - 1) / kGemmPositionBlock;
  const int64_t per_group = weight_blocks + column_blocks;
  const auto options = weight_kc.options();
  at::parallel_for(0, g.groups * per_group, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t grp = task / per_group, block = task % per_group;
      if (block < weight_blocks) {
        const int64_t c0 = block * kGemmWeightBlock, n = std::min(kGemmWeightBlock, width - c0);
        grad_weight_kc.select(0, grp)
            .narrow(1, c0, n)
            .addmm_(grad_out.narrow(0, grp * cout_g, cout_g), group_columns(columns, rows, g, grp, options).narrow(1, c0, n));
      } else {
        const int64_t r0 = (block - weight_blocks) * kGemmPositionBlock;
        const int64_t n = std::min(kGemmPositionBlock, rows - r0);
        at::Tensor out = group_columns(grad_columns, rows, g, grp, options).narrow(0, r0, n);
        at::mm_out(out, grad_out_t.narrow(0, r0, n).narrow(1, grp * cout_g, cout_g), weight_kc.select(0, grp));
      }
    }
  });
}

// grad_x (channels-last) += grad_columns * mask * tap weight, for channels
// [c_begin, c_end) of every row; callers split the channels between threads.
template <typename T>
void scatter_columns(
    const ConvGeometry& g, const std::vector<ChannelRun>& runs, const T* grad_columns, const T* mask,
    const Taps<T>* taps, int64_t row0, int64_t rows, T* grad_x_nhwc) {
  const int64_t kk = g.kernel_points(), C = g.channels;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = row0 + r;
    T* gx = grad_x_nhwc + (row / g.positions()) * g.plane() * C;
    const T* gcol_row = grad_columns + r * g.row_length();
    for (const ChannelRun& run : runs) {
      for (int64_t k = 0; k < kk; ++k) {
        const Taps<T>& t = taps[(r * g.offset_groups + run.offset_group) * kk + k];
        const T m = modulation(g, mask, row, run.offset_group, k);
        const T* src = gcol_row + column_index(g, run, k, run.begin) - run.begin;
        for (int i = 0; i < 4; ++i) {
          if (t.weight[i] == T(0)) {
            continue;
          }
          const T wi = t.weight[i] * m;
          T* gxi = gx + int64_t(t.index[i]) * C;
#pragma omp simd
          for (int64_t c = run.begin; c < run.end; ++c) {
            gxi[c] += wi * src[c];
          }
        }
      }
    }
  }
}

// Offset and mask gradients of rows [row0, row0 + rows): per sampling point,
// sums over the channels of its offset group of grad_columns times the
// derivatives of the bilinear sample (times the mask) / the sample itself.
template <typename T>
void offset_and_mask_grads(
    const ConvGeometry& g, const std::vector<ChannelRun>& runs, const T* grad_columns, const T* x_nhwc,
    const T* mask, const Taps<T>* taps, int64_t row0, int64_t rows, T* grad_offset, T* grad_mask) {
  const int64_t kk = g.kernel_points(), C = g.channels, P = g.positions();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = row0 + r, b = row / P, p = row % P;
    const T* x = x_nhwc + b * g.plane() * C;
    const T* gcol_row = grad_columns + r * g.row_length();
    for (int64_t og = 0; og < g.offset_groups; ++og) {
      for (int64_t k = 0; k < kk; ++k) {
        const Taps<T>& t = taps[(r * g.offset_groups + og) * kk + k];
        int which[4];
        const int n = active_taps(t, which);
        T acc_y = 0, acc_x = 0, acc_m = 0;
        for (const ChannelRun& run : runs) {
          if (run.offset_group != og) {
            continue;
          }
          const T* src = gcol_row + column_index(g, run, k, run.begin) - run.begin;
          for (int a = 0; a < n; ++a) {
            const int i = which[a];
            const T* xi = x + int64_t(t.index[i]) * C;
            T dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t c = run.begin; c < run.end; ++c) {
              dot += src[c] * xi[c];
            }
            acc_y += t.d_dy[i] * dot;
            acc_x += t.d_dx[i] * dot;
            acc_m += t.weight[i] * dot;
          }
        }
        const int64_t point = (b * g.offset_groups + og) * kk + k;
        const T m = modulation(g, mask, row, og, k);
        grad_offset[(point * 2) * P + p] = acc_y * m;
        grad_offset[(point * 2 + 1) * P + p] = acc_x * m;
        if (grad_mask) {
          grad_mask[point * P + p] = acc_m;
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_kernel(
    const at::Tensor& grad_,
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offset_,
    const std::optional<at::Tensor>& mask_,
    const std::optional<at::Tensor>& bias,
    int64_t stride_h,
    int64_t stride_w,
    int64_t pad_h,
    int64_t pad_w,
    int64_t dilation_h,
    int64_t dilation_w,
    int64_t groups,
    int64_t offset_groups) {
  const ConvGeometry g = check_and_make_geometry(
      input, weight, offset_, mask_, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
      offset_groups);
  check_output_grad(grad_, g);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  at::Tensor grad_offset = at::zeros_like(offset);
  at::Tensor grad_mask = mask.defined() ? at::zeros_like(mask) : at::empty({0}, input.options());
  at::Tensor grad_bias = grad.sum({0, 2, 3});
  if (g.batch == 0) {
    return {at::zeros_like(input), at::zeros_like(weight), grad_offset, grad_mask, grad_bias};
  }
  const at::Tensor x_nhwc = input.permute({0, 2, 3, 1}).contiguous();
  const at::Tensor weight_kc = weight_in_column_order(weight, g);
  at::Tensor grad_x_nhwc = at::zeros_like(x_nhwc);
  at::Tensor grad_weight_kc = at::zeros_like(weight_kc);
  const int64_t P = g.positions();
  const int64_t chunk = images_per_chunk(g, input.element_size());
  const auto runs = channel_runs(g, 0, g.channels);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
    using T = scalar_t;
    const T* mask_ptr = mask.defined() ? mask.data_ptr<T>() : nullptr;
    const T* x = x_nhwc.data_ptr<T>();
    std::vector<Taps<T>> taps(chunk * P * g.offset_groups * g.kernel_points());
    std::vector<T> columns(chunk * P * g.row_length()), grad_columns(columns.size());
    for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
      const int64_t n = std::min(chunk, g.batch - b0), rows = n * P, row0 = b0 * P;
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        sampling_taps(g, offset.data_ptr<T>(), row0 + begin, end - begin,
                      taps.data() + begin * g.offset_groups * g.kernel_points());
        gather_columns(g, runs, x, mask_ptr, taps.data() + begin * g.offset_groups * g.kernel_points(),
                       row0 + begin, end - begin, columns.data() + begin * g.row_length());
      });
      // [n, C_out, P] -> [C_out, n * P] and [n * P, C_out]: the GEMMs' layouts.
      const at::Tensor grad_chunk = grad.narrow(0, b0, n).view({n, g.out_channels, P});
      const at::Tensor grad_out = grad_chunk.transpose(0, 1).reshape({g.out_channels, rows});
      const at::Tensor grad_out_t = grad_chunk.transpose(1, 2).reshape({rows, g.out_channels});
      backward_gemms(g, weight_kc, grad_out, grad_out_t, columns.data(), grad_columns.data(), rows, grad_weight_kc);
      // Input gradient by channel ranges: no two threads touch one element.
      at::parallel_for(0, g.channels, 16, [&](int64_t begin, int64_t end) {
        scatter_columns(g, channel_runs(g, begin, end), grad_columns.data(), mask_ptr, taps.data(), row0, rows,
                        grad_x_nhwc.data_ptr<T>());
      });
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        offset_and_mask_grads(g, runs, grad_columns.data() + begin * g.row_length(), x, mask_ptr,
                              taps.data() + begin * g.offset_groups * g.kernel_points(), row0 + begin, end - begin,
                              grad_offset.data_ptr<T>(), mask.defined() ? grad_mask.data_ptr<T>() : nullptr);
      });
    }
  });
  at::Tensor grad_input = grad_x_nhwc.permute({0, 3, 1, 2}).contiguous();
  at::Tensor grad_weight = grad_weight_kc
                               .view({g.groups, g.out_channels / g.groups, g.kernel_points(), g.channels_per_group()})
                               .permute({0, 1, 3, 2})
                               .contiguous()
                               .view(weight.sizes());
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, CPU, m) {
  m.impl("deform_conv2d", deform_conv2d_forward_kernel);
  m.impl("_deform_conv2d_backward", deform_conv2d_backward_kernel);
}

}  // namespace ops
}  // namespace dcnv2
