// Multi-tensor chunking for the CPU kernels: the one piece every CPU op
// shares (host-side planning, plus the walk a kernel does over one chunk).
//
// NOTE [multi-tensor chunking]
// All tensors of one call are laid end to end in a virtual flat index space
// and cut into chunks of about kChunkElems elements. A chunk may span many
// small tensors (4000 tensors of 4096 elements become 500 chunks of 8 tensors)
// or a slice of one large tensor, so every chunk carries about the same work
// and ONE parallel region (at::parallel_for over the chunk list) runs the
// whole step; there is no per-tensor parallel loop, whose fork/join cost is
// what makes torch's fused CPU kernel slow on many small tensors.
//
// A chunk boundary inside a tensor always falls on a multiple of kAlignElems
// elements of that tensor, so (with torch's 64-byte aligned allocations) the
// vector loops start aligned and two threads never write the same cache
// line. The plan depends only on the tensor sizes, never on the thread count:
// grad_sumsq keeps one partial sum per chunk and adds them in chunk order, so
// its result is the same with 1 or 64 threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastopt::cpu {

// 32K elements = 128 KiB per fp32 stream: large enough that the per-chunk
// bookkeeping is noise, small enough that 64M elements give 2048 chunks to
// balance over the threads.
constexpr int64_t kChunkElems = 32768;
constexpr int64_t kAlignElems = 64;

// A chunk starts at element `offset` of tensor `tensor` and covers `numel`
// elements, continuing into the following tensors (empty ones are skipped).
struct Chunk {
  int64_t tensor;
  int64_t offset;
  int64_t numel;
};

inline std::vector<Chunk> plan_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t n : numels) total += n;
  chunks.reserve(static_cast<size_t>(total / kChunkElems + 2));
  int64_t fill = kChunkElems;  // elements in the open chunk; "full" opens a new one
  for (int64_t i = 0; i < static_cast<int64_t>(numels.size()); ++i) {
    const int64_t n = numels[i];
    int64_t off = 0;
    while (off < n) {
      if (fill >= kChunkElems) {
        chunks.push_back({i, off, 0});
        fill = 0;
      }
      int64_t take = std::min(n - off, kChunkElems - fill);
      if (off + take < n) {
        // The tensor continues in the next chunk: end this one on an aligned
        // element of the tensor (see the note) and close it.
        take -= take % kAlignElems;
        chunks.back().numel += take;
        off += take;
        fill = kChunkElems;
        continue;
      }
      chunks.back().numel += take;
      fill += take;
      off += take;
    }
  }
  return chunks;
}

// Calls f(tensor, begin, end) for each contiguous piece of `chunk`, in order.
// Always inlined so that, called from a kernel compiled for AVX-512, the
// loops inside f are compiled for AVX-512 too.
template <typename F>
inline __attribute__((always_inline)) void for_each_segment(const Chunk& chunk,
                                                            const int64_t* numels,
                                                            F&& f) {
  int64_t left = chunk.numel;
  int64_t i = chunk.tensor;
  int64_t off = chunk.offset;
  while (left > 0) {
    const int64_t len = std::min(numels[i] - off, left);
    if (len > 0) f(i, off, off + len);
    left -= len;
    ++i;
    off = 0;
  }
}

}  // namespace fastopt::cpu
