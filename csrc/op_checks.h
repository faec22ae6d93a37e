// Argument checks shared by the CPU and CUDA op entries (csrc/cpu/ops_cpu.cpp,
// csrc/cuda/ops_cuda.cpp): the rules of csrc/ops.cpp's conventions, written
// once, with messages that name the op, the list and the index. Host C++ only
// (ATen); the .cu kernel files never see it.
#pragma once

#include <ATen/core/Tensor.h>
#include <fastopt/update_math.h>
#include <c10/util/Exception.h>

#include <limits>
#include <optional>

namespace fastopt {

// One list parallel to params: its length, and per tensor its device (that of
// params[0]), dtype, size and layout.
inline void check_list(const char* op, const char* name, at::TensorList list,
                       at::ScalarType dtype, at::TensorList params) {
  TORCH_CHECK(list.size() == params.size(), op, ": ", name, " has ", list.size(),
              " tensors but params has ", params.size());
  const at::Device device = params[0].device();
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(),
                ", params[0] is on ", device);
    TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, "[", i, "] has dtype ",
                c10::toString(t.scalar_type()), ", expected ", c10::toString(dtype));
    TORCH_CHECK(t.numel() == params[i].numel(), op, ": ", name, "[", i, "] has ", t.numel(),
                " elements but params[", i, "] has ", params[i].numel());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i,
                "] is not contiguous (the compiled kernels need contiguous tensors)");
  }
}

// A moment list: check_list, except that 8-bit moments (uint8, NOTE [int8
// moments]) hold q8_bytes(numel) bytes each, one dimension.
inline void check_moments(const char* op, const char* name, at::TensorList list,
                          at::ScalarType dtype, at::TensorList params) {
  if (dtype != at::kByte) return check_list(op, name, list, dtype, params);
  TORCH_CHECK(list.size() == params.size(), op, ": ", name, " has ", list.size(),
              " tensors but params has ", params.size());
  const at::Device device = params[0].device();
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.defined() && t.device() == device && t.scalar_type() == at::kByte, op, ": ",
                name, "[", i, "] must be a uint8 tensor (8-bit moments) on ", device);
    const int64_t want = q8_bytes(params[i].numel());
    TORCH_CHECK(t.dim() == 1 && t.numel() == want && t.is_contiguous(), op, ": ", name, "[", i,
                "] holds ", t.numel(), " bytes; an 8-bit moment of ", params[i].numel(),
                " elements is a contiguous 1-D uint8 tensor of ", want,
                " bytes (NOTE [int8 moments])");
  }
}

// What the checks of the lists every update op takes establish (NOTE [what
// the fast backends take] in fastopt/backends/__init__.py).
struct UpdateLists {
  at::ScalarType param;  // params
  at::ScalarType grad;   // grads: the params' dtype, or float32 for bf16/fp16 params
  at::ScalarType state;  // moments: float32, bfloat16, the params' dtype or uint8 (8-bit)
  Master master;         // master_params: absent, fp32 masters or int16 remainders
};

// Checks params (non-empty, on a `device_type` device), grads, master_params
// and the dtype of the moments, taken from exp_avgs[0]; each op checks its
// moment lists against it after.
inline UpdateLists check_update_lists(const char* op, c10::DeviceType device_type,
                                      at::TensorList params, at::TensorList grads,
                                      at::TensorList master_params, at::TensorList exp_avgs) {
  UpdateLists l;
  TORCH_CHECK(params[0].defined() && params[0].device().type() == device_type, op,
              ": params[0] must be a ", c10::DeviceTypeName(device_type, /*lower_case=*/true),
              " tensor");
  l.param = params[0].scalar_type();
  TORCH_CHECK(l.param == at::kFloat || l.param == at::kBFloat16 || l.param == at::kHalf, op,
              ": params[0] has dtype ", c10::toString(l.param),
              "; the compiled kernels take float32, bfloat16 and float16 params (float64 runs "
              "on the reference backend)");
  check_list(op, "params", params, l.param, params);
  TORCH_CHECK(grads.size() == params.size(), op, ": grads has ", grads.size(),
              " tensors but params has ", params.size());
  l.grad = grads[0].defined() ? grads[0].scalar_type() : l.param;
  TORCH_CHECK(l.grad == l.param || (l.grad == at::kFloat && l.param != at::kFloat), op,
              ": grads[0] has dtype ", c10::toString(l.grad),
              "; grads must have the params' dtype (", c10::toString(l.param),
              ") or, for bfloat16/float16 params, float32");
  check_list(op, "grads", grads, l.grad, params);
  l.master = Master::kNone;
  if (!master_params.empty()) {
    TORCH_CHECK(l.param != at::kFloat, op,
                ": master_params given for float32 params (master weights are for "
                "bfloat16/float16 params only)");
    const at::ScalarType m =
        master_params[0].defined() ? master_params[0].scalar_type() : at::kFloat;
    TORCH_CHECK(m == at::kFloat || (m == at::kShort && l.param == at::kBFloat16), op,
                ": master_params[0] has dtype ", c10::toString(m),
                "; expected float32 (masters) or, for bfloat16 params, int16 (remainders, "
                "NOTE [master remainder])");
    l.master = m == at::kFloat ? Master::kFp32 : Master::kRemainder;
    check_list(op, "master_params", master_params, m, params);
  }
  TORCH_CHECK(exp_avgs.size() == params.size(), op, ": exp_avgs has ", exp_avgs.size(),
              " tensors but params has ", params.size());
  l.state = exp_avgs[0].defined() ? exp_avgs[0].scalar_type() : at::kFloat;
  TORCH_CHECK(l.state == at::kFloat || l.state == at::kBFloat16 || l.state == l.param ||
                  l.state == at::kByte,
              op, ": exp_avgs[0] has dtype ", c10::toString(l.state),
              "; the moments are float32, bfloat16, the params' dtype (",
              c10::toString(l.param), ") or uint8 (8-bit, NOTE [int8 moments])");
  return l;
}

// state_steps: one float32 one-element tensor per param, on the params' device.
inline void check_steps(const char* op, at::TensorList state_steps, at::TensorList params) {
  TORCH_CHECK(state_steps.size() == params.size(), op, ": state_steps has ",
              state_steps.size(), " tensors but params has ", params.size());
  const at::Device device = params[0].device();
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const at::Tensor& t = state_steps[i];
    TORCH_CHECK(t.defined() && t.device() == device && t.scalar_type() == at::kFloat &&
                    t.numel() == 1,
                op, ": state_steps[", i, "] must be a float32 tensor of one element on ",
                device);
  }
}

// The address of a scalar argument (lr_tensor, grad_mul, clip_coef, skip): a
// float32 one-element tensor on `device`; null when absent.
inline const float* scalar_ptr(const char* op, const char* name,
                               const std::optional<at::Tensor>& t, at::Device device) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1, op,
              ": ", name, " must be a float32 tensor of one element on ", device, ", got ",
              c10::toString(t->scalar_type()), " on ", t->device(), " with ", t->numel(),
              " elements");
  return t->const_data_ptr<float>();
}

// The clamp bound of value clipping: +inf when off (NOTE [gradient transform]).
inline double clamp_bound(const char* op, std::optional<double> max_grad_value) {
  if (!max_grad_value.has_value()) return std::numeric_limits<double>::infinity();
  TORCH_CHECK(*max_grad_value >= 0.0, op, ": max_grad_value must be non-negative, got ",
              *max_grad_value);
  return *max_grad_value;
}

// AdEMAMix's warm-up lengths: positive, or None (passed on as 0, update_math.h).
inline void check_warmups(const char* op, std::optional<double> t_alpha,
                          std::optional<double> t_beta3) {
  TORCH_CHECK(!t_alpha.has_value() || *t_alpha > 0.0, op, ": t_alpha must be positive or None");
  TORCH_CHECK(!t_beta3.has_value() || *t_beta3 > 0.0, op, ": t_beta3 must be positive or None");
}

}  // namespace fastopt
