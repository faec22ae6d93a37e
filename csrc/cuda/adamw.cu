// AdamW over many tensors in a few launches (see NOTE [multi-tensor chunking]).
// The arithmetic is fastopt::adamw_element from the shared header; this file
// only moves bytes to and from it.
#include <type_traits>

#include "cuda/dispatch.cuh"
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "fastopt/update_math.h"

namespace fastopt {
namespace cuda {
namespace {

struct AdamWArgs {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  const float* lr_ptr;      // overrides lr when non-null
  const float* grad_scale;  // null: 1
  const float* found_inf;   // null: never skip
  bool maximize;
};

// List order in the table: p, g, m, v, [vmax], [master], step.
template <bool MASTER, bool AMSGRAD>
struct AdamWLayout {
  static constexpr int kVmax = 4;
  static constexpr int kMaster = 4 + AMSGRAD;
  static constexpr int kStep = 4 + AMSGRAD + MASTER;
  static constexpr int kDepth = kStep + 1;
};

// P: storage of params and grads. States are fp32 with master weights,
// otherwise P (see the conventions in csrc/ops.cpp).
template <typename P, bool MASTER, bool AMSGRAD>
struct AdamWChunk {
  using S = std::conditional_t<MASTER, float, P>;
  P* p;
  const P* g;
  S* m;
  S* v;
  S* vmax;
  float* master;
  float grad_mul;
  AdamWCoeffs coeffs;

  template <int N, bool VECTOR>
  __device__ __forceinline__ void run(int off) {
    float w[N], gr[N], mo[N], ve[N], vm[N];
    if constexpr (MASTER) {
      load_n<N, VECTOR>(master + off, w);
    } else {
      load_n<N, VECTOR>(p + off, w);
    }
    load_n<N, VECTOR>(g + off, gr);
    load_n<N, VECTOR>(m + off, mo);
    load_n<N, VECTOR>(v + off, ve);
    if constexpr (AMSGRAD) load_n<N, VECTOR>(vmax + off, vm);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      // NOTE [maximize as a sign]: maximize is folded into grad_mul's sign on
      // the host side of this kernel (g * -s == -(g * s) exactly in IEEE
      // arithmetic), so MAXIMIZE=false here and the kernel count halves.
      adamw_element<AMSGRAD, false>(w[j], gr[j], mo[j], ve[j], vm[j], grad_mul, coeffs);
    }
    store_n<N, VECTOR>(p + off, w);
    if constexpr (MASTER) store_n<N, VECTOR>(master + off, w);
    store_n<N, VECTOR>(m + off, mo);
    store_n<N, VECTOR>(v + off, ve);
    if constexpr (AMSGRAD) store_n<N, VECTOR>(vmax + off, vm);
  }
};

template <typename P, bool MASTER, bool AMSGRAD>
__global__ void __launch_bounds__(kBlockThreads)
    adamw_kernel(const __grid_constant__ TensorTable<AdamWLayout<MASTER, AMSGRAD>::kDepth> table,
                 const __grid_constant__ AdamWArgs args) {
  using L = AdamWLayout<MASTER, AMSGRAD>;
  using Chunk = AdamWChunk<P, MASTER, AMSGRAD>;
  using S = typename Chunk::S;
  if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;

  const ChunkRef c = locate_chunk(table);
  const int t = c.tensor;
  Chunk chunk;
  // Coefficients once per block, from device-resident step and lr, in double
  // as the header (and the reference) do. Computed before the chunk's
  // addresses are formed: pow() is a real call, and values live across it
  // would have to be saved to the stack (the build test checks there is none).
  const double step = static_cast<double>(*static_cast<const float*>(table.ptrs[L::kStep][t]));
  const double lr = args.lr_ptr != nullptr ? static_cast<double>(*args.lr_ptr) : args.lr;
  chunk.coeffs = adamw_coeffs(lr, args.beta1, args.beta2, args.eps, args.weight_decay, step);
  const float scale = args.grad_scale != nullptr ? *args.grad_scale : 1.0f;
  chunk.grad_mul = args.maximize ? -scale : scale;

  chunk.p = static_cast<P*>(table.ptrs[0][t]) + c.begin;
  chunk.g = static_cast<const P*>(table.ptrs[1][t]) + c.begin;
  chunk.m = static_cast<S*>(table.ptrs[2][t]) + c.begin;
  chunk.v = static_cast<S*>(table.ptrs[3][t]) + c.begin;
  chunk.vmax = AMSGRAD ? static_cast<S*>(table.ptrs[L::kVmax][t]) + c.begin : nullptr;
  chunk.master = MASTER ? static_cast<float*>(table.ptrs[L::kMaster][t]) + c.begin : nullptr;

  bool aligned = aligned16(chunk.p) && aligned16(chunk.g) && aligned16(chunk.m) &&
                 aligned16(chunk.v);
  if (AMSGRAD) aligned = aligned && aligned16(chunk.vmax);
  if (MASTER) aligned = aligned && aligned16(chunk.master);
  // NOTE [128-bit access]: the narrowest list (P) fills one 16-byte word.
  constexpr int kVec = 16 / sizeof(P);
  for_each_in_chunk<kVec>(c.len, aligned, chunk);
}

template <typename P, bool MASTER, bool AMSGRAD>
cudaError_t run(const RawLists& l, const AdamWArgs& args, cudaStream_t stream) {
  using L = AdamWLayout<MASTER, AMSGRAD>;
  using Table = TensorTable<L::kDepth>;
  static_assert(sizeof(Table) + sizeof(AdamWArgs) <= kParamBytes, "kernel parameters overflow");
  return launch_lists<L::kDepth>(l, [&](const Table& table, unsigned blocks, int64_t) {
    adamw_kernel<P, MASTER, AMSGRAD><<<blocks, kBlockThreads, 0, stream>>>(table, args);
  });
}

template <typename P>
cudaError_t run_modes(const RawLists& l, const AdamWCall& call, const AdamWArgs& args,
                      cudaStream_t stream) {
  if constexpr (std::is_same_v<P, float>) {
    // fp32 params never carry master weights (the op entry checks).
    return call.amsgrad ? run<P, false, true>(l, args, stream)
                        : run<P, false, false>(l, args, stream);
  } else {
    if (call.master) {
      return call.amsgrad ? run<P, true, true>(l, args, stream)
                          : run<P, true, false>(l, args, stream);
    }
    return call.amsgrad ? run<P, false, true>(l, args, stream)
                        : run<P, false, false>(l, args, stream);
  }
}

}  // namespace

cudaError_t launch_adamw(const RawLists& lists, const AdamWCall& call, cudaStream_t stream) {
  AdamWArgs args = update_args<AdamWArgs>(call);
  args.eps = call.eps;
  return dispatch_storage(call.param, [&](auto tag) {
    return run_modes<typename decltype(tag)::type>(lists, call, args, stream);
  });
}

}  // namespace cuda
}  // namespace fastopt
