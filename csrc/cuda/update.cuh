// What the three update kernels (adamw.cu, lion.cu, ademamix.cu) share,
// written once: on the host, the dispatch of a call's storage types to a
// kernel instantiation and the launches through multi-tensor apply; on the
// device, the kernel prologue (NOTE [update kernel prologue]). Included by
// the .cu files only.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "fastopt/update_math.h"

namespace fastopt {
namespace cuda {

// The storage marker of 8-bit moments (the kernels' S; csrc/cuda/q8.cuh).
struct Q8 {
  uint8_t bits;
};

// NOTE [128-bit access]: the narrowest list (the params P, or the moments S
// when they are narrower: fp32 params with bf16 moments) fills one 16-byte
// word per thread and iteration.
template <typename P, typename S>
constexpr int kVecElems = 16 / static_cast<int>(sizeof(P) < sizeof(S) ? sizeof(P) : sizeof(S));

// Whether a master list is in the table (its slot shifts the later lists).
template <Master MASTER>
constexpr int kHasMaster = MASTER == Master::kNone ? 0 : 1;

// ---- host: from a call's storage types to launches --------------------------

// f.template operator()<P, G, S, MASTER>() for the call's master kind; only
// the combinations the op checks allow are instantiated (masters for 16-bit
// params, remainders for bf16 params).
template <typename P, typename G, typename S, typename F>
cudaError_t dispatch_master(const UpdateParams& p, F& f) {
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    if (p.master == Master::kRemainder) return f.template operator()<P, G, S, Master::kRemainder>();
  }
  if constexpr (!std::is_same_v<P, float>) {
    if (p.master == Master::kFp32) return f.template operator()<P, G, S, Master::kFp32>();
  }
  return f.template operator()<P, G, S, Master::kNone>();
}

// The moments' storage: float32, bf16, the params' type or 8-bit.
template <typename P, typename G, typename F>
cudaError_t dispatch_state(const UpdateParams& p, F& f) {
  switch (p.state) {
    case Storage::kFloat:
      return dispatch_master<P, G, float>(p, f);
    case Storage::kBFloat16:
      return dispatch_master<P, G, c10::BFloat16>(p, f);
    case Storage::kQ8:  // NOTE [int8 moments on the GPU]
      return dispatch_master<P, G, Q8>(p, f);
    default:
      return dispatch_master<P, G, P>(p, f);
  }
}

template <typename P, typename F>
cudaError_t dispatch_grad(const UpdateParams& p, F& f) {
  if constexpr (std::is_same_v<P, float>) {
    return dispatch_state<float, float>(p, f);  // the op entry allows nothing else
  } else {
    return p.grad == Storage::kFloat ? dispatch_state<P, float>(p, f) : dispatch_state<P, P>(p, f);
  }
}

// Returns f.template operator()<P, G, S, MASTER>() for the params', grads' and
// moments' storage types and the master kind: the one place an update call's
// Storage values become C++ types.
template <typename F>
cudaError_t dispatch_update(const UpdateParams& p, F&& f) {
  switch (p.param) {
    case Storage::kFloat:
      return dispatch_grad<float>(p, f);
    case Storage::kBFloat16:
      return dispatch_grad<c10::BFloat16>(p, f);
    case Storage::kHalf:
      return dispatch_grad<c10::Half>(p, f);
    default:
      return cudaErrorInvalidValue;
  }
}

// Packs l's parallel lists into DEPTH-deep tables (pack_and_launch) and calls
// launch(table, nblocks, first_block) for each, which issues one kernel launch.
// Returns the first launch error; *blocks_launched (if given) gets the total
// number of blocks, which grad_sumsq needs to place its partial sums.
template <int DEPTH, typename Launch>
cudaError_t launch_lists(const RawLists& l, Launch&& launch, int64_t* blocks_launched = nullptr) {
  cudaError_t err = cudaSuccess;
  const int64_t total = pack_and_launch<DEPTH>(
      static_cast<int64_t>(l.numel.size()), [&](int k, int64_t i) { return l.lists[k][i]; },
      [&](int64_t i) { return l.numel[i]; },
      [&](const TensorTable<DEPTH>& table, int64_t blocks, int64_t first_block) {
        launch(table, static_cast<unsigned>(blocks), first_block);
        const cudaError_t e = cudaGetLastError();
        if (err == cudaSuccess) err = e;
      });
  if (blocks_launched != nullptr) *blocks_launched = total;
  return err;
}

// kernel<<<...>>>(table, params) for every table of the call's lists.
template <int DEPTH, typename Params>
cudaError_t launch_update(void (*kernel)(TensorTable<DEPTH>, Params), const RawLists& lists,
                          const Params& params, cudaStream_t stream) {
  static_assert(sizeof(TensorTable<DEPTH>) + sizeof(Params) <= kParamBytes,
                "kernel parameters overflow (NOTE [kernel parameter budget])");
  return launch_lists<DEPTH>(lists, [&](const TensorTable<DEPTH>& table, unsigned blocks,
                                        int64_t) {
    kernel<<<blocks, kBlockThreads, 0, stream>>>(table, params);
  });
}

// ---- device: the kernel prologue --------------------------------------------
//
// NOTE [update kernel prologue]
// Every update kernel starts here: it returns at once when the step is
// skipped (*skip != 0: nothing is written, so the caller's state stays
// bitwise unchanged); finds its block's chunk (NOTE [multi-tensor chunking]);
// computes the tensor's coefficients from the device-resident lr and step
// count in double (update_math.h's *_coeffs), before the chunk's addresses
// are formed, so that nothing is live across the math library's pow/log/exp
// (no stack frame: tests/test_cuda_build.py); and reads the gradient
// transform's scalars, folding maximize's sign into grad_mul (NOTE [gradient
// transform]). Every scalar is read on the device: NOTE [no host sync].

template <typename Coeffs>
struct UpdateBlock {
  bool skip;  // the step is skipped: return without writing
  ChunkRef chunk;
  Coeffs coeffs;
  GradTransform transform;
};

// STEP_LIST: the table list of state_steps, or -1 (Lion keeps none).
// make_coeffs(lr, step) computes the op's coefficients.
template <int STEP_LIST, int DEPTH, typename MakeCoeffs>
__device__ __forceinline__ auto begin_update(const TensorTable<DEPTH>& table,
                                             const UpdateParams& p, MakeCoeffs&& make_coeffs) {
  UpdateBlock<decltype(make_coeffs(0.0, 0.0))> b;
  b.skip = p.skip != nullptr && *p.skip != 0.0f;
  if (b.skip) return b;
  b.chunk = locate_chunk(table);
  const double lr = p.lr_ptr != nullptr ? static_cast<double>(*p.lr_ptr) : p.lr;
  double step = 0.0;
  if constexpr (STEP_LIST >= 0) {
    step = static_cast<double>(*static_cast<const float*>(table.ptrs[STEP_LIST][b.chunk.tensor]));
  }
  b.coeffs = make_coeffs(lr, step);
  const float mul = p.grad_mul != nullptr ? *p.grad_mul : 1.0f;
  b.transform.grad_mul = p.grad_sign * mul;
  b.transform.max_grad_value = p.max_grad_value;
  b.transform.clip_coef = p.clip_coef != nullptr ? *p.clip_coef : 1.0f;
  return b;
}

// ---- device: the weight an update runs on ------------------------------------

// The master list's storage: fp32 masters, or the remainder's bits (NOTE
// [master remainder]); float (never dereferenced) without one.
template <Master MASTER>
using master_t = std::conditional_t<MASTER == Master::kRemainder, uint16_t, float>;

template <Master MASTER, int N, bool VECTOR, typename P>
__device__ __forceinline__ void load_weight_n(const P* __restrict__ p,
                                              const master_t<MASTER>* __restrict__ master,
                                              float (&w)[N]) {
  if constexpr (MASTER == Master::kFp32) {
    load_n<N, VECTOR>(master, w);
  } else if constexpr (MASTER == Master::kRemainder) {
    uint16_t hi[N], lo[N];
    load_n<N, VECTOR>(reinterpret_cast<const uint16_t*>(p), hi);
    load_n<N, VECTOR>(master, lo);
#pragma unroll
    for (int j = 0; j < N; ++j) w[j] = __uint_as_float(join_remainder(hi[j], lo[j]));
  } else {
    load_n<N, VECTOR>(p, w);
  }
}

// The updated weight into the param (rounded to nearest even, or with a
// remainder to nearest with ties away from zero) and the master, if any.
template <Master MASTER, int N, bool VECTOR, typename P>
__device__ __forceinline__ void store_weight_n(P* __restrict__ p,
                                               master_t<MASTER>* __restrict__ master,
                                               const float (&w)[N]) {
  if constexpr (MASTER == Master::kRemainder) {
    uint16_t hi[N], lo[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const uint32_t u = __float_as_uint(w[j]);
      hi[j] = split_param(u);
      lo[j] = split_remainder(u);
    }
    store_n<N, VECTOR>(reinterpret_cast<uint16_t*>(p), hi);
    store_n<N, VECTOR>(master, lo);
  } else {
    store_n<N, VECTOR>(p, w);
    if constexpr (MASTER == Master::kFp32) store_n<N, VECTOR>(master, w);
  }
}

}  // namespace cuda
}  // namespace fastopt
