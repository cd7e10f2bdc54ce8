// CPU kernels of (modulated) deformable RoI pooling (DCNv2, Eq. 2):
//
//   y(k) = sum_j x(p_kj + dp_k) * dm_k / n_k
//
// Bin k of a RoI averages n_k bilinear samples laid out as in RoIAlign
// (aligned=True: pixel centres at +0.5, no minimum RoI size), after the whole
// bin is shifted by dp_k = gamma * offset_k * (roi width, roi height), then it
// is scaled by dm_k.
//
// The bilinear taps of the samples are tabulated once and reused for all
// channels, a bounded number at a time: the RoIs' samples, in order (RoI,
// bin, sample), are cut into chunks of at most kMaxTapsPerChunk, a bin with
// more samples than that (a huge RoI under adaptive sampling) being split
// between chunks. So memory does not grow with the RoIs' size. The forward
// and the offset / mask gradients accumulate a split bin's sums across
// chunks in the output and gradient tensors, and scale them at the end;
// a bin within one chunk sums exactly as if unchunked. Every channel streams
// through the whole table, so the forward keeps only what it reads (indices
// and weights, not the derivatives): half the bytes (one thread, 500 RoIs
// on a 256x200x304 map, adaptive sampling: 372 -> 222 ms; on smaller maps
// or with 2x2 samples, unchanged within noise; same results to the bit).
// Looping over a few RoIs' taps for all channels at a time was slower: each
// channel's plane then leaves the cache before the next RoIs need it.
//
// Parallel loops write disjoint outputs (channels in forward and for the
// input gradient, bins for the offset and mask gradients), so results do not
// depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/deform_roi_pool_geometry.h"
#include "ops/sampling.h"

namespace dcnv2 {
namespace ops {

namespace {

// Upper bound on the tabulated samples of one chunk.
constexpr int64_t kMaxTapsPerChunk = int64_t(1) << 18;

// Samples [s0, s1) of bin `bin` of RoI `k`, whose taps start at `first_tap`
// in the chunk's table.
struct Piece {
  int64_t k, bin, s0, s1, first_tap;
};

// One chunk: pieces in (RoI, bin, sample) order, no two of the same bin (a
// split bin's pieces but the last fill whole chunks), and their taps.
template <typename T>
struct RoiChunk {
  std::vector<Piece> pieces;
  std::vector<Taps<T>> taps;
  int64_t size() const { return pieces.empty() ? 0 : pieces.back().first_tap + pieces.back().s1 - pieces.back().s0; }
};

// Walks all samples of all RoIs once, handing out one chunk at a time (so
// the plan itself takes no memory per sample either).
template <typename T>
class ChunkPlanner {
 public:
  ChunkPlanner(const PoolGeometry& g, const std::vector<RoiLayout<T>>& layouts) : g_(g), layouts_(layouts) {}

  // Fills `chunk` with the next pieces; false when all samples are planned.
  bool next(RoiChunk<T>& chunk) {
    chunk.pieces.clear();
    int64_t taps = 0;
    while (k_ < g_.num_rois) {
      const int64_t samples = layouts_[k_].samples_per_bin();
      if (samples == 0 || bin_ == g_.bins()) {
        ++k_;
        bin_ = s_ = 0;
        continue;
      }
      const int64_t n = std::min(samples - s_, kMaxTapsPerChunk);
      if (taps + n > kMaxTapsPerChunk) {
        break;
      }
      chunk.pieces.push_back({k_, bin_, s_, s_ + n, taps});
      taps += n;
      s_ += n;
      if (s_ == samples) {
        ++bin_;
        s_ = 0;
      }
    }
    return !chunk.pieces.empty();
  }

 private:
  const PoolGeometry& g_;
  const std::vector<RoiLayout<T>>& layouts_;
  int64_t k_ = 0, bin_ = 0, s_ = 0;
};

template <typename T>
std::vector<RoiLayout<T>> roi_layouts(const PoolGeometry& g, const T* rois) {
  std::vector<RoiLayout<T>> layouts(g.num_rois);
  for (int64_t k = 0; k < g.num_rois; ++k) {
    layouts[k] = roi_layout(rois + k * 5, static_cast<T>(g.spatial_scale), g.pooled_h, g.pooled_w, g.sampling_ratio);
  }
  return layouts;
}

// Calls store(position in the chunk's table, taps) for every sample of
// `chunk`, split between threads by pieces.
template <typename T, typename Store>
void for_each_tap(
    const PoolGeometry& g, const T* offset, const std::vector<RoiLayout<T>>& layouts, const RoiChunk<T>& chunk,
    const Store& store) {
  at::parallel_for(0, static_cast<int64_t>(chunk.pieces.size()), 1, [&](int64_t begin, int64_t end) {
    Taps<T> taps;
    for (int64_t i = begin; i < end; ++i) {
      const Piece& piece = chunk.pieces[i];
      const RoiLayout<T>& r = layouts[piece.k];
      const int64_t ph = piece.bin / g.pooled_w, pw = piece.bin % g.pooled_w;
      T dy, dx;
      bin_shift(g, offset, r, piece.k, piece.bin, dy, dx);
      for (int64_t s = piece.s0; s < piece.s1; ++s) {
        const int64_t iy = s / r.grid_w, ix = s % r.grid_w;
        roi_align_taps(r.sample_y(ph, iy, dy), r.sample_x(pw, ix, dx), g.height, g.width, taps);
        store(piece.first_tap + s - piece.s0, taps);
      }
    }
  });
}

// Taps of every piece of `chunk`, with their derivatives (the backward's).
template <typename T>
void fill_taps(const PoolGeometry& g, const T* offset, const std::vector<RoiLayout<T>>& layouts, RoiChunk<T>& chunk) {
  chunk.taps.resize(chunk.size());
  for_each_tap(g, offset, layouts, chunk, [&](int64_t i, const Taps<T>& taps) { chunk.taps[i] = taps; });
}

// What the forward reads of a sample's taps: half the bytes of Taps, so the
// table that every channel streams through is half as large.
template <typename T>
struct GatherTaps {
  int32_t index[4];
  T weight[4];
};

template <typename T>
void fill_gather_taps(
    const PoolGeometry& g, const T* offset, const std::vector<RoiLayout<T>>& layouts, const RoiChunk<T>& chunk,
    std::vector<GatherTaps<T>>& table) {
  table.resize(chunk.size());
  for_each_tap(g, offset, layouts, chunk, [&](int64_t i, const Taps<T>& taps) {
    for (int j = 0; j < 4; ++j) {
      table[i].index[j] = taps.index[j];
      table[i].weight[j] = taps.weight[j];
    }
  });
}

at::Tensor deform_roi_pool_forward_kernel(
    const at::Tensor& input_, const at::Tensor& rois_, const std::optional<at::Tensor>& offset_,
    const std::optional<at::Tensor>& mask_, int64_t pooled_height, int64_t pooled_width, double spatial_scale,
    int64_t sampling_ratio, double gamma) {
  const PoolGeometry g = check_and_make_geometry(
      input_, rois_, offset_, mask_, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma);
  check_roi_batch_indices(rois_, g.batch);
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
    const auto layouts = roi_layouts(g, rois.data_ptr<scalar_t>());
    ChunkPlanner<scalar_t> planner(g, layouts);
    RoiChunk<scalar_t> chunk;
    std::vector<GatherTaps<scalar_t>> table;
    // The sums of the samples first (a split bin's continue where the last
    // chunk left them)...
    while (planner.next(chunk)) {
      fill_gather_taps(g, offset_ptr, layouts, chunk, table);
      at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          for (const Piece& piece : chunk.pieces) {
            const scalar_t* xc = x + (layouts[piece.k].batch_index * g.channels + c) * plane;
            const GatherTaps<scalar_t>* t = table.data() + piece.first_tap;
            scalar_t* bin_out = out + (piece.k * g.channels + c) * bins + piece.bin;
            scalar_t sum = *bin_out;
            for (int64_t s = piece.s0; s < piece.s1; ++s, ++t) {
              sum += gather(t->weight, t->index, xc);
            }
            *bin_out = sum;
          }
        }
      });
    }
    // ... then the average, modulated.
    at::parallel_for(0, g.num_rois * g.channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t kc = begin; kc < end; ++kc) {
        const int64_t k = kc / g.channels;
        for (int64_t bin = 0; bin < bins; ++bin) {
          const scalar_t m = mask_ptr ? mask_ptr[k * bins + bin] : scalar_t(1);
          out[kc * bins + bin] = out[kc * bins + bin] * layouts[k].inv_count * m;
        }
      }
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> deform_roi_pool_backward_kernel(
    const at::Tensor& grad_, const at::Tensor& input_, const at::Tensor& rois_,
    const std::optional<at::Tensor>& offset_, const std::optional<at::Tensor>& mask_, int64_t pooled_height,
    int64_t pooled_width, double spatial_scale, int64_t sampling_ratio, double gamma) {
  const PoolGeometry g = check_and_make_geometry(
      input_, rois_, offset_, mask_, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma);
  check_roi_batch_indices(rois_, g.batch);
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
    // Until the end: the sums over channels and samples of the incoming
    // gradient times the samples' derivatives (x, y) and values.
    scalar_t* g_offset = offset_ptr ? grad_offset.data_ptr<scalar_t>() : nullptr;
    scalar_t* g_mask = mask_ptr ? grad_mask.data_ptr<scalar_t>() : nullptr;
    const int64_t plane = g.height * g.width, bins = g.bins();
    const auto layouts = roi_layouts(g, rois.data_ptr<scalar_t>());
    ChunkPlanner<scalar_t> planner(g, layouts);
    RoiChunk<scalar_t> chunk;
    while (planner.next(chunk)) {
      fill_taps(g, offset_ptr, layouts, chunk);
      // Input gradient: one channel per task, so RoIs sharing pixels never
      // write concurrently.
      at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          for (const Piece& piece : chunk.pieces) {
            const RoiLayout<scalar_t>& r = layouts[piece.k];
            scalar_t* gxc = gx + (r.batch_index * g.channels + c) * plane;
            const Taps<scalar_t>* t = chunk.taps.data() + piece.first_tap;
            const scalar_t m = mask_ptr ? mask_ptr[piece.k * bins + piece.bin] : scalar_t(1);
            const scalar_t gv = gy[(piece.k * g.channels + c) * bins + piece.bin] * r.inv_count * m;
            for (int64_t s = piece.s0; s < piece.s1; ++s, ++t) {
              for (int i = 0; i < 4; ++i) {
                gxc[t->index[i]] += t->weight[i] * gv;
              }
            }
          }
        }
      });
      if (!offset_ptr && !mask_ptr) {
        continue;
      }
      // Offset and mask sums: one piece (so one bin) per task.
      at::parallel_for(0, static_cast<int64_t>(chunk.pieces.size()), 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const Piece& piece = chunk.pieces[i];
          const int64_t k = piece.k, bin = piece.bin;
          const RoiLayout<scalar_t>& r = layouts[k];
          scalar_t acc_y = 0, acc_x = 0, acc_v = 0;
          for (int64_t c = 0; c < g.channels; ++c) {
            const scalar_t* xc = x + (r.batch_index * g.channels + c) * plane;
            const scalar_t gv = gy[(k * g.channels + c) * bins + bin];
            const Taps<scalar_t>* t = chunk.taps.data() + piece.first_tap;
            scalar_t sy = 0, sx = 0, sv = 0;
            for (int64_t s = piece.s0; s < piece.s1; ++s, ++t) {
              for (int j = 0; j < 4; ++j) {
                const scalar_t v = xc[t->index[j]];
                sy += t->d_dy[j] * v;
                sx += t->d_dx[j] * v;
                sv += t->weight[j] * v;
              }
            }
            acc_y += gv * sy;
            acc_x += gv * sx;
            acc_v += gv * sv;
          }
          if (g_offset) {
            g_offset[(k * 2 + 0) * bins + bin] += acc_x;
            g_offset[(k * 2 + 1) * bins + bin] += acc_y;
          }
          if (g_mask) {
            g_mask[k * bins + bin] += acc_v;
          }
        }
      });
    }
    if (!offset_ptr && !mask_ptr) {
      return;
    }
    // The sums through the bins' average, modulation and shift.
    at::parallel_for(0, g.num_rois, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const RoiLayout<scalar_t>& r = layouts[k];
        for (int64_t bin = 0; bin < bins; ++bin) {
          const scalar_t m = mask_ptr ? mask_ptr[k * bins + bin] : scalar_t(1);
          if (g_offset) {
            scalar_t& ox = g_offset[(k * 2 + 0) * bins + bin];
            scalar_t& oy = g_offset[(k * 2 + 1) * bins + bin];
            offset_grads(g, r, ox, oy, m, ox, oy);
          }
          if (g_mask) {
            g_mask[k * bins + bin] = g_mask[k * bins + bin] * r.inv_count;
          }
        }
      }
    });
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
