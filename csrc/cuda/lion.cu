// Lion over many tensors in a few launches (NOTE [multi-tensor chunking]):
// the kernel moves bytes to and from fastopt::lion_element (update_math.h).
#include "cuda/launch.h"
#include "cuda/q8.cuh"
#include "cuda/update.cuh"

namespace fastopt {
namespace cuda {
namespace {

// List order in the table: p, g, m, [master].
template <Master MASTER>
struct LionLayout {
  static constexpr int kMaster = 3;
  static constexpr int kDepth = 3 + kHasMaster<MASTER>;
};

template <typename P, typename G, typename S, Master MASTER>
__global__ void __launch_bounds__(kBlockThreads)
    lion_kernel(const __grid_constant__ TensorTable<LionLayout<MASTER>::kDepth> table,
                const __grid_constant__ LionParams params) {
  const auto b = begin_update<-1>(table, params, [&](double lr, double) {
    return lion_coeffs(lr, params.beta1, params.beta2, params.weight_decay);
  });
  if (b.skip) return;
  P* p = chunk_ptr<P>(table, 0, b.chunk);
  const G* g = chunk_ptr<const G>(table, 1, b.chunk);
  using W = master_t<MASTER>;
  W* master =
      kHasMaster<MASTER> ? chunk_ptr<W>(table, LionLayout<MASTER>::kMaster, b.chunk) : nullptr;
  if constexpr (kIsQ8<S>) {
    // NOTE [int8 moments on the GPU]
    const Q8Chunk mq = q8_chunk(table, 2, b.chunk);
    const bool aligned = all_aligned16(p, g, master);
    auto body = [&](int blk, int off, int count) {
      const bool full = aligned && count == kQ8Lane;
      float w[kQ8Lane], gr[kQ8Lane], mo[kQ8Lane];
      q8_load_weights<MASTER>(p + off, master + off, g + off, count, full, w, gr);
      q8_load_lane<true>(mq, blk, off, count, mo);
#pragma unroll
      for (int j = 0; j < kQ8Lane; ++j) {
        lion_element(w[j], transform_grad(gr[j], b.transform), mo[j], b.coeffs);
      }
      q8_store_weights<MASTER>(p + off, master + off, count, full, w);
      q8_store_lane<true>(mq, blk, off, count, mo);
    };
    for_each_q8_block(b.chunk.len, body);
  } else {
    S* m = chunk_ptr<S>(table, 2, b.chunk);

    auto body = [&]<int N, bool VECTOR>(int off) {
      float w[N], gr[N], mo[N];
      load_weight_n<MASTER, N, VECTOR>(p + off, master + off, w);
      load_n<N, VECTOR>(g + off, gr);
      load_n<N, VECTOR>(m + off, mo);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        lion_element(w[j], transform_grad(gr[j], b.transform), mo[j], b.coeffs);
      }
      store_weight_n<MASTER, N, VECTOR>(p + off, master + off, w);
      store_n<N, VECTOR>(m + off, mo);
    };
    for_each_in_chunk<kVecElems<P, S>>(b.chunk.len, all_aligned16(p, g, m, master), body);
  }
}

}  // namespace

cudaError_t launch_lion(const RawLists& lists, const LionParams& params, cudaStream_t stream) {
  return dispatch_update(params, [&]<typename P, typename G, typename S, Master MASTER>() {
    return launch_update(&lion_kernel<P, G, S, MASTER>, lists, params, stream);
  });
}

}  // namespace cuda
}  // namespace fastopt
