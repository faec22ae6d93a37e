// CPU implementations of the fastopt ops (schemas and conventions: csrc/ops.cpp).
//
// Host code only: check the arguments, pack pointers and per-tensor
// coefficients into flat arrays, plan the chunks (NOTE [multi-tensor
// chunking]), pick the kernel instantiation for this call's variant, and run
// it in one parallel region. The arithmetic is in csrc/cpu/kernels.h and
// fastopt/update_math.h. A step allocates O(number of tensors) bookkeeping
// and nothing proportional to the tensors' sizes.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "kernels.h"

namespace fastopt::cpu {
namespace {

using at::Tensor;
using at::TensorList;

// ---- checks ------------------------------------------------------------------

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

void check_list(const char* op, const char* name, TensorList list, size_t expected_len,
                at::ScalarType dtype, TensorList params) {
  TORCH_CHECK(list.size() == expected_len, op, ": ", name, " has ", list.size(),
              " tensors but params has ", expected_len);
  for (size_t i = 0; i < list.size(); ++i) {
    const Tensor& t = list[i];
    TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", i, "] is on ", t.device(),
                ", expected cpu");
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", i, "] has dtype ",
                dtype_name(t.scalar_type()), ", expected ", dtype_name(dtype));
    TORCH_CHECK(t.numel() == params[i].numel(), op, ": ", name, "[", i, "] has ", t.numel(),
                " elements but params[", i, "] has ", params[i].numel());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i,
                "] is not contiguous (the compiled kernels need contiguous tensors)");
  }
}

at::ScalarType check_params(const char* op, TensorList params) {
  TORCH_CHECK(!params.empty(), op, ": params is empty");
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": params have dtype ", dtype_name(dtype),
              "; the cpu kernels support float32, bfloat16 and float16");
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined");
    TORCH_CHECK(p.device().is_cpu(), op, ": params[", i, "] is on ", p.device(),
                ", expected cpu");
    TORCH_CHECK(p.scalar_type() == dtype, op, ": params[", i, "] has dtype ",
                dtype_name(p.scalar_type()), " but params[0] has ", dtype_name(dtype),
                " (one call takes one dtype)");
    TORCH_CHECK(p.is_contiguous(), op, ": params[", i,
                "] is not contiguous (the compiled kernels need contiguous tensors)");
  }
  return dtype;
}

// What the checks of an update op's common lists establish.
struct UpdateLists {
  at::ScalarType dtype;        // params and grads
  at::ScalarType state_dtype;  // moments: float32 with master weights, else dtype
  bool master;
  size_t n;  // tensors per list
};

// Checks the lists every update op takes: params, grads, exp_avgs and (when
// given) master_params; each op checks its own extra lists after this.
UpdateLists check_update_lists(const char* op, TensorList params, TensorList grads,
                               TensorList exp_avgs, TensorList master_params) {
  UpdateLists l;
  l.dtype = check_params(op, params);
  l.master = !master_params.empty();
  l.state_dtype = l.master ? at::kFloat : l.dtype;
  l.n = params.size();
  check_list(op, "grads", grads, l.n, l.dtype, params);
  check_list(op, "exp_avgs", exp_avgs, l.n, l.state_dtype, params);
  if (l.master) check_list(op, "master_params", master_params, l.n, at::kFloat, params);
  return l;
}

// A 0-dim (or one-element) floating CPU tensor read on the host, once per call.
std::optional<double> read_scalar(const char* op, const char* name,
                                  const std::optional<Tensor>& t) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " is on ", t->device(), ", expected cpu");
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must have one element, got ", t->numel());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", name,
              " must be a floating tensor, got ", dtype_name(t->scalar_type()));
  return t->item<double>();
}

// The step count of one tensor: a float32 (or float64) one-element CPU tensor,
// read straight from memory (a dispatcher call per tensor would cost more
// than the update of a small tensor).
double read_step(const char* op, const Tensor& step, size_t i) {
  TORCH_CHECK(step.defined() && step.device().is_cpu() && step.numel() == 1, op,
              ": steps[", i, "] must be a one-element cpu tensor");
  if (step.scalar_type() == at::kFloat) return static_cast<double>(*step.const_data_ptr<float>());
  TORCH_CHECK(step.scalar_type() == at::kDouble, op, ": steps[", i,
              "] must be float32, got ", dtype_name(step.scalar_type()));
  return *step.const_data_ptr<double>();
}

// Returns true when found_inf says to skip the step (nothing may be written).
bool skip_step(const char* op, const std::optional<Tensor>& found_inf) {
  const std::optional<double> v = read_scalar(op, "found_inf", found_inf);
  return v.has_value() && *v != 0.0;
}

float grad_multiplier(const char* op, const std::optional<Tensor>& grad_scale) {
  const std::optional<double> v = read_scalar(op, "grad_scale", grad_scale);
  return v.has_value() ? static_cast<float>(*v) : 1.0f;
}

double learning_rate(const char* op, double lr, const std::optional<Tensor>& lr_tensor) {
  const std::optional<double> v = read_scalar(op, "lr_tensor", lr_tensor);
  return v.has_value() ? *v : lr;
}

// ---- launching -----------------------------------------------------------------

struct Plan {
  std::vector<int64_t> numels;
  std::vector<Chunk> chunks;

  explicit Plan(TensorList tensors) {
    numels.reserve(tensors.size());
    for (const Tensor& t : tensors) numels.push_back(t.numel());
    chunks = plan_chunks(numels);
  }
  Launch launch(float grad_mul) const { return {numels.data(), chunks.data(), grad_mul}; }
  int64_t num_chunks() const { return static_cast<int64_t>(chunks.size()); }
};

// at::parallel_for is an inline OpenMP region: an extension compiled without
// -fopenmp silently runs it on one thread.
#ifndef _OPENMP
#pragma message("fastopt: compiled without -fopenmp; the CPU kernels will run on one thread")
#endif

// One parallel region over all chunks. Chunks are equal-sized (NOTE
// [multi-tensor chunking]), so at::parallel_for's static split into one
// contiguous range per thread is balanced.
template <typename F>
void run_chunks(int64_t num_chunks, const F& f) {
  if (num_chunks == 0) return;
  at::parallel_for(0, num_chunks, 1, f);
}

// Calls f(P{}, std::bool_constant<MASTER>{}) for the params' storage type.
template <typename F>
void dispatch_param_type(const char* op, at::ScalarType dtype, bool master, F&& f) {
  TORCH_CHECK(!master || dtype != at::kFloat, op,
              ": master_params given for float32 params (master weights are for "
              "bfloat16/float16 params only)");
  switch (dtype) {
    case at::kFloat:
      return f(float{}, std::false_type{});
    case at::kBFloat16:
      return master ? f(c10::BFloat16{}, std::true_type{}) : f(c10::BFloat16{}, std::false_type{});
    case at::kHalf:
      return master ? f(c10::Half{}, std::true_type{}) : f(c10::Half{}, std::false_type{});
    default:
      TORCH_CHECK(false, op, ": unsupported params dtype ", dtype_name(dtype));
  }
}

template <typename F>
void dispatch_bool(bool value, F&& f) {
  return value ? f(std::true_type{}) : f(std::false_type{});
}

// ---- ops ---------------------------------------------------------------------

void adamw_cpu(TensorList params, TensorList grads, TensorList exp_avgs,
               TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList master_params,
               TensorList steps, double lr, const std::optional<Tensor>& lr_tensor,
               double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
               bool maximize, const std::optional<Tensor>& grad_scale,
               const std::optional<Tensor>& found_inf) {
  constexpr const char* op = "fastopt::adamw_";
  if (params.empty()) return;
  const auto [dtype, state_dtype, master, n] =
      check_update_lists(op, params, grads, exp_avgs, master_params);
  check_list(op, "exp_avg_sqs", exp_avg_sqs, n, state_dtype, params);
  if (amsgrad) {
    check_list(op, "max_exp_avg_sqs", max_exp_avg_sqs, n, state_dtype, params);
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs given but amsgrad is false");
  }
  TORCH_CHECK(steps.size() == n, op, ": steps has ", steps.size(),
              " tensors but params has ", n);

  if (skip_step(op, found_inf)) return;
  const float grad_mul = grad_multiplier(op, grad_scale);
  lr = learning_rate(op, lr, lr_tensor);

  std::vector<AdamWTensor> tensors(n);
  double last_step = -1.0;
  AdamWCoeffs coeffs{};
  for (size_t i = 0; i < n; ++i) {
    const double step = read_step(op, steps[i], i);
    // Usually every tensor of a group is at the same step: compute the
    // bias corrections (two pow calls) only when the step changes.
    if (step != last_step) {
      coeffs = adamw_coeffs(lr, beta1, beta2, eps, weight_decay, step);
      last_step = step;
    }
    AdamWTensor& t = tensors[i];
    t.param = params[i].data_ptr();
    t.grad = grads[i].const_data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr();
    t.max_exp_avg_sq = amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
    t.master_param = master ? master_params[i].data_ptr<float>() : nullptr;
    t.coeffs = coeffs;
  }
  const Plan plan(params);
  const Launch launch = plan.launch(grad_mul);
  const AdamWTensor* packed = tensors.data();

  dispatch_param_type(op, dtype, master, [&](auto p_tag, auto master_tag) {
    using P = decltype(p_tag);
    constexpr bool MASTER = decltype(master_tag)::value;
    dispatch_bool(amsgrad, [&](auto ams_tag) {
      dispatch_bool(maximize, [&](auto max_tag) {
        constexpr bool AMSGRAD = decltype(ams_tag)::value;
        constexpr bool MAXIMIZE = decltype(max_tag)::value;
        run_chunks(plan.num_chunks(), [&](int64_t begin, int64_t end) {
          adamw_chunks<P, MASTER, AMSGRAD, MAXIMIZE>(packed, launch, begin, end);
        });
      });
    });
  });
}

void lion_cpu(TensorList params, TensorList grads, TensorList exp_avgs,
              TensorList master_params, double lr, const std::optional<Tensor>& lr_tensor,
              double beta1, double beta2, double weight_decay, bool maximize,
              const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  constexpr const char* op = "fastopt::lion_";
  if (params.empty()) return;
  const auto [dtype, state_dtype, master, n] =
      check_update_lists(op, params, grads, exp_avgs, master_params);

  if (skip_step(op, found_inf)) return;
  const float grad_mul = grad_multiplier(op, grad_scale);
  lr = learning_rate(op, lr, lr_tensor);
  const LionCoeffs coeffs = lion_coeffs(lr, beta1, beta2, weight_decay);

  std::vector<LionTensor> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    LionTensor& t = tensors[i];
    t.param = params[i].data_ptr();
    t.grad = grads[i].const_data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr();
    t.master_param = master ? master_params[i].data_ptr<float>() : nullptr;
  }
  const Plan plan(params);
  const Launch launch = plan.launch(grad_mul);
  const LionTensor* packed = tensors.data();

  dispatch_param_type(op, dtype, master, [&](auto p_tag, auto master_tag) {
    using P = decltype(p_tag);
    constexpr bool MASTER = decltype(master_tag)::value;
    dispatch_bool(maximize, [&](auto max_tag) {
      constexpr bool MAXIMIZE = decltype(max_tag)::value;
      run_chunks(plan.num_chunks(), [&](int64_t begin, int64_t end) {
        lion_chunks<P, MASTER, MAXIMIZE>(packed, coeffs, launch, begin, end);
      });
    });
  });
}

Tensor grad_sumsq_cpu(TensorList grads) {
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
        TORCH_CHECK(false, op, ": grads[", i, "] has dtype ", dtype_name(g.scalar_type()),
                    "; expected float32, bfloat16, float16 or float64 (complex "
                    "gradients are passed as real views)");
    }
    data[i] = g.const_data_ptr();
  }
  const Plan plan(grads);
  const Launch launch = plan.launch(1.0f);
  std::vector<double> partials(static_cast<size_t>(plan.num_chunks()), 0.0);
  double* out = partials.data();
  const void* const* data_ptr = data.data();
  const DType* dtype_ptr = dtypes.data();
  run_chunks(plan.num_chunks(), [&](int64_t begin, int64_t end) {
    sumsq_chunks(data_ptr, dtype_ptr, launch, begin, end, out);
  });
  // Chunk order, not thread order: the same sum whatever the thread count.
  double total = 0.0;
  for (double partial : partials) total += partial;
  // Rounded to float here: a finite double beyond float's range becomes inf
  // (as the reference's .float() does) instead of failing a range check.
  return at::scalar_tensor(static_cast<float>(total), at::TensorOptions().dtype(at::kFloat));
}

void steps_add_cpu(TensorList steps, double value) {
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& t = steps[i];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == 1,
                "fastopt::steps_add_: steps[", i, "] must be a float32 CPU scalar tensor");
  }
  const float add = static_cast<float>(value);
  for (const at::Tensor& t : steps) *t.data_ptr<float>() += add;
}

}  // namespace
}  // namespace fastopt::cpu

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("steps_add_", &fastopt::cpu::steps_add_cpu);
  m.impl("adamw_", &fastopt::cpu::adamw_cpu);
  m.impl("lion_", &fastopt::cpu::lion_cpu);
  m.impl("grad_sumsq", &fastopt::cpu::grad_sumsq_cpu);
}
