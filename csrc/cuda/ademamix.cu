// AdEMAMix over many tensors in a few launches (NOTE [multi-tensor chunking]):
// the kernel moves bytes to and from fastopt::ademamix_element (update_math.h).
#include "cuda/launch.h"
#include "cuda/q8.cuh"
#include "cuda/update.cuh"

namespace fastopt {
namespace cuda {
namespace {

// List order in the table: p, g, m1, m2, v, [master], step.
template <Master MASTER>
struct AdEMAMixLayout {
  static constexpr int kMaster = 5;
  static constexpr int kStep = 5 + kHasMaster<MASTER>;
  static constexpr int kDepth = kStep + 1;
};

template <typename P, typename G, typename S, Master MASTER>
__global__ void __launch_bounds__(kBlockThreads)
    ademamix_kernel(const __grid_constant__ TensorTable<AdEMAMixLayout<MASTER>::kDepth> table,
                    const __grid_constant__ AdEMAMixParams params) {
  using L = AdEMAMixLayout<MASTER>;
  const auto b = begin_update<L::kStep>(table, params, [&](double lr, double step) {
    return ademamix_coeffs(lr, params.beta1, params.beta2, params.beta3, params.alpha,
                           params.t_alpha, params.t_beta3, params.eps, params.weight_decay, step);
  });
  if (b.skip) return;
  P* p = chunk_ptr<P>(table, 0, b.chunk);
  const G* g = chunk_ptr<const G>(table, 1, b.chunk);
  using W = master_t<MASTER>;
  W* master = kHasMaster<MASTER> ? chunk_ptr<W>(table, L::kMaster, b.chunk) : nullptr;
  if constexpr (kIsQ8<S>) {
    // NOTE [int8 moments on the GPU]
    const Q8Chunk q1 = q8_chunk(table, 2, b.chunk), q2 = q8_chunk(table, 3, b.chunk),
                  qv = q8_chunk(table, 4, b.chunk);
    const bool aligned = all_aligned16(p, g, master);
    auto body = [&](int blk, int off, int count) {
      const bool full = aligned && count == kQ8Lane;
      float w[kQ8Lane], gr[kQ8Lane], fast[kQ8Lane], slow[kQ8Lane], ve[kQ8Lane];
      q8_load_weights<MASTER>(p + off, master + off, g + off, count, full, w, gr);
      q8_load_lane<true>(q1, blk, off, count, fast);
      q8_load_lane<true>(q2, blk, off, count, slow);
      q8_load_lane<false>(qv, blk, off, count, ve);
#pragma unroll
      for (int j = 0; j < kQ8Lane; ++j) {
        ademamix_element(w[j], transform_grad(gr[j], b.transform), fast[j], slow[j], ve[j],
                         b.coeffs);
      }
      q8_store_weights<MASTER>(p + off, master + off, count, full, w);
      q8_store_lane<true>(q1, blk, off, count, fast);
      q8_store_lane<true>(q2, blk, off, count, slow);
      q8_store_lane<false>(qv, blk, off, count, ve);
    };
    for_each_q8_block(b.chunk.len, body);
  } else {
    S* m1 = chunk_ptr<S>(table, 2, b.chunk);
    S* m2 = chunk_ptr<S>(table, 3, b.chunk);
    S* v = chunk_ptr<S>(table, 4, b.chunk);

    auto body = [&]<int N, bool VECTOR>(int off) {
      float w[N], gr[N], fast[N], slow[N], ve[N];
      load_weight_n<MASTER, N, VECTOR>(p + off, master + off, w);
      load_n<N, VECTOR>(g + off, gr);
      load_n<N, VECTOR>(m1 + off, fast);
      load_n<N, VECTOR>(m2 + off, slow);
      load_n<N, VECTOR>(v + off, ve);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        ademamix_element(w[j], transform_grad(gr[j], b.transform), fast[j], slow[j], ve[j],
                         b.coeffs);
      }
      store_weight_n<MASTER, N, VECTOR>(p + off, master + off, w);
      store_n<N, VECTOR>(m1 + off, fast);
      store_n<N, VECTOR>(m2 + off, slow);
      store_n<N, VECTOR>(v + off, ve);
    };
    for_each_in_chunk<kVecElems<P, S>>(b.chunk.len, all_aligned16(p, g, m1, m2, v, master), body);
  }
}

}  // namespace

cudaError_t launch_ademamix(const RawLists& lists, const AdEMAMixParams& params,
                            cudaStream_t stream) {
  return dispatch_update(params, [&]<typename P, typename G, typename S, Master MASTER>() {
    return launch_update(&ademamix_kernel<P, G, S, MASTER>, lists, params, stream);
  });
}

}  // namespace cuda
}  // namespace fastopt
