// Global sum of squares of many tensors, for global-norm clipping.
//
// NOTE [deterministic norm]
// Two passes and no atomics: every block of the multi-tensor launches writes
// the sum of squares of its chunk to its own slot of a partials buffer (block
// index across all launches of the call, see pack_and_launch), then one block
// adds the partials up, each thread a fixed strided subset in double, then a
// fixed tree. Every addition happens in the same order on every run, so the
// norm -- and whether a step is skipped as non-finite -- is reproducible.
// Within a chunk a thread accumulates its <= 128 squares in fp32 (the
// partials are fp32); across chunks the sum is in double.
#include "cuda/dispatch.cuh"
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "fastopt/update_math.h"

namespace fastopt {
namespace cuda {
namespace {

struct SumsqArgs {
  float* partials;  // partials[first_partial + blockIdx.x] <- this block's sum
  int64_t first_partial;
};

template <typename T>
struct SumsqChunk {
  const T* g;
  float acc;

  template <int N, bool VECTOR>
  __device__ __forceinline__ void run(int off) {
    float x[N];
    load_n<N, VECTOR>(g + off, x);
#pragma unroll
    for (int j = 0; j < N; ++j) acc = fmaf(x[j], x[j], acc);
  }
};

// Sum over the block in a fixed order; the result is valid in thread 0.
template <typename A>
__device__ __forceinline__ A block_sum(A x) {
  __shared__ A warp_sums[kBlockThreads / 32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) x += __shfl_down_sync(0xffffffffu, x, d);
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : A(0);
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) x += __shfl_down_sync(0xffffffffu, x, d);
  }
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    grad_sumsq_kernel(const __grid_constant__ TensorTable<1> table,
                      const __grid_constant__ SumsqArgs args) {
  const ChunkRef c = locate_chunk(table);
  SumsqChunk<T> chunk;
  chunk.g = static_cast<const T*>(table.ptrs[0][c.tensor]) + c.begin;
  chunk.acc = 0.0f;
  for_each_in_chunk<16 / sizeof(T)>(c.len, aligned16(chunk.g), chunk);  // NOTE [128-bit access]
  const float total = block_sum(chunk.acc);
  if (threadIdx.x == 0) args.partials[args.first_partial + blockIdx.x] = total;
}

__global__ void __launch_bounds__(kBlockThreads)
    grad_sumsq_finish_kernel(const float* __restrict__ partials, int64_t count,
                             float* __restrict__ out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += static_cast<double>(partials[i]);
  const double total = block_sum(acc);
  if (threadIdx.x == 0) out[0] = static_cast<float>(total);
}

template <typename T>
cudaError_t run(const RawLists& l, float* partials, int64_t first_partial, int64_t* written,
                cudaStream_t stream) {
  using Table = TensorTable<1>;
  static_assert(sizeof(Table) + sizeof(SumsqArgs) <= kParamBytes, "kernel parameters overflow");
  return launch_lists<1>(
      l,
      [&](const Table& table, unsigned blocks, int64_t first_block) {
        SumsqArgs args;
        args.partials = partials;
        args.first_partial = first_partial + first_block;
        grad_sumsq_kernel<T><<<blocks, kBlockThreads, 0, stream>>>(table, args);
      },
      written);
}

}  // namespace

int64_t grad_sumsq_partials(const std::vector<int64_t>& numel) {
  int64_t n = 0;
  for (const int64_t e : numel) n += (e + kChunkElems - 1) / kChunkElems;
  return n;
}

cudaError_t launch_grad_sumsq_partials(const RawLists& grads, Storage storage, float* partials,
                                       int64_t first_partial, int64_t* written,
                                       cudaStream_t stream) {
  return dispatch_storage(storage, [&](auto tag) {
    return run<typename decltype(tag)::type>(grads, partials, first_partial, written, stream);
  });
}

cudaError_t launch_grad_sumsq_finish(const float* partials, int64_t count, float* out,
                                     cudaStream_t stream) {
  grad_sumsq_finish_kernel<<<1, kBlockThreads, 0, stream>>>(partials, count, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastopt
