// AdamW over many tensors in a few launches (NOTE [multi-tensor chunking]):
// the kernel moves bytes to and from fastopt::adamw_element (update_math.h).
#include "cuda/launch.h"
#include "cuda/q8.cuh"
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
  using W = master_t<MASTER>;
  W* master = kHasMaster<MASTER> ? chunk_ptr<W>(table, L::kMaster, b.chunk) : nullptr;
  if constexpr (kIsQ8<S>) {
    // NOTE [int8 moments on the GPU] (amsgrad is refused by the op entry)
    const Q8Chunk mq = q8_chunk(table, 2, b.chunk), vq = q8_chunk(table, 3, b.chunk);
    const bool aligned = all_aligned16(p, g, master);
    auto body = [&](int blk, int off, int count) {
      const bool full = aligned && count == kQ8Lane;
      float w[kQ8Lane], gr[kQ8Lane], mo[kQ8Lane], ve[kQ8Lane];
      q8_load_weights<MASTER>(p + off, master + off, g + off, count, full, w, gr);
      q8_load_lane<true>(mq, blk, off, count, mo);
      q8_load_lane<false>(vq, blk, off, count, ve);
#pragma unroll
      for (int j = 0; j < kQ8Lane; ++j) {
        float unused = 0.0f;
        adamw_element<false>(w[j], transform_grad(gr[j], b.transform), mo[j], ve[j], unused,
                             b.coeffs);
      }
      q8_store_weights<MASTER>(p + off, master + off, count, full, w);
      q8_store_lane<true>(mq, blk, off, count, mo);
      q8_store_lane<false>(vq, blk, off, count, ve);
    };
    for_each_q8_block(b.chunk.len, body);
  } else {
    S* m = chunk_ptr<S>(table, 2, b.chunk);
    S* v = chunk_ptr<S>(table, 3, b.chunk);
    S* vmax = AMSGRAD ? chunk_ptr<S>(table, L::kVmax, b.chunk) : nullptr;

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
}

}  // namespace

cudaError_t launch_adamw(const RawLists& lists, const AdamWParams& params, cudaStream_t stream) {
  return dispatch_update(params, [&]<typename P, typename G, typename S, Master MASTER>() {
    if constexpr (kIsQ8<S>) {  // no amsgrad with 8-bit moments
      return launch_update(&adamw_kernel<P, G, S, MASTER, false>, lists, params, stream);
    } else {
      return params.amsgrad
                 ? launch_update(&adamw_kernel<P, G, S, MASTER, true>, lists, params, stream)
                 : launch_update(&adamw_kernel<P, G, S, MASTER, false>, lists, params, stream);
    }
  });
}

}  // namespace cuda
}  // namespace fastopt
