// The seam between the op entries (ops_cuda.cpp: torch types, checks) and the
// kernel files (*.cu: raw pointers, packing, launches). Keeping ATen out of
// the .cu files keeps nvcc's per-architecture passes short (see the build-time
// note in setup.py) and keeps device code free of anything but arithmetic.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

namespace fastopt {
namespace cuda {

enum class Storage { kFloat, kBFloat16, kHalf };

// Parallel lists of raw addresses, lists[k][i] = tensor i of list k.
struct RawLists {
  std::vector<std::vector<void*>> lists;
  std::vector<int64_t> numel;
};

// What every update op's call carries; AdamWCall and LionCall add their own.
struct UpdateCall {
  Storage param;  // params and grads; states are fp32 iff master
  bool master;
  bool maximize;
  double lr;
  const float* lr_ptr;  // overrides lr when non-null
  double beta1, beta2, weight_decay;
  const float* grad_scale;  // null: 1
  const float* found_inf;   // null: never skip
};

struct AdamWCall : UpdateCall {
  bool amsgrad;
  double eps;
};
// lists: params, grads, exp_avgs, exp_avg_sqs, [max_exp_avg_sqs if amsgrad],
// [master_params if master], steps.
cudaError_t launch_adamw(const RawLists& lists, const AdamWCall& call, cudaStream_t stream);

struct LionCall : UpdateCall {};
// lists: params, grads, exp_avgs, [master_params if master].
cudaError_t launch_lion(const RawLists& lists, const LionCall& call, cudaStream_t stream);

// Number of per-block partial sums grad_sumsq needs for tensors of these sizes.
int64_t grad_sumsq_partials(const std::vector<int64_t>& numel);
// Writes per-block partial sums of squares of one dtype's tensors into
// partials[first_partial ...]; returns how many it wrote through *written.
cudaError_t launch_grad_sumsq_partials(const RawLists& grads, Storage storage, float* partials,
                                       int64_t first_partial, int64_t* written,
                                       cudaStream_t stream);
// out[0] = sum of partials[0 .. count), in a fixed order (deterministic).
cudaError_t launch_grad_sumsq_finish(const float* partials, int64_t count, float* out,
                                     cudaStream_t stream);

}  // namespace cuda
}  // namespace fastopt
