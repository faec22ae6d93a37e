// CUDA implementations of the fastopt ops (schemas in csrc/ops.cpp): the host
// half. Everything here runs on the CPU thread that calls step(): it checks
// the lists, takes raw addresses and hands them to the launchers in the .cu
// files. Nothing here waits for the GPU: lr, step, grad_scale and found_inf
// are passed as device addresses the kernels read (STYLE rule 6).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "cuda/launch.h"

namespace fastopt {
namespace cuda {
namespace {

using at::Tensor;
using at::TensorList;

Storage storage_of(const Tensor& t, const char* what) {
  const at::ScalarType dtype = t.scalar_type();
  if (dtype == at::kBFloat16) return Storage::kBFloat16;
  if (dtype == at::kHalf) return Storage::kHalf;
  TORCH_CHECK(dtype == at::kFloat, "fastopt (cuda): ", what,
              " must be float32, bfloat16 or float16, got ", dtype);
  return Storage::kFloat;
}

// Checks one list against the params: length, device, dtype, size, layout.
void check_list(TensorList list, TensorList params, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(list.size() == params.size(), "fastopt (cuda): ", name, " has ", list.size(),
              " tensors, params has ", params.size());
  const at::Device device = params[0].device();
  for (size_t i = 0; i < list.size(); ++i) {
    const Tensor& t = list[i];
    TORCH_CHECK(t.device() == device, "fastopt (cuda): ", name, "[", i, "] is on ", t.device(),
                ", params are on ", device);
    TORCH_CHECK(t.scalar_type() == dtype, "fastopt (cuda): ", name, "[", i, "] is ",
                t.scalar_type(), ", expected ", dtype);
    TORCH_CHECK(t.numel() == params[i].numel(), "fastopt (cuda): ", name, "[", i, "] has ",
                t.numel(), " elements, params[", i, "] has ", params[i].numel());
    TORCH_CHECK(t.is_contiguous(), "fastopt (cuda): ", name, "[", i, "] is not contiguous");
  }
}

// A device scalar the kernels read: float32, one element, on the params' device.
const float* device_scalar(const std::optional<Tensor>& t, const Tensor& like, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == like.device(), "fastopt (cuda): ", name, " is on ", t->device(),
              ", params are on ", like.device());
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == 1,
              "fastopt (cuda): ", name, " must be a float32 tensor of one element");
  return t->data_ptr<float>();
}

void push(RawLists& raw, TensorList list) {
  std::vector<void*> ptrs;
  ptrs.reserve(list.size());
  for (const Tensor& t : list) ptrs.push_back(t.data_ptr());
  raw.lists.push_back(std::move(ptrs));
}

// Checks params and the lists shared by AdamW and Lion (grads, master_params)
// and fills the call fields they share; call.master says whether master
// weights are on.
void check_update(TensorList params, TensorList grads, TensorList master_params, double lr,
                  const std::optional<Tensor>& lr_tensor, double beta1, double beta2,
                  double weight_decay, bool maximize, const std::optional<Tensor>& grad_scale,
                  const std::optional<Tensor>& found_inf, UpdateCall& call) {
  const Tensor& p0 = params[0];
  TORCH_CHECK(p0.is_cuda(), "fastopt (cuda): params must be CUDA tensors");
  const Storage storage = storage_of(p0, "params");
  check_list(params, params, p0.scalar_type(), "params");
  check_list(grads, params, p0.scalar_type(), "grads");
  const bool master = !master_params.empty();
  if (master) {
    TORCH_CHECK(storage != Storage::kFloat,
                "fastopt (cuda): master_params are only for bfloat16/float16 params");
    check_list(master_params, params, at::kFloat, "master_params");
  }
  call.param = storage;
  call.master = master;
  call.maximize = maximize;
  call.lr = lr;
  call.lr_ptr = device_scalar(lr_tensor, p0, "lr_tensor");
  call.beta1 = beta1;
  call.beta2 = beta2;
  call.weight_decay = weight_decay;
  call.grad_scale = device_scalar(grad_scale, p0, "grad_scale");
  call.found_inf = device_scalar(found_inf, p0, "found_inf");
}

void adamw_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                TensorList max_exp_avg_sqs, TensorList master_params, TensorList steps, double lr,
                const std::optional<Tensor>& lr_tensor, double beta1, double beta2, double eps,
                double weight_decay, bool amsgrad, bool maximize,
                const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  if (params.empty()) return;
  AdamWCall call;
  check_update(params, grads, master_params, lr, lr_tensor, beta1, beta2, weight_decay, maximize,
               grad_scale, found_inf, call);
  const bool master = call.master;
  const at::ScalarType state = master ? at::kFloat : params[0].scalar_type();
  check_list(exp_avgs, params, state, "exp_avgs");
  check_list(exp_avg_sqs, params, state, "exp_avg_sqs");
  TORCH_CHECK(amsgrad == !max_exp_avg_sqs.empty(),
              "fastopt (cuda): max_exp_avg_sqs must be given exactly when amsgrad is true");
  if (amsgrad) check_list(max_exp_avg_sqs, params, state, "max_exp_avg_sqs");
  TORCH_CHECK(steps.size() == params.size(), "fastopt (cuda): steps has ", steps.size(),
              " tensors, params has ", params.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].device() == params[0].device() && steps[i].scalar_type() == at::kFloat &&
                    steps[i].numel() == 1,
                "fastopt (cuda): steps[", i, "] must be a float32 scalar on ", params[0].device());
  }

  call.amsgrad = amsgrad;
  call.eps = eps;

  RawLists raw;
  for (TensorList l : {params, grads, exp_avgs, exp_avg_sqs}) push(raw, l);
  if (amsgrad) push(raw, max_exp_avg_sqs);
  if (master) push(raw, master_params);
  push(raw, steps);
  for (const Tensor& p : params) raw.numel.push_back(p.numel());

  const c10::cuda::CUDAGuard guard(params[0].device());
  C10_CUDA_CHECK(launch_adamw(raw, call, c10::cuda::getCurrentCUDAStream()));
}

void lion_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList master_params,
               double lr, const std::optional<Tensor>& lr_tensor, double beta1, double beta2,
               double weight_decay, bool maximize, const std::optional<Tensor>& grad_scale,
               const std::optional<Tensor>& found_inf) {
  if (params.empty()) return;
  LionCall call;
  check_update(params, grads, master_params, lr, lr_tensor, beta1, beta2, weight_decay, maximize,
               grad_scale, found_inf, call);
  const bool master = call.master;
  check_list(exp_avgs, params, master ? at::kFloat : params[0].scalar_type(), "exp_avgs");

  RawLists raw;
  for (TensorList l : {params, grads, exp_avgs}) push(raw, l);
  if (master) push(raw, master_params);
  for (const Tensor& p : params) raw.numel.push_back(p.numel());

  const c10::cuda::CUDAGuard guard(params[0].device());
  C10_CUDA_CHECK(launch_lion(raw, call, c10::cuda::getCurrentCUDAStream()));
}

Tensor grad_sumsq_cuda(TensorList grads) {
  TORCH_CHECK(!grads.empty(), "fastopt (cuda): grad_sumsq needs at least one tensor");
  const at::Device device = grads[0].device();
  TORCH_CHECK(device.is_cuda(), "fastopt (cuda): grads must be CUDA tensors");
  // Grads of several dtypes may come in one call; each dtype gets its own
  // launches, all writing into one partials buffer (NOTE [deterministic norm]).
  const Storage kinds[] = {Storage::kFloat, Storage::kBFloat16, Storage::kHalf};
  RawLists by_kind[3];
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& g = grads[i];
    TORCH_CHECK(g.device() == device, "fastopt (cuda): grads[", i, "] is on ", g.device(),
                ", grads[0] is on ", device);
    TORCH_CHECK(g.is_contiguous(), "fastopt (cuda): grads[", i, "] is not contiguous");
    RawLists& raw = by_kind[static_cast<int>(storage_of(g, "grads"))];
    if (raw.lists.empty()) raw.lists.emplace_back();
    raw.lists[0].push_back(g.data_ptr());
    raw.numel.push_back(g.numel());
  }
  int64_t count = 0;
  for (const RawLists& raw : by_kind) count += grad_sumsq_partials(raw.numel);

  const c10::cuda::CUDAGuard guard(device);
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(device);
  const Tensor partials = at::empty({std::max<int64_t>(count, 1)}, opts);
  Tensor out = at::empty({}, opts);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t filled = 0;
  for (int k = 0; k < 3; ++k) {
    if (by_kind[k].numel.empty()) continue;
    int64_t written = 0;
    C10_CUDA_CHECK(launch_grad_sumsq_partials(by_kind[k], kinds[k], partials.data_ptr<float>(),
                                              filled, &written, stream));
    filled += written;
  }
  TORCH_INTERNAL_ASSERT(filled == count, "fastopt (cuda): grad_sumsq partials miscounted");
  C10_CUDA_CHECK(
      launch_grad_sumsq_finish(partials.data_ptr<float>(), count, out.data_ptr<float>(), stream));
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fastopt

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("adamw_", &fastopt::cuda::adamw_cuda);
  m.impl("lion_", &fastopt::cuda::lion_cuda);
  m.impl("grad_sumsq", &fastopt::cuda::grad_sumsq_cuda);
}
