// Global sum of squares of many tensors, for global-norm clipping: each
// element through the first two steps of the gradient transform (g * grad_mul,
// clamped to +-max_grad_value: NOTE [gradient transform]), then squared.
//
// NOTE [deterministic norm]
// Two passes and no atomics: every block of the multi-tensor launches writes
// the sum of squares of its chunk to its own slot of a partials buffer (block
// index across all launches of the call, see pack_and_launch), then one block
// adds the partials up, each thread a fixed strided subset, then a fixed tree.
// Every addition happens in the same order on every run, so the norm -- and
// whether a step is skipped as non-finite -- is reproducible. Squares and
// sums are in double throughout (the square of an fp32 value is exact in
// double), as the CPU kernel and the reference accumulate.
#include "cuda/launch.h"
#include "cuda/update.cuh"

namespace fastopt {
namespace cuda {
namespace {

// Sum over the block in a fixed order; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double x) {
  __shared__ double warp_sums[kBlockThreads / 32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) x += __shfl_down_sync(0xffffffffu, x, d);
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) x += __shfl_down_sync(0xffffffffu, x, d);
  }
  return x;
}

// The clamp of value clipping; NaN passes (as update_math.h's transform_grad).
template <typename A>
__device__ __forceinline__ A clamp_value(A g, A c) {
  return g > c ? c : (g < -c ? -c : g);
}

// T: the grads' storage. fp32/bf16/fp16 are transformed in fp32, as the
// update kernels read them; fp64 in double.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    grad_sumsq_kernel(const __grid_constant__ TensorTable<1> table,
                      const __grid_constant__ SumsqParams params) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const ChunkRef c = locate_chunk(table);
  const T* g = chunk_ptr<const T>(table, 0, c);
  const A mul = params.grad_mul != nullptr ? static_cast<A>(*params.grad_mul) : A(1);
  const A bound = static_cast<A>(params.max_grad_value);
  double acc = 0.0;
  auto body = [&]<int N, bool VECTOR>(int off) {
    A x[N];
    load_n<N, VECTOR>(g + off, x);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const double e = static_cast<double>(clamp_value(x[j] * mul, bound));
      acc += e * e;
    }
  };
  for_each_in_chunk<16 / static_cast<int>(sizeof(T))>(c.len, aligned16(g), body);
  const double total = block_sum(acc);
  if (threadIdx.x == 0) params.partials[params.first_partial + blockIdx.x] = total;
}

__global__ void __launch_bounds__(kBlockThreads)
    grad_sumsq_finish_kernel(const double* __restrict__ partials, int64_t count,
                             float* __restrict__ out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
  const double total = block_sum(acc);
  if (threadIdx.x == 0) out[0] = static_cast<float>(total);
}

template <typename T>
cudaError_t run(const RawLists& l, const SumsqParams& params, int64_t* written,
                cudaStream_t stream) {
  using Table = TensorTable<1>;
  static_assert(sizeof(Table) + sizeof(SumsqParams) <= kParamBytes, "kernel parameters overflow");
  return launch_lists<1>(
      l,
      [&](const Table& table, unsigned blocks, int64_t first_block) {
        SumsqParams launch = params;
        launch.first_partial = params.first_partial + first_block;
        grad_sumsq_kernel<T><<<blocks, kBlockThreads, 0, stream>>>(table, launch);
      },
      written);
}

}  // namespace

int64_t grad_sumsq_partials(const std::vector<int64_t>& numel) {
  int64_t n = 0;
  for (const int64_t e : numel) n += (e + kChunkElems - 1) / kChunkElems;
  return n;
}

cudaError_t launch_grad_sumsq_partials(const RawLists& grads, const SumsqParams& params,
                                       int64_t* written, cudaStream_t stream) {
  switch (params.grad) {
    case Storage::kFloat:
      return run<float>(grads, params, written, stream);
    case Storage::kBFloat16:
      return run<c10::BFloat16>(grads, params, written, stream);
    case Storage::kHalf:
      return run<c10::Half>(grads, params, written, stream);
    case Storage::kDouble:
      return run<double>(grads, params, written, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_grad_sumsq_finish(const double* partials, int64_t count, float* out,
                                     cudaStream_t stream) {
  grad_sumsq_finish_kernel<<<1, kBlockThreads, 0, stream>>>(partials, count, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastopt
