// Walking the counter-RNG stream of one row, shared by the CPU kernels.
//
// A tensor is viewed as rows of R random draws, draw (b, r) at stream index m = b * R + r. Work is
// split into tasks of kTaskSpan aligned indices of one row, so every Philox counter (4 indices)
// is evaluated once per row, and per-task partial results can be reduced in a fixed order
// (results do not depend on the number of threads). The Triton kernels use the same tiling.
#pragma once

#include <algorithm>
#include <cstdint>

#include "philox.h"

namespace diffkernels {

constexpr int64_t kChunk = 4 * kBatchCounters;  // draws per chunk (128)
constexpr int64_t kChunksPerTask = 8;
constexpr int64_t kTaskSpan = kChunk * kChunksPerTask;  // 1024 draws per task

// Tasks per row: enough aligned spans to cover R draws starting at any offset mod 4.
inline int64_t tasks_per_row(int64_t R) { return (R + 3 + kTaskSpan - 1) / kTaskSpan; }

// Grain size for at::parallel_for over tasks that each touch elements_per_task elements: small
// inputs run on the calling thread (a parallel region costs more than it saves below ~64K elements).
inline int64_t task_grain(int64_t elements_per_task) {
  constexpr int64_t kMinElementsPerThread = 1 << 16;
  return std::max<int64_t>(1, kMinElementsPerThread / std::max<int64_t>(1, elements_per_task));
}

// Calls f(r0, j_lo, j_hi, u) for each chunk of row b inside task t: u[j] = U(seed, b * R + r0 + j),
// and only j in [j_lo, j_hi) lie inside the row (r0 may be negative at the row start).
template <typename F>
void for_each_chunk(int64_t b, int64_t t, int64_t R, uint64_t seed, F&& f) {
  const int64_t row_start = b * R;
  const int64_t first_counter = (row_start >> 2) + t * (kTaskSpan / 4);
  float u[kChunk];
  for (int64_t k = 0; k < kChunksPerTask; ++k) {
    const int64_t counter0 = first_counter + k * kBatchCounters;
    const int64_t r0 = 4 * counter0 - row_start;
    const int64_t j_lo = std::max<int64_t>(0, -r0);
    const int64_t j_hi = std::min<int64_t>(kChunk, R - r0);
    if (j_hi <= j_lo) {
      if (r0 >= R) return;
      continue;
    }
    philox_uniform_batch(static_cast<uint64_t>(counter0), seed, u);
    f(r0, j_lo, j_hi, static_cast<const float*>(u));
  }
}

}  // namespace diffkernels
