// CPU kernels of (modulated) deformable RoI pooling (DCNv2, Eq. 2):
//
//   y(k) = sum_j x(p_kj + dp_k) * dm_k / n_k
//
// Bin k of a RoI averages n_k bilinear samples laid out as in RoIAlign
// (aligned=True: pixel centres at +0.5, no minimum RoI size), after the whole
// bin is shifted by dp_k = gamma * offset_k * (roi width, roi height), then it
// is scaled by dm_k. The bilinear taps of every sample of a chunk of RoIs are
// tabulated once and reused for all channels.
//
// Parallel loops write disjoint outputs (RoIs in forward and for the offset
// and mask gradients, channels for the input gradient), so results do not
// depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/deform_roi_pool_geometry.h"
#include "ops/sampling.h"

namespace dcnv2 {
namespace ops {

namespace {

// Upper bound on the tabulated samples of one chunk of RoIs.
constexpr int64_t kMaxTapsPerChunk = int64_t(1) << 18;

// Offset of bin `bin` of RoI `k`, in feature pixels: (dy, dx).
template <typename T>
inline void bin_shift(
    const PoolGeometry& g, const T* offset, const RoiLayout<T>& r, int64_t k, int64_t bin, T& dy, T& dx) {
  dy = dx = T(0);
  if (offset) {
    const T gamma = static_cast<T>(g.gamma);
    dx = gamma * offset[(k * 2 + 0) * g.bins() + bin] * r.width;
    dy = gamma * offset[(k * 2 + 1) * g.bins() + bin] * r.height;
  }
}

// A chunk of RoIs [k0, k1) with the taps of all their samples, laid out
// [roi][bin][sample].
template <typename T>
struct RoiChunk {
  int64_t k0 = 0, k1 = 0;
  std::vector<RoiLayout<T>> layouts;
  std::vector<int64_t> first_tap;  // where each RoI's samples start in `taps`
  std::vector<Taps<T>> taps;
};

// Splits all RoIs into chunks whose tap tables stay under kMaxTapsPerChunk
// (a single large RoI may exceed it on its own).
template <typename T>
std::vector<RoiChunk<T>> plan_chunks(const PoolGeometry& g, const T* rois) {
  std::vector<RoiChunk<T>> chunks;
  RoiChunk<T> current;
  int64_t taps = 0;
  for (int64_t k = 0; k < g.num_rois; ++k) {
    const RoiLayout<T> r =
        roi_layout(rois + k * 5, static_cast<T>(g.spatial_scale), g.pooled_h, g.pooled_w, g.sampling_ratio);
    TORCH_CHECK(
        r.batch_index >= 0 && r.batch_index < g.batch, "deform_roi_pool: rois[", k, ", 0] = ", rois[k * 5],
        " is not a batch index of input (batch size ", g.batch, ")");
    const int64_t roi_taps = g.bins() * r.samples_per_bin();
    if (!current.layouts.empty() && taps + roi_taps > kMaxTapsPerChunk) {
      current.k1 = k;
      chunks.push_back(std::move(current));
      current = RoiChunk<T>();
      current.k0 = k;
      taps = 0;
    }
    current.first_tap.push_back(taps);
    taps += roi_taps;
    current.layouts.push_back(r);
  }
  current.k1 = g.num_rois;
  if (!current.layouts.empty()) {
    chunks.push_back(std::move(current));
  }
  return chunks;
}

template <typename T>
void fill_taps(const PoolGeometry& g, const T* offset, RoiChunk<T>& chunk) {
  chunk.taps.resize(chunk.first_tap.back() + g.bins() * chunk.layouts.back().samples_per_bin());
  at::parallel_for(chunk.k0, chunk.k1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const RoiLayout<T>& r = chunk.layouts[k - chunk.k0];
      Taps<T>* t = chunk.taps.data() + chunk.first_tap[k - chunk.k0];
      for (int64_t ph = 0; ph < g.pooled_h; ++ph) {
        for (int64_t pw = 0; pw < g.pooled_w; ++pw) {
          T dy, dx;
          bin_shift(g, offset, r, k, ph * g.pooled_w + pw, dy, dx);
          for (int64_t iy = 0; iy < r.grid_h; ++iy) {
            for (int64_t ix = 0; ix < r.grid_w; ++ix) {
              roi_align_taps(r.sample_y(ph, iy, dy), r.sample_x(pw, ix, dx), g.height, g.width, *t++);
            }
          }
        }
      }
    }
  });
}

at::Tensor deform_roi_pool_forward_kernel(
    const at::Tensor& input_, const at::Tensor& rois_, const std::optional<at::Tensor>& offset_,
    const std::optional<at::Tensor>& mask_, int64_t pooled_height, int64_t pooled_width, double spatial_scale,
    int64_t sampling_ratio, double gamma) {
  const PoolGeometry g = check_and_make_geometry(
      input_, rois_, offset_, mask_, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma);
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.contiguous();
  const at::Tensor offset = offset_.has_value() ? offset_->contiguous() : at::Tensor();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  at::Tensor output = at::zeros({g.num_rois, g.channels, g.pooled_h, g.pooled_w}, input.options());
  if (g.num_rois == 0 || g.height * g.width == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_roi_pool_forward_cpu", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    const scalar_t* offset_ptr = offset.defined() ? offset.data_ptr<scalar_t>() : nullptr;
    const scalar_t* mask_ptr = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    scalar_t* out = output.data_ptr<scalar_t>();
    const int64_t plane = g.height * g.width, bins = g.bins();
    for (auto& chunk : plan_chunks<scalar_t>(g, rois.data_ptr<scalar_t>())) {
      fill_taps(g, offset_ptr, chunk);
      at::parallel_for(chunk.k0 * g.channels, chunk.k1 * g.channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t kc = begin; kc < end; ++kc) {
          const int64_t k = kc / g.channels, c = kc % g.channels;
          const RoiLayout<scalar_t>& r = chunk.layouts[k - chunk.k0];
          const scalar_t* xc = x + (r.batch_index * g.channels + c) * plane;
          const Taps<scalar_t>* t = chunk.taps.data() + chunk.first_tap[k - chunk.k0];
          const int64_t samples = r.samples_per_bin();
          for (int64_t bin = 0; bin < bins; ++bin) {
            scalar_t sum = 0;
            for (int64_t s = 0; s < samples; ++s) {
              sum += gather(t->weight, t->index, xc);
              ++t;
            }
            const scalar_t m = mask_ptr ? mask_ptr[k * bins + bin] : scalar_t(1);
            out[kc * bins + bin] = sum * r.inv_count * m;
          }
        }
      });
    }
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
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor input = input_.contiguous();
  const at::Tensor rois = rois_.contiguous();
  const at::Tensor offset = offset_.has_value() ? offset_->contiguous() : at::Tensor();
  const at::Tensor mask = mask_.has_value() ? mask_->contiguous() : at::Tensor();
  at::Tensor grad_input = at::zeros_like(input);
  at::Tensor grad_offset = offset.defined() ? at::zeros_like(offset) : at::empty({0}, input.options());
  at::Tensor grad_mask = mask.defined() ? at::zeros_like(mask) : at::empty({0}, input.options());
  if (g.num_rois == 0 || g.height * g.width == 0) {
    return {grad_input, grad_offset, grad_mask};
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "deform_roi_pool_backward_cpu", [&] {
    const scalar_t* x = input.data_ptr<scalar_t>();
    const scalar_t* gy = grad.data_ptr<scalar_t>();
    const scalar_t* offset_ptr = offset.defined() ? offset.data_ptr<scalar_t>() : nullptr;
    const scalar_t* mask_ptr = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    scalar_t* gx = grad_input.data_ptr<scalar_t>();
    const int64_t plane = g.height * g.width, bins = g.bins();
    for (auto& chunk : plan_chunks<scalar_t>(g, rois.data_ptr<scalar_t>())) {
      fill_taps(g, offset_ptr, chunk);
      // Input gradient: one channel per task, so RoIs sharing pixels never
      // write concurrently.
      at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          for (int64_t k = chunk.k0; k < chunk.k1; ++k) {
            const RoiLayout<scalar_t>& r = chunk.layouts[k - chunk.k0];
            scalar_t* gxc = gx + (r.batch_index * g.channels + c) * plane;
            const Taps<scalar_t>* t = chunk.taps.data() + chunk.first_tap[k - chunk.k0];
            const int64_t samples = r.samples_per_bin();
            for (int64_t bin = 0; bin < bins; ++bin) {
              const scalar_t m = mask_ptr ? mask_ptr[k * bins + bin] : scalar_t(1);
              const scalar_t gv = gy[(k * g.channels + c) * bins + bin] * r.inv_count * m;
              for (int64_t s = 0; s < samples; ++s, ++t) {
                for (int i = 0; i < 4; ++i) {
                  gxc[t->index[i]] += t->weight[i] * gv;
                }
              }
            }
          }
        }
      });
      if (!offset_ptr && !mask_ptr) {
        continue;
      }
      // Offset and mask gradients: one RoI per task, summed over channels.
      at::parallel_for(chunk.k0, chunk.k1, 1, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const RoiLayout<scalar_t>& r = chunk.layouts[k - chunk.k0];
          const int64_t samples = r.samples_per_bin();
          const scalar_t gamma_t = static_cast<scalar_t>(g.gamma);
          for (int64_t bin = 0; bin < bins; ++bin) {
            scalar_t acc_y = 0, acc_x = 0, acc_v = 0;
            for (int64_t c = 0; c < g.channels; ++c) {
              const scalar_t* xc = x + (r.batch_index * g.channels + c) * plane;
              const scalar_t gv = gy[(k * g.channels + c) * bins + bin];
              const Taps<scalar_t>* t = chunk.taps.data() + chunk.first_tap[k - chunk.k0] + bin * samples;
              scalar_t sy = 0, sx = 0, sv = 0;
              for (int64_t s = 0; s < samples; ++s, ++t) {
                for (int i = 0; i < 4; ++i) {
                  const scalar_t v = xc[t->index[i]];
                  sy += t->d_dy[i] * v;
                  sx += t->d_dx[i] * v;
                  sv += t->weight[i] * v;
                }
              }
              acc_y += gv * sy;
              acc_x += gv * sx;
              acc_v += gv * sv;
            }
            const scalar_t m = mask_ptr ? mask_ptr[k * bins + bin] : scalar_t(1);
            if (offset_ptr) {
              // d(sample)/d(offset) = gamma * roi size.
              grad_offset.data_ptr<scalar_t>()[(k * 2 + 0) * bins + bin] = acc_x * r.inv_count * m * gamma_t * r.width;
              grad_offset.data_ptr<scalar_t>()[(k * 2 + 1) * bins + bin] = acc_y * r.inv_count * m * gamma_t * r.height;
            }
            if (mask_ptr) {
              grad_mask.data_ptr<scalar_t>()[k * bins + bin] = acc_v * r.inv_count;
            }
          }
        }
      });
    }
  });
  return {grad_input, grad_offset, grad_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(dcnv2, CPU, m) {
  m.impl("deform_roi_pool", deform_roi_pool_forward_kernel);
  m.impl("_deform_roi_pool_backward", deform_roi_pool_backward_kernel);
}

}  // namespace ops
}  // namespace dcnv2
