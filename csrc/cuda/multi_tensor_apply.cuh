// Multi-tensor apply: the one piece every CUDA op of fastopt launches through.
//
// NOTE [multi-tensor chunking]
// An op gets parallel lists of tensors (params, grads, moments, ...). Every
// tensor is cut into chunks of kChunkElems elements and one thread block
// handles one chunk, so one launch covers many tensors. What a block needs to
// find its chunk travels by value in the kernel's parameter space (no
// host-to-device copy, no allocation, nothing to synchronise on):
//   * ptrs[k][i]    the address of tensor i of list k,
//   * numel[i]      its element count (int64: tensors may exceed 2^31),
//   * chunk_begin[i] the first block index of tensor i in this launch (a
//     prefix sum; chunk_begin[ntensors] is the launch's grid size).
// This is the chunk table in compressed form: instead of one (tensor, chunk)
// entry per block (apex, torch) a block binary-searches chunk_begin, so the
// number of blocks per launch is not bounded by the table and a launch only
// ends when the *tensor* slots run out. When they do, pack_and_launch()
// launches what it has and starts a new table; tensors are never split
// across launches. The search costs ~log2(kMaxTensors) uniform constant-bank
// loads per block of 64K elements.
//
// NOTE [kernel parameter budget]
// CUDA >= 12.1 allows 32764 bytes of kernel parameters on Volta and newer
// (the default TORCH_CUDA_ARCH_LIST is sm_80 and sm_90); older toolkits allow
// 4096. We use the larger budget when the toolkit has it: at depth 6 (AdamW
// with master weights: p, g, m, v, master, step) a table then holds 541
// tensors instead of 63, so a typical model takes one launch per op instead
// of several. The cost is that every launch ships the whole parameter struct,
// filled or not; ~32 KB per launch is small next to the launches it saves.
// A 12.1+ build needs a >= 12.1 driver (a CUDA 13 build needs a 13.x driver
// anyway); define FASTOPT_MTA_PARAM_BYTES=4096 to build for pre-Volta GPUs or
// older drivers.
//
// This header is included by host-only C++ too (and compiled by g++ in
// tests/test_cuda_build.py), so everything device-only sits under __CUDACC__.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#ifndef FASTOPT_MTA_PARAM_BYTES
#if defined(__has_include)
#if __has_include(<cuda_runtime_api.h>)
#include <cuda_runtime_api.h>
#endif
#endif
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
#define FASTOPT_MTA_PARAM_BYTES 32764
#else
#define FASTOPT_MTA_PARAM_BYTES 4096
#endif
#endif

namespace fastopt {
namespace cuda {

constexpr int kBlockThreads = 512;
// 64K elements per block: large enough that the per-block setup (table
// search, coefficient arithmetic in double) is amortised, small enough that a
// 1M-element tensor still spreads over 16 SMs.
constexpr int64_t kChunkElems = 65536;
constexpr int kParamBytes = FASTOPT_MTA_PARAM_BYTES;
// Room left in the parameter space for each op's own argument struct
// (scalars and a handful of pointers); every kernel static_asserts it fits.
constexpr int kArgsReserve = 256;

template <int DEPTH>
struct TensorTable {
  // Bytes per tensor slot: DEPTH addresses, an int64 numel, an int32 prefix.
  static constexpr int kMaxTensors =
      (kParamBytes - kArgsReserve - 2 * static_cast<int>(sizeof(int32_t))) /
      (DEPTH * static_cast<int>(sizeof(void*)) + static_cast<int>(sizeof(int64_t)) +
       static_cast<int>(sizeof(int32_t)));
  static_assert(kMaxTensors >= 8, "kernel parameter budget too small for this depth");

  void* ptrs[DEPTH][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk_begin[kMaxTensors + 1];
  int32_t ntensors;
};

#if defined(__CUDACC__)
#define FASTOPT_MTA_HD __host__ __device__ __forceinline__
#else
#define FASTOPT_MTA_HD inline
#endif

// The chunk a block owns: tensor slot, first element (int64) and length.
struct ChunkRef {
  int tensor;
  int64_t begin;
  int len;
};

// Which chunk block `block` of a launch of `table` owns. Host-callable so the
// packing and this search are tested together on the CPU.
template <int DEPTH>
FASTOPT_MTA_HD ChunkRef locate_chunk_at(const TensorTable<DEPTH>& table, int block) {
  // Last slot whose chunk_begin <= block (slots are non-empty, so the
  // chunk_begin values are strictly increasing).
  int lo = 0;
  int hi = table.ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table.chunk_begin[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  ChunkRef c;
  c.tensor = lo;
  c.begin = static_cast<int64_t>(block - table.chunk_begin[lo]) * kChunkElems;
  const int64_t left = table.numel[lo] - c.begin;
  c.len = static_cast<int>(left < kChunkElems ? left : kChunkElems);
  return c;
}

// Plans the launches of one op call and calls launch(table, nblocks,
// first_block) for each; first_block counts blocks across all launches of the
// call (grad_sumsq uses it to place its per-block partial sums). ptr(k, i) is
// the address of tensor i of list k, numel(i) its element count. Empty tensors
// are left out. Returns the total number of blocks launched.
template <int DEPTH, typename PtrFn, typename NumelFn, typename Launch>
int64_t pack_and_launch(int64_t ntensors, PtrFn ptr, NumelFn numel, Launch launch) {
  using Table = TensorTable<DEPTH>;
  // Kept under 2^31 so block indices and chunk_begin stay int32; a tensor of
  // 2^31 chunks would be 2^47 elements, far beyond any device's memory.
  constexpr int64_t kMaxBlocks = (int64_t{1} << 31) - 1;
  Table table;
  table.ntensors = 0;
  table.chunk_begin[0] = 0;
  int64_t blocks = 0;
  int64_t first_block = 0;
  auto flush = [&]() {
    if (table.ntensors == 0) return;
    launch(static_cast<const Table&>(table), blocks, first_block);
    first_block += blocks;
    blocks = 0;
    table.ntensors = 0;
  };
  for (int64_t i = 0; i < ntensors; ++i) {
    const int64_t n = numel(i);
    if (n == 0) continue;
    const int64_t chunks = (n + kChunkElems - 1) / kChunkElems;
    if (chunks > kMaxBlocks) throw std::length_error("fastopt: tensor too large for one launch");
    if (table.ntensors == Table::kMaxTensors || blocks + chunks > kMaxBlocks) flush();
    const int slot = table.ntensors;
    for (int k = 0; k < DEPTH; ++k) table.ptrs[k][slot] = ptr(k, i);
    table.numel[slot] = n;
    blocks += chunks;
    table.chunk_begin[slot + 1] = static_cast<int32_t>(blocks);
    table.ntensors = slot + 1;
  }
  flush();
  return first_block;
}

#if defined(__CUDACC__)

template <int DEPTH>
__device__ __forceinline__ ChunkRef locate_chunk(const TensorTable<DEPTH>& table) {
  return locate_chunk_at(table, static_cast<int>(blockIdx.x));
}

// The address of the block's chunk in list `list` of the table.
template <typename T, int DEPTH>
__device__ __forceinline__ T* chunk_ptr(const TensorTable<DEPTH>& table, int list,
                                        const ChunkRef& c) {
  return static_cast<T*>(table.ptrs[list][c.tensor]) + c.begin;
}

// ---- vectorised access -----------------------------------------------------
//
// NOTE [128-bit access]
// A thread moves N consecutive elements of every list per iteration, with N
// chosen so the narrowest storage type fills 16 bytes (4 fp32, 8 bf16/fp16);
// wider lists then take several 16-byte transactions. A block uses this path
// when every address of its tensor is 16-byte aligned (chunk starts are
// multiples of kChunkElems, so chunks inherit the alignment); the chunk's
// last len % N elements go through the scalar path. Unaligned tensors (views
// at odd offsets) take the scalar path for the whole chunk.

template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Every address is 16-byte aligned (null counts as aligned: an absent list).
template <typename... T>
__device__ __forceinline__ bool all_aligned16(const T*... p) {
  return (aligned16(p) && ...);
}

// Loads N elements of T starting at p (16-byte aligned when VECTOR) into A:
// fp32 registers (NOTE [one precision policy] in fastopt/update_math.h), or
// double for grad_sumsq's fp64 gradients. c10::BFloat16 / c10::Half convert
// exactly; their float constructors round to nearest even (the stores).
template <int N, bool VECTOR, typename T, typename A>
__device__ __forceinline__ void load_n(const T* __restrict__ p, A (&out)[N]) {
  if constexpr (VECTOR) {
    static_assert((N * sizeof(T)) % 16 == 0, "vector path moves whole 16-byte words");
    constexpr int kPerWord = 16 / sizeof(T);
#pragma unroll
    for (int w = 0; w < N / kPerWord; ++w) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[w];
      T vals[kPerWord];
      memcpy(vals, &raw, 16);
#pragma unroll
      for (int j = 0; j < kPerWord; ++j) out[w * kPerWord + j] = static_cast<A>(vals[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = static_cast<A>(p[j]);
  }
}

template <int N, bool VECTOR, typename T, typename A>
__device__ __forceinline__ void store_n(T* __restrict__ p, const A (&in)[N]) {
  if constexpr (VECTOR) {
    static_assert((N * sizeof(T)) % 16 == 0, "vector path moves whole 16-byte words");
    constexpr int kPerWord = 16 / sizeof(T);
#pragma unroll
    for (int w = 0; w < N / kPerWord; ++w) {
      T vals[kPerWord];
#pragma unroll
      for (int j = 0; j < kPerWord; ++j) vals[j] = T(in[w * kPerWord + j]);
      uint4 raw;
      memcpy(&raw, vals, 16);
      reinterpret_cast<uint4*>(p)[w] = raw;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = T(in[j]);
  }
}

// Runs body.template operator()<N, VECTOR>(offset) over a chunk of len
// elements: 16-byte vectors of N elements when `aligned`, then a scalar tail;
// everything scalar otherwise. Offsets are relative to the chunk start. The
// body is the kernel's own lambda, so the element code stays in the kernel.
template <int N, typename Body>
__device__ __forceinline__ void for_each_in_chunk(int len, bool aligned, Body& body) {
  int done = 0;
  if (aligned) {
    const int nvec = len / N;
    for (int i = static_cast<int>(threadIdx.x); i < nvec; i += blockDim.x) {
      body.template operator()<N, true>(i * N);
    }
    done = nvec * N;
  }
  for (int i = done + static_cast<int>(threadIdx.x); i < len; i += blockDim.x) {
    body.template operator()<1, false>(i);
  }
}

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace fastopt
