// Parallel loops whose tasks call dense libraries (oneDNN convs, MKL GEMMs).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>

namespace dcnv2 {
namespace ops {

// Calls fn(begin, end) over chunks of tasks [0, n) on torch's threads, below
// autograd (the guard is thread-local, so each task sets it).
//
// Each call runs inside an active parallel region whenever torch has more
// than one thread, so the libraries it calls run single-threaded there:
// their results then depend on the task alone, not on the thread count. (A
// range of one task would run inline, outside any region, and the library
// would use all threads; an empty second task prevents that.)
template <typename Fn>
void parallel_tasks(int64_t n, const Fn& fn) {
  at::parallel_for(0, std::max<int64_t>(n, 2), 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    end = std::min(end, n);
    if (begin < end) {
      fn(begin, end);
    }
  });
}

}  // namespace ops
}  // namespace dcnv2
