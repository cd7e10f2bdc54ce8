// CPU kernels of modulated deformable convolution (DCNv2, Eq. 1):
//
//   y(p) = sum_k w_k * x(p + p_k + dp_k) * dm_k
//
// "Deformable patches + dense conv", channels-last: the input is viewed as
// [B, H, W, C], so the four bilinear taps of a sampling point, computed once,
// serve all channels of its offset group in contiguous (SIMD) loops. The
// sampled values (times the modulation) are written as a patch image
// [B, kh * H_out, kw * W_out, C]: output position (i, j) owns the kh x kw
// block at (i * kh, j * kw), holding its kernel points' samples. A dense
// conv2d of the patch image with the layer's weight, stride (kh, kw), no
// padding, is then the deformable conv; for float32 it runs on oneDNN
// (measured twice as fast as MKL's GEMMs on an AVX-512 AMD CPU), and its
// backward gives the weight gradient and the gradient of every sample.
//
// Both passes work on tiles of output rows, so memory is a few tiles
// whatever the batch. Forward fuses sampling and conv per tile, one tile per
// thread (the tile's patches stay in cache). Backward takes the tiles in
// order, each split between the threads: the input gradient is scattered by
// channel ranges and the offset / mask gradients are summed per sampling
// point, so no two tasks write the same element and no atomics are needed.
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

#include "ops/deform_conv2d_geometry.h"
#include "ops/sampling.h"

namespace dcnv2 {
namespace ops {

namespace {

// Size of one forward tile's patch image: at least kTileBytes, so that it
// stays in cache, and at least kTileWeightRatio times the weight, because
// every conv call reorders the weight into the conv library's layout.
constexpr int64_t kTileBytes = int64_t(4) << 20;
constexpr int64_t kTileWeightRatio = 2;
// The backward's tiles: larger, since each of its conv calls is split
// between the threads. (16 MiB measured faster than per-image chunks of up
// to 64 MiB: 156 against 244 ms for conv3 forward+backward.)
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

// A run of channels [begin, end) within one offset group: the unit of the
// contiguous inner loops.
struct ChannelRun {
  int64_t begin, end, offset_group;
};

std::vector<ChannelRun> channel_runs(const ConvGeometry& g, int64_t begin, int64_t end) {
  std::vector<ChannelRun> runs;
  const int64_t cpog = g.channels_per_offset_group();
  for (int64_t c = begin; c < end;) {
    const int64_t stop = std::min(end, (c / cpog + 1) * cpog);
    runs.push_back({c, stop, c / cpog});
    c = stop;
  }
  return runs;
}

// Where the samples of row r (an output position, counted from the start of
// a block of whole output rows) and kernel point k start in the block's
// patch image; channel c is at + c.
inline int64_t patch_offset(const ConvGeometry& g, int64_t r, int64_t k) {
  const int64_t i = r / g.out_w, j = r % g.out_w;
  const int64_t ki = k / g.kernel_w, kj = k % g.kernel_w;
  return ((i * g.kernel_h + ki) * (g.kernel_w * g.out_w) + j * g.kernel_w + kj) * g.channels;
}

// The patch image of `images` x `out_rows` output rows as a channels-last
// [images, C, kh * out_rows, kw * W_out] tensor over `patches`.
template <typename T>
at::Tensor patch_image(T* patches, const ConvGeometry& g, int64_t images, int64_t out_rows, const at::TensorOptions& options) {
  const int64_t h = g.kernel_h * out_rows, w = g.kernel_w * g.out_w, C = g.channels;
  return at::from_blob(patches, {images, C, h, w}, {h * w * C, 1, w * C, C}, options);
}

// The dense conv that contracts a patch image with the layer's weight:
// stride (kh, kw), no padding, no dilation.
struct PatchConv {
  int64_t stride[2], zeros[2] = {0, 0}, ones[2] = {1, 1};
  int64_t groups;

  explicit PatchConv(const ConvGeometry& g) : stride{g.kernel_h, g.kernel_w}, groups(g.groups) {}

  at::Tensor forward(const at::Tensor& patches, const at::Tensor& weight) const {
    return at::conv2d(patches, weight, std::nullopt, stride, zeros, ones, groups);
  }

  // (gradient of the patches, gradient of the weight)
  std::tuple<at::Tensor, at::Tensor> backward(
      const at::Tensor& grad, const at::Tensor& patches, const at::Tensor& weight) const {
    auto grads = at::convolution_backward(
        grad, patches, weight, std::nullopt, stride, zeros, ones, false, zeros, groups, {true, true, false});
    return {std::get<0>(grads), std::get<1>(grads)};
  }
};

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

// The patch image of rows [r_begin, r_end) of a block starting at global row
// `row0` (a row being image * positions + position; row0 starts an output
// row): x(sampling point) * mask. `taps` holds the block's taps from r = 0.
template <typename T>
void gather_patches(
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
        T* dst = patches + patch_offset(g, r, k);
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

// Output rows [i0, i0 + out_rows) of image b: sample, then conv.
template <typename T>
void forward_tile(
    const ConvGeometry& g, const std::vector<ChannelRun>& runs, const T* x_nhwc, const T* offset, const T* mask,
    const at::Tensor& weight, int64_t b, int64_t i0, int64_t out_rows, Buffer<Taps<T>>& taps, Buffer<T>& patches,
    at::Tensor& output) {
  const int64_t row0 = b * g.positions() + i0 * g.out_w, rows = out_rows * g.out_w;
  sampling_taps(g, offset, row0, rows, taps.data());
  gather_patches(g, runs, x_nhwc, mask, taps.data(), row0, 0, rows, patches.data());
  // A dense op on raw buffers: below autograd, whatever thread runs it.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor tile = PatchConv(g).forward(patch_image(patches.data(), g, 1, out_rows, weight.options()), weight);
  output.select(0, b).narrow(1, i0, out_rows).copy_(tile.select(0, 0));
}

// Output rows per tile: a patch image of at least `min_bytes` and at least
// kTileWeightRatio times the weight (see kTileBytes).
int64_t tile_rows(const ConvGeometry& g, int64_t element_size, int64_t min_bytes) {
  const int64_t per_row = std::max<int64_t>(g.out_w * g.row_length() * element_size, 1);
  const int64_t weight_bytes = g.out_channels * g.channels_per_group() * g.kernel_points() * element_size;
  const int64_t bytes = std::max(min_bytes, kTileWeightRatio * weight_bytes);
  return std::min(std::max<int64_t>(1, bytes / per_row), g.out_h);
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
  // Channels-last, as the conv library would otherwise copy it on every call.
  const at::Tensor weight_c = weight.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  const int64_t tile = tile_rows(g, input.element_size(), kTileBytes);
  const int64_t tiles_per_image = (g.out_h + tile - 1) / tile;
  const auto runs = channel_runs(g, 0, g.channels);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_forward_cpu", [&] {
    const scalar_t* mask_ptr = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, g.batch * tiles_per_image, 1, [&](int64_t begin, int64_t end) {
      Buffer<Taps<scalar_t>> taps(tile * g.out_w * g.offset_groups * g.kernel_points());
      Buffer<scalar_t> patches(tile * g.out_w * g.row_length());
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / tiles_per_image, i0 = (t % tiles_per_image) * tile;
        forward_tile<scalar_t>(
            g, runs, x_nhwc.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), mask_ptr, weight_c, b, i0,
            std::min(tile, g.out_h - i0), taps, patches, output);
      }
    });
  });
  if (bias.has_value()) {
    output.add_(bias->view({1, g.out_channels, 1, 1}));
  }
  return output;
}

// grad_x (channels-last) += grad_patches * mask * tap weight, for channels
// [c_begin, c_end) of every row of a block; callers split the channels
// between threads.
template <typename T>
void scatter_patches(
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
        const T* src = grad_patches + patch_offset(g, r, k);
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

// Offset and mask gradients of rows [r_begin, r_end) of a block: per
// sampling point, sums over the channels of its offset group of
// grad_patches times the derivatives of the bilinear sample (times the mask)
// / the sample itself.
template <typename T>
void offset_and_mask_grads(
    const ConvGeometry& g, const std::vector<ChannelRun>& runs, const T* grad_patches, const T* x_nhwc,
    const T* mask, const Taps<T>* taps, int64_t row0, int64_t r_begin, int64_t r_end, T* grad_offset,
    T* grad_mask) {
  const int64_t kk = g.kernel_points(), C = g.channels, P = g.positions();
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t row = row0 + r, b = row / P, p = row % P;
    const T* x = x_nhwc + b * g.plane() * C;
    for (int64_t og = 0; og < g.offset_groups; ++og) {
      for (int64_t k = 0; k < kk; ++k) {
        const Taps<T>& t = taps[(r * g.offset_groups + og) * kk + k];
        int which[4];
        const int n = active_taps(t, which);
        const T* src = grad_patches + patch_offset(g, r, k);
        T acc_y = 0, acc_x = 0, acc_m = 0;
        for (const ChannelRun& run : runs) {
          if (run.offset_group != og) {
            continue;
          }
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
  const at::Tensor weight_c = weight.contiguous(at::MemoryFormat::ChannelsLast);  // as in the forward
  at::Tensor grad_x_nhwc = at::zeros_like(x_nhwc);
  at::Tensor grad_weight = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  const int64_t P = g.positions(), kk = g.kernel_points();
  const int64_t tile = tile_rows(g, input.element_size(), kBackwardTileBytes);
  const int64_t tiles_per_image = (g.out_h + tile - 1) / tile;
  const auto runs = channel_runs(g, 0, g.channels);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
    using T = scalar_t;
    const T* mask_ptr = mask.defined() ? mask.data_ptr<T>() : nullptr;
    const T* x = x_nhwc.data_ptr<T>();
    Buffer<Taps<T>> taps(tile * g.out_w * g.offset_groups * kk);
    Buffer<T> patches(tile * g.out_w * g.row_length());
    // Tile by tile, in order (the weight gradient sums the tiles' in a fixed
    // order), each tile's work split between the threads.
    for (int64_t t = 0; t < g.batch * tiles_per_image; ++t) {
      const int64_t b = t / tiles_per_image, i0 = (t % tiles_per_image) * tile;
      const int64_t out_rows = std::min(tile, g.out_h - i0), rows = out_rows * g.out_w, row0 = b * P + i0 * g.out_w;
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        sampling_taps(g, offset.data_ptr<T>(), row0 + begin, end - begin, taps.data() + begin * g.offset_groups * kk);
        gather_patches(g, runs, x, mask_ptr, taps.data(), row0, begin, end, patches.data());
      });
      // The patch conv's backward: the weight gradient and the gradient of
      // every sample (a channels-last patch image, like the patches).
      const at::Tensor image = patch_image(patches.data(), g, 1, out_rows, input.options());
      auto [grad_image_, grad_weight_tile] =
          PatchConv(g).backward(grad.narrow(0, b, 1).narrow(2, i0, out_rows), image, weight_c);
      grad_weight.add_(grad_weight_tile);
      const at::Tensor grad_image = grad_image_.contiguous(at::MemoryFormat::ChannelsLast);
      const T* grad_patches = grad_image.data_ptr<T>();
      // Input gradient by channel ranges: no two threads touch one element.
      at::parallel_for(0, g.channels, 16, [&](int64_t begin, int64_t end) {
        scatter_patches(g, channel_runs(g, begin, end), grad_patches, mask_ptr, taps.data(), row0, rows,
                        grad_x_nhwc.data_ptr<T>());
      });
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        offset_and_mask_grads(g, runs, grad_patches, x, mask_ptr, taps.data(), row0, begin, end,
                              grad_offset.data_ptr<T>(), mask.defined() ? grad_mask.data_ptr<T>() : nullptr);
      });
    }
  });
  at::Tensor grad_input = grad_x_nhwc.permute({0, 3, 1, 2}).contiguous();
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, CPU, m) {
  m.impl("deform_conv2d", deform_conv2d_forward_kernel);
  m.impl("_deform_conv2d_backward", deform_conv2d_backward_kernel);
}

}  // namespace ops
}  // namespace dcnv2
