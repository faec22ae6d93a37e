// 8-bit moments on the GPU (NOTE [int8 moments] in fastopt/update_math.h):
// what the update kernels share when a call's moments are uint8. Included by
// the .cu files only.
//
// NOTE [int8 moments on the GPU]
// One warp owns one block of 256 elements at a time, 8 consecutive elements
// per lane: the lane decodes its 8 codes with the block's scale, the kernel
// updates the 8 elements in fp32 registers, and for each moment the warp takes
// the block's new scale by a shuffle reduction (the largest magnitude; NaN if
// a lane saw a NaN), codes its 8 values and lane 0 writes the scale. Chunks
// (kChunkElems) are whole blocks, so a block never spans two thread blocks;
// only a tensor's last block is short, and its missing elements are zeros that
// are never stored. Params, grads and masters move as 16-byte words when the
// tensor is 16-byte aligned and the lane's 8 elements are all there, element
// by element otherwise; codes move as one 8-byte word.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda/update.cuh"

namespace fastopt {
namespace cuda {

template <typename S>
constexpr bool kIsQ8 = std::is_same_v<S, Q8>;

static_assert(kChunkElems % kQ8Block == 0, "chunks must hold whole 8-bit blocks");
constexpr int kQ8Lane = kQ8Block / 32;  // elements per lane

// One moment of the block's chunk: its codes (chunk-relative) and scales.
struct Q8Chunk {
  uint8_t* codes;
  float* scales;  // scales[b] belongs to the chunk's block b
};

template <int DEPTH>
__device__ __forceinline__ Q8Chunk q8_chunk(const TensorTable<DEPTH>& table, int list,
                                            const ChunkRef& c) {
  auto* base = static_cast<uint8_t*>(table.ptrs[list][c.tensor]);
  auto* scales = reinterpret_cast<float*>(base + q8_blocks(table.numel[c.tensor]) * kQ8Block);
  return {base + c.begin, scales + c.begin / kQ8Block};
}

// Calls body(block, offset, count) for every 256-element block of a chunk of
// len elements, one warp per block: offset is the lane's first element
// (chunk-relative) and count how many of its 8 exist (0..8). Warp-uniform.
template <typename Body>
__device__ __forceinline__ void for_each_q8_block(int len, Body& body) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warps = static_cast<int>(blockDim.x) >> 5;
  const int blocks = (len + kQ8Block - 1) / kQ8Block;
  for (int blk = static_cast<int>(threadIdx.x) >> 5; blk < blocks; blk += warps) {
    const int off = blk * kQ8Block + lane * kQ8Lane;
    const int left = len - off;
    body(blk, off, left < 0 ? 0 : (left < kQ8Lane ? left : kQ8Lane));
  }
}

template <bool SIGNED>
__device__ __forceinline__ void q8_load_lane(const Q8Chunk& q, int blk, int off, int count,
                                             float (&x)[kQ8Lane]) {
  uint8_t c[kQ8Lane];
  if (count == kQ8Lane) {
    const uint2 raw = *reinterpret_cast<const uint2*>(q.codes + off);
    memcpy(c, &raw, sizeof(raw));
  } else {
#pragma unroll
    for (int j = 0; j < kQ8Lane; ++j) c[j] = j < count ? q.codes[off + j] : 0;
  }
  const float s = q.scales[blk];
#pragma unroll
  for (int j = 0; j < kQ8Lane; ++j) {
    x[j] = j < count ? (SIGNED ? q8_decode_signed(c[j], s) : q8_decode_unsigned(c[j], s)) : 0.0f;
  }
}

template <bool SIGNED>
__device__ __forceinline__ void q8_store_lane(const Q8Chunk& q, int blk, int off, int count,
                                              const float (&x)[kQ8Lane]) {
  float amax = 0.0f;
  int nan = 0;
#pragma unroll
  for (int j = 0; j < kQ8Lane; ++j) {
    const float a = j < count ? fabsf(x[j]) : 0.0f;
    amax = a > amax ? a : amax;
    nan |= a != a;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
    nan |= __shfl_xor_sync(0xFFFFFFFFu, nan, o);
  }
  const float s = nan ? __int_as_float(0x7FC00000) : amax;
  const Q8Inverse inv = q8_inverse(s);
  uint8_t c[kQ8Lane];
#pragma unroll
  for (int j = 0; j < kQ8Lane; ++j) {
    c[j] = SIGNED ? q8_encode_signed(x[j], inv) : q8_encode_unsigned(x[j], inv);
  }
  if (count == kQ8Lane) {
    uint2 raw;
    memcpy(&raw, c, sizeof(raw));
    *reinterpret_cast<uint2*>(q.codes + off) = raw;
  } else {
#pragma unroll
    for (int j = 0; j < kQ8Lane; ++j) {
      if (j < count) q.codes[off + j] = c[j];
    }
  }
  if ((threadIdx.x & 31) == 0) q.scales[blk] = s;
}

// A lane's 8 weights and grads (zeros past count), as 16-byte words when `full`.
template <Master MASTER, typename P, typename G>
__device__ __forceinline__ void q8_load_weights(const P* p, const master_t<MASTER>* master,
                                                const G* g, int count, bool full,
                                                float (&w)[kQ8Lane], float (&gr)[kQ8Lane]) {
  if (full) {
    load_weight_n<MASTER, kQ8Lane, true>(p, master, w);
    load_n<kQ8Lane, true>(g, gr);
    return;
  }
#pragma unroll
  for (int j = 0; j < kQ8Lane; ++j) {
    float wj[1] = {0.0f}, gj[1] = {0.0f};
    if (j < count) {
      load_weight_n<MASTER, 1, false>(p + j, master + j, wj);
      load_n<1, false>(g + j, gj);
    }
    w[j] = wj[0];
    gr[j] = gj[0];
  }
}

template <Master MASTER, typename P>
__device__ __forceinline__ void q8_store_weights(P* p, master_t<MASTER>* master, int count,
                                                 bool full, const float (&w)[kQ8Lane]) {
  if (full) {
    store_weight_n<MASTER, kQ8Lane, true>(p, master, w);
    return;
  }
#pragma unroll
  for (int j = 0; j < kQ8Lane; ++j) {
    if (j < count) {
      const float wj[1] = {w[j]};
      store_weight_n<MASTER, 1, false>(p + j, master + j, wj);
    }
  }
}

}  // namespace cuda
}  // namespace fastopt
