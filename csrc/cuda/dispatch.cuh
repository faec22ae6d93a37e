// Host-side glue every kernel file shares: the Storage -> C++ type switch,
// packing RawLists into launches, and the scalar arguments of the update ops.
// Included only by the .cu files (it names c10's bf16/fp16 types, which
// launch.h keeps away from the ATen-facing ops_cuda.cpp).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"

namespace fastopt {
namespace cuda {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the storage type `storage` names and returns
// its result; the one place a Storage value becomes a C++ type.
template <typename F>
cudaError_t dispatch_storage(Storage storage, F&& f) {
  switch (storage) {
    case Storage::kFloat:
      return f(TypeTag<float>{});
    case Storage::kBFloat16:
      return f(TypeTag<c10::BFloat16>{});
    case Storage::kHalf:
      return f(TypeTag<c10::Half>{});
  }
  return cudaErrorInvalidValue;
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

// The fields an update op's kernel arguments share with its call (the
// UpdateCall part of AdamWCall / LionCall); the caller fills the op's extras.
template <typename Args>
Args update_args(const UpdateCall& call) {
  Args args;
  args.lr = call.lr;
  args.beta1 = call.beta1;
  args.beta2 = call.beta2;
  args.weight_decay = call.weight_decay;
  args.lr_ptr = call.lr_ptr;
  args.grad_scale = call.grad_scale;
  args.found_inf = call.found_inf;
  args.maximize = call.maximize;
  return args;
}

}  // namespace cuda
}  // namespace fastopt
