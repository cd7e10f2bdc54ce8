// CPU kernels of modulated deformable convolution (DCNv2, Eq. 1):
//
//   y(p) = sum_k w_k * x(p + p_k + dp_k) * dm_k
//
// Forward is "deformable im2col + GEMM", fused per tile of output positions:
// the bilinear samples x(p + p_k + dp_k) * dm_k of one tile are gathered into
// a small column buffer [C_in * kh * kw, tile] that stays in cache while one
// GEMM per group multiplies it with the weights. Memory is bounded by one
// tile per thread, whatever the batch.
//
// Backward works on chunks of images whose column buffers stay under a fixed
// budget: the input gradient is scattered per channel and the offset/mask
// gradients are summed per sampling point, so no two tasks write the same
// element and no atomics are needed.
//
// The bilinear taps of a sampling point are computed once per (offset group,
// kernel point, position) and reused for all channels of the offset group.
// All work is split into pieces whose sizes depend on the shapes only, and
// each GEMM runs single-threaded inside its piece, so results are identical
// at any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/sampling.h"

namespace dcnv2 {
namespace ops {

namespace {

// Upper bound on the column buffer of one chunk of images (backward).
constexpr int64_t kColumnBudgetBytes = int64_t(64) << 20;
// Target size of one forward tile's column buffer: about a core's L2 cache.
constexpr int64_t kTileBytes = int64_t(1) << 20;
// Positions handled together when summing offset gradients over channels,
// and columns / rows per task of the backward GEMMs.
constexpr int64_t kPositionBlock = 256;
constexpr int64_t kGemmColumnBlock = 256;
constexpr int64_t kGemmRowBlock = 16;

struct ConvGeometry {
  int64_t batch, channels, height, width;
  int64_t out_channels, kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t groups, offset_groups;
  int64_t out_h, out_w;

  int64_t kernel_points() const { return kernel_h * kernel_w; }
  int64_t positions() const { return out_h * out_w; }
  int64_t channels_per_offset_group() const { return channels / offset_groups; }
};

ConvGeometry check_and_make_geometry(
    const at::Tensor& input,
    const at::Tensor& weight,
    const at::Tensor& offset,
    const std::optional<at::Tensor>& mask,
    int64_t stride_h,
    int64_t stride_w,
    int64_t pad_h,
    int64_t pad_w,
    int64_t dilation_h,
    int64_t dilation_w,
    int64_t groups,
    int64_t offset_groups) {
  TORCH_CHECK(input.dim() == 4, "deform_conv2d: input must be 4-D, got ", input.dim(), "-D");
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
      g.channels % groups == 0 && weight.size(1) * groups == g.channels,
      "deform_conv2d: weight has ", weight.size(1), " input channels per group; input has ", g.channels,
      " channels and groups=", groups);
  TORCH_CHECK(g.out_channels % groups == 0, "deform_conv2d: out_channels must be divisible by groups");
  TORCH_CHECK(g.channels % offset_groups == 0, "deform_conv2d: in_channels must be divisible by offset_groups");
  TORCH_CHECK(
      offset.size(0) == g.batch && offset.size(1) == 2 * offset_groups * g.kernel_points() &&
          offset.size(2) == g.out_h && offset.size(3) == g.out_w,
      "deform_conv2d: offset has shape ", offset.sizes(), ", expected [", g.batch, ", ",
      2 * offset_groups * g.kernel_points(), ", ", g.out_h, ", ", g.out_w, "]");
  if (mask.has_value()) {
    TORCH_CHECK(
        mask->dim() == 4 && mask->size(0) == g.batch && mask->size(1) == offset_groups * g.kernel_points() &&
            mask->size(2) == g.out_h && mask->size(3) == g.out_w,
        "deform_conv2d: mask has shape ", mask->sizes(), ", expected [", g.batch, ", ",
        offset_groups * g.kernel_points(), ", ", g.out_h, ", ", g.out_w, "]");
  }
  // Tap indices are int32 within one channel plane.
  TORCH_CHECK(g.height * g.width < (int64_t(1) << 31), "deform_conv2d: input plane too large");
  return g;
}

// Taps of the sampling points of kernel point k of offset group `group` in
// image b, at output positions [p0, p0 + len).
template <typename T>
void row_taps(const ConvGeometry& g, const T* offset, int64_t b, int64_t group, int64_t k, int64_t p0, int64_t len, Taps<T>* out) {
  const int64_t P = g.positions();
  const int64_t i = k / g.kernel_w, j = k % g.kernel_w;
  // offset[b][group][k][(dy, dx)][position]
  const T* dy = offset + ((b * g.offset_groups + group) * g.kernel_points() + k) * 2 * P;
  const T* dx = dy + P;
  for (int64_t p = p0; p < p0 + len; ++p) {
    const int64_t h = p / g.out_w, w = p % g.out_w;
    const T y = T(h * g.stride_h - g.pad_h + i * g.dilation_h) + dy[p];
    const T x = T(w * g.stride_w - g.pad_w + j * g.dilation_w) + dx[p];
    deform_conv_taps(y, x, g.height, g.width, out[p - p0]);
  }
}

// Taps of every sampling point of images [b0, b0 + n), laid out
// [n][offset_groups][kernel_points][positions].
template <typename T>
std::vector<Taps<T>> sampling_taps(const ConvGeometry& g, const T* offset, int64_t b0, int64_t n) {
  const int64_t kk = g.kernel_points(), P = g.positions();
  std::vector<Taps<T>> taps(n * g.offset_groups * kk * P);
  at::parallel_for(0, n * g.offset_groups * kk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bg = row / kk;  // (image in chunk) * offset_groups + group
      row_taps(g, offset, b0 + bg / g.offset_groups, bg % g.offset_groups, row % kk, 0, P, taps.data() + row * P);
    }
  });
  return taps;
}

// mask value of (image b, group, kernel point k) at every position, or
// nullptr for DCNv1 (modulation 1).
template <typename T>
inline const T* mask_row(const T* mask, const ConvGeometry& g, int64_t b, int64_t group, int64_t k) {
  return mask ? mask + ((b * g.offset_groups + group) * g.kernel_points() + k) * g.positions() : nullptr;
}

// columns[(c * kk + k)][(b - b0) * P + p] = x_c(sampling point) * mask
template <typename T>
void deformable_im2col(
    const ConvGeometry& g,
    const T* input,
    const T* mask,
    const std::vector<Taps<T>>& taps,
    int64_t b0,
    int64_t n,
    T* columns) {
  const int64_t kk = g.kernel_points(), P = g.positions(), plane = g.height * g.width;
  const int64_t cpg = g.channels_per_offset_group();
  at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t group = c / cpg;
      for (int64_t bl = 0; bl < n; ++bl) {
        const T* x = input + ((b0 + bl) * g.channels + c) * plane;
        for (int64_t k = 0; k < kk; ++k) {
          const Taps<T>* t = taps.data() + ((bl * g.offset_groups + group) * kk + k) * P;
          const T* m = mask_row(mask, g, b0 + bl, group, k);
          T* col = columns + (c * kk + k) * (n * P) + bl * P;
          for (int64_t p = 0; p < P; ++p) {
            const T v = gather(t[p].weight, t[p].index, x);
            col[p] = m ? v * m[p] : v;
          }
        }
      }
    }
  });
}

// grad_input_c += sum over sampling points of grad_columns * mask * tap weight.
// One channel per task: no two tasks touch the same plane.
template <typename T>
void deformable_col2im(
    const ConvGeometry& g,
    const T* grad_columns,
    const T* mask,
    const std::vector<Taps<T>>& taps,
    int64_t b0,
    int64_t n,
    T* grad_input) {
  const int64_t kk = g.kernel_points(), P = g.positions(), plane = g.height * g.width;
  const int64_t cpg = g.channels_per_offset_group();
  at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t group = c / cpg;
      for (int64_t bl = 0; bl < n; ++bl) {
        T* gx = grad_input + ((b0 + bl) * g.channels + c) * plane;
        for (int64_t k = 0; k < kk; ++k) {
          const Taps<T>* t = taps.data() + ((bl * g.offset_groups + group) * kk + k) * P;
          const T* m = mask_row(mask, g, b0 + bl, group, k);
          const T* gcol = grad_columns + (c * kk + k) * (n * P) + bl * P;
          for (int64_t p = 0; p < P; ++p) {
            const T gv = m ? gcol[p] * m[p] : gcol[p];
            const Taps<T>& tp = t[p];
            gx[tp.index[0]] += tp.weight[0] * gv;
            gx[tp.index[1]] += tp.weight[1] * gv;
            gx[tp.index[2]] += tp.weight[2] * gv;
            gx[tp.index[3]] += tp.weight[3] * gv;
          }
        }
      }
    }
  });
}

// Gradients of the offsets and the mask: for each sampling point, a sum over
// the channels of its offset group of grad_columns times the derivative of
// the bilinear sample (times the mask) / the sample itself.
template <typename T>
void deformable_col2im_coord(
    const ConvGeometry& g,
    const T* grad_columns,
    const T* input,
    const T* mask,
    const std::vector<Taps<T>>& taps,
    int64_t b0,
    int64_t n,
    T* grad_offset,
    T* grad_mask) {
  const int64_t kk = g.kernel_points(), P = g.positions(), plane = g.height * g.width;
  const int64_t cpg = g.channels_per_offset_group();
  const int64_t blocks = (P + kPositionBlock - 1) / kPositionBlock;
  const int64_t rows = n * g.offset_groups * kk;
  at::parallel_for(0, rows * blocks, 1, [&](int64_t begin, int64_t end) {
    T acc_y[kPositionBlock], acc_x[kPositionBlock], acc_m[kPositionBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / blocks;
      const int64_t p0 = (task % blocks) * kPositionBlock;
      const int64_t len = std::min(kPositionBlock, P - p0);
      const int64_t k = row % kk;
      const int64_t bl = row / kk / g.offset_groups;
      const int64_t group = (row / kk) % g.offset_groups;
      const Taps<T>* t = taps.data() + row * P + p0;
      std::fill(acc_y, acc_y + len, T(0));
      std::fill(acc_x, acc_x + len, T(0));
      std::fill(acc_m, acc_m + len, T(0));
      for (int64_t c = group * cpg; c < (group + 1) * cpg; ++c) {
        const T* x = input + ((b0 + bl) * g.channels + c) * plane;
        const T* gcol = grad_columns + (c * kk + k) * (n * P) + bl * P + p0;
        for (int64_t p = 0; p < len; ++p) {
          const Taps<T>& tp = t[p];
          const T v0 = x[tp.index[0]], v1 = x[tp.index[1]], v2 = x[tp.index[2]], v3 = x[tp.index[3]];
          const T gv = gcol[p];
          acc_y[p] += gv * (tp.d_dy[0] * v0 + tp.d_dy[1] * v1 + tp.d_dy[2] * v2 + tp.d_dy[3] * v3);
          acc_x[p] += gv * (tp.d_dx[0] * v0 + tp.d_dx[1] * v1 + tp.d_dx[2] * v2 + tp.d_dx[3] * v3);
          acc_m[p] += gv * (tp.weight[0] * v0 + tp.weight[1] * v1 + tp.weight[2] * v2 + tp.weight[3] * v3);
        }
      }
      const T* m = mask_row(mask, g, b0 + bl, group, k);
      T* gy = grad_offset + (((b0 + bl) * g.offset_groups + group) * kk + k) * 2 * P + p0;
      T* gx = gy + P;
      for (int64_t p = 0; p < len; ++p) {
        const T scale = m ? m[p0 + p] : T(1);
        gy[p] = acc_y[p] * scale;
        gx[p] = acc_x[p] * scale;
      }
      if (grad_mask) {
        T* gm = grad_mask + (((b0 + bl) * g.offset_groups + group) * kk + k) * P + p0;
        std::copy(acc_m, acc_m + len, gm);
      }
    }
  });
}

// Weight of group `group` as a [C_out / groups, C_in / groups * kk] matrix.
at::Tensor group_weight(const at::Tensor& weight, const ConvGeometry& g, int64_t group) {
  return weight.view({g.groups, g.out_channels / g.groups, -1}).select(0, group);
}

// Rows of the column buffer that belong to `group`.
at::Tensor group_columns(const at::Tensor& columns, const ConvGeometry& g, int64_t group) {
  const int64_t rows = g.channels / g.groups * g.kernel_points();
  return columns.narrow(0, group * rows, rows);
}

// Forward of one tile: output positions [p0, p0 + len) of image b.
// `taps` and `columns` are the calling thread's scratch buffers.
template <typename T>
void forward_tile(
    const ConvGeometry& g,
    const T* input,
    const T* offset,
    const T* mask,
    const at::Tensor& weight,
    int64_t b,
    int64_t p0,
    int64_t len,
    std::vector<Taps<T>>& taps,
    std::vector<T>& columns,
    T* output) {
  const int64_t kk = g.kernel_points(), P = g.positions(), plane = g.height * g.width;
  const int64_t cpg = g.channels_per_offset_group();
  for (int64_t group = 0; group < g.offset_groups; ++group) {
    for (int64_t k = 0; k < kk; ++k) {
      row_taps(g, offset, b, group, k, p0, len, taps.data() + (group * kk + k) * len);
    }
  }
  for (int64_t c = 0; c < g.channels; ++c) {
    const int64_t group = c / cpg;
    const T* x = input + (b * g.channels + c) * plane;
    for (int64_t k = 0; k < kk; ++k) {
      const Taps<T>* t = taps.data() + (group * kk + k) * len;
      const T* m = mask_row(mask, g, b, group, k);
      T* col = columns.data() + (c * kk + k) * len;
      if (m) {
        for (int64_t p = 0; p < len; ++p) {
          col[p] = gather(t[p].weight, t[p].index, x) * m[p0 + p];
        }
      } else {
        for (int64_t p = 0; p < len; ++p) {
          col[p] = gather(t[p].weight, t[p].index, x);
        }
      }
    }
  }
  // Plain GEMMs on raw buffers: below autograd, whatever thread runs them.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto options = weight.options();
  const at::Tensor cols = at::from_blob(columns.data(), {g.channels * kk, len}, options);
  const int64_t cout_g = g.out_channels / g.groups;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    // output[b][group's channels][p0 : p0 + len], a strided [cout_g, len] block.
    at::Tensor out = at::from_blob(
        output + (b * g.out_channels + grp * cout_g) * P + p0, {cout_g, len}, {P, 1}, options);
    at::mm_out(out, group_weight(weight, g, grp), group_columns(cols, g, grp));
  }
}

// Output positions per forward tile: a column buffer of about kTileBytes.
int64_t tile_positions(const ConvGeometry& g, int64_t element_size) {
  const int64_t per_position = g.channels * g.kernel_points() * element_size;
  const int64_t tile = std::max<int64_t>(16, kTileBytes / std::max<int64_t>(per_position, 1)) / 16 * 16;
  return std::min(tile, g.positions());
}

int64_t images_per_chunk(const ConvGeometry& g, int64_t element_size) {
  const int64_t per_image = g.channels * g.kernel_points() * g.positions() * element_size;
  return std::max<int64_t>(1, std::min<int64_t>(g.batch, kColumnBudgetBytes / std::max<int64_t>(per_image, 1)));
}

// Per group, grad_weight += grad_out @ columns^T and grad_columns = weight^T @
// grad_out, as fixed blocks of rows / columns each multiplied on one thread,
// so the sums do not depend on the thread count.
void backward_gemms(
    const ConvGeometry& g,
    const at::Tensor& weight,
    const at::Tensor& grad_out,
    const at::Tensor& columns,
    at::Tensor& grad_weight,
    at::Tensor& grad_columns) {
  const int64_t cout_g = g.out_channels / g.groups, n_cols = columns.size(1);
  const int64_t row_blocks = (cout_g + kGemmRowBlock - 1) / kGemmRowBlock;
  const int64_t col_blocks = (n_cols + kGemmColumnBlock - 1) / kGemmColumnBlock;
  const int64_t per_group = row_blocks + col_blocks;
  at::parallel_for(0, g.groups * per_group, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t grp = task / per_group, block = task % per_group;
      const at::Tensor grad_out_g = grad_out.narrow(0, grp * cout_g, cout_g);
      if (block < row_blocks) {
        const int64_t r0 = block * kGemmRowBlock, rows = std::min(kGemmRowBlock, cout_g - r0);
        group_weight(grad_weight, g, grp)
            .narrow(0, r0, rows)
            .addmm_(grad_out_g.narrow(0, r0, rows), group_columns(columns, g, grp).t());
      } else {
        const int64_t c0 = (block - row_blocks) * kGemmColumnBlock;
        const int64_t cols = std::min(kGemmColumnBlock, n_cols - c0);
        at::Tensor out = group_columns(grad_columns, g, grp).narrow(1, c0, cols);
        at::mm_out(out, group_weight(weight, g, grp).t(), grad_out_g.narrow(1, c0, cols));
      }
    }
  });
}

at::Tensor deform_conv2d_forward_kernel(
    const at::Tensor& input_,
    const at::Tensor& weight_,
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
      input_, weight_, offset_, mask_, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
      offset_groups);
  const at::Tensor input = input_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  if (g.batch == 0) {
    return output;
  }
  const int64_t P = g.positions();
  const int64_t tile = tile_positions(g, input.element_size());
  const int64_t tiles_per_image = (P + tile - 1) / tile;

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_forward_cpu", [&] {
    const scalar_t* mask_ptr = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, g.batch * tiles_per_image, 1, [&](int64_t begin, int64_t end) {
      std::vector<Taps<scalar_t>> taps(g.offset_groups * g.kernel_points() * tile);
      std::vector<scalar_t> columns(g.channels * g.kernel_points() * tile);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / tiles_per_image, p0 = (t % tiles_per_image) * tile;
        forward_tile<scalar_t>(
            g, input.data_ptr<scalar_t>(), offset.data_ptr<scalar_t>(), mask_ptr, weight, b, p0,
            std::min(tile, P - p0), taps, columns, output.data_ptr<scalar_t>());
      }
    });
  });
  if (bias.has_value()) {
    output.add_(bias->view({1, g.out_channels, 1, 1}));
  }
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_kernel(
    const at::Tensor& grad_,
    const at::Tensor& input_,
    const at::Tensor& weight_,
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
      input_, weight_, offset_, mask_, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups,
      offset_groups);
  TORCH_CHECK(
      grad_.dim() == 4 && grad_.size(0) == g.batch && grad_.size(1) == g.out_channels && grad_.size(2) == g.out_h &&
          grad_.size(3) == g.out_w,
      "deform_conv2d backward: grad has shape ", grad_.sizes());
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor weight = weight_.contiguous();
  const at::Tensor offset = offset_.contiguous();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();

  at::Tensor grad_input = at::zeros_like(input);
  at::Tensor grad_weight = at::zeros_like(weight);
  at::Tensor grad_offset = at::zeros_like(offset);
  at::Tensor grad_mask = mask.defined() ? at::zeros_like(mask) : at::empty({0}, input.options());
  at::Tensor grad_bias = grad.sum({0, 2, 3});
  if (g.batch == 0) {
    return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
  }
  const int64_t P = g.positions();
  const int64_t chunk = images_per_chunk(g, input.element_size());
  at::Tensor columns = at::empty({g.channels * g.kernel_points(), chunk * P}, input.options());
  at::Tensor grad_columns = at::empty_like(columns);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_conv2d_backward_cpu", [&] {
    const scalar_t* mask_ptr = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    for (int64_t b0 = 0; b0 < g.batch; b0 += chunk) {
      const int64_t n = std::min(chunk, g.batch - b0);
      at::Tensor cols = columns.narrow(1, 0, n * P);
      at::Tensor grad_cols = grad_columns.narrow(1, 0, n * P);
      if (n < chunk) {
        cols = cols.contiguous();
        grad_cols = grad_cols.contiguous();
      }
      const auto taps = sampling_taps<scalar_t>(g, offset.data_ptr<scalar_t>(), b0, n);
      deformable_im2col<scalar_t>(g, input.data_ptr<scalar_t>(), mask_ptr, taps, b0, n, cols.data_ptr<scalar_t>());
      // [n, C_out, P] -> [C_out, n * P], the columns' layout.
      const at::Tensor grad_out =
          grad.narrow(0, b0, n).view({n, g.out_channels, P}).transpose(0, 1).contiguous().view({g.out_channels, n * P});
      backward_gemms(g, weight, grad_out, cols, grad_weight, grad_cols);
      deformable_col2im<scalar_t>(
          g, grad_cols.data_ptr<scalar_t>(), mask_ptr, taps, b0, n, grad_input.data_ptr<scalar_t>());
      deformable_col2im_coord<scalar_t>(
          g, grad_cols.data_ptr<scalar_t>(), input.data_ptr<scalar_t>(), mask_ptr, taps, b0, n,
          grad_offset.data_ptr<scalar_t>(), mask.defined() ? grad_mask.data_ptr<scalar_t>() : nullptr);
    }
  });
  return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, CPU, m) {
  m.impl("deform_conv2d", deform_conv2d_forward_kernel);
  m.impl("_deform_conv2d_backward", deform_conv2d_backward_kernel);
}

}  // namespace ops
}  // namespace dcnv2
