// CUDA kernels of the sparse-supervision loss (docs/METHODS.md section 1) and the RNG test hook.
//
// Same primitives, same masks bit for bit, as csrc/sparse_mse.cpp (CPU) and
// diffkernels/triton/sparse_mse.py: the input is viewed as (B, C, R) with one keep draw per (b, r)
// at stream index b * R + r, tiled as described in cuda_common.cuh.
//
// sparse_mse_fwd is one launch: every block reduces its tile to one partial (float math per
// 4U-element vector, double across vectors and threads, fixed-order tree in the block); when a row
// spans several tiles, the last block of the row to finish (an atomic ticket per row) adds the
// row's partials in tile order. No float atomics: results are bit-reproducible run to run.
// Masked-out elements are never loaded: a vector whose draws are all kept is read with 16-byte
// loads, one with some kept draws element by element (kept elements only), one with none not at
// all (at 98% masking most sectors are never touched).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "cuda_common.cuh"

namespace diffkernels {
namespace cuda {
namespace {

constexpr int kMaxItersLoss = 8;
constexpr int kMaxItersMask = 4;
constexpr int kMaxItersScale = 8;

template <typename scalar_t>
constexpr int loss_counters_per_unit() {
  return sizeof(scalar_t) == 2 ? 2 : 1;  // 8 half/bfloat16 or 4 float/double elements per unit
}

// ---- sparse_mse_fwd -------------------------------------------------------------------------

template <typename scalar_t, typename acc_t, int U, bool WANT_GRAD>
__global__ void __launch_bounds__(kThreads)
    sparse_mse_fwd_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                          scalar_t* __restrict__ grad, const acc_t* __restrict__ grad_scale,
                          double* __restrict__ sq_out, int64_t* __restrict__ kept_out, double* __restrict__ part_sq,
                          int* __restrict__ part_kept, unsigned int* __restrict__ row_done, int64_t R, int64_t C,
                          int64_t T, int iters, uint64_t seed, float eta, bool aligned) {
  constexpr int kUnit = 4 * U;
  const int64_t pid = blockIdx.x;
  const int64_t b = pid / T;
  const int64_t row_start = b * R;
  const int64_t first = (row_start / kUnit) * kUnit + (pid - b * T) * (static_cast<int64_t>(kUnit) * kThreads * iters);
  const acc_t scale = WANT_GRAD ? grad_scale[b] : acc_t(0);

  double sum = 0.0;
  int kept = 0;
  for (int it = 0; it < iters; ++it) {
    const int64_t m0 = first + (static_cast<int64_t>(it) * kThreads + threadIdx.x) * kUnit;  // stream index
    const int64_t r0 = m0 - row_start;
    if (r0 >= R) break;
    if (r0 + kUnit <= 0) continue;
    float u[kUnit];
#pragma unroll
    for (int k = 0; k < U; ++k) uniform4(static_cast<uint64_t>(m0 >> 2) + k, seed, u + 4 * k);
    bool keep[kUnit];
    bool all_kept = true, any_kept = false;
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      const bool inside = r0 + j >= 0 && r0 + j < R;
      keep[j] = inside && u[j] >= eta;
      kept += keep[j];
      all_kept &= keep[j];
      any_kept |= keep[j];
    }
    const bool full = r0 >= 0 && r0 + kUnit <= R;
    if (!WANT_GRAD && !any_kept) continue;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t e0 = (b * C + c) * R + r0;  // element offset of draw r0 in channel c
      const bool vec = full && aligned && e0 % kUnit == 0;
      acc_t d[kUnit];
      if (all_kept && vec) {
        scalar_t p[kUnit], q[kUnit];
        load_vec(pred + e0, p);
        load_vec(target + e0, q);
#pragma unroll
        for (int j = 0; j < kUnit; ++j) d[j] = static_cast<acc_t>(p[j]) - static_cast<acc_t>(q[j]);
      } else {
#pragma unroll
        for (int j = 0; j < kUnit; ++j) {
          d[j] = acc_t(0);
          if (keep[j]) d[j] = static_cast<acc_t>(load_ro(pred + e0 + j)) - static_cast<acc_t>(load_ro(target + e0 + j));
        }
      }
      acc_t part = acc_t(0);
#pragma unroll
      for (int j = 0; j < kUnit; ++j) part += keep[j] ? d[j] * d[j] : acc_t(0);
      sum += static_cast<double>(part);
      if constexpr (WANT_GRAD) {
        scalar_t g[kUnit];
#pragma unroll
        for (int j = 0; j < kUnit; ++j) g[j] = static_cast<scalar_t>(keep[j] ? scale * d[j] : acc_t(0));
        if (vec) {
          store_vec(grad + e0, g);
        } else {
#pragma unroll
          for (int j = 0; j < kUnit; ++j)
            if (r0 + j >= 0 && r0 + j < R) grad[e0 + j] = g[j];
        }
      }
    }
  }

  __shared__ double s_sum[kWarps], s_sum2[kWarps];
  __shared__ int s_kept[kWarps];
  __shared__ long long s_kept2[kWarps];
  __shared__ bool s_last;
  const double block_sq = block_sum(sum, s_sum);
  const int block_kept = block_sum(kept, s_kept);
  if (T == 1) {
    if (threadIdx.x == 0) {
      sq_out[b] = block_sq;
      kept_out[b] = static_cast<int64_t>(block_kept) * C;
    }
    return;
  }
  // Last-block-done: publish this tile's partial, take a ticket; the row's last block sums them.
  if (threadIdx.x == 0) {
    part_sq[pid] = block_sq;
    part_kept[pid] = block_kept;
    __threadfence();
    s_last = atomicAdd(row_done + b, 1u) == static_cast<unsigned int>(T - 1);
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  double row_sq = 0.0;
  long long row_kept = 0;
  for (int64_t i = threadIdx.x; i < T; i += kThreads) {  // fixed order: tile i, i + kThreads, ...
    row_sq += __ldcg(part_sq + b * T + i);
    row_kept += __ldcg(part_kept + b * T + i);
  }
  row_sq = block_sum(row_sq, s_sum2);
  row_kept = block_sum(row_kept, s_kept2);
  if (threadIdx.x == 0) {
    sq_out[b] = row_sq;
    kept_out[b] = static_cast<int64_t>(row_kept) * C;
  }
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "diffkernels CUDA kernels take CUDA tensors; ", name, " is on ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.is_contiguous(), "diffkernels CUDA kernels take contiguous tensors; ", name, " is not");
}

template <typename acc_t>
at::ScalarType acc_scalar_type() {
  return std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_mse_fwd_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                                   double mask_ratio, int64_t seed, int64_t channels,
                                                                   const std::optional<at::Tensor>& grad_scale) {
  check_cuda(pred, "pred", pred);
  check_cuda(target, "target", pred);
  TORCH_CHECK(pred.sizes() == target.sizes() && pred.scalar_type() == target.scalar_type(),
              "pred and target must have the same shape and dtype");
  TORCH_CHECK(pred.dim() >= 1, "pred must have a batch dimension");
  c10::cuda::CUDAGuard guard(pred.device());
  const int64_t B = pred.size(0);
  const int64_t n = B ? pred.numel() / B : 0;
  TORCH_CHECK(channels >= 1 && n % channels == 0, "channels must divide the per-sample size");
  const int64_t C = channels, R = n / C;
  const bool want_grad = grad_scale.has_value();
  if (want_grad) {
    TORCH_CHECK(grad_scale->device() == pred.device(), "grad_scale must be on pred's device");
    TORCH_CHECK(grad_scale->numel() == B, "grad_scale must have one entry per sample");
  }
  auto sq_sum = at::empty({B}, pred.options().dtype(at::kDouble));
  auto kept = at::empty({B}, pred.options().dtype(at::kLong));
  auto grad = want_grad ? at::empty_like(pred) : at::empty({0}, pred.options());
  if (B == 0) return std::make_tuple(sq_sum, kept, grad);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "sparse_mse_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int U = loss_counters_per_unit<scalar_t>();
    const TilePlan plan = plan_tiles(B, R, 4 * U, kMaxItersLoss);
    const int64_t T = plan.T;
    check_grid(B * T);
    at::Tensor gs;
    const acc_t* gs_ptr = nullptr;
    if (want_grad) {
      gs = grad_scale->to(acc_scalar_type<acc_t>()).contiguous();
      gs_ptr = gs.data_ptr<acc_t>();
    }
    // Workspace for rows that span several tiles: partial sums, counts, one ticket per row.
    at::Tensor work;
    double* part_sq = nullptr;
    int* part_kept = nullptr;
    unsigned int* row_done = nullptr;
    if (T > 1) {
      const int64_t parts = B * T;
      work = at::empty({parts * 8 + parts * 4 + B * 4}, pred.options().dtype(at::kByte));
      char* base = static_cast<char*>(work.data_ptr());
      part_sq = reinterpret_cast<double*>(base);
      part_kept = reinterpret_cast<int*>(base + parts * 8);
      row_done = reinterpret_cast<unsigned int*>(base + parts * 12);
      C10_CUDA_CHECK(cudaMemsetAsync(row_done, 0, B * sizeof(unsigned int), stream));
    }
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* q = target.data_ptr<scalar_t>();
    scalar_t* g = want_grad ? grad.data_ptr<scalar_t>() : nullptr;
    const bool aligned = aligned16(p) && aligned16(q) && aligned16(g);
    const float eta = static_cast<float>(mask_ratio);
    const uint64_t s = static_cast<uint64_t>(seed);
    if (want_grad) {
      sparse_mse_fwd_kernel<scalar_t, acc_t, U, true><<<static_cast<unsigned int>(B * T), kThreads, 0, stream>>>(
          p, q, g, gs_ptr, sq_sum.data_ptr<double>(), kept.data_ptr<int64_t>(), part_sq, part_kept, row_done, R, C, T,
          plan.iters, s, eta, aligned);
    } else {
      sparse_mse_fwd_kernel<scalar_t, acc_t, U, false><<<static_cast<unsigned int>(B * T), kThreads, 0, stream>>>(
          p, q, g, gs_ptr, sq_sum.data_ptr<double>(), kept.data_ptr<int64_t>(), part_sq, part_kept, row_done, R, C, T,
          plan.iters, s, eta, aligned);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return std::make_tuple(sq_sum, kept, grad);
}

// ---- sparse_mask ----------------------------------------------------------------------------

constexpr int kMaskU = 4;  // 16 draws per unit: 16-byte stores of the bool mask

__global__ void __launch_bounds__(kThreads)
    sparse_mask_kernel(bool* __restrict__ out, int64_t R, int64_t C, int64_t T, int iters, uint64_t seed, float eta,
                       bool aligned) {
  constexpr int kUnit = 4 * kMaskU;
  const int64_t pid = blockIdx.x;
  const int64_t b = pid / T;
  const int64_t row_start = b * R;
  const int64_t first = (row_start / kUnit) * kUnit + (pid - b * T) * (static_cast<int64_t>(kUnit) * kThreads * iters);
  for (int it = 0; it < iters; ++it) {
    const int64_t m0 = first + (static_cast<int64_t>(it) * kThreads + threadIdx.x) * kUnit;
    const int64_t r0 = m0 - row_start;
    if (r0 >= R) break;
    if (r0 + kUnit <= 0) continue;
    float u[kUnit];
#pragma unroll
    for (int k = 0; k < kMaskU; ++k) uniform4(static_cast<uint64_t>(m0 >> 2) + k, seed, u + 4 * k);
    bool keep[kUnit];
#pragma unroll
    for (int j = 0; j < kUnit; ++j) keep[j] = u[j] >= eta;
    const bool full = r0 >= 0 && r0 + kUnit <= R;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t e0 = (b * C + c) * R + r0;
      if (full && aligned && e0 % kUnit == 0) {
        store_vec(out + e0, keep);
      } else {
#pragma unroll
        for (int j = 0; j < kUnit; ++j)
          if (r0 + j >= 0 && r0 + j < R) out[e0 + j] = keep[j];
      }
    }
  }
}

// Keep-mask of shape (B, C, R) on a CUDA device (the CPU op sparse_mask has no tensor argument to
// dispatch on, so the device is an argument here).
at::Tensor sparse_mask_cuda(int64_t seed, int64_t B, int64_t C, int64_t R, double mask_ratio, c10::Device device) {
  TORCH_CHECK(device.is_cuda(), "sparse_mask_cuda needs a CUDA device, got ", device);
  TORCH_CHECK(B >= 0 && C >= 1 && R >= 0, "invalid mask shape");
  if (!device.has_index()) device = c10::Device(c10::kCUDA, c10::cuda::current_device());
  c10::cuda::CUDAGuard guard(device);
  auto out = at::empty({B, C, R}, at::TensorOptions().dtype(at::kBool).device(device));
  if (B == 0 || R == 0) return out;
  const TilePlan plan = plan_tiles(B, R, 4 * kMaskU, kMaxItersMask);
  check_grid(B * plan.T);
  bool* o = out.data_ptr<bool>();
  sparse_mask_kernel<<<static_cast<unsigned int>(B * plan.T), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      o, R, C, plan.T, plan.iters, static_cast<uint64_t>(seed), static_cast<float>(mask_ratio), aligned16(o));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---- scale_rows_ ----------------------------------------------------------------------------

// grad[b, :] *= factor[b] for rows whose factor is not exactly 1 (those blocks exit at once).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    scale_rows_kernel(scalar_t* __restrict__ grad, const acc_t* __restrict__ factor, int64_t n, int64_t T, int iters,
                      bool aligned) {
  constexpr int kUnit = 16 / sizeof(scalar_t);  // elements per 16 bytes
  const int64_t pid = blockIdx.x;
  const int64_t b = pid / T;
  const acc_t f = factor[b];
  if (f == acc_t(1)) return;  // the usual loss.backward(): no pass over the gradient
  const int64_t row_start = b * n;
  const int64_t first = (row_start / kUnit) * kUnit + (pid - b * T) * (static_cast<int64_t>(kUnit) * kThreads * iters);
  for (int it = 0; it < iters; ++it) {
    const int64_t e0 = first + (static_cast<int64_t>(it) * kThreads + threadIdx.x) * kUnit;
    const int64_t r0 = e0 - row_start;
    if (r0 >= n) break;
    if (r0 + kUnit <= 0) continue;
    if (aligned && r0 >= 0 && r0 + kUnit <= n) {
      scalar_t v[kUnit];
      load_vec<false>(grad + e0, v);  // in place: not through the read-only cache
#pragma unroll
      for (int j = 0; j < kUnit; ++j) v[j] = static_cast<scalar_t>(f * static_cast<acc_t>(v[j]));
      store_vec(grad + e0, v);
    } else {
#pragma unroll
      for (int j = 0; j < kUnit; ++j)
        if (r0 + j >= 0 && r0 + j < n) grad[e0 + j] = static_cast<scalar_t>(f * static_cast<acc_t>(grad[e0 + j]));
    }
  }
}

void scale_rows_cuda_(at::Tensor grad, const at::Tensor& factor) {
  check_cuda(grad, "grad", grad);
  TORCH_CHECK(factor.device() == grad.device(), "factor must be on grad's device");
  c10::cuda::CUDAGuard guard(grad.device());
  const int64_t B = grad.dim() ? grad.size(0) : 0;
  TORCH_CHECK(factor.numel() == B, "factor must have one entry per row");
  const int64_t n = B ? grad.numel() / B : 0;
  if (B == 0 || n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_rows_cuda_", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int kUnit = 16 / sizeof(scalar_t);
    auto f = factor.to(acc_scalar_type<acc_t>()).contiguous();
    const TilePlan plan = plan_tiles(B, n, kUnit, kMaxItersScale);
    check_grid(B * plan.T);
    scalar_t* g = grad.data_ptr<scalar_t>();
    scale_rows_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned int>(B * plan.T), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            g, f.data_ptr<acc_t>(), n, plan.T, plan.iters, aligned16(g));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---- philox_uniform (RNG test hook) ---------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    philox_uniform_kernel(const int64_t* __restrict__ index, float* __restrict__ out, int64_t numel, uint64_t seed) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    out[i] = philox_uniform(seed, static_cast<uint64_t>(index[i]));
}

at::Tensor philox_uniform_cuda(int64_t seed, const at::Tensor& index) {
  check_cuda(index, "index", index);
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64");
  c10::cuda::CUDAGuard guard(index.device());
  auto out = at::empty(index.sizes(), index.options().dtype(at::kFloat));
  const int64_t numel = index.numel();
  if (numel == 0) return out;
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, 65536);
  philox_uniform_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      index.data_ptr<int64_t>(), out.data_ptr<float>(), numel, static_cast<uint64_t>(seed));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda

// The ops are defined in sparse_mse.cpp (TORCH_LIBRARY); sparse_mask_cuda exists only in CUDA builds.
TORCH_LIBRARY_FRAGMENT(diffkernels_native, m) {
  m.def("sparse_mask_cuda(int seed, int batch, int channels, int rows, float mask_ratio, Device device) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffkernels_native, CUDA, m) {
  m.impl("sparse_mse_fwd", &cuda::sparse_mse_fwd_cuda);
  m.impl("scale_rows_", &cuda::scale_rows_cuda_);
  m.impl("philox_uniform", &cuda::philox_uniform_cuda);
}

// No tensor argument to dispatch on (like sparse_mask): registered for the catch-all key.
TORCH_LIBRARY_IMPL(diffkernels_native, CompositeExplicitAutograd, m) {
  m.impl("sparse_mask_cuda", &cuda::sparse_mask_cuda);
}

}  // namespace diffkernels
