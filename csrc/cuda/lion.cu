// Lion over many tensors in a few launches (see NOTE [multi-tensor chunking]).
// The arithmetic is fastopt::lion_element from the shared header.
#include <type_traits>

#include "cuda/dispatch.cuh"
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "fastopt/update_math.h"

namespace fastopt {
namespace cuda {
namespace {

struct LionArgs {
  double lr;
  double beta1;
  double beta2;
  double weight_decay;
  const float* lr_ptr;      // overrides lr when non-null
  const float* grad_scale;  // null: 1
  const float* found_inf;   // null: never skip
  bool maximize;
};

// List order in the table: p, g, m, [master].
template <bool MASTER>
struct LionLayout {
  static constexpr int kMaster = 3;
  static constexpr int kDepth = 3 + MASTER;
};

template <typename P, bool MASTER>
struct LionChunk {
  using S = std::conditional_t<MASTER, float, P>;
  P* p;
  const P* g;
  S* m;
  float* master;
  float grad_mul;
  LionCoeffs coeffs;

  template <int N, bool VECTOR>
  __device__ __forceinline__ void run(int off) {
    float w[N], gr[N], mo[N];
    if constexpr (MASTER) {
      load_n<N, VECTOR>(master + off, w);
    } else {
      load_n<N, VECTOR>(p + off, w);
    }
    load_n<N, VECTOR>(g + off, gr);
    load_n<N, VECTOR>(m + off, mo);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      // MAXIMIZE=false: see NOTE [maximize as a sign] in adamw.cu.
      lion_element<false>(w[j], gr[j], mo[j], grad_mul, coeffs);
    }
    store_n<N, VECTOR>(p + off, w);
    if constexpr (MASTER) store_n<N, VECTOR>(master + off, w);
    store_n<N, VECTOR>(m + off, mo);
  }
};

template <typename P, bool MASTER>
__global__ void __launch_bounds__(kBlockThreads)
    lion_kernel(const __grid_constant__ TensorTable<LionLayout<MASTER>::kDepth> table,
                const __grid_constant__ LionArgs args) {
  using Chunk = LionChunk<P, MASTER>;
  using S = typename Chunk::S;
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;

  const ChunkRef c = locate_chunk(table);
  const int t = c.tensor;
  Chunk chunk;
  chunk.p = static_cast<P*>(table.ptrs[0][t]) + c.begin;
  chunk.g = static_cast<const P*>(table.ptrs[1][t]) + c.begin;
  chunk.m = static_cast<S*>(table.ptrs[2][t]) + c.begin;
  chunk.master =
      MASTER ? static_cast<float*>(table.ptrs[LionLayout<MASTER>::kMaster][t]) + c.begin : nullptr;

  const double lr = args.lr_ptr != nullptr ? static_cast<double>(*args.lr_ptr) : args.lr;
  chunk.coeffs = lion_coeffs(lr, args.beta1, args.beta2, args.weight_decay);
  const float scale = args.grad_scale != nullptr ? *args.grad_scale : 1.0f;
  chunk.grad_mul = args.maximize ? -scale : scale;

  bool aligned = aligned16(chunk.p) && aligned16(chunk.g) && aligned16(chunk.m);
  if (MASTER) aligned = aligned && aligned16(chunk.master);
  constexpr int kVec = 16 / sizeof(P);  // NOTE [128-bit access]
  for_each_in_chunk<kVec>(c.len, aligned, chunk);
}

template <typename P, bool MASTER>
cudaError_t run(const RawLists& l, const LionArgs& args, cudaStream_t stream) {
  constexpr int kDepth = LionLayout<MASTER>::kDepth;
  using Table = TensorTable<kDepth>;
  static_assert(sizeof(Table) + sizeof(LionArgs) <= kParamBytes, "kernel parameters overflow");
  return launch_lists<kDepth>(l, [&](const Table& table, unsigned blocks, int64_t) {
    lion_kernel<P, MASTER><<<blocks, kBlockThreads, 0, stream>>>(table, args);
  });
}

template <typename P>
cudaError_t run_modes(const RawLists& l, const LionCall& call, const LionArgs& args,
                      cudaStream_t stream) {
  if constexpr (std::is_same_v<P, float>) {
    return run<P, false>(l, args, stream);
  } else {
    return call.master ? run<P, true>(l, args, stream) : run<P, false>(l, args, stream);
  }
}

}  // namespace

cudaError_t launch_lion(const RawLists& lists, const LionCall& call, cudaStream_t stream) {
  const LionArgs args = update_args<LionArgs>(call);
  return dispatch_storage(call.param, [&](auto tag) {
    return run_modes<typename decltype(tag)::type>(lists, call, args, stream);
  });
}

}  // namespace cuda
}  // namespace fastopt
