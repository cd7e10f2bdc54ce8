// CPU kernels of modulated deformable convolution (DCNv2, Eq. 1):
//
//   y(p) = sum_k w_k * x(p + p_k + dp_k) * dm_k
//
// "Deformable patches + dense contraction", channels-last: the input is
// viewed as [B, H, W, C], so the four bilinear taps of a sampling point,
// computed once, serve all channels of its offset group in contiguous (SIMD)
// loops. The sampled values (times the modulation) of one output position
// form a patch row of C * kh * kw values; a tile of patch rows times the
// weight is the deformable conv (patch_conv.h), and the backward of that
// product gives the weight gradient and the gradient of every sample.
//
// Both passes work on tiles of output positions (a position being image *
// H_out * W_out + offset in the image), so memory is a few tiles whatever
// the batch. Forward fuses sampling and contraction per tile, one tile at a
// time per thread (the tile's patches stay in cache). Backward takes the
// tiles in order, each split between the threads: the input gradient is
// scattered by channel ranges and the offset / mask gradients are summed per
// sampling point, so no two tasks write the same element and no atomics are
// needed.
//
// All work is split into pieces whose sizes depend on the shapes only, so
// results are identical at any thread count (tested).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "ops/cpu/parallel_tasks.h"
#include "ops/cpu/patch_conv.h"
#include "ops/cpu/vector_clones.h"
#include "ops/deform_conv2d_geometry.h"
#include "ops/sampling.h"

namespace dcnv2 {
namespace ops {

namespace {

// Patch rows per forward tile: about kTileBytes of them (as fast per row as
// whole images, see benchmarks/RESULTS.md, and small enough to stay in the
// last-level cache between the sampling and the contraction).
constexpr int64_t kTileBytes = int64_t(4) << 20;
// The backward's tiles: larger, since each of its contractions is split
// between the threads.
constexpr int64_t kBackwardTileBytes = int64_t(16) << 20;

// Scratch memory that every use writes before reading: left uninitialized
// (a std::vector would zero megabytes per tile for nothing).
template <typename T>
class Buffer {
 public:
  explicit Buffer(int64_t size) : data_(new T[size]) {}
  T* data() { return data_.get(); }

 private:
  std::unique_ptr<T[]> data_;
};

// A run of channels [begin, end) within one offset group and one conv group:
// the unit of the contiguous inner loops.
struct ChannelRun {
  int64_t begin, end, offset_group, group;
};

std::vector<ChannelRun> channel_runs(const ConvGeometry& g, int64_t begin, int64_t end) {
  std::vector<ChannelRun> runs;
  const int64_t cpog = g.channels_per_offset_group(), cpg = g.channels_per_group();
  for (int64_t c = begin; c < end;) {
    const int64_t stop = std::min({end, (c / cpog + 1) * cpog, (c / cpg + 1) * cpg});
    runs.push_back({c, stop, c / cpog, c / cpg});
    c = stop;
  }
  return runs;
}

// Where the samples of kernel point k start in a patch row (columns are
// group, kernel point, channel within the group; see patch_conv.h); channel
// c of `run` is at + c.
inline int64_t patch_column(const ConvGeometry& g, const ChannelRun& run, int64_t k) {
  return g.channels_per_group() * (run.group * (g.kernel_points() - 1) + k);
}

// Positions per tile: about `bytes` of patch rows, the tiles of the whole
// batch made equal in size (the last one is then hardly padded).
int64_t tile_positions(const ConvGeometry& g, int64_t element_size, int64_t bytes) {
  const int64_t total = g.batch * g.positions();
  const int64_t target = std::max<int64_t>(1, bytes / (g.row_length() * element_size));
  const int64_t tiles = (total + target - 1) / target;
  return (total + tiles - 1) / tiles;
}

// Calls fn(image, first position in the image, first row, rows) for each
// image's part of positions [row0, row0 + rows).
template <typename Fn>
void for_each_image_part(const ConvGeometry& g, int64_t row0, int64_t rows, const Fn& fn) {
  const int64_t P = g.positions();
  for (int64_t r = 0; r < rows;) {
    const int64_t b = (row0 + r) / P, p = (row0 + r) % P, n = std::min(rows - r, P - p);
    fn(b, p, r, n);
    r += n;
  }
}

// Positions [p, p + n) of image b of NCHW `planes` as an [n, C_out] matrix
// (strided): the layout of the contraction's rows.
inline at::Tensor position_rows(
    void* planes, const ConvGeometry& g, int64_t b, int64_t p, int64_t n, const at::TensorOptions& options) {
  const int64_t offset = (b * g.out_channels * g.positions() + p) * options.dtype().itemsize();
  return at::from_blob(static_cast<char*>(planes) + offset, {n, g.out_channels}, {1, g.positions()}, options);
}

// Taps of every sampling point of positions [row0, row0 + rows); laid out
// [row][offset group][k].
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

// Modulation of (position, offset group, kernel point); 1 for DCNv1.
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

// Patch rows [r_begin, r_end) of a tile starting at position `row0`:
// x(sampling point) * mask. `taps` holds the tile's taps from r = 0.
template <typename T>
DCNV2_VECTOR_CLONES void gather_patches(
    const ConvGeometry& g, const std::vector<ChannelRun>& runs, const T* x_nhwc, const T* mask, const Taps<T>* taps,
    int64_t row0, int64_t r_begin, int64_t r_end, T* patches) {
  const int64_t kk = g.kernel_points(), C = g.channels;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t row = row0 + r;
    const T* x = x_nhwc + (row / g.positions()) * g.plane() * C;
    for (const ChannelRun& run : runs) {
      for (int64_t k = 0; k < kk; ++k) {
        const Taps<T>& t = taps[(r * g.offset_groups + run.offset_group) * kk + k];
        const T m = modulation(g, mask, row, run.offset_group, k);
        T* dst = patches + r * g.row_length() + patch_column(g, run, k);
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

// Positions [row0, row0 + rows): sample, contract, write out. `patches`
// holds a whole tile of rows; those past `rows` are zeroed (the contraction
// always gets whole tiles, see patch_conv.h).
template <typename T>
void forward_tile(
    const ConvGeometry& g, const std::vector<ChannelRun>& runs, const T* x_nhwc, const T* offset, const T* mask,
    const PatchConv& conv, int64_t row0, int64_t rows, Buffer<Taps<T>>& taps, at::Tensor& patches, T* output) {
  T* patch_rows = patches.data_ptr<T>();
  sampling_taps(g, offset, row0, rows, taps.data());
  gather_patches(g, runs, x_nhwc, mask, taps.data(), row0, 0, rows, patch_rows);
  std::fill(patch_rows + rows * g.row_length(), patch_rows + patches.numel(), T(0));
  const at::Tensor out = conv.forward(as_conv_input(patch_rows, patches.size(0), g.row_length(), patches.options()));
  const at::Tensor out_rows = out.permute({0, 2, 3, 1}).reshape({-1, g.out_channels});  // no copy
  for_each_image_part(g, row0, rows, [&](int64_t b, int64_t p, int64_t r, int64_t n) {
    position_rows(output, g, b, p, n, out.options()).copy_(out_rows.narrow(0, r, n));
  });
}

at::Tensor deform_conv2d_forward_kernel(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset_,
    const std::optional<at::Tensor>& mask_, const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t groups, int64_t offset_groups) {
  const ConvGeometry g = check_and_make_geometry(
      input, weight, offset_, mask_, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
      offset_groups);
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  if (g.batch == 0) {
    return output;
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x_nhwc = input.permute({0, 2, 3, 1}).contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  const int64_t tile = tile_positions(g, input.element_size(), kTileBytes);
  const int64_t tiles = (g.batch * g.positions() + tile - 1) / tile;
  const PatchConv conv(weight, g, tile);
  const auto runs = channel_runs(g, 0, g.channels);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_forward_cpu", [&] {
    const scalar_t* mask_ptr = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    // Each tile's contraction single-threaded: see parallel_tasks.
    parallel_tasks(tiles, [&](int64_t begin, int64_t end) {
      Buffer<Taps<scalar_t>> taps(tile * g.offset_groups * g.kernel_points());
      at::Tensor patches = at::empty({tile, g.row_length()}, input.options());  // 64-byte aligned
      for (int64_t t = begin; t < end; ++t) {
        const int64_t row0 = t * tile;
        forward_tile<scalar_t>(
            g, runs, x_nhwc.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), mask_ptr, conv, row0,
            std::min(tile, g.batch * g.positions() - row0), taps, patches, output.data_ptr<scalar_t>());
      }
    });
  });
  if (bias.has_value()) {
    output.add_(bias->view({1, g.out_channels, 1, 1}));
  }
  return output;
}

// grad_x (channels-last) += grad_patches * mask * tap weight, for channels
// [c_begin, c_end) of every row of a tile; callers split the channels
// between threads.
template <typename T>
DCNV2_VECTOR_CLONES void scatter_patches(
    const ConvGeometry& g, const std::vector<ChannelRun>& runs, const T* grad_patches, const T* mask,
    const Taps<T>* taps, int64_t row0, int64_t rows, T* grad_x_nhwc) {
  const int64_t kk = g.kernel_points(), C = g.channels;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = row0 + r;
    T* gx = grad_x_nhwc + (row / g.positions()) * g.plane() * C;
    for (const ChannelRun& run : runs) {
      for (int64_t k = 0; k < kk; ++k) {
        const Taps<T>& t = taps[(r * g.offset_groups + run.offset_group) * kk + k];
        const T m = modulation(g, mask, row, run.offset_group, k);
        const T* src = grad_patches + r * g.row_length() + patch_column(g, run, k);
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

// Offset and mask gradients of rows [r_begin, r_end) of a tile: per
// sampling point, sums over the channels of its offset group of
// grad_patches times the derivatives of the bilinear sample (times the mask)
// / the sample itself.
template <typename T>
DCNV2_VECTOR_CLONES void offset_and_mask_grads(
    const ConvGeometry& g, const std::vector<ChannelRun>& runs, const T* grad_patches, const T* x_nhwc, const T* mask,
    const Taps<T>* taps, int64_t row0, int64_t r_begin, int64_t r_end, T* grad_offset, T* grad_mask) {
  const int64_t kk = g.kernel_points(), C = g.channels, P = g.positions();
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t row = row0 + r, b = row / P, p = row % P;
    const T* x = x_nhwc + b * g.plane() * C;
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
          const T* src = grad_patches + r * g.row_length() + patch_column(g, run, k);
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
    const at::Tensor& grad_, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset_,
    const std::optional<at::Tensor>& mask_, const std::optional<at::Tensor>& bias, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dilation_h, int64_t dilation_w, int64_t groups, int64_t offset_groups) {
  const ConvGeometry g = check_and_make_geometry(
      input, weight, offset_, mask_, bias, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
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
  at::Tensor x_nhwc = input.permute({0, 2, 3, 1}).contiguous();
  at::Tensor grad_x_nhwc = at::zeros_like(x_nhwc);
  const int64_t total = g.batch * g.positions(), kk = g.kernel_points(), X = g.row_length();
  const int64_t tile = tile_positions(g, input.element_size(), kBackwardTileBytes);
  const PatchConv conv(weight, g);
  const auto runs = channel_runs(g, 0, g.channels);
  // The contraction's operands and results, as in patch_conv.h (64-byte
  // aligned, as GEMM results can depend on alignment).
  at::Tensor grad_weight_matrix = at::zeros({g.out_channels, X / g.groups}, input.options());
  at::Tensor patches = at::empty({tile, X}, input.options());
  at::Tensor grad_patches = at::empty({tile, X}, input.options());
  at::Tensor grad_rows = at::empty({tile, g.out_channels}, input.options());

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
    using T = scalar_t;
    const T* mask_ptr = mask.defined() ? mask.data_ptr<T>() : nullptr;
    const T* x = x_nhwc.data_ptr<T>();
    Buffer<Taps<T>> taps(tile * g.offset_groups * kk);
    // Tile by tile, in order (the weight gradient sums the tiles' in a fixed
    // order), each tile's work split between the threads.
    for (int64_t row0 = 0; row0 < total; row0 += tile) {
      const int64_t rows = std::min(tile, total - row0);
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        at::AutoDispatchBelowADInplaceOrView below_autograd;  // (thread-local) for the copies below
        sampling_taps(g, offset.data_ptr<T>(), row0 + begin, end - begin, taps.data() + begin * g.offset_groups * kk);
        gather_patches(g, runs, x, mask_ptr, taps.data(), row0, begin, end, patches.data_ptr<T>());
        // The incoming gradient of these positions as rows [position, C_out].
        for_each_image_part(g, row0 + begin, end - begin, [&](int64_t b, int64_t p, int64_t r, int64_t n) {
          grad_rows.narrow(0, begin + r, n).copy_(position_rows(grad.data_ptr(), g, b, p, n, grad.options()));
        });
      });
      at::Tensor tile_grad_patches = grad_patches.narrow(0, 0, rows);
      conv.backward(grad_rows.narrow(0, 0, rows), patches.narrow(0, 0, rows), grad_weight_matrix, tile_grad_patches);
      const T* gp = grad_patches.data_ptr<T>();
      // Input gradient by channel ranges: no two threads touch one element.
      at::parallel_for(0, g.channels, 16, [&](int64_t begin, int64_t end) {
        scatter_patches(
            g, channel_runs(g, begin, end), gp, mask_ptr, taps.data(), row0, rows, grad_x_nhwc.data_ptr<T>());
      });
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        offset_and_mask_grads(
            g, runs, gp, x, mask_ptr, taps.data(), row0, begin, end, grad_offset.data_ptr<T>(),
            mask.defined() ? grad_mask.data_ptr<T>() : nullptr);
      });
    }
  });
  x_nhwc.reset();  // before the gradient's layout copy: one input-sized buffer less at the peak
  at::Tensor grad_input = grad_x_nhwc.permute({0, 3, 1, 2}).contiguous();
  at::Tensor grad_weight = grad_weight_matrix.view({g.out_channels, g.kernel_h, g.kernel_w, g.channels_per_group()})
                               .permute({0, 3, 1, 2})
                               .contiguous();
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, CPU, m) {
  m.impl("deform_conv2d", deform_conv2d_forward_kernel);
  m.impl("_deform_conv2d_backward", deform_conv2d_backward_kernel);
}

}  // namespace ops
}  // namespace dcnv2
