// AdamW over many tensors in a few launches (NOTE [multi-tensor chunking]):
// the kernel moves bytes to and from fastopt::adamw_element (update_math.h).
#include "cuda/launch.h"
#include "cuda/update.cuh"

namespace fastopt {
namespace cuda {
namespace {

// List order in the table: p, g, m, v, [vmax], [master], step.
template <Master MASTER, bool AMSGRAD>
struct AdamWLayout {
  static constexpr int kVmax = 4;
  static constexpr int kMaster = 4 + AMSGRAD;
  static constexpr int kStep = 4 + AMSGRAD + kHasMaster<MASTER>;
  static constexpr int kDepth = kStep + 1;
};

// P: params' storage; G: grads' (P, or float); S: the moments' (float, bf16
// or P); MASTER: where the weight lives (update.cuh's load_weight_n).
template <typename P, typename G, typename S, Master MASTER, bool AMSGRAD>
__global__ void __launch_bounds__(kBlockThreads)
    adamw_kernel(const __grid_constant__ TensorTable<AdamWLayout<MASTER, AMSGRAD>::kDepth> table,
                 const __grid_constant__ AdamWParams params) {
  using L = AdamWLayout<MASTER, AMSGRAD>;
  const auto b = begin_update<L::kStep>(table, params, [&](double lr, double step) {
    return adamw_coeffs(lr, params.beta1, params.beta2, params.eps, params.weight_decay, step);
  });
  if (b.skip) return;
  P* p = chunk_ptr<P>(table, 0, b.chunk);
  const G* g = chunk_ptr<const G>(table, 1, b.chunk);
  S* m = chunk_ptr<S>(table, 2, b.chunk);
  S* v = chunk_ptr<S>(table, 3, b.chunk);
  S* vmax = AMSGRAD ? chunk_ptr<S>(table, L::kVmax, b.chunk) : nullptr;
  using W = master_t<MASTER>;
  W* master = kHasMaster<MASTER> ? chunk_ptr<W>(table, L::kMaster, b.chunk) : nullptr;

  auto body = [&]<int N, bool VECTOR>(int off) {
    float w[N], gr[N], mo[N], ve[N], vm[N];
    load_weight_n<MASTER, N, VECTOR>(p + off, master + off, w);
    load_n<N, VECTOR>(g + off, gr);
    load_n<N, VECTOR>(m + off, mo);
    load_n<N, VECTOR>(v + off, ve);
    if constexpr (AMSGRAD) load_n<N, VECTOR>(vmax + off, vm);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      adamw_element<AMSGRAD>(w[j], transform_grad(gr[j], b.transform), mo[j], ve[j], vm[j],
                             b.coeffs);
    }
    store_weight_n<MASTER, N, VECTOR>(p + off, master + off, w);
    store_n<N, VECTOR>(m + off, mo);
    store_n<N, VECTOR>(v + off, ve);
    if constexpr (AMSGRAD) store_n<N, VECTOR>(vmax + off, vm);
  };
  for_each_in_chunk<kVecElems<P, S>>(b.chunk.len, all_aligned16(p, g, m, v, vmax, master), body);
}

}  // namespace

cudaError_t launch_adamw(const RawLists& lists, const AdamWParams& params, cudaStream_t stream) {
  return dispatch_update(params, [&]<typename P, typename G, typename S, Master MASTER>() {
    return params.amsgrad
               ? launch_update(&adamw_kernel<P, G, S, MASTER, true>, lists, params, stream)
               : launch_update(&adamw_kernel<P, G, S, MASTER, false>, lists, params, stream);
  });
}

}  // namespace cuda
}  // namespace fastopt
