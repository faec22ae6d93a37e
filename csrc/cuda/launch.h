// The seam between the op entries (ops_cuda.cpp: torch types, checks) and the
// kernel files (*.cu: raw pointers, packing, launches): one params struct per
// op, filled on the host by the op entry and passed by value to every launch
// of the op's kernel (flash-attention's params style). Keeping ATen out of
// the .cu files keeps nvcc's per-architecture passes short (NOTE [CUDA build
// time] in setup.py) and keeps device code free of anything but arithmetic.
//
// NOTE [no host sync]: every value a kernel needs that lives in a tensor (lr,
// the step counts, grad_mul, clip_coef, skip) travels as a device address
// the kernel reads, so an op call never waits for the GPU (STYLE rule 6).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "fastopt/update_math.h"

namespace fastopt {
namespace cuda {

enum class Storage { kFloat, kBFloat16, kHalf, kDouble, kQ8 };  // kQ8: 8-bit moments

// Parallel lists of raw addresses, lists[k][i] = tensor i of list k.
struct RawLists {
  std::vector<std::vector<void*>> lists;
  std::vector<int64_t> numel;
};

// What every update op's params carry: the storage types the host dispatches
// on, the learning rate and the gradient transform (NOTE [gradient transform]
// in fastopt/update_math.h).
struct UpdateParams {
  Storage param;           // params (float, bf16 or fp16)
  Storage grad;            // grads: param, or kFloat for bf16/fp16 params
  Storage state;           // the moments: kFloat, kBFloat16, param or kQ8 (state_dtype)
  Master master;           // where the weight lives (NOTE [master remainder])
  double lr;               // used when lr_ptr is null
  const float* lr_ptr;     // the lr tensor, or null
  const float* grad_mul;   // null: 1
  float grad_sign;         // -1 for maximize, else 1: a sign on grad_mul
  float max_grad_value;    // +inf when value clipping is off
  const float* clip_coef;  // null: 1
  const float* skip;       // non-zero: the kernels return at once; null: never skip
};

// lists: params, grads, exp_avgs, exp_avg_sqs, [max_exp_avg_sqs if amsgrad],
// [master_params if master], state_steps.
struct AdamWParams : UpdateParams {
  double beta1, beta2, eps, weight_decay;
  bool amsgrad;
};
cudaError_t launch_adamw(const RawLists& lists, const AdamWParams& params, cudaStream_t stream);

// lists: params, grads, exp_avgs, [master_params if master].
struct LionParams : UpdateParams {
  double beta1, beta2, weight_decay;
};
cudaError_t launch_lion(const RawLists& lists, const LionParams& params, cudaStream_t stream);

// lists: params, grads, exp_avgs, exp_avgs_slow, exp_avg_sqs, [master_params
// if master], state_steps. t_alpha / t_beta3 <= 0: no warm-up.
struct AdEMAMixParams : UpdateParams {
  double beta1, beta2, beta3, alpha, t_alpha, t_beta3, eps, weight_decay;
};
cudaError_t launch_ademamix(const RawLists& lists, const AdEMAMixParams& params,
                            cudaStream_t stream);

// grad_sumsq of the grads of one storage type (NOTE [deterministic norm] in
// grad_sumsq.cu): each block writes one partial sum, partials[first_partial +
// its index over all launches of the call].
struct SumsqParams {
  Storage grad;
  const float* grad_mul;  // null: 1
  double max_grad_value;  // +inf when off; rounded to fp32 for fp32/bf16/fp16 grads
  double* partials;
  int64_t first_partial;
};
// Number of per-block partial sums grad_sumsq needs for tensors of these sizes.
int64_t grad_sumsq_partials(const std::vector<int64_t>& numel);
// Launches the partial sums; *written gets how many blocks it launched.
cudaError_t launch_grad_sumsq_partials(const RawLists& grads, const SumsqParams& params,
                                       int64_t* written, cudaStream_t stream);
// out[0] = sum of partials[0 .. count) as float32, in a fixed order.
cudaError_t launch_grad_sumsq_finish(const double* partials, int64_t count, float* out,
                                     cudaStream_t stream);

}  // namespace cuda
}  // namespace fastopt
