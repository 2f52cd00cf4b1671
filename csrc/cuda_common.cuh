// Shared pieces of the CUDA kernels of diffkernels: row tiling of the counter-RNG stream,
// 16-byte vector loads/stores, deterministic block reductions, launch helpers.
//
// Tiling (same idea as csrc/row_tiles.h and the Triton row_tile): a tensor is viewed as rows of R
// draws, draw (b, r) at stream index m = b * R + r. A *unit* is kUnit = 4 * U consecutive stream
// indices starting at a multiple of kUnit, i.e. U whole Philox counters (one Philox4x32 call gives
// the 4 uniforms of a counter). A block handles one tile of one row: `iters` x kThreads units
// starting at the unit that holds the row's first draw; thread `tid` takes units
// it * kThreads + tid (adjacent threads, adjacent units: coalesced). Every counter of a row is
// evaluated once, and units that lie wholly inside a row and start on an aligned element offset
// use 16-byte vector memory accesses.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <numeric>

#include "philox.h"

namespace diffkernels {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ---- host side: tile geometry -------------------------------------------------------------

// Tiles per row so that every row is covered whatever its start offset inside a unit: row b
// starts (b * R) mod unit draws into its first unit, a multiple of gcd(R, unit) below unit.
inline int64_t tiles_per_row(int64_t R, int64_t unit, int64_t tile) {
  if (R <= 0) return 1;  // one (empty) tile per row, so per-row outputs still get written
  const int64_t g = std::gcd(R, unit);
  return (R + unit - g + tile - 1) / tile;
}

inline int sm_count() {
  static std::atomic<int> cache[64];
  const int dev = c10::cuda::current_device();
  if (dev < 0 || dev >= 64) return 132;
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

struct TilePlan {
  int iters;  // units per thread
  int64_t T;  // tiles (blocks) per row
};

// Largest tile (up to max_iters units per thread) that still gives at least two blocks per SM:
// big tiles for big inputs (fewer partial sums), small ones so small inputs fill the GPU.
inline TilePlan plan_tiles(int64_t B, int64_t R, int64_t unit, int max_iters) {
  const int64_t min_blocks = 2 * static_cast<int64_t>(sm_count());
  int iters = max_iters;
  int64_t T = tiles_per_row(R, unit, unit * kThreads * iters);
  while (iters > 1 && B * T < min_blocks) {
    iters /= 2;
    T = tiles_per_row(R, unit, unit * kThreads * iters);
  }
  return {iters, T};
}

inline void check_grid(int64_t blocks) {
  TORCH_CHECK(blocks <= 0x7fffffff, "input too large for one launch (", blocks, " blocks)");
}

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---- device side ----------------------------------------------------------------------------

// The four uniforms of Philox counter `counter`: u[w] = U(seed, 4 * counter + w).
__device__ __forceinline__ void uniform4(uint64_t counter, uint64_t seed, float* u) {
  uint32_t w[4];
  philox4x32_10(counter, seed, w);
#pragma unroll
  for (int k = 0; k < 4; ++k) u[k] = uniform_from_word(w[k]);
}

template <int BYTES>
struct Word;
template <>
struct Word<16> {
  using type = uint4;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<4> {
  using type = unsigned int;
};
template <>
struct Word<2> {
  using type = unsigned short;
};
template <>
struct Word<1> {
  using type = unsigned char;
};

// N consecutive elements in 16-byte (or smaller, for short vectors) words. `src`/`dst` must be
// aligned to min(16, N * sizeof(T)) bytes. The word accesses are intrinsics (inline PTX), so they
// stay vector instructions whatever the optimiser does to the surrounding code. Loads of data the
// kernel never writes go through the read-only path (__ldg); READ_ONLY = false (in-place updates)
// loads with __ldcg instead.
template <bool READ_ONLY = true, typename T, int N>
__device__ __forceinline__ void load_vec(const T* src, T (&dst)[N]) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  constexpr int kWord = kBytes >= 16 ? 16 : kBytes;
  static_assert(kBytes % kWord == 0, "vector size");
  using W = typename Word<kWord>::type;
#pragma unroll
  for (int k = 0; k < kBytes / kWord; ++k) {
    const W* p = reinterpret_cast<const W*>(src) + k;
    const W w = READ_ONLY ? __ldg(p) : __ldcg(p);
    memcpy(reinterpret_cast<char*>(dst) + k * kWord, &w, kWord);
  }
}

// One element of data the kernel never writes, through the read-only path (any 1-8 byte type).
template <typename T>
__device__ __forceinline__ T load_ro(const T* src) {
  using W = typename Word<sizeof(T)>::type;
  const W w = __ldg(reinterpret_cast<const W*>(src));
  T v;
  memcpy(&v, &w, sizeof(T));
  return v;
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* dst, const T (&src)[N]) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  constexpr int kWord = kBytes >= 16 ? 16 : kBytes;
  static_assert(kBytes % kWord == 0, "vector size");
  using W = typename Word<kWord>::type;
#pragma unroll
  for (int k = 0; k < kBytes / kWord; ++k) {
    W w;
    memcpy(&w, reinterpret_cast<const char*>(src) + k * kWord, kWord);
    __stwb(reinterpret_cast<W*>(dst) + k, w);
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block in a fixed order (butterfly within warps, then warp 0 over the warp sums):
// the result depends only on the inputs, never on timing. Valid in thread 0. `smem` holds kWarps
// values and must not be reused by another reduction without a __syncthreads in between.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T total = T(0);
  if (warp == 0) {
    total = lane < kWarps ? smem[lane] : T(0);
    total = warp_sum(total);
  }
  return total;
}

}  // namespace cuda
}  // namespace diffkernels
