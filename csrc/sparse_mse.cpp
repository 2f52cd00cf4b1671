// CPU kernels for the sparse-supervision loss (docs/METHODS.md section 1) and the RNG test hook.
//
// Layout shared with the Triton kernel: the input is viewed as (B, C, R); the keep-mask has one
// uniform per (b, r), index m = b * R + r (C = 1 for granularity "element", C = channels for
// "pixel"), walked with the row tiles of row_tiles.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ScalarOps.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "philox.h"
#include "row_tiles.h"

namespace diffkernels {
namespace {

template <typename acc_t>
at::ScalarType acc_scalar_type() {
  return std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
}

// Sum of keep * (p - q)^2 over len elements (float64, in 4 partial sums so the loop vectorises),
// writing grad = keep * scale * (p - q) when g is given. Masked elements contribute an exact 0
// (a select, not a product), so NaN/Inf in masked-out positions never reach the loss or gradient.
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) double chunk_sq_sum_body(const scalar_t* p, const scalar_t* q, scalar_t* g,
                                                               const bool* keep, int64_t len, acc_t scale) {
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  if (g != nullptr) {
    for (int64_t j = 0; j < len; ++j) {
      const acc_t d = static_cast<acc_t>(p[j]) - static_cast<acc_t>(q[j]);
      part[j & 3] += static_cast<double>(keep[j] ? d * d : acc_t(0));
      g[j] = static_cast<scalar_t>(keep[j] ? scale * d : acc_t(0));
    }
  } else {
    for (int64_t j = 0; j < len; ++j) {
      const acc_t d = static_cast<acc_t>(p[j]) - static_cast<acc_t>(q[j]);
      part[j & 3] += static_cast<double>(keep[j] ? d * d : acc_t(0));
    }
  }
  return (part[0] + part[1]) + (part[2] + part[3]);
}

#if defined(__x86_64__) || defined(_M_X64)
template <typename scalar_t, typename acc_t>
__attribute__((target("avx2"))) double chunk_sq_sum_avx2(const scalar_t* p, const scalar_t* q, scalar_t* g,
                                                         const bool* keep, int64_t len, acc_t scale) {
  return chunk_sq_sum_body(p, q, g, keep, len, scale);
}
#endif

template <typename scalar_t, typename acc_t>
double chunk_sq_sum(const scalar_t* p, const scalar_t* q, scalar_t* g, const bool* keep, int64_t len, acc_t scale) {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if (has_avx2) return chunk_sq_sum_avx2(p, q, g, keep, len, scale);
#endif
  return chunk_sq_sum_body(p, q, g, keep, len, scale);
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "diffkernels C++ kernels take CPU tensors; ", name, " is on ", t.device());
  TORCH_CHECK(t.is_contiguous(), "diffkernels C++ kernels take contiguous tensors; ", name, " is not");
}

at::Tensor philox_uniform_op(int64_t seed, const at::Tensor& index) {
  check_cpu(index, "index");
  TORCH_CHECK(index.scalar_type() == at::kLong, "index must be int64");
  auto out = at::empty(index.sizes(), index.options().dtype(at::kFloat));
  const int64_t* idx = index.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, index.numel(), 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) o[i] = philox_uniform(static_cast<uint64_t>(seed), static_cast<uint64_t>(idx[i]));
  });
  return out;
}

// The batched generator the kernels use (AVX2 where the CPU has it), exposed for the RNG tests:
// U(seed, 4 * counter0 + i) for i < 4 * kBatchCounters.
at::Tensor philox_uniform_batch_op(int64_t seed, int64_t counter0, bool force_scalar) {
  auto out = at::empty({4 * kBatchCounters}, at::TensorOptions().dtype(at::kFloat));
  if (force_scalar)
    philox_uniform_batch_scalar(static_cast<uint64_t>(counter0), static_cast<uint64_t>(seed), out.data_ptr<float>());
  else
    philox_uniform_batch(static_cast<uint64_t>(counter0), static_cast<uint64_t>(seed), out.data_ptr<float>());
  return out;
}

// Keep-mask of shape (B, C, R): one draw per (b, r), repeated over the C channels.
at::Tensor sparse_mask(int64_t seed, int64_t B, int64_t C, int64_t R, double mask_ratio) {
  TORCH_CHECK(B >= 0 && C >= 1 && R >= 0, "invalid mask shape");
  auto out = at::empty({B, C, R}, at::TensorOptions().dtype(at::kBool));
  bool* o = out.data_ptr<bool>();
  const float eta = static_cast<float>(mask_ratio);
  const int64_t T = tasks_per_row(R);
  at::parallel_for(0, B * T, task_grain(kTaskSpan * C), [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / T;
      for_each_chunk(b, task % T, R, static_cast<uint64_t>(seed),
                     [&](int64_t r0, int64_t j_lo, int64_t j_hi, const float* u) {
                       for (int64_t c = 0; c < C; ++c) {
                         bool* row = o + (b * C + c) * R + r0;
                         for (int64_t j = j_lo; j < j_hi; ++j) row[j] = u[j] >= eta;
                       }
                     });
    }
  });
  return out;
}

// Per-row sums of keep * (pred - target)^2 (float64), per-row kept element counts (int64), and,
// when grad_scale (B,) is given, grad = grad_scale[b] * keep * (pred - target) in pred's dtype.
// (sparse_mse_fwd_impl: or, with grad_const, the same grad_scale for every row, without a tensor for it.)
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_mse_fwd_impl(const at::Tensor& pred, const at::Tensor& target,
                                                                   double mask_ratio, int64_t seed, int64_t channels,
                                                                   const std::optional<at::Tensor>& grad_scale,
                                                                   std::optional<double> grad_const) {
  check_cpu(pred, "pred");
  check_cpu(target, "target");
  TORCH_CHECK(pred.sizes() == target.sizes() && pred.scalar_type() == target.scalar_type(),
              "pred and target must have the same shape and dtype");
  TORCH_CHECK(pred.dim() >= 1, "pred must have a batch dimension");
  const int64_t B = pred.size(0);
  const int64_t n = B ? pred.numel() / B : 0;
  TORCH_CHECK(channels >= 1 && n % channels == 0, "channels must divide the per-sample size");
  const int64_t C = channels, R = n / C;
  const float eta = static_cast<float>(mask_ratio);
  const bool want_grad = grad_scale.has_value() || grad_const.has_value();
  if (grad_scale.has_value()) {
    check_cpu(*grad_scale, "grad_scale");
    TORCH_CHECK(grad_scale->numel() == B, "grad_scale must have one entry per sample");
  }

  const int64_t T = tasks_per_row(R);
  std::vector<double> partial(static_cast<size_t>(B * T), 0.0);
  std::vector<int64_t> partial_kept(static_cast<size_t>(B * T), 0);
  auto grad = want_grad ? at::empty_like(pred) : at::empty({0}, pred.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "sparse_mse_fwd", [&] {
    // float math for float/half/bfloat16 (elementwise in float, sums in double); double for double.
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* q = target.data_ptr<scalar_t>();
    scalar_t* g = want_grad ? grad.data_ptr<scalar_t>() : nullptr;
    at::Tensor gs_acc;
    const acc_t* gs = nullptr;
    if (grad_scale.has_value()) {
      gs_acc = grad_scale->to(acc_scalar_type<acc_t>()).contiguous();
      gs = gs_acc.data_ptr<acc_t>();
    }
    const acc_t gc = static_cast<acc_t>(grad_const.value_or(0.0));
    at::parallel_for(0, B * T, task_grain(kTaskSpan * C), [&](int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / T;
        const acc_t scale = gs != nullptr ? gs[b] : gc;
        double sum = 0.0;
        int64_t kept = 0;
        bool keep[kChunk];
        for_each_chunk(b, task % T, R, static_cast<uint64_t>(seed),
                       [&](int64_t r0, int64_t j_lo, int64_t j_hi, const float* u) {
                         for (int64_t j = 0; j < kChunk; ++j) keep[j] = u[j] >= eta;
                         for (int64_t j = j_lo; j < j_hi; ++j) kept += keep[j];
                         for (int64_t c = 0; c < C; ++c) {
                           const int64_t base = (b * C + c) * R + r0 + j_lo;
                           sum += chunk_sq_sum<scalar_t, acc_t>(p + base, q + base, want_grad ? g + base : nullptr,
                                                                keep + j_lo, j_hi - j_lo, scale);
                         }
                       });
        partial[task] = sum;
        partial_kept[task] = kept * C;
      }
    });
  });

  auto sq_sum = at::empty({B}, pred.options().dtype(at::kDouble));
  auto kept = at::empty({B}, pred.options().dtype(at::kLong));
  double* s = sq_sum.data_ptr<double>();
  int64_t* k = kept.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    double acc = 0.0;
    int64_t cnt = 0;
    for (int64_t t = 0; t < T; ++t) {
      acc += partial[b * T + t];
      cnt += partial_kept[b * T + t];
    }
    s[b] = acc;
    k[b] = cnt;
  }
  return std::make_tuple(sq_sum, kept, grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_mse_fwd(const at::Tensor& pred, const at::Tensor& target,
                                                              double mask_ratio, int64_t seed, int64_t channels,
                                                              const std::optional<at::Tensor>& grad_scale) {
  return sparse_mse_fwd_impl(pred, target, mask_ratio, seed, channels, grad_scale, std::nullopt);
}

// grad[b, ...] *= factor[b], skipping rows whose factor is exactly 1 (the usual loss.backward()).
void scale_rows_(at::Tensor grad, const at::Tensor& factor) {
  check_cpu(grad, "grad");
  check_cpu(factor, "factor");
  const int64_t B = grad.dim() ? grad.size(0) : 0;
  TORCH_CHECK(factor.numel() == B, "factor must have one entry per row");
  const int64_t n = B ? grad.numel() / B : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_rows_", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto f_acc = factor.to(acc_scalar_type<acc_t>()).contiguous();
    const acc_t* f = f_acc.data_ptr<acc_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, B * n, 1 << 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi;) {
        const int64_t b = i / n, end = std::min(hi, (b + 1) * n);
        const acc_t s = f[b];
        if (s != acc_t(1))
          for (int64_t j = i; j < end; ++j) g[j] = static_cast<scalar_t>(s * static_cast<acc_t>(g[j]));
        i = end;
      }
    });
  });
}


// --- the loss with its autograd in C++: the eager CPU path of backward="fused" -------------------
//
// The same forward and backward as the Python op layer (diffkernels/ops/sparse_mse.py: _forward,
// _backward), op for op, so that both give bitwise-equal results; done here, the step costs one
// dispatcher call and an autograd node in C++ instead of Python's autograd.Function.

enum Normalize : int64_t { kExpected = 0, kAll = 1, kKept = 2 };
enum Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };

constexpr const char* kSecondBackward =
    "diffkernels.sparse_mse_loss: this graph was already differentiated once. With backward='fused' (the "
    "default) the gradient is computed in the forward pass and rescaled in place by the first backward, so a "
    "graph can be differentiated only once. For retain_graph=True, gradcheck or Jacobians, call "
    "sparse_mse_loss(..., backward='recompute').";

constexpr const char* kCreateGraphFused =
    "diffkernels.sparse_mse_loss: backward='fused' (the default) cannot give second-order gradients "
    "(create_graph=True, e.g. a gradient penalty or Hessian-vector products): its gradient is computed in the "
    "forward pass, as a constant. Call sparse_mse_loss(..., backward='recompute'), whose backward is "
    "differentiable.";

// d loss / d sq_sum[b] apart from w_b and, for "kept", 1/Z_b (the Python _loss_scale).
double loss_scale(int64_t B, int64_t n, double mask_ratio, int64_t normalize, int64_t reduction) {
  const double reduce_factor =
      reduction == kMean ? (B ? 1.0 / static_cast<double>(B) : std::numeric_limits<double>::quiet_NaN()) : 1.0;
  double known = 0.0;  // 0: not known ("kept"), like Python's `or 1.0`
  if (normalize == kExpected) known = static_cast<double>(n) * (1.0 - mask_ratio);
  if (normalize == kAll) known = static_cast<double>(n);
  return reduce_factor / (known != 0.0 ? known : 1.0);
}

struct LossForward {
  at::Tensor loss, grad, kept, sq_sum;  // kept: "kept" only, sq_sum: with a weight only
  double scale;
};

LossForward loss_forward(const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         double mask_ratio, int64_t seed, int64_t channels, int64_t normalize, int64_t reduction,
                         bool want_grad) {
  TORCH_CHECK(normalize >= kExpected && normalize <= kKept, "invalid normalize code ", normalize);
  TORCH_CHECK(reduction >= kMean && reduction <= kNone, "invalid reduction code ", reduction);
  TORCH_CHECK(pred.dim() >= 1, "pred must have a batch dimension");
  const bool has_weight = weight.has_value() && weight->defined();
  const int64_t B = pred.size(0);
  const int64_t n = B ? pred.numel() / B : 0;
  const double scale = loss_scale(B, n, mask_ratio, normalize, reduction);
  // The per-row gradient scale 2 * scale * w_b (Python: _grad_scale), a constant without a weight.
  // Computed in scalar code like the finalisation below: (acc_t) w_b * (acc_t) c is the tensor op's
  // w.to(acc) * c (a float64 weight value rounds to float32 as the conversion does).
  const at::Tensor w64 = has_weight ? weight->to(at::kDouble).contiguous() : at::Tensor();
  const double* w = has_weight ? w64.data_ptr<double>() : nullptr;
  std::optional<at::Tensor> grad_scale;
  std::optional<double> grad_const;
  if (want_grad && has_weight) {
    const double c = 2.0 * scale;
    grad_scale = at::empty({B}, pred.options().dtype(pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
    if (grad_scale->scalar_type() == at::kDouble) {
      double* gs = grad_scale->data_ptr<double>();
      for (int64_t b = 0; b < B; ++b) gs[b] = w[b] * c;
    } else {
      float* gs = grad_scale->data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) gs[b] = static_cast<float>(w[b]) * static_cast<float>(c);
    }
  } else if (want_grad) {
    grad_const = 2.0 * scale;
  }
  auto [sq_sum, kept, grad] = sparse_mse_fwd_impl(pred, target, mask_ratio, seed, channels, grad_scale, grad_const);
  LossForward out;
  out.scale = scale;
  // Elementwise in scalar code, each step the same IEEE operation as the tensor op of the Python
  // path (float64 per-row values; the weight and the counts converted to float64).
  at::Tensor per_sample = sq_sum;
  if (normalize == kKept || has_weight) {
    per_sample = at::empty({B}, sq_sum.options());
    const double* s = sq_sum.data_ptr<double>();
    double* ps = per_sample.data_ptr<double>();
    int64_t* k = kept.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      double v = s[b];
      if (normalize == kKept) {
        k[b] = std::max<int64_t>(k[b], 1);  // Z_b = max(1, K_b), saved for backward
        v = v / static_cast<double>(k[b]);
      }
      if (w != nullptr) v = v * w[b];
      ps[b] = v;
    }
    if (normalize == kKept) out.kept = kept;
    if (has_weight) out.sq_sum = sq_sum;
  }
  if (reduction != kNone) per_sample = per_sample.sum();
  // computed in float64, stored as the loss dtype (Python: torch.mul(x, scale, out=...))
  out.loss = at::empty(per_sample.sizes(), pred.options().dtype(at::promote_types(pred.scalar_type(), at::kFloat)));
  const double* ps = per_sample.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(out.loss.scalar_type(), "sparse_mse_loss", [&] {
    scalar_t* l = out.loss.data_ptr<scalar_t>();
    for (int64_t i = 0; i < out.loss.numel(); ++i) l[i] = static_cast<scalar_t>(ps[i] * scale);
  });
  if (want_grad) out.grad = grad;
  return out;
}

struct SparseMSELoss : public torch::autograd::Function<SparseMSELoss> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, double mask_ratio, int64_t seed,
                            int64_t channels, int64_t normalize, int64_t reduction) {
    auto f = loss_forward(pred, target, weight, mask_ratio, seed, channels, normalize, reduction, true);
    ctx->saved_data["scale"] = f.scale;
    ctx->saved_data["reduction"] = reduction;
    ctx->save_for_backward({f.grad, weight.has_value() ? *weight : at::Tensor(), f.kept, f.sq_sum});
    return f.loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(), kCreateGraphFused);  // create_graph=True
    torch::autograd::variable_list saved;
    try {
      saved = ctx->get_saved_variables();
    } catch (const c10::Error& e) {
      // the saved gradient was rescaled in place by an earlier backward through this graph
      if (std::string(e.what()).find("inplace") == std::string::npos) throw;
      TORCH_CHECK(false, kSecondBackward);
    }
    at::Tensor grad = saved[0], weight = saved[1], kept = saved[2], sq_sum = saved[3];
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const at::Tensor grad_loss = grad_outputs[0].contiguous();
    const int64_t B = grad.size(0);
    at::Tensor grad_pred, grad_target, grad_weight;
    const bool need_pred = ctx->needs_input_grad(0), need_target = ctx->needs_input_grad(1);
    if (need_pred || need_target) {
      // grad[b] *= upstream_b / Z_b ("kept") or upstream_b, rows with a factor of exactly 1 untouched:
      // the Python path's factor (in the loss dtype) and scale_rows_, in one loop.
      AT_DISPATCH_FLOATING_TYPES(grad_loss.scalar_type(), "sparse_mse_loss_backward", [&] {
        const scalar_t* up = grad_loss.data_ptr<scalar_t>();
        const int64_t* k = kept.defined() ? kept.data_ptr<int64_t>() : nullptr;
        const int64_t up_stride = reduction == kNone ? 1 : 0;
        const int64_t n = B ? grad.numel() / B : 0;
        AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "sparse_mse_loss_scale", [&] {
          using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
          using up_t = std::remove_const_t<std::remove_pointer_t<decltype(up)>>;
          scalar_t* g = grad.data_ptr<scalar_t>();
          for (int64_t b = 0; b < B; ++b) {
            const up_t u = up[b * up_stride];
            const acc_t f = static_cast<acc_t>(k != nullptr ? u / static_cast<up_t>(k[b]) : u);
            if (f == acc_t(1)) continue;
            for (int64_t j = b * n; j < (b + 1) * n; ++j) g[j] = static_cast<scalar_t>(f * static_cast<acc_t>(g[j]));
          }
        });
      });
      torch::autograd::impl::bump_version(grad);  // a second backward through this graph is detected
      if (need_pred) grad_pred = grad;
      if (need_target) grad_target = -grad;
    }
    const at::Tensor per_row = reduction == kNone ? grad_loss : grad_loss.expand({B});
    if (weight.defined() && ctx->needs_input_grad(2)) {
      const at::Tensor per_sample = kept.defined() ? sq_sum * per_row / kept : sq_sum * per_row;  // float64
      grad_weight = (per_sample * scale).to(weight.scalar_type());
    }
    return {grad_pred, grad_target, grad_weight, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor sparse_mse_loss_autograd(const at::Tensor& pred, const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight, double mask_ratio, int64_t seed,
                                    int64_t channels, int64_t normalize, int64_t reduction) {
  return SparseMSELoss::apply(pred, target, weight, mask_ratio, seed, channels, normalize, reduction);
}

// Below autograd (inference mode, no gradient): the loss alone.
at::Tensor sparse_mse_loss_cpu(const at::Tensor& pred, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, double mask_ratio, int64_t seed,
                               int64_t channels, int64_t normalize, int64_t reduction) {
  return loss_forward(pred, target, weight, mask_ratio, seed, channels, normalize, reduction, false).loss;
}

}  // namespace

TORCH_LIBRARY(diffkernels_native, m) {
  m.def("philox_uniform(int seed, Tensor index) -> Tensor");
  m.def("philox_uniform_batch(int seed, int counter0, bool force_scalar) -> Tensor");
  m.def("sparse_mask(int seed, int batch, int channels, int rows, float mask_ratio) -> Tensor");
  m.def(
      "sparse_mse_fwd(Tensor pred, Tensor target, float mask_ratio, int seed, int channels, Tensor? grad_scale)"
      " -> (Tensor, Tensor, Tensor)");
  m.def("scale_rows_(Tensor(a!) grad, Tensor factor) -> ()");
  // normalize: 0 "expected", 1 "all", 2 "kept"; reduction: 0 "mean", 1 "sum", 2 "none"
  m.def(
      "sparse_mse_loss(Tensor pred, Tensor target, Tensor? weight, float mask_ratio, int seed, int channels,"
      " int normalize, int reduction) -> Tensor");
}

// The loss with its gradient (backward="fused") and autograd node in C++, for CPU tensors.
TORCH_LIBRARY_IMPL(diffkernels_native, Autograd, m) { m.impl("sparse_mse_loss", &sparse_mse_loss_autograd); }

TORCH_LIBRARY_IMPL(diffkernels_native, CPU, m) {
  m.impl("philox_uniform", &philox_uniform_op);
  m.impl("sparse_mse_fwd", &sparse_mse_fwd);
  m.impl("scale_rows_", &scale_rows_);
  m.impl("sparse_mse_loss", &sparse_mse_loss_cpu);
}

// These take no tensor argument to dispatch on, so they are registered for the catch-all key.
TORCH_LIBRARY_IMPL(diffkernels_native, CompositeExplicitAutograd, m) {
  m.impl("sparse_mask", &sparse_mask);
  m.impl("philox_uniform_batch", &philox_uniform_batch_op);
}

}  // namespace diffkernels
