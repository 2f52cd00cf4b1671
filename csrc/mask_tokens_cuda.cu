// CUDA kernel of mask_tokens for masked diffusion LMs (docs/METHODS.md section 2).
//
// Same semantics and bit-identical outputs as csrc/mask_tokens.cpp (see its header for the (B, 8)
// row table) and diffkernels/triton/mask_tokens.py. One uniform per token u = U(seed, b * L + l),
// tiled as in cuda_common.cuh with units of 8 tokens (two Philox counters): a unit wholly inside a
// row is read and written with vector accesses (ids 64 or 32 bytes, flags and mask 8 bytes,
// weights 32 bytes); row edges and unaligned inputs go element by element.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda_common.cuh"

namespace diffkernels {
namespace cuda {
namespace {

constexpr int kTokU = 2;  // Philox counters per unit: 8 tokens
constexpr int kMaxItersTokens = 4;

struct RowTable {
  float t1, t2, w_single, w_both;  // copy-1 threshold, copy-2 threshold, weights (masked once / twice)
};

// One copy's outputs for the unit of tokens i0 .. i0 + N - 1 (row positions r0 ..), masked where
// bit j of `bits` is set: vector stores for a whole aligned unit, else token by token in the row.
template <typename index_t, int N>
__device__ __forceinline__ void write_copy(index_t* __restrict__ noisy, bool* __restrict__ masked,
                                           float* __restrict__ weight, int64_t i0, int64_t r0, int64_t L,
                                           uint32_t bits, const float (&w)[N], const index_t (&in)[N],
                                           index_t mask_id, bool vec) {
  bool m[N];
  float wt[N];
  index_t out[N];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    m[j] = (bits >> j) & 1u;
    wt[j] = m[j] ? w[j] : 0.0f;
    out[j] = m[j] ? mask_id : in[j];
  }
  if (vec) {
    store_vec(masked + i0, m);
    store_vec(weight + i0, wt);
    store_vec(noisy + i0, out);
    return;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (r0 + j < 0 || r0 + j >= L) continue;
    masked[i0 + j] = m[j];
    weight[i0 + j] = wt[j];
    noisy[i0 + j] = out[j];
  }
}

template <typename index_t, bool MIRROR>
__global__ void __launch_bounds__(kThreads, 4)  // <= 64 registers: 4 blocks per SM
    mask_tokens_kernel(const index_t* __restrict__ ids, const float* __restrict__ table,
                       const uint8_t* __restrict__ eligible, const uint8_t* __restrict__ rare,
                       index_t* __restrict__ noisy, bool* __restrict__ masked, float* __restrict__ weight, int64_t L,
                       int64_t T, int iters, int64_t plane, uint64_t seed, index_t mask_id, bool aligned,
                       bool aligned2) {
  constexpr int kUnit = 4 * kTokU;
  const int64_t pid = blockIdx.x;
  const int64_t b = pid / T;
  const int64_t row_start = b * L;
  const int64_t first = (row_start / kUnit) * kUnit + (pid - b * T) * (static_cast<int64_t>(kUnit) * kThreads * iters);
  const float* row = table + 8 * b;
  const RowTable plain{__ldg(row + 0), __ldg(row + 1), __ldg(row + 4), __ldg(row + 5)};
  const RowTable isad{__ldg(row + 2), __ldg(row + 3), __ldg(row + 6), __ldg(row + 7)};

  for (int it = 0; it < iters; ++it) {
    const int64_t i0 = first + (static_cast<int64_t>(it) * kThreads + threadIdx.x) * kUnit;  // token = stream index
    const int64_t r0 = i0 - row_start;
    if (r0 >= L) break;
    if (r0 + kUnit <= 0) continue;
    float u[kUnit];
#pragma unroll
    for (int k = 0; k < kTokU; ++k) uniform4(static_cast<uint64_t>(i0 >> 2) + k, seed, u + 4 * k);
    const bool vec = aligned && r0 >= 0 && r0 + kUnit <= L;  // i0 is a multiple of kUnit by construction

    index_t in[kUnit];
    uint8_t elig[kUnit], rar[kUnit];
    if (vec) {
      load_vec(ids + i0, in);
      if (eligible != nullptr) load_vec(eligible + i0, elig);
      if (rare != nullptr) load_vec(rare + i0, rar);
    } else {
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        const bool inside = r0 + j >= 0 && r0 + j < L;
        in[j] = inside ? load_ro(ids + i0 + j) : index_t(0);
        elig[j] = (inside && eligible != nullptr) ? load_ro(eligible + i0 + j) : uint8_t(0);
        rar[j] = (inside && rare != nullptr) ? load_ro(rare + i0 + j) : uint8_t(0);
      }
    }
    // Masks as bits and the shared weight (masked in one copy: w_single, in both: w_both); each copy
    // is then written from these, one after the other (fewer live registers than both at once).
    uint32_t bits1 = 0, bits2 = 0;
    float w[kUnit];
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      const bool is_rare = rare != nullptr && rar[j] != 0;
      const float t1 = is_rare ? isad.t1 : plain.t1, t2 = is_rare ? isad.t2 : plain.t2;
      const float w_single = is_rare ? isad.w_single : plain.w_single;
      const float w_both = is_rare ? isad.w_both : plain.w_both;
      const bool e = eligible == nullptr || elig[j] != 0;
      const bool m1 = e && u[j] < t1;
      const bool m2 = MIRROR && e && u[j] > t2;
      w[j] = (m1 && m2) ? w_both : w_single;
      bits1 |= static_cast<uint32_t>(m1) << j;
      bits2 |= static_cast<uint32_t>(m2) << j;
    }
    write_copy<index_t, kUnit>(noisy, masked, weight, i0, r0, L, bits1, w, in, mask_id, vec);
    if (MIRROR) write_copy<index_t, kUnit>(noisy + plane, masked + plane, weight + plane, i0, r0, L, bits2, w, in,
                                           mask_id, vec && aligned2);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_tokens_cuda(const at::Tensor& ids, const at::Tensor& table,
                                                                int64_t seed, int64_t mask_id,
                                                                const std::optional<at::Tensor>& eligible,
                                                                const std::optional<at::Tensor>& rare, bool mirror) {
  TORCH_CHECK(ids.is_cuda() && ids.dim() == 2 && ids.is_contiguous(), "ids must be a contiguous (B, L) CUDA tensor");
  const int64_t B = ids.size(0), L = ids.size(1), copies = mirror ? 2 : 1;
  TORCH_CHECK(table.device() == ids.device() && table.scalar_type() == at::kFloat && table.is_contiguous() &&
                  table.numel() == 8 * B,
              "bad row table: need a contiguous (B, 8) float32 tensor on ids' device");
  for (const auto* flag : {&eligible, &rare}) {
    if (flag->has_value())
      TORCH_CHECK((*flag)->device() == ids.device() && (*flag)->scalar_type() == at::kBool &&
                      (*flag)->is_contiguous() && (*flag)->sizes() == ids.sizes(),
                  "token flags must be contiguous bool tensors shaped like ids, on ids' device");
  }
  c10::cuda::CUDAGuard guard(ids.device());
  auto noisy = at::empty({copies, B, L}, ids.options());
  auto masked = at::empty({copies, B, L}, ids.options().dtype(at::kBool));
  auto weight = at::empty({copies, B, L}, ids.options().dtype(at::kFloat));
  if (B == 0 || L == 0) return std::make_tuple(noisy, masked, weight);
  constexpr int kUnit = 4 * kTokU;
  const TilePlan plan = plan_tiles(B, L, kUnit, kMaxItersTokens);
  check_grid(B * plan.T);
  const uint8_t* elig = eligible.has_value() ? reinterpret_cast<const uint8_t*>(eligible->data_ptr<bool>()) : nullptr;
  const uint8_t* rar = rare.has_value() ? reinterpret_cast<const uint8_t*>(rare->data_ptr<bool>()) : nullptr;
  const int64_t plane = B * L;  // offset of copy 2
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "mask_tokens_cuda", [&] {
    const index_t* in = ids.data_ptr<index_t>();
    index_t* out = noisy.data_ptr<index_t>();
    bool* m = masked.data_ptr<bool>();
    float* w = weight.data_ptr<float>();
    const bool aligned = aligned16(in) && aligned16(elig) && aligned16(rar) && aligned16(out) && aligned16(m) &&
                         aligned16(w);
    const bool aligned2 = plane % kUnit == 0;
    const index_t mask_value = static_cast<index_t>(mask_id);
    const float* tab = table.data_ptr<float>();
    const unsigned int blocks = static_cast<unsigned int>(B * plan.T);
    if (mirror) {
      mask_tokens_kernel<index_t, true><<<blocks, kThreads, 0, stream>>>(
          in, tab, elig, rar, out, m, w, L, plan.T, plan.iters, plane, static_cast<uint64_t>(seed), mask_value,
          aligned, aligned2);
    } else {
      mask_tokens_kernel<index_t, false><<<blocks, kThreads, 0, stream>>>(
          in, tab, elig, rar, out, m, w, L, plan.T, plan.iters, plane, static_cast<uint64_t>(seed), mask_value,
          aligned, aligned2);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return std::make_tuple(noisy, masked, weight);
}

}  // namespace
}  // namespace cuda

// mask_tokens is defined in mask_tokens.cpp (TORCH_LIBRARY_FRAGMENT); this adds its CUDA kernel.
TORCH_LIBRARY_IMPL(diffkernels_native, CUDA, m) { m.impl("mask_tokens", &cuda::mask_tokens_cuda); }

}  // namespace diffkernels
