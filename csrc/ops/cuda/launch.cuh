// Launch sizing shared by the CUDA kernels: fixed-size blocks, a grid capped
// at kMaxBlocks, and 64-bit grid-stride loops that cover whatever the cap
// leaves (indices of large batches do not fit in 32 bits).
#pragma once

#include <algorithm>
#include <cstdint>

namespace dcnv2 {
namespace ops {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// Blocks for a grid-stride loop over n elements (at least one).
inline unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

}  // namespace ops
}  // namespace dcnv2

#define CUDA_KERNEL_LOOP_64(i, n) \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += int64_t(blockDim.x) * gridDim.x)
