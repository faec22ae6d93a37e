// CPU op entries of the fastopt ops (schemas and conventions: csrc/ops.cpp).
//
// Each entry checks its arguments (csrc/op_checks.h, shared with the CUDA
// entries), reads the 0-dim scalars (lr_tensor, grad_mul, clip_coef, skip) on
// the host once, packs one params struct (addresses and per-tensor
// coefficients, and the chunk plan of NOTE [multi-tensor chunking]), picks the
// kernel instantiation of this call's storage types and flags, and runs it in
// one parallel region. The kernels are
// in csrc/cpu/kernels.h, the arithmetic in fastopt/update_math.h. Every check
// comes before the first write, so a call that fails writes nothing. A step
// allocates O(number of tensors) bookkeeping and nothing proportional to the
// tensors' sizes.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "kernels.h"
#include "op_checks.h"

namespace fastopt::cpu {
namespace {

using at::Tensor;
using at::TensorList;

// ---- the scalars of an update op (checks: csrc/op_checks.h) --------------------------

// The value of a float32 one-element cpu tensor, read on the host.
std::optional<float> read_scalar(const char* op, const char* name,
                                 const std::optional<Tensor>& t) {
  const float* ptr = scalar_ptr(op, name, t, at::Device(at::kCPU));
  return ptr == nullptr ? std::nullopt : std::optional<float>(*ptr);
}

// The scalars of an update op, read once per call.
struct UpdateScalars {
  bool skip;
  double lr;
  GradTransform transform;
};

UpdateScalars read_update_scalars(const char* op, double lr,
                                  const std::optional<Tensor>& lr_tensor, bool maximize,
                                  const std::optional<Tensor>& grad_mul,
                                  std::optional<double> max_grad_value,
                                  const std::optional<Tensor>& clip_coef,
                                  const std::optional<Tensor>& skip) {
  UpdateScalars s;
  s.skip = read_scalar(op, "skip", skip).value_or(0.0f) != 0.0f;
  s.lr = read_scalar(op, "lr_tensor", lr_tensor).value_or(lr);
  // maximize is a sign on grad_mul (NOTE [gradient transform]).
  const float mul = read_scalar(op, "grad_mul", grad_mul).value_or(1.0f);
  s.transform.grad_mul = maximize ? -mul : mul;
  s.transform.max_grad_value = static_cast<float>(clamp_bound(op, max_grad_value));
  s.transform.clip_coef = read_scalar(op, "clip_coef", clip_coef).value_or(1.0f);
  return s;
}

std::vector<int64_t> numels_of(TensorList tensors) {
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  for (const Tensor& t : tensors) numels.push_back(t.numel());
  return numels;
}

// ---- running a kernel ---------------------------------------------------------------

// NOTE [one parallel region]: each op runs its kernel in one at::parallel_for
// over all chunks. Chunks are equal-sized (NOTE [multi-tensor chunking]), so
// at::parallel_for's static split into one contiguous range per thread is
// balanced. at::parallel_for is an inline OpenMP region: an extension compiled
// without -fopenmp silently runs it on one thread.
#ifndef _OPENMP
#pragma message("fastopt: compiled without -fopenmp; the CPU kernels will run on one thread")
#endif

// The instantiation pick.template operator()<P, G, S, MASTER>() returns, for
// the storage types of l (kernels.h's float / bf16 / fp16) and its master
// kind. Only the combinations check_update_lists allows are instantiated:
// masters for 16-bit params, remainders for bf16 params, moments in float32,
// bf16, the params' type or 8-bit.
template <typename P, typename G, typename S, typename Pick>
auto pick_master(const UpdateLists& l, Pick& pick) {
  if constexpr (std::is_same_v<P, bf16>) {
    if (l.master == Master::kRemainder) {
      return pick.template operator()<P, G, S, Master::kRemainder>();
    }
  }
  if constexpr (!std::is_same_v<P, float>) {
    if (l.master == Master::kFp32) return pick.template operator()<P, G, S, Master::kFp32>();
  }
  return pick.template operator()<P, G, S, Master::kNone>();
}

template <typename P, typename G, typename Pick>
auto pick_state(const UpdateLists& l, Pick& pick) {
  switch (l.state) {
    case at::kFloat:
      return pick_master<P, G, float>(l, pick);
    case at::kBFloat16:
      return pick_master<P, G, bf16>(l, pick);
    case at::kByte:  // NOTE [int8 moments]
      return pick_master<P, G, q8>(l, pick);
    default:  // the params' type
      return pick_master<P, G, P>(l, pick);
  }
}

template <typename Pick>
auto pick_kernel(const UpdateLists& l, Pick&& pick) {
  const bool fp32_grad = l.grad == at::kFloat;
  switch (l.param) {
    case at::kBFloat16:
      return fp32_grad ? pick_state<bf16, float>(l, pick) : pick_state<bf16, bf16>(l, pick);
    case at::kHalf:
      return fp32_grad ? pick_state<fp16, float>(l, pick) : pick_state<fp16, fp16>(l, pick);
    default:  // float32 (check_update_lists allows nothing else)
      return pick_state<float, float>(l, pick);
  }
}

template <typename T>
T* data_or_null(TensorList list, size_t i) {
  return list.empty() ? nullptr : static_cast<T*>(list[i].data_ptr());
}

// ---- ops -----------------------------------------------------------------------------

void adamw_cpu(TensorList params, TensorList grads, TensorList exp_avgs,
               TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList master_params,
               TensorList state_steps, double lr, const std::optional<Tensor>& lr_tensor,
               double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
               bool maximize, const std::optional<Tensor>& grad_mul,
               std::optional<double> max_grad_value, const std::optional<Tensor>& clip_coef,
               const std::optional<Tensor>& skip) {
  constexpr const char* op = "fastopt::adamw_";
  if (params.empty()) return;
  const UpdateLists l = check_update_lists(op, at::kCPU, params, grads, master_params, exp_avgs);
  check_moments(op, "exp_avgs", exp_avgs, l.state, params);
  check_moments(op, "exp_avg_sqs", exp_avg_sqs, l.state, params);
  if (amsgrad) {
    TORCH_CHECK(l.state != at::kByte, op,
                ": amsgrad is not supported with 8-bit moments (NOTE [int8 moments])");
    check_list(op, "max_exp_avg_sqs", max_exp_avg_sqs, l.state, params);
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs given but amsgrad is false");
  }
  check_steps(op, state_steps, params);
  const UpdateScalars s = read_update_scalars(op, lr, lr_tensor, maximize, grad_mul,
                                              max_grad_value, clip_coef, skip);
  if (s.skip) return;

  std::vector<AdamWTensor> tensors(params.size());
  double last_step = -1.0;
  AdamWCoeffs coeffs{};
  for (size_t i = 0; i < params.size(); ++i) {
    // Usually every tensor of a group is at the same step: compute the bias
    // corrections (two pow calls) only when the step changes.
    const double step = *state_steps[i].const_data_ptr<float>();
    if (step != last_step) {
      coeffs = adamw_coeffs(s.lr, beta1, beta2, eps, weight_decay, step);
      last_step = step;
    }
    tensors[i] = {params[i].numel(),
                  params[i].data_ptr(),
                  grads[i].const_data_ptr(),
                  exp_avgs[i].data_ptr(),
                  exp_avg_sqs[i].data_ptr(),
                  amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr,
                  data_or_null<void>(master_params, i),
                  coeffs};
  }
  const ChunkPlan plan(numels_of(params));
  const AdamWParams p{tensors.data(), plan.view(), s.transform};
  const auto kernel = pick_kernel(l, [&]<typename P, typename G, typename S, Master MASTER>() {
    return amsgrad ? &adamw_kernel<P, G, S, MASTER, true> : &adamw_kernel<P, G, S, MASTER, false>;
  });
  at::parallel_for(0, plan.num_chunks(), 1, [&](int64_t begin, int64_t end) {
    kernel(p, begin, end);  // NOTE [one parallel region]
  });
}

void lion_cpu(TensorList params, TensorList grads, TensorList exp_avgs,
              TensorList master_params, double lr, const std::optional<Tensor>& lr_tensor,
              double beta1, double beta2, double weight_decay, bool maximize,
              const std::optional<Tensor>& grad_mul, std::optional<double> max_grad_value,
              const std::optional<Tensor>& clip_coef, const std::optional<Tensor>& skip) {
  constexpr const char* op = "fastopt::lion_";
  if (params.empty()) return;
  const UpdateLists l = check_update_lists(op, at::kCPU, params, grads, master_params, exp_avgs);
  check_moments(op, "exp_avgs", exp_avgs, l.state, params);
  const UpdateScalars s = read_update_scalars(op, lr, lr_tensor, maximize, grad_mul,
                                              max_grad_value, clip_coef, skip);
  if (s.skip) return;

  std::vector<LionTensor> tensors(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    tensors[i] = {params[i].numel(), params[i].data_ptr(), grads[i].const_data_ptr(),
                  exp_avgs[i].data_ptr(), data_or_null<void>(master_params, i)};
  }
  const ChunkPlan plan(numels_of(params));
  const LionParams p{tensors.data(), plan.view(), s.transform,
                     lion_coeffs(s.lr, beta1, beta2, weight_decay)};
  const auto kernel = pick_kernel(
      l, [&]<typename P, typename G, typename S, Master MASTER>() {
        return &lion_kernel<P, G, S, MASTER>;
      });
  at::parallel_for(0, plan.num_chunks(), 1, [&](int64_t begin, int64_t end) {
    kernel(p, begin, end);  // NOTE [one parallel region]
  });
}

void ademamix_cpu(TensorList params, TensorList grads, TensorList exp_avgs,
                  TensorList exp_avgs_slow, TensorList exp_avg_sqs, TensorList master_params,
                  TensorList state_steps, double lr, const std::optional<Tensor>& lr_tensor,
                  double beta1, double beta2, double beta3, double alpha,
                  std::optional<double> t_alpha, std::optional<double> t_beta3, double eps,
                  double weight_decay, bool maximize, const std::optional<Tensor>& grad_mul,
                  std::optional<double> max_grad_value, const std::optional<Tensor>& clip_coef,
                  const std::optional<Tensor>& skip) {
  constexpr const char* op = "fastopt::ademamix_";
  if (params.empty()) return;
  const UpdateLists l = check_update_lists(op, at::kCPU, params, grads, master_params, exp_avgs);
  check_moments(op, "exp_avgs", exp_avgs, l.state, params);
  check_moments(op, "exp_avgs_slow", exp_avgs_slow, l.state, params);
  check_moments(op, "exp_avg_sqs", exp_avg_sqs, l.state, params);
  check_steps(op, state_steps, params);
  check_warmups(op, t_alpha, t_beta3);
  const UpdateScalars s = read_update_scalars(op, lr, lr_tensor, maximize, grad_mul,
                                              max_grad_value, clip_coef, skip);
  if (s.skip) return;

  std::vector<AdEMAMixTensor> tensors(params.size());
  double last_step = -1.0;
  AdEMAMixCoeffs coeffs{};
  for (size_t i = 0; i < params.size(); ++i) {
    const double step = *state_steps[i].const_data_ptr<float>();
    if (step != last_step) {  // the schedulers and bias corrections, once per distinct step
      coeffs = ademamix_coeffs(s.lr, beta1, beta2, beta3, alpha, t_alpha.value_or(0.0),
                               t_beta3.value_or(0.0), eps, weight_decay, step);
      last_step = step;
    }
    tensors[i] = {params[i].numel(),          params[i].data_ptr(),
                  grads[i].const_data_ptr(),
                  exp_avgs[i].data_ptr(),     exp_avgs_slow[i].data_ptr(),
                  exp_avg_sqs[i].data_ptr(),  data_or_null<void>(master_params, i),
                  coeffs};
  }
  const ChunkPlan plan(numels_of(params));
  const AdEMAMixParams p{tensors.data(), plan.view(), s.transform};
  const auto kernel = pick_kernel(
      l, [&]<typename P, typename G, typename S, Master MASTER>() {
        return &ademamix_kernel<P, G, S, MASTER>;
      });
  at::parallel_for(0, plan.num_chunks(), 1, [&](int64_t begin, int64_t end) {
    kernel(p, begin, end);  // NOTE [one parallel region]
  });
}

Tensor grad_sumsq_cpu(TensorList grads, const std::optional<Tensor>& grad_mul,
                      std::optional<double> max_grad_value) {
  constexpr const char* op = "fastopt::grad_sumsq";
  const size_t n = grads.size();
  std::vector<const void*> data(n);
  std::vector<DType> dtypes(n);
  for (size_t i = 0; i < n; ++i) {
    const Tensor& g = grads[i];
    TORCH_CHECK(g.defined(), op, ": grads[", i, "] is undefined");
    TORCH_CHECK(g.device().is_cpu(), op, ": grads[", i, "] is on ", g.device(),
                ", expected cpu");
    TORCH_CHECK(g.is_contiguous(), op, ": grads[", i,
                "] is not contiguous (the compiled kernels need contiguous tensors)");
    switch (g.scalar_type()) {
      case at::kFloat:
        dtypes[i] = DType::kFloat;
        break;
      case at::kBFloat16:
        dtypes[i] = DType::kBFloat16;
        break;
      case at::kHalf:
        dtypes[i] = DType::kHalf;
        break;
      case at::kDouble:
        dtypes[i] = DType::kDouble;
        break;
      default:
        TORCH_CHECK(false, op, ": grads[", i, "] has dtype ", c10::toString(g.scalar_type()),
                    "; expected float32, bfloat16, float16 or float64 (complex "
                    "gradients are passed as real views)");
    }
    data[i] = g.const_data_ptr();
  }
  SumsqParams p;
  p.grad_mul = read_scalar(op, "grad_mul", grad_mul).value_or(1.0f);
  p.max_grad_value = clamp_bound(op, max_grad_value);
  const ChunkPlan plan(numels_of(grads));
  std::vector<double> partials(static_cast<size_t>(plan.num_chunks()), 0.0);
  p.grads = data.data();
  p.dtypes = dtypes.data();
  p.chunks = plan.view();
  p.partials = partials.data();
  at::parallel_for(0, plan.num_chunks(), 1, [&](int64_t begin, int64_t end) {
    grad_sumsq_kernel(p, begin, end);  // NOTE [one parallel region]
  });
  // Chunk order, not thread order: the same sum whatever the thread count.
  double total = 0.0;
  for (double partial : partials) total += partial;
  // Rounded to float here: a finite double beyond float's range becomes inf
  // (as the reference's .float() does) instead of failing a range check.
  return at::scalar_tensor(static_cast<float>(total), at::TensorOptions().dtype(at::kFloat));
}

// NOTE [step counters] in fastopt/_base.py: one loop instead of one
// dispatcher call per tensor.
void steps_add_cpu(TensorList steps, double value) {
  for (size_t i = 0; i < steps.size(); ++i) {
    const Tensor& t = steps[i];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == 1,
                "fastopt::steps_add_: steps[", i, "] must be a float32 CPU scalar tensor");
  }
  const float add = static_cast<float>(value);
  for (const Tensor& t : steps) *t.data_ptr<float>() += add;
}

}  // namespace
}  // namespace fastopt::cpu

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("adamw_", &fastopt::cpu::adamw_cpu);
  m.impl("lion_", &fastopt::cpu::lion_cpu);
  m.impl("ademamix_", &fastopt::cpu::ademamix_cpu);
  m.impl("grad_sumsq", &fastopt::cpu::grad_sumsq_cpu);
  m.impl("steps_add_", &fastopt::cpu::steps_add_cpu);
}
