// Multi-tensor chunking for the CPU kernels: the one piece every CPU op
// shares. The op entries (ops_cpu.cpp) plan; the kernels (kernels.h) walk.
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
// The plan is a flat list of segments (one tensor's [begin, end) inside one
// chunk), in order, plus the index of each chunk's first segment. A range of
// chunks is therefore a range of segments, and a kernel is one loop over
// segments with one vector loop inside.
//
// A chunk boundary inside a tensor always falls on a multiple of kAlignElems
// elements of that tensor, so (with torch's 64-byte aligned allocations) the
// vector loops start aligned, two threads never write the same cache
// line, and a block of 8-bit moments (256 elements, NOTE [int8 moments]) is
// never split between two chunks. The plan depends only on the tensor sizes, never on the thread count:
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
constexpr int64_t kAlignElems = 256;

// Elements [begin, end) of tensor `tensor`.
struct Segment {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// What a kernel reads of the plan: chunk c is segments
// [first_segment[c], first_segment[c + 1]).
struct ChunkView {
  const Segment* segments;
  const int64_t* first_segment;
};

// The plan of one call, owned by the op entry for the call's duration.
// O(number of tensors + number of chunks) memory.
class ChunkPlan {
 public:
  explicit ChunkPlan(const std::vector<int64_t>& numels) {
    int64_t total = 0;
    for (int64_t n : numels) total += n;
    first_segment_.reserve(static_cast<size_t>(total / kChunkElems + 2));
    segments_.reserve(numels.size() + static_cast<size_t>(total / kChunkElems + 1));
    int64_t fill = kChunkElems;  // elements in the open chunk; "full" opens a new one
    for (int64_t i = 0; i < static_cast<int64_t>(numels.size()); ++i) {
      const int64_t n = numels[i];
      int64_t off = 0;
      while (off < n) {
        if (fill >= kChunkElems) {
          first_segment_.push_back(static_cast<int64_t>(segments_.size()));
          fill = 0;
        }
        int64_t take = std::min(n - off, kChunkElems - fill);
        const bool continues = off + take < n;
        // The tensor continues in the next chunk: end this one on an aligned
        // element of the tensor (see the note). A fresh chunk always takes
        // kChunkElems > 0 elements, so no chunk is empty.
        if (continues) take -= take % kAlignElems;
        if (take > 0) segments_.push_back({i, off, off + take});
        off += take;
        fill = continues ? kChunkElems : fill + take;
      }
    }
    first_segment_.push_back(static_cast<int64_t>(segments_.size()));
  }

  int64_t num_chunks() const { return static_cast<int64_t>(first_segment_.size()) - 1; }
  ChunkView view() const { return {segments_.data(), first_segment_.data()}; }

 private:
  std::vector<Segment> segments_;
  std::vector<int64_t> first_segment_;
};

}  // namespace fastopt::cpu
