// Operator schemas of the fastopt extension: the one place they are declared.
// The CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) are two
// dispatch keys of these same ops; fake kernels for torch.compile are
// registered in fastopt/backends/compiled.py. The Triton and reference
// backends implement the same signatures in Python.
//
// Conventions shared by every update op (the Python side,
// fastopt/functional.py, documents them for users):
// * lists are parallel and hold contiguous tensors of one device; params
//   share one dtype (float32, bfloat16 or float16; float64 runs on the
//   reference backend) and grads share one dtype, the params' or float32 for
//   bfloat16/float16 params (torch's Tensor.grad_dtype); the moment lists share
//   one dtype, read from exp_avgs: float32, bfloat16 or the params' dtype (the
//   optimizers' state_dtype). The op entries' checks (csrc/op_checks.h) come
//   before any write: a call that fails writes nothing.
// * master_params empty -> no master weights; float32 -> fp32 masters; int16
//   (bfloat16 params only) -> remainders (NOTE [master remainder] in
//   fastopt/update_math.h). max_exp_avg_sqs empty -> no amsgrad state.
// * state_steps: float32 0-dim tensors, already incremented for this step.
// * lr_tensor, when given, is a float32 0-dim tensor on the params' device and
//   replaces the float lr (a GPU step keeps lr device-side).
// * the gradient transform (NOTE [gradient transform] in
//   csrc/include/fastopt/update_math.h): g * grad_mul, clamped to
//   [-max_grad_value, max_grad_value], times clip_coef. grad_mul and clip_coef
//   are float32 0-dim tensors on the params' device (None: 1); maximize is
//   applied as a sign on grad_mul.
// * skip: float32 0-dim; when non-zero the op returns without writing anything.
#include <torch/library.h>

TORCH_LIBRARY(fastopt, m) {
  m.def(
      "adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, "
      "Tensor[] state_steps, *, float lr, Tensor? lr_tensor, float beta1, float beta2, "
      "float eps, float weight_decay, bool amsgrad, bool maximize, Tensor? grad_mul, "
      "float? max_grad_value, Tensor? clip_coef, Tensor? skip) -> ()");
  m.def(
      "lion_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] master_params, *, float lr, Tensor? lr_tensor, float beta1, float beta2, "
      "float weight_decay, bool maximize, Tensor? grad_mul, float? max_grad_value, "
      "Tensor? clip_coef, Tensor? skip) -> ()");
  // AdEMAMix (Pagliardini et al. 2024): exp_avgs is the fast EMA m1,
  // exp_avgs_slow the slow EMA m2. t_alpha / t_beta3 None: no warm-up.
  m.def(
      "ademamix_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avgs_slow, Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] master_params, "
      "Tensor[] state_steps, *, float lr, Tensor? lr_tensor, float beta1, float beta2, "
      "float beta3, float alpha, float? t_alpha, float? t_beta3, float eps, "
      "float weight_decay, bool maximize, Tensor? grad_mul, float? max_grad_value, "
      "Tensor? clip_coef, Tensor? skip) -> ()");
  // Sum over every element of every tensor of clamp(g * grad_mul, -c, c)^2
  // (c = max_grad_value; None: no clamp; grad_mul None: 1), as a float32 0-dim
  // tensor on the tensors' device (accumulated in double on the CPU).
  // float64 gradients are allowed here (squared in double).
  m.def("grad_sumsq(Tensor[] grads, *, Tensor? grad_mul=None, float? max_grad_value=None) -> Tensor");
  // steps[i] += value for float32 0-dim CPU tensors, in one C++ loop: on the
  // CPU torch._foreach_add_ dispatches once per tensor (NOTE [step counters]
  // in fastopt/_base.py); GPUs keep torch's fused _foreach_add_.
  m.def("steps_add_(Tensor(a!)[] steps, float value) -> ()");
}

// The Python module fastopt._C itself (whose import runs these registrations)
// is defined with the step plan classes in csrc/plan.cpp.
