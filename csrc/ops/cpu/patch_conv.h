// The dense half of the CPU deformable conv: a patch matrix (one row of
// C * kh * kw samples per output position) times the layer's weight.
//
// The forward runs it as a 1x1 conv over a channels-last [1, X, 1, R] view
// of R patch rows: for float32 that is oneDNN, faster than MKL's GEMM here.
// The weight is packed into oneDNN's blocked layout once per call, not once
// per tile, for one tile shape that every tile then has (tiles of another
// shape are much slower). benchmarks/RESULTS.md has the measurements. The
// backward runs as GEMMs on fixed blocks (see backward()).
//
// The packed conv is a private oneDNN op of torch (packed_conv_op()); where
// it is missing, has another schema than the one this code calls, or fails,
// the forward uses at::conv2d instead (the same results up to rounding).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <optional>
#include <string>
#include <vector>

#include "ops/cpu/parallel_tasks.h"
#include "ops/deform_conv2d_geometry.h"

namespace dcnv2 {
namespace ops {

// Columns of a patch row are (group, kernel point, channel within group): the
// weight's [C_out, kh, kw, C / groups] order, so the weight matrix is the
// channels-last weight as it lies in memory.
inline at::Tensor weight_matrix(const at::Tensor& weight, const ConvGeometry& g) {
  const int64_t columns = g.kernel_points() * g.channels_per_group();
  return weight.permute({0, 2, 3, 1}).contiguous().view({g.out_channels, columns, 1, 1});
}

// A [R, X] row-major buffer as the channels-last [1, X, 1, R] conv input.
inline at::Tensor as_conv_input(void* rows, int64_t R, int64_t X, const at::TensorOptions& options) {
  return at::from_blob(rows, {1, X, 1, R}, {R * X, 1, R * X, X}, options);
}

class PatchConv {
 public:
  // `forward_tile_rows`: for forward(), the number of patch rows every call
  // will get, for which the weight is packed.
  PatchConv(const at::Tensor& weight, const ConvGeometry& g, std::optional<int64_t> forward_tile_rows = std::nullopt)
      : weight_(weight_matrix(weight, g)), groups_(g.groups) {
    const auto* op = packed_conv_op();
    // (torch.backends.mkldnn.enabled = False turns it off, as for at::conv2d.)
    const bool onednn = at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
    if (forward_tile_rows && op && onednn && weight.scalar_type() == at::kFloat) {
      try {
        const int64_t tile_shape[4] = {1, weight_.size(1) * groups_, 1, *forward_tile_rows};
        packed_ = at::mkldnn_reorder_conv2d_weight(weight_.to_mkldnn(), {0, 0}, {1, 1}, {1, 1}, groups_, tile_shape);
        packed_op_ = op;
      } catch (const std::exception& e) {
        packed_conv_failed(e);
      }
    }
  }

  // [1, X, 1, R] -> [1, C_out, 1, R], channels-last ([R, C_out] in memory).
  at::Tensor forward(const at::Tensor& rows) const {
    const int64_t zeros[2] = {0, 0}, ones[2] = {1, 1};
    at::Tensor out;
    if (packed_op_ && !packed_conv_disabled().load()) {
      try {
        out = packed_forward(rows);
      } catch (const std::exception& e) {
        packed_conv_failed(e);
      }
    }
    if (!out.defined()) {
      out = at::conv2d(rows, weight_, std::nullopt, ones, zeros, ones, groups_);
    }
    return out.contiguous(at::MemoryFormat::ChannelsLast);
  }

  // The contraction's backward for a tile of patch rows (grad_rows [R, C_out]
  // and rows [R, X], row-major): grad_weight ([C_out, X / groups],
  // row-major) += the tile's part; grad_patches ([R, X], row-major) = the
  // gradient of every sample.
  //
  // Plain GEMMs, each single-threaded (parallel_tasks), on blocks fixed by
  // the shapes: unlike the conv library's backward, whose summation order
  // depends on the thread count, these give the same results at any thread
  // count.
  void backward(
      const at::Tensor& grad_rows, const at::Tensor& rows, at::Tensor& grad_weight, at::Tensor& grad_patches) const {
    const int64_t R = rows.size(0), X = rows.size(1), xg = X / groups_, cout_g = weight_.size(0) / groups_;
    const at::Tensor weight = weight_.view({weight_.size(0), xg});
    // Weight gradient by column blocks (each reads the tile's incoming
    // gradient, which is small, once more).
    const Blocks columns(xg, kColumnBlock);
    parallel_tasks(groups_ * columns.count, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t group = t / columns.count, c0 = columns.start(t % columns.count);
        const int64_t n = columns.length(t % columns.count);
        grad_weight.narrow(0, group * cout_g, cout_g)
            .narrow(1, c0, n)
            .addmm_(grad_rows.narrow(1, group * cout_g, cout_g).t(), rows.narrow(1, group * xg + c0, n));
      }
    });
    // Samples' gradient by row blocks.
    const Blocks row_blocks(R, kRowBlock);
    parallel_tasks(groups_ * row_blocks.count, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t group = t / row_blocks.count, r0 = row_blocks.start(t % row_blocks.count);
        const int64_t n = row_blocks.length(t % row_blocks.count);
        at::Tensor out = grad_patches.narrow(0, r0, n).narrow(1, group * xg, xg);
        at::mm_out(
            out, grad_rows.narrow(0, r0, n).narrow(1, group * cout_g, cout_g),
            weight.narrow(0, group * cout_g, cout_g));
      }
    });
  }

 private:
  // The packed conv of `rows`, checked to have the expected result shape.
  at::Tensor packed_forward(const at::Tensor& rows) const {
    std::vector<c10::IValue> stack{
        rows,
        packed_,
        c10::IValue(),
        std::vector<int64_t>{0, 0},
        std::vector<int64_t>{1, 1},
        std::vector<int64_t>{1, 1},
        groups_,
        std::string("none"),
        c10::List<std::optional<at::Scalar>>(),
        std::string("")};
    packed_op_->callBoxed(&stack);
    at::Tensor out = stack.at(0).toTensor();
    const int64_t expected[4] = {1, weight_.size(0), 1, rows.size(3)};
    TORCH_CHECK(out.sizes() == at::IntArrayRef(expected), "unexpected result shape ", out.sizes());
    return out;
  }

  // At most this many columns / rows per backward GEMM.
  static constexpr int64_t kColumnBlock = 256;
  static constexpr int64_t kRowBlock = 256;

  // [0, size) in `count` near-equal blocks of at most `max_block`.
  struct Blocks {
    int64_t size, count, block;
    Blocks(int64_t size_, int64_t max_block)
        : size(size_), count((size_ + max_block - 1) / max_block), block((size_ + count - 1) / count) {}
    int64_t start(int64_t i) const { return i * block; }
    int64_t length(int64_t i) const { return std::min(block, size - i * block); }
  };

  // oneDNN's conv with a prepacked weight (what torch.compile's CPU backend
  // calls). A private op: it is used only if it exists (not in builds
  // without oneDNN) with exactly the schema forward() calls it with (looked
  // up once), and not after it failed once (remembered for the process).
  // DCNV2_DISABLE_PACKED_CONV=1 in the environment when the first conv runs
  // turns it off too (for tests of the fallback).
  static constexpr const char* kPackedConvSchema =
      "mkldnn::_convolution_pointwise(Tensor X, Tensor W, Tensor? B, int[] padding, int[] stride, int[] dilation, "
      "int groups, str attr, Scalar?[] scalars, str? algorithm) -> Tensor Y";

  static const c10::OperatorHandle* packed_conv_op() {
    static const std::optional<c10::OperatorHandle> op = find_packed_conv_op();
    return op && !packed_conv_disabled().load() ? &*op : nullptr;
  }

  static std::optional<c10::OperatorHandle> find_packed_conv_op() {
    const char* disable = std::getenv("DCNV2_DISABLE_PACKED_CONV");
    if (disable && std::string(disable) == "1") {
      return std::nullopt;
    }
    auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", ""});
    if (!op || c10::toString(op->schema()) != kPackedConvSchema) {
      return std::nullopt;
    }
    return op;
  }

  static std::atomic<bool>& packed_conv_disabled() {
    static std::atomic<bool> disabled{false};
    return disabled;
  }

  static void packed_conv_failed(const std::exception& e) {
    packed_conv_disabled().store(true);
    TORCH_WARN_ONCE(
        "dcnv2: oneDNN's packed conv (mkldnn::_convolution_pointwise) failed; the CPU deformable conv uses "
        "at::conv2d from now on. The error: ",
        e.what());
  }

  at::Tensor weight_;  // [C_out, X / groups, 1, 1]
  int64_t groups_;
  const c10::OperatorHandle* packed_op_ = nullptr;
  at::Tensor packed_;
};

}  // namespace ops
}  // namespace dcnv2
