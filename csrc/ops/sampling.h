// Bilinear sampling rules shared by the CPU and CUDA kernels, so both
// devices compute exactly the same taps.
//
// A sampling point reads four taps (y_low|y_high, x_low|x_high). Taps carry
// their flat index in the channel plane, their weight, and the derivatives
// of the weight with respect to the point's y and x (for the offset
// gradients). An unused tap has weight 0 and index 0, so gathers need no
// branch.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace dcnv2 {
namespace ops {

// Finite (not NaN, not infinite), the same way on host and device.
template <typename T>
C10_HOST_DEVICE inline bool is_finite(T v) {
  return v - v == T(0);
}

template <typename T>
struct Taps {
  int32_t index[4];
  T weight[4];
  T d_dy[4];
  T d_dx[4];
};

template <typename T>
C10_HOST_DEVICE inline void clear_taps(Taps<T>& taps) {
  for (int i = 0; i < 4; ++i) {
    taps.index[i] = 0;
    taps.weight[i] = taps.d_dy[i] = taps.d_dx[i] = T(0);
  }
}

template <typename T>
C10_HOST_DEVICE inline void set_taps(
    Taps<T>& taps, int64_t y_low, int64_t y_high, int64_t x_low, int64_t x_high, T ly, T lx, int64_t height,
    int64_t width, bool y_free, bool x_free) {
  const T hy = T(1) - ly, hx = T(1) - lx;
  const int64_t ys[4] = {y_low, y_low, y_high, y_high};
  const int64_t xs[4] = {x_low, x_high, x_low, x_high};
  const T weight[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  const T d_dy[4] = {-hx, -lx, hx, lx};
  const T d_dx[4] = {-hy, hy, -ly, ly};
  for (int i = 0; i < 4; ++i) {
    if (ys[i] >= 0 && ys[i] < height && xs[i] >= 0 && xs[i] < width) {
      taps.index[i] = static_cast<int32_t>(ys[i] * width + xs[i]);
      taps.weight[i] = weight[i];
      taps.d_dy[i] = y_free ? d_dy[i] : T(0);
      taps.d_dx[i] = x_free ? d_dx[i] : T(0);
    }
  }
}

// Deformable convolution's sampling, as torchvision's deform_conv2d: taps
// outside the map read zero, and the coordinate gradient is taken on the
// taps that remain (one-sided at the border: a point at y = -1 still "sees"
// row 0 through its gradient).
template <typename T>
C10_HOST_DEVICE inline void deform_conv_taps(T y, T x, int64_t height, int64_t width, Taps<T>& taps) {
  clear_taps(taps);
  // Beyond one pixel outside the map every tap is invalid; this also keeps
  // NaN and huge offsets away from the integer conversion below.
  if (!(y > T(-2) && y < T(height + 1) && x > T(-2) && x < T(width + 1))) {
    return;
  }
  const int64_t y_low = static_cast<int64_t>(::floor(y));
  const int64_t x_low = static_cast<int64_t>(::floor(x));
  set_taps(taps, y_low, y_low + 1, x_low, x_low + 1, y - T(y_low), x - T(x_low), height, width, true, true);
}

// RoIAlign's sampling (torchvision / Detectron2 ROIAlignV2): points up to one
// pixel outside the map are clamped onto its border, where the coordinate
// derivative is then zero; points further out read zero.
template <typename T>
C10_HOST_DEVICE inline void roi_align_taps(T y, T x, int64_t height, int64_t width, Taps<T>& taps) {
  clear_taps(taps);
  if (!(y >= T(-1) && y <= T(height) && x >= T(-1) && x <= T(width))) {
    return;  // also rejects NaN
  }
  bool y_free = true, x_free = true;
  if (y <= T(0)) {
    y = T(0);
    y_free = false;
  }
  if (x <= T(0)) {
    x = T(0);
    x_free = false;
  }
  int64_t y_low = static_cast<int64_t>(y), x_low = static_cast<int64_t>(x);
  int64_t y_high = y_low + 1, x_high = x_low + 1;
  if (y_low >= height - 1) {
    y_high = y_low = height - 1;
    y = T(y_low);
    y_free = false;
  }
  if (x_low >= width - 1) {
    x_high = x_low = width - 1;
    x = T(x_low);
    x_free = false;
  }
  set_taps(taps, y_low, y_high, x_low, x_high, y - T(y_low), x - T(x_low), height, width, y_free, x_free);
}

template <typename T, typename V>
C10_HOST_DEVICE inline T gather(const T* weights, const int32_t* index, const V* x) {
  return weights[0] * T(x[index[0]]) + weights[1] * T(x[index[1]]) + weights[2] * T(x[index[2]]) +
         weights[3] * T(x[index[3]]);
}

// Adaptive sampling (sampling_ratio <= 0) takes ceil(bin size) points per
// bin side, as RoIAlign, but at most kMaxAdaptiveGrid: a bin wider than that
// many feature pixels (only absurd boxes, e.g. 1e9 px) gets kMaxAdaptiveGrid
// evenly spread points per side instead of billions, so such a RoI costs at
// most ~1M samples per bin; only there results differ from RoIAlign's
// uncapped rule. An explicit sampling_ratio is used as given.
constexpr int64_t kMaxAdaptiveGrid = 1024;

template <typename T>
C10_HOST_DEVICE inline int64_t adaptive_grid(T bin_size) {
  return bin_size < T(kMaxAdaptiveGrid) ? static_cast<int64_t>(::ceil(bin_size)) : kMaxAdaptiveGrid;
}

// Where one RoI samples (aligned=True): its box in feature coordinates and
// its sampling grid per bin (adaptive: see adaptive_grid; a degenerate or
// inverted RoI gets no adaptive samples and pools to zero). A RoI with a NaN
// or infinite coordinate (or a size that overflows) gets no samples at any
// sampling_ratio and zero size: it pools to zero, and every gradient through
// it (input, offset, mask) is zero.
template <typename T>
struct RoiLayout {
  int64_t batch_index;
  T start_h, start_w, height, width, bin_h, bin_w;
  int64_t grid_h, grid_w;
  T inv_count;

  C10_HOST_DEVICE int64_t samples_per_bin() const { return grid_h * grid_w; }

  // Sample (iy, ix) of bin (ph, pw), with the bin shifted by (dy, dx).
  C10_HOST_DEVICE T sample_y(int64_t ph, int64_t iy, T dy) const {
    return start_h + dy + T(ph) * bin_h + (T(iy) + T(0.5)) * bin_h / T(grid_h);
  }
  C10_HOST_DEVICE T sample_x(int64_t pw, int64_t ix, T dx) const {
    return start_w + dx + T(pw) * bin_w + (T(ix) + T(0.5)) * bin_w / T(grid_w);
  }
};

template <typename T>
C10_HOST_DEVICE inline RoiLayout<T> roi_layout(
    const T* roi, T spatial_scale, int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio) {
  RoiLayout<T> r{};
  r.batch_index = is_finite(roi[0]) ? static_cast<int64_t>(roi[0]) : -1;
  // aligned=True: a box edge at x maps to continuous coordinate x*scale - 0.5.
  r.start_w = roi[1] * spatial_scale - T(0.5);
  r.start_h = roi[2] * spatial_scale - T(0.5);
  r.width = roi[3] * spatial_scale - T(0.5) - r.start_w;
  r.height = roi[4] * spatial_scale - T(0.5) - r.start_h;
  r.bin_h = r.height / T(pooled_h);
  r.bin_w = r.width / T(pooled_w);
  r.grid_h = r.grid_w = 0;
  if (!(is_finite(r.start_h) && is_finite(r.start_w) && is_finite(r.height) && is_finite(r.width))) {
    r.start_h = r.start_w = r.height = r.width = r.bin_h = r.bin_w = T(0);
  } else if (sampling_ratio > 0) {
    r.grid_h = r.grid_w = sampling_ratio;
  } else if (r.bin_h > T(0) && r.bin_w > T(0)) {
    r.grid_h = adaptive_grid(r.bin_h);
    r.grid_w = adaptive_grid(r.bin_w);
  }
  const int64_t count = r.grid_h * r.grid_w;
  r.inv_count = T(1) / T(count > 1 ? count : 1);
  return r;
}

}  // namespace ops
}  // namespace dcnv2
