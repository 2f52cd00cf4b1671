// CPU kernel of mask_tokens for masked diffusion LMs (docs/METHODS.md section 2).
//
// One uniform per token, u = U(seed, b * L + l). Copy 1 masks an eligible token iff u < p_tok,
// copy 2 (mirror mode) iff u > 1 - p_tok, with p_tok = q for ISAD ("rare") tokens. Every
// per-row number (thresholds and loss weights) is precomputed on the host side in a (B, 8) float
// table, so the kernels only compare and select, and all backends agree bit for bit:
//   [p, 1 - p (2 disables copy 2), q, 1 - q, w_single(p), w_both(p), w_single(q), w_both(q)]
// A token masked in exactly one copy gets w_single, one masked in both copies w_both.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "row_tiles.h"

namespace diffkernels {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> mask_tokens(const at::Tensor& ids, const at::Tensor& table,
                                                           int64_t seed, int64_t mask_id,
                                                           const std::optional<at::Tensor>& eligible,
                                                           const std::optional<at::Tensor>& rare, bool mirror) {
  TORCH_CHECK(ids.device().is_cpu() && ids.dim() == 2 && ids.is_contiguous(), "ids must be a contiguous (B, L) CPU tensor");
  const int64_t B = ids.size(0), L = ids.size(1), copies = mirror ? 2 : 1;
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.numel() == 8 * B, "bad row table");
  for (const auto* flag : {&eligible, &rare}) {
    if (flag->has_value())
      TORCH_CHECK((*flag)->scalar_type() == at::kBool && (*flag)->is_contiguous() && (*flag)->sizes() == ids.sizes(),
                  "token flags must be contiguous bool tensors shaped like ids");
  }
  auto noisy = at::empty({copies, B, L}, ids.options());
  auto masked = at::empty({copies, B, L}, ids.options().dtype(at::kBool));
  auto weight = at::empty({copies, B, L}, ids.options().dtype(at::kFloat));
  const float* tab = table.data_ptr<float>();
  const bool* elig = eligible.has_value() ? eligible->data_ptr<bool>() : nullptr;
  const bool* rar = rare.has_value() ? rare->data_ptr<bool>() : nullptr;
  bool* m_out = masked.data_ptr<bool>();
  float* w_out = weight.data_ptr<float>();
  const int64_t plane = B * L;  // offset of copy 2
  const int64_t T = tasks_per_row(L);

  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "mask_tokens", [&] {
    const index_t* in = ids.data_ptr<index_t>();
    index_t* out = noisy.data_ptr<index_t>();
    const index_t mask_value = static_cast<index_t>(mask_id);
    at::parallel_for(0, B * T, task_grain(kTaskSpan), [&](int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / T;
        const float* row = tab + 8 * b;
        for_each_chunk(b, task % T, L, static_cast<uint64_t>(seed),
                       [&](int64_t r0, int64_t j_lo, int64_t j_hi, const float* u) {
                         const int64_t base = b * L + r0;
                         for (int64_t j = j_lo; j < j_hi; ++j) {
                           const int64_t i = base + j;
                           const int k = (rar != nullptr && rar[i]) ? 2 : 0;
                           const bool e = elig == nullptr || elig[i];
                           const bool m1 = e && u[j] < row[k];
                           const bool m2 = mirror && e && u[j] > row[k + 1];
                           const float w = (m1 && m2) ? row[5 + k] : row[4 + k];
                           m_out[i] = m1;
                           w_out[i] = m1 ? w : 0.0f;
                           out[i] = m1 ? mask_value : in[i];
                           if (mirror) {
                             m_out[plane + i] = m2;
                             w_out[plane + i] = m2 ? w : 0.0f;
                             out[plane + i] = m2 ? mask_value : in[i];
                           }
                         }
                       });
      }
    });
  });
  return std::make_tuple(noisy, masked, weight);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffkernels_native, m) {
  m.def(
      "mask_tokens(Tensor ids, Tensor table, int seed, int mask_id, Tensor? eligible, Tensor? rare, bool mirror)"
      " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(diffkernels_native, CPU, m) { m.impl("mask_tokens", &mask_tokens); }

}  // namespace diffkernels
