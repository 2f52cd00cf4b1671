// Counter-based RNG shared by every C++/CUDA kernel of diffkernels.
//
// U(seed, i) = word (i % 4) of Philox4x32-10(counter = (c lo, c hi, 0, 0), key = (seed lo, seed hi)),
// c = i / 4, converted exactly like Triton's uint_to_uniform_float. This is bit-identical to
// word i % 4 of Triton's tl.rand4x(seed, i // 4) and to diffkernels.rng.uniform.
#pragma once

#include <climits>
#include <cstdint>

#if defined(__CUDACC__)
#define DK_INLINE __host__ __device__ __forceinline__
#else
#define DK_INLINE inline
#endif

namespace diffkernels {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
// 4.6566127342e-10 rounded to float: the largest scale with INT32_MAX * scale < 1.
constexpr float kUniformScale = 0x1.fffffep-32f;

DK_INLINE void philox4x32_10(uint64_t counter, uint64_t seed, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

DK_INLINE float uniform_from_word(uint32_t word) {
  const int32_t s = static_cast<int32_t>(word);
  const int32_t folded = s < 0 ? ~s : s;  // Triton: where(x < 0, ~x, x)
  return static_cast<float>(folded) * kUniformScale;
}

DK_INLINE float philox_uniform(uint64_t seed, uint64_t index) {
  uint32_t w[4];
  philox4x32_10(index >> 2, seed, w);
  return uniform_from_word(w[index & 3]);
}

// ---- CPU batch generation -------------------------------------------------------------------
// kBatchCounters consecutive counters at once: out[4 * j + w] = U(seed, 4 * (counter0 + j) + w).
// A single Philox chain is latency bound (dependent 32x32->64 multiplies), so the AVX2 path runs
// four independent 8-lane chains; compilers do not vectorise the widening multiplies by themselves.
#if !defined(__CUDACC__)
constexpr int kBatchCounters = 32;

inline void philox_uniform_batch_scalar(uint64_t counter0, uint64_t seed, float* out) {
  uint32_t w[4];
  for (int j = 0; j < kBatchCounters; ++j) {
    philox4x32_10(counter0 + static_cast<uint64_t>(j), seed, w);
    for (int k = 0; k < 4; ++k) out[4 * j + k] = uniform_from_word(w[k]);
  }
}
}  // namespace diffkernels

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

namespace diffkernels {
namespace avx2 {

__attribute__((target("avx2"))) inline void mulhilo(__m256i m, __m256i x, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, m);                        // 64-bit products of lanes 0,2,4,6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);  // lanes 1,3,5,7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) inline __m256 to_uniform(__m256i x) {
  const __m256i folded = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));  // x < 0 ? ~x : x
  return _mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(kUniformScale));
}

__attribute__((target("avx2"))) inline void philox_uniform_batch(uint64_t counter0, uint64_t seed, float* out) {
  constexpr int V = kBatchCounters / 8;
  __m256i c0[V], c1[V], c2[V], c3[V];
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int v = 0; v < V; ++v) {
    // 64-bit counters: carry into the high word where the low word wraps.
    const uint64_t base = counter0 + 8 * static_cast<uint64_t>(v);
    const __m256i lo = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base))), lane);
    const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base))), _mm256_set1_epi32(INT32_MIN)),
                                               _mm256_xor_si256(lo, _mm256_set1_epi32(INT32_MIN)));
    c0[v] = lo;
    c1[v] = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32))), wrapped);
    c2[v] = _mm256_setzero_si256();
    c3[v] = _mm256_setzero_si256();
  }
  __m256i k0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed)));
  __m256i k1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed >> 32)));
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0)), m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i w0 = _mm256_set1_epi32(static_cast<int>(kPhiloxW0)), w1 = _mm256_set1_epi32(static_cast<int>(kPhiloxW1));
  for (int r = 0; r < kPhiloxRounds; ++r) {
    for (int v = 0; v < V; ++v) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo(m0, c0[v], hi0, lo0);
      mulhilo(m1, c2[v], hi1, lo1);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), k0);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), k1);
      c1[v] = lo1;
      c3[v] = lo0;
    }
    k0 = _mm256_add_epi32(k0, w0);
    k1 = _mm256_add_epi32(k1, w1);
  }
  for (int v = 0; v < V; ++v) {
    // 4x8 transpose: rows are words 0..3 of counters 0..7, output is counter-major.
    const __m256 r0 = to_uniform(c0[v]), r1 = to_uniform(c1[v]), r2 = to_uniform(c2[v]), r3 = to_uniform(c3[v]);
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    const __m256 a = _mm256_shuffle_ps(t0, t2, 0x44), b = _mm256_shuffle_ps(t0, t2, 0xEE);  // counters 0|4, 1|5
    const __m256 c = _mm256_shuffle_ps(t1, t3, 0x44), d = _mm256_shuffle_ps(t1, t3, 0xEE);  // counters 2|6, 3|7
    float* o = out + 32 * v;
    _mm256_storeu_ps(o + 0, _mm256_permute2f128_ps(a, b, 0x20));
    _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(c, d, 0x20));
    _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(a, b, 0x31));
    _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(c, d, 0x31));
  }
}

}  // namespace avx2
}  // namespace diffkernels
#endif

namespace diffkernels {
inline void philox_uniform_batch(uint64_t counter0, uint64_t seed, float* out) {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if (has_avx2) return avx2::philox_uniform_batch(counter0, seed, out);
#endif
  philox_uniform_batch_scalar(counter0, seed, out);
}
#endif  // !__CUDACC__

}  // namespace diffkernels
