// Counter-based RNG shared by every C++/CUDA kernel of diffkernels.
//
// U(seed, i) = word (i % 4) of Philox4x32-10(counter = (c lo, c hi, 0, 0), key = (seed lo, seed hi)),
// c = i / 4, converted exactly like Triton's uint_to_uniform_float. This is bit-identical to
// word i % 4 of Triton's tl.rand4x(seed, i // 4) and to diffkernels.rng.uniform.
#pragma once

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

// LANES consecutive counters at once, held in plain arrays so that the compiler vectorises the
// rounds (a scalar loop is bound by the 32x32->64 multiplies). out[4 * j + w] = U(seed, 4 * (counter0 + j) + w).
template <int LANES>
inline void philox_uniform_batch(uint64_t counter0, uint64_t seed, float* out) {
  uint32_t c0[LANES], c1[LANES], c2[LANES], c3[LANES];
  for (int j = 0; j < LANES; ++j) {
    const uint64_t c = counter0 + static_cast<uint64_t>(j);
    c0[j] = static_cast<uint32_t>(c);
    c1[j] = static_cast<uint32_t>(c >> 32);
    c2[j] = 0;
    c3[j] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
#pragma GCC ivdep
    for (int j = 0; j < LANES; ++j) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0[j];
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2[j];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[j] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[j] ^ k1;
      c1[j] = static_cast<uint32_t>(p1);
      c3[j] = static_cast<uint32_t>(p0);
      c0[j] = n0;
      c2[j] = n2;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int j = 0; j < LANES; ++j) {
    out[4 * j + 0] = uniform_from_word(c0[j]);
    out[4 * j + 1] = uniform_from_word(c1[j]);
    out[4 * j + 2] = uniform_from_word(c2[j]);
    out[4 * j + 3] = uniform_from_word(c3[j]);
  }
}

}  // namespace diffkernels
