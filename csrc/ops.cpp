// Operator schemas of the fastopt extension: the one place they are declared.
// Device kernels register implementations in csrc/cpu and csrc/cuda; fake
// (meta) kernels for torch.compile live in fastopt/_ops.py.
//
// Conventions shared by every op (see fastopt/backends/__init__.py):
// * lists are parallel and hold tensors of one device; params share one
//   dtype, grads have the params' dtype; states are fp32 when master_params
//   is non-empty, otherwise the params' dtype; all contiguous.
// * master_params empty -> no master weights; max_exp_avg_sqs empty -> no
//   amsgrad state (amsgrad must then be false).
// * steps: float32 0-dim tensors, already incremented for this step.
// * lr_tensor, when given, is a float32 0-dim tensor on the params' device and
//   overrides the float lr (the GPU path keeps lr device-side).
// * grad_scale: float32 0-dim multiplier applied to every gradient element
//   (unscale and clip folded together). found_inf: float32 0-dim; when
//   non-zero the op returns without touching anything.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastopt, m) {
  m.def(
      "adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, "
      "Tensor(e!)[] master_params, Tensor[] steps, float lr, Tensor? lr_tensor, "
      "float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
      "bool maximize, Tensor? grad_scale, Tensor? found_inf) -> ()");
  m.def(
      "lion_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] master_params, float lr, Tensor? lr_tensor, float beta1, "
      "float beta2, float weight_decay, bool maximize, Tensor? grad_scale, "
      "Tensor? found_inf) -> ()");
  // Sum of squares of every element of every tensor, as a float32 0-dim
  // tensor on the tensors' device (accumulated in double on the CPU).
  m.def("grad_sumsq(Tensor[] grads) -> Tensor");
  // steps[i] += value for float32 0-dim tensors. On the CPU this replaces
  // torch._foreach_add_, which dispatches once per tensor (NOTE [step counters]
  // in fastopt/_base.py); GPUs keep torch's fused _foreach_add_.
  m.def("steps_add_(Tensor(a!)[] steps, float value) -> ()");
}

// The extension is loaded as a Python module (fastopt._C) so that importing it
// runs the registrations above; it defines no Python functions of its own.
static struct PyModuleDef fastopt_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                              nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastopt_c_module); }
