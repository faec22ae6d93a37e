// CUDA op entries of the fastopt ops (schemas and conventions: csrc/ops.cpp).
//
// Each entry checks its arguments (csrc/op_checks.h, shared with the CPU
// entries), fills the op's one params struct (csrc/cuda/launch.h) and its raw
// address lists, and calls the op's launcher in its .cu file. Nothing here
// waits for the GPU: lr, the steps, grad_mul, clip_coef and skip travel as
// device addresses the kernels read (NOTE [no host sync] in launch.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <vector>

#include "cuda/launch.h"
#include "op_checks.h"

namespace fastopt {
namespace cuda {
namespace {

using at::Tensor;
using at::TensorList;

Storage storage_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16:
      return Storage::kBFloat16;
    case at::kHalf:
      return Storage::kHalf;
    case at::kDouble:
      return Storage::kDouble;
    case at::kByte:  // 8-bit moments (NOTE [int8 moments])
      return Storage::kQ8;
    default:  // the checks allow float32 and the above only
      return Storage::kFloat;
  }
}

// The UpdateParams part of an op's params, from its checked lists and scalars.
void fill_update_params(const char* op, const UpdateLists& l, TensorList params, double lr,
                        const std::optional<Tensor>& lr_tensor, bool maximize,
                        const std::optional<Tensor>& grad_mul,
                        std::optional<double> max_grad_value,
                        const std::optional<Tensor>& clip_coef,
                        const std::optional<Tensor>& skip, UpdateParams& p) {
  const at::Device device = params[0].device();
  p.param = storage_of(l.param);
  p.grad = storage_of(l.grad);
  p.state = storage_of(l.state);
  p.master = l.master;
  p.lr = lr;
  p.lr_ptr = scalar_ptr(op, "lr_tensor", lr_tensor, device);
  p.grad_mul = scalar_ptr(op, "grad_mul", grad_mul, device);
  p.grad_sign = maximize ? -1.0f : 1.0f;
  p.max_grad_value = static_cast<float>(clamp_bound(op, max_grad_value));
  p.clip_coef = scalar_ptr(op, "clip_coef", clip_coef, device);
  p.skip = scalar_ptr(op, "skip", skip, device);
}

// The address lists of a launch, in the order the op's kernel reads them.
RawLists raw_lists(TensorList params, std::initializer_list<TensorList> lists) {
  RawLists raw;
  for (TensorList list : lists) {
    if (list.empty()) continue;  // an absent optional list (amsgrad, master weights)
    std::vector<void*> ptrs;
    ptrs.reserve(list.size());
    // data_ptr(), not const_data_ptr(): it materialises a copy-on-write
    // storage before the kernel writes through the address.
    for (const Tensor& t : list) ptrs.push_back(t.data_ptr());
    raw.lists.push_back(std::move(ptrs));
  }
  raw.numel.reserve(params.size());
  for (const Tensor& p : params) raw.numel.push_back(p.numel());
  return raw;
}

void adamw_cuda(TensorList params, TensorList grads, TensorList exp_avgs,
                TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList master_params,
                TensorList state_steps, double lr, const std::optional<Tensor>& lr_tensor,
                double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                bool maximize, const std::optional<Tensor>& grad_mul,
                std::optional<double> max_grad_value, const std::optional<Tensor>& clip_coef,
                const std::optional<Tensor>& skip) {
  constexpr const char* op = "fastopt::adamw_";
  if (params.empty()) return;
  const UpdateLists l = check_update_lists(op, at::kCUDA, params, grads, master_params, exp_avgs);
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

  AdamWParams p;
  fill_update_params(op, l, params, lr, lr_tensor, maximize, grad_mul, max_grad_value,
                     clip_coef, skip, p);
  p.beta1 = beta1;
  p.beta2 = beta2;
  p.eps = eps;
  p.weight_decay = weight_decay;
  p.amsgrad = amsgrad;
  const RawLists raw = raw_lists(params, {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                          master_params, state_steps});
  const c10::cuda::CUDAGuard guard(params[0].device());
  C10_CUDA_CHECK(launch_adamw(raw, p, c10::cuda::getCurrentCUDAStream()));
}

void lion_cuda(TensorList params, TensorList grads, TensorList exp_avgs,
               TensorList master_params, double lr, const std::optional<Tensor>& lr_tensor,
               double beta1, double beta2, double weight_decay, bool maximize,
               const std::optional<Tensor>& grad_mul, std::optional<double> max_grad_value,
               const std::optional<Tensor>& clip_coef, const std::optional<Tensor>& skip) {
  constexpr const char* op = "fastopt::lion_";
  if (params.empty()) return;
  const UpdateLists l = check_update_lists(op, at::kCUDA, params, grads, master_params, exp_avgs);
  check_moments(op, "exp_avgs", exp_avgs, l.state, params);

  LionParams p;
  fill_update_params(op, l, params, lr, lr_tensor, maximize, grad_mul, max_grad_value,
                     clip_coef, skip, p);
  p.beta1 = beta1;
  p.beta2 = beta2;
  p.weight_decay = weight_decay;
  const RawLists raw = raw_lists(params, {params, grads, exp_avgs, master_params});
  const c10::cuda::CUDAGuard guard(params[0].device());
  C10_CUDA_CHECK(launch_lion(raw, p, c10::cuda::getCurrentCUDAStream()));
}

void ademamix_cuda(TensorList params, TensorList grads, TensorList exp_avgs,
                   TensorList exp_avgs_slow, TensorList exp_avg_sqs, TensorList master_params,
                   TensorList state_steps, double lr, const std::optional<Tensor>& lr_tensor,
                   double beta1, double beta2, double beta3, double alpha,
                   std::optional<double> t_alpha, std::optional<double> t_beta3, double eps,
                   double weight_decay, bool maximize, const std::optional<Tensor>& grad_mul,
                   std::optional<double> max_grad_value, const std::optional<Tensor>& clip_coef,
                   const std::optional<Tensor>& skip) {
  constexpr const char* op = "fastopt::ademamix_";
  if (params.empty()) return;
  const UpdateLists l = check_update_lists(op, at::kCUDA, params, grads, master_params, exp_avgs);
  check_moments(op, "exp_avgs", exp_avgs, l.state, params);
  check_moments(op, "exp_avgs_slow", exp_avgs_slow, l.state, params);
  check_moments(op, "exp_avg_sqs", exp_avg_sqs, l.state, params);
  check_steps(op, state_steps, params);
  check_warmups(op, t_alpha, t_beta3);

  AdEMAMixParams p;
  fill_update_params(op, l, params, lr, lr_tensor, maximize, grad_mul, max_grad_value,
                     clip_coef, skip, p);
  p.beta1 = beta1;
  p.beta2 = beta2;
  p.beta3 = beta3;
  p.alpha = alpha;
  p.t_alpha = t_alpha.value_or(0.0);
  p.t_beta3 = t_beta3.value_or(0.0);
  p.eps = eps;
  p.weight_decay = weight_decay;
  const RawLists raw = raw_lists(
      params, {params, grads, exp_avgs, exp_avgs_slow, exp_avg_sqs, master_params, state_steps});
  const c10::cuda::CUDAGuard guard(params[0].device());
  C10_CUDA_CHECK(launch_ademamix(raw, p, c10::cuda::getCurrentCUDAStream()));
}

Tensor grad_sumsq_cuda(TensorList grads, const std::optional<Tensor>& grad_mul,
                       std::optional<double> max_grad_value) {
  constexpr const char* op = "fastopt::grad_sumsq";
  // With no grads the dispatcher chose CUDA for grad_mul: its device it is.
  TORCH_CHECK(!grads.empty() || (grad_mul.has_value() && grad_mul->defined()), op,
              ": no tensor to place the result on");
  const at::Device device = !grads.empty() ? grads[0].device() : grad_mul->device();
  TORCH_CHECK(device.is_cuda(), op, ": grads[0] must be a cuda tensor");
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(device);
  SumsqParams p;
  p.grad_mul = scalar_ptr(op, "grad_mul", grad_mul, device);
  p.max_grad_value = clamp_bound(op, max_grad_value);
  if (grads.empty()) return at::zeros({}, opts);
  // Grads of several dtypes may come in one call; each dtype gets its own
  // launches, all writing into one partials buffer (NOTE [deterministic norm]).
  constexpr Storage kinds[] = {Storage::kFloat, Storage::kBFloat16, Storage::kHalf,
                               Storage::kDouble};
  RawLists by_kind[4];
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& g = grads[i];
    TORCH_CHECK(g.defined() && g.device() == device, op, ": grads[", i, "] is on ",
                g.defined() ? g.device() : device, ", grads[0] is on ", device);
    TORCH_CHECK(g.is_contiguous(), op, ": grads[", i,
                "] is not contiguous (the compiled kernels need contiguous tensors)");
    const at::ScalarType dtype = g.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
                    dtype == at::kDouble,
                op, ": grads[", i, "] has dtype ", c10::toString(dtype),
                "; expected float32, bfloat16, float16 or float64");
    RawLists& raw = by_kind[static_cast<int>(storage_of(dtype))];
    if (raw.lists.empty()) raw.lists.emplace_back();
    raw.lists[0].push_back(const_cast<void*>(g.const_data_ptr()));
    raw.numel.push_back(g.numel());
  }
  int64_t count = 0;
  for (const RawLists& raw : by_kind) count += grad_sumsq_partials(raw.numel);

  const c10::cuda::CUDAGuard guard(device);
  const Tensor partials = at::empty({std::max<int64_t>(count, 1)}, opts.dtype(at::kDouble));
  Tensor out = at::empty({}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  p.partials = partials.data_ptr<double>();
  p.first_partial = 0;
  for (int k = 0; k < 4; ++k) {
    if (by_kind[k].numel.empty()) continue;
    p.grad = kinds[k];
    int64_t written = 0;
    C10_CUDA_CHECK(launch_grad_sumsq_partials(by_kind[k], p, &written, stream));
    p.first_partial += written;
  }
  TORCH_INTERNAL_ASSERT(p.first_partial == count, op, ": partials miscounted");
  C10_CUDA_CHECK(launch_grad_sumsq_finish(partials.data_ptr<double>(), count,
                                          out.data_ptr<float>(), stream));
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fastopt

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("adamw_", &fastopt::cuda::adamw_cuda);
  m.impl("lion_", &fastopt::cuda::lion_cuda);
  m.impl("ademamix_", &fastopt::cuda::ademamix_cuda);
  m.impl("grad_sumsq", &fastopt::cuda::grad_sumsq_cuda);
}
