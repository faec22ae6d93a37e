// CPU kernels: one loop over the chunk plan's segments (NOTE [multi-tensor
// chunking]) with one vector loop inside that calls the per-element function
// of fastopt/update_math.h. The op entries in csrc/cpu/ops_cpu.cpp check the
// arguments and fill the params struct each kernel reads; nothing here checks
// or allocates.
//
// NOTE [CPU SIMD through function multiversioning]
// The per-element math is the scalar code of fastopt/update_math.h, shared
// with the CUDA kernels. Here it is inlined into plain counted loops over
// restrict pointers marked `omp simd`, which GCC vectorizes, scalar tail
// included. Every kernel is built three times by `target_clones` and the
// dynamic loader picks the best one for the running CPU once, so the extension
// uses zmm registers on an AVX-512 machine without being built with
// -march=native (and still runs on an older one). The clones are whole
// micro-architecture levels, x86-64-v4 (AVX-512) and x86-64-v3 (AVX2), because
// those are the levels that include FMA: the explicit fmas of update_math.h
// (NOTE [one formula per quantity]) must be instructions, and GCC's "avx512f"
// and "avx2" feature targets do not enable FMA. The baseline clone computes
// the same bits through libm's fmaf, slowly. GCC inlines only always_inline
// functions into a clone of another `arch=`, so everything a loop calls is
// either a builtin or our own always_inline code: the header functions, and
// the storage conversions below (which is also why bf16/fp16 are our own
// structs here, not c10's types, whose members are not always_inline).
//
// Build flags this relies on (setup.py): -fno-trapping-math, without which
// GCC turns the selects of the 16-bit conversions below into masked
// floating-point operations that it cannot vectorize; -fno-math-errno, so
// sqrtf is an instruction; -ffp-contract=off (NOTE [one formula per
// quantity]); -fopenmp for `omp simd` and the parallel region (ops_cpu.cpp).
#pragma once

#include <fastopt/update_math.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "multi_tensor.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    !defined(FASTOPT_NO_CLONES)
#define FASTOPT_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTOPT_CPU_CLONES
#endif

#define FASTOPT_ALWAYS_INLINE inline __attribute__((always_inline))

#ifdef _OPENMP
#define FASTOPT_SIMD_LOOP _Pragma("omp simd")
#else
#define FASTOPT_SIMD_LOOP _Pragma("GCC ivdep")
#endif

namespace fastopt::cpu {

// ---- storage types and conversions -------------------------------------------

// bf16 and fp16 storage as their bits: the layout of c10::BFloat16 / c10::Half.
struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

// NOTE [vectorizable narrowing]
// c10's BFloat16 / Half conversions are correct (round to nearest even, NaN
// stays NaN) but GCC does not vectorize loops containing them (it reports
// control flow), so the loops load and store through these equivalents
// written as straight-line integer arithmetic with selects. Same results bit
// for bit as c10's, including NaN -> the canonical quiet NaN;
// tests/test_cpu_kernels.py checks them against torch's own conversions on
// halfway cases, subnormals, overflow, infinities and NaN.
// memcpy, not std::bit_cast: GCC 12 cannot vectorize the VIEW_CONVERT_EXPR
// that bit_cast becomes, while a memcpy folds into a plain reinterpretation.
FASTOPT_ALWAYS_INLINE uint32_t f32_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
FASTOPT_ALWAYS_INLINE float f32_from(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

FASTOPT_ALWAYS_INLINE float load_f32(float x) { return x; }
FASTOPT_ALWAYS_INLINE float load_f32(bf16 x) { return f32_from(uint32_t{x.bits} << 16); }
FASTOPT_ALWAYS_INLINE float load_f32(fp16 x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;  // exponent and mantissa
  // Finite values (normal and subnormal): place the bits into a float and
  // rebias the exponent by multiplying with 2^(127-15), which is exact.
  const float finite = f32_from(em << 13) * 0x1p112f;
  const uint32_t inf_nan = (em << 13) | 0x7F800000u;
  return f32_from(sign | (em >= 0x7C00u ? inf_nan : f32_bits(finite)));
}

template <typename T>
FASTOPT_ALWAYS_INLINE T store_f32(float x);

template <>
FASTOPT_ALWAYS_INLINE float store_f32<float>(float x) {
  return x;
}

template <>
FASTOPT_ALWAYS_INLINE bf16 store_f32<bf16>(float x) {
  const uint32_t u = f32_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return bf16{static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded)};
}

template <>
FASTOPT_ALWAYS_INLINE fp16 store_f32<fp16>(float x) {
  const uint32_t u = f32_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // |x| >= 65520 rounds to infinity; NaN becomes the quiet NaN 0x7E00.
  const uint32_t big = a > 0x7F800000u ? 0x7E00u : 0x7C00u;
  // |x| < 2^-14 (half subnormal or zero): adding 0.5 shifts the value's bits
  // into the low mantissa bits, and the fp32 addition rounds to nearest even.
  const uint32_t small = f32_bits(f32_from(a) + 0.5f) - f32_bits(0.5f);
  // Normal: rebias the exponent and round the 13 dropped bits to nearest even.
  const uint32_t normal = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;
  const uint32_t h = a >= 0x477FF000u ? big : (a < 0x38800000u ? small : normal);
  return fp16{static_cast<uint16_t>(sign | h)};
}

// ---- 8-bit moments (NOTE [int8 moments] in update_math.h) ---------------------------
//
// The marker type S of a call whose moments are 8-bit. Such a kernel walks
// each segment a block of 256 elements at a time: each moment is decoded into
// a stack buffer (q8_load), one loop updates every element in fp32 from the
// buffers and leaves the new moments there, then each moment's new block
// scale is taken and its codes stored (q8_store). Separate simple loops,
// because GCC did not vectorize the fused decode-and-update loop in the
// x86-64-v3/v4 clones (it did without clones): 17x slower than fp32 moments. Segments start on block boundaries (kAlignElems), and only
// a tensor's last block is short.
struct q8 {
  uint8_t bits;
};

// One tensor's 8-bit moment: its codes, and its scales after them.
struct Q8View {
  uint8_t* __restrict__ codes;
  float* __restrict__ scales;
};

FASTOPT_ALWAYS_INLINE Q8View q8_view(void* base, int64_t numel) {
  auto* bytes = static_cast<uint8_t*>(base);
  return {bytes, reinterpret_cast<float*>(bytes + q8_blocks(numel) * kQ8Block)};
}

// The decoded values of elements [k0, k0 + len) into x (one simple loop per
// moment, which GCC vectorizes in every clone; the update loop then reads x).
template <bool SIGNED>
FASTOPT_ALWAYS_INLINE void q8_load(const Q8View& q, int64_t k0, float* __restrict__ x,
                                   int64_t len) {
  const uint8_t* __restrict__ codes = q.codes + k0;
  const float s = q.scales[k0 / kQ8Block];
  FASTOPT_SIMD_LOOP
  for (int64_t j = 0; j < len; ++j) {
    x[j] = SIGNED ? q8_decode_signed(codes[j], s) : q8_decode_unsigned(codes[j], s);
  }
}

// The block's scale (its largest magnitude, NaN if any element is NaN) and its
// codes: x[0, len) are the new values of elements [k0, k0 + len).
template <bool SIGNED>
FASTOPT_ALWAYS_INLINE void q8_store(const Q8View& q, int64_t k0, const float* __restrict__ x,
                                    int64_t len) {
  // The largest |x| over kLanes independent lanes (max is exact in any order),
  // which vectorizes; GCC left the one-accumulator reduction scalar (a
  // compare-and-select chain of 256 dependent steps: 17x the fp32 step).
  constexpr int kLanes = 16;
  float lane_max[kLanes] = {};
  uint32_t lane_nan[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) {
    FASTOPT_SIMD_LOOP
    for (int l = 0; l < kLanes; ++l) {
      const float a = __builtin_fabsf(x[j + l]);
      lane_max[l] = a > lane_max[l] ? a : lane_max[l];
      lane_nan[l] |= a != a ? 1u : 0u;
    }
  }
  for (int l = 0; j < len; ++j, ++l) {
    const float a = __builtin_fabsf(x[j]);
    lane_max[l] = a > lane_max[l] ? a : lane_max[l];
    lane_nan[l] |= a != a ? 1u : 0u;
  }
  float amax = 0.0f;
  uint32_t nan = 0;
  for (int l = 0; l < kLanes; ++l) {
    amax = lane_max[l] > amax ? lane_max[l] : amax;
    nan |= lane_nan[l];
  }
  const float s = nan ? __builtin_nanf("") : amax;
  const Q8Inverse inv = q8_inverse(s);
  uint8_t* __restrict__ codes = q.codes + k0;
  FASTOPT_SIMD_LOOP
  for (int64_t j = 0; j < len; ++j) {
    codes[j] = SIGNED ? q8_encode_signed(x[j], inv) : q8_encode_unsigned(x[j], inv);
  }
  q.scales[k0 / kQ8Block] = s;
}

// ---- the weight an update runs on (Master in update_math.h) ------------------------
//
// W: the storage of the master list, float for fp32 masters, the remainder's
// bits for NOTE [master remainder]; unused (never dereferenced) without one.
template <Master MASTER>
using master_t = std::conditional_t<MASTER == Master::kRemainder, uint16_t, float>;

template <Master MASTER, typename P>
FASTOPT_ALWAYS_INLINE float load_weight(const P* __restrict__ param,
                                        const master_t<MASTER>* __restrict__ master, int64_t k) {
  if constexpr (MASTER == Master::kFp32) {
    return master[k];
  } else if constexpr (MASTER == Master::kRemainder) {
    static_assert(std::is_same_v<P, bf16>, "remainders are for bf16 params");
    return f32_from(join_remainder(param[k].bits, master[k]));
  } else {
    return load_f32(param[k]);
  }
}

// The updated weight into the param (rounded to nearest even, or with a
// remainder to nearest with ties away from zero) and the master, if any.
template <Master MASTER, typename P>
FASTOPT_ALWAYS_INLINE void store_weight(P* __restrict__ param,
                                        master_t<MASTER>* __restrict__ master, int64_t k,
                                        float w) {
  if constexpr (MASTER == Master::kRemainder) {
    const uint32_t u = f32_bits(w);
    param[k] = P{split_param(u)};
    master[k] = split_remainder(u);
  } else {
    if constexpr (MASTER == Master::kFp32) master[k] = w;
    param[k] = store_f32<P>(w);
  }
}

// ---- params structs (filled by the op entries) ----------------------------------
//
// Per tensor: its addresses (typed in the kernel from its template
// parameters; absent states are null) and, for AdamW and AdEMAMix, the
// coefficients of its step.

struct AdamWTensor {
  int64_t numel;  // for the scales of 8-bit moments
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  void* master_param;  // fp32 masters, int16 remainders or null
  AdamWCoeffs coeffs;
};

struct AdamWParams {
  const AdamWTensor* tensors;
  ChunkView chunks;
  GradTransform transform;
};

struct LionTensor {
  int64_t numel;  // for the scales of 8-bit moments
  void* param;
  const void* grad;
  void* exp_avg;
  void* master_param;  // fp32 masters, int16 remainders or null
};

struct LionParams {
  const LionTensor* tensors;
  ChunkView chunks;
  GradTransform transform;
  LionCoeffs coeffs;
};

struct AdEMAMixTensor {
  int64_t numel;  // for the scales of 8-bit moments
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_slow;
  void* exp_avg_sq;
  void* master_param;  // fp32 masters, int16 remainders or null
  AdEMAMixCoeffs coeffs;
};

struct AdEMAMixParams {
  const AdEMAMixTensor* tensors;
  ChunkView chunks;
  GradTransform transform;
};

enum class DType : int32_t { kFloat, kBFloat16, kHalf, kDouble };

struct SumsqParams {
  const void* const* grads;
  const DType* dtypes;
  ChunkView chunks;
  float grad_mul;         // 1 if none
  double max_grad_value;  // +inf when off; rounded to fp32 for fp32/bf16/fp16 grads
  double* partials;       // one per chunk
};

// ---- update kernels ----------------------------------------------------------------
//
// Each runs chunks [chunk_begin, chunk_end) of one call. P: params' storage,
// G: grads' storage (P, or float for bf16/fp16 params), S: the moments'
// storage (float, bf16 or P: the optimizer's state_dtype), MASTER: where the
// weight lives.

template <typename P, typename G, typename S, Master MASTER, bool AMSGRAD>
FASTOPT_CPU_CLONES void adamw_kernel(const AdamWParams& a, int64_t chunk_begin,
                                     int64_t chunk_end) {
  const GradTransform x = a.transform;
  const int64_t last = a.chunks.first_segment[chunk_end];
  for (int64_t s = a.chunks.first_segment[chunk_begin]; s < last; ++s) {
    const Segment seg = a.chunks.segments[s];
    const AdamWTensor& t = a.tensors[seg.tensor];
    P* __restrict__ param = static_cast<P*>(t.param);
    const G* __restrict__ grad = static_cast<const G*>(t.grad);
    S* __restrict__ exp_avg = static_cast<S*>(t.exp_avg);
    S* __restrict__ exp_avg_sq = static_cast<S*>(t.exp_avg_sq);
    S* __restrict__ max_exp_avg_sq = static_cast<S*>(t.max_exp_avg_sq);
    master_t<MASTER>* __restrict__ master = static_cast<master_t<MASTER>*>(t.master_param);
    const AdamWCoeffs c = t.coeffs;
    if constexpr (std::is_same_v<S, q8>) {
      // (AMSGRAD is false: the op entries refuse amsgrad with 8-bit moments)
      const Q8View mq = q8_view(t.exp_avg, t.numel), vq = q8_view(t.exp_avg_sq, t.numel);
      for (int64_t k0 = seg.begin; k0 < seg.end; k0 += kQ8Block) {
        const int64_t len = seg.end - k0 < kQ8Block ? seg.end - k0 : kQ8Block;
        float mb[kQ8Block], vb[kQ8Block];
        q8_load<true>(mq, k0, mb, len);
        q8_load<false>(vq, k0, vb, len);
        FASTOPT_SIMD_LOOP
        for (int64_t j = 0; j < len; ++j) {
          const int64_t k = k0 + j;
          float p = load_weight<MASTER>(param, master, k);
          float m = mb[j];
          float v = vb[j];
          float unused = 0.0f;
          adamw_element<false>(p, transform_grad(load_f32(grad[k]), x), m, v, unused, c);
          store_weight<MASTER>(param, master, k, p);
          mb[j] = m;
          vb[j] = v;
        }
        q8_store<true>(mq, k0, mb, len);
        q8_store<false>(vq, k0, vb, len);
      }
    } else {
      FASTOPT_SIMD_LOOP
      for (int64_t k = seg.begin; k < seg.end; ++k) {
        float p = load_weight<MASTER>(param, master, k);
        float m = load_f32(exp_avg[k]);
        float v = load_f32(exp_avg_sq[k]);
        float vmax = AMSGRAD ? load_f32(max_exp_avg_sq[k]) : 0.0f;
        adamw_element<AMSGRAD>(p, transform_grad(load_f32(grad[k]), x), m, v, vmax, c);
        store_weight<MASTER>(param, master, k, p);
        exp_avg[k] = store_f32<S>(m);
        exp_avg_sq[k] = store_f32<S>(v);
        if (AMSGRAD) max_exp_avg_sq[k] = store_f32<S>(vmax);
      }
    }
  }
}

template <typename P, typename G, typename S, Master MASTER>
FASTOPT_CPU_CLONES void lion_kernel(const LionParams& a, int64_t chunk_begin, int64_t chunk_end) {
  const GradTransform x = a.transform;
  const LionCoeffs c = a.coeffs;
  const int64_t last = a.chunks.first_segment[chunk_end];
  for (int64_t s = a.chunks.first_segment[chunk_begin]; s < last; ++s) {
    const Segment seg = a.chunks.segments[s];
    const LionTensor& t = a.tensors[seg.tensor];
    P* __restrict__ param = static_cast<P*>(t.param);
    const G* __restrict__ grad = static_cast<const G*>(t.grad);
    S* __restrict__ exp_avg = static_cast<S*>(t.exp_avg);
    master_t<MASTER>* __restrict__ master = static_cast<master_t<MASTER>*>(t.master_param);
    if constexpr (std::is_same_v<S, q8>) {
      const Q8View mq = q8_view(t.exp_avg, t.numel);
      for (int64_t k0 = seg.begin; k0 < seg.end; k0 += kQ8Block) {
        const int64_t len = seg.end - k0 < kQ8Block ? seg.end - k0 : kQ8Block;
        float mb[kQ8Block];
        q8_load<true>(mq, k0, mb, len);
        FASTOPT_SIMD_LOOP
        for (int64_t j = 0; j < len; ++j) {
          const int64_t k = k0 + j;
          float p = load_weight<MASTER>(param, master, k);
          float m = mb[j];
          lion_element(p, transform_grad(load_f32(grad[k]), x), m, c);
          store_weight<MASTER>(param, master, k, p);
          mb[j] = m;
        }
        q8_store<true>(mq, k0, mb, len);
      }
    } else {
      FASTOPT_SIMD_LOOP
      for (int64_t k = seg.begin; k < seg.end; ++k) {
        float p = load_weight<MASTER>(param, master, k);
        float m = load_f32(exp_avg[k]);
        lion_element(p, transform_grad(load_f32(grad[k]), x), m, c);
        store_weight<MASTER>(param, master, k, p);
        exp_avg[k] = store_f32<S>(m);
      }
    }
  }
}

template <typename P, typename G, typename S, Master MASTER>
FASTOPT_CPU_CLONES void ademamix_kernel(const AdEMAMixParams& a, int64_t chunk_begin,
                                        int64_t chunk_end) {
  const GradTransform x = a.transform;
  const int64_t last = a.chunks.first_segment[chunk_end];
  for (int64_t s = a.chunks.first_segment[chunk_begin]; s < last; ++s) {
    const Segment seg = a.chunks.segments[s];
    const AdEMAMixTensor& t = a.tensors[seg.tensor];
    P* __restrict__ param = static_cast<P*>(t.param);
    const G* __restrict__ grad = static_cast<const G*>(t.grad);
    S* __restrict__ exp_avg = static_cast<S*>(t.exp_avg);
    S* __restrict__ exp_avg_slow = static_cast<S*>(t.exp_avg_slow);
    S* __restrict__ exp_avg_sq = static_cast<S*>(t.exp_avg_sq);
    master_t<MASTER>* __restrict__ master = static_cast<master_t<MASTER>*>(t.master_param);
    const AdEMAMixCoeffs c = t.coeffs;
    if constexpr (std::is_same_v<S, q8>) {
      const Q8View q1 = q8_view(t.exp_avg, t.numel), q2 = q8_view(t.exp_avg_slow, t.numel),
                   qv = q8_view(t.exp_avg_sq, t.numel);
      for (int64_t k0 = seg.begin; k0 < seg.end; k0 += kQ8Block) {
        const int64_t len = seg.end - k0 < kQ8Block ? seg.end - k0 : kQ8Block;
        float b1[kQ8Block], b2[kQ8Block], bv[kQ8Block];
        q8_load<true>(q1, k0, b1, len);
        q8_load<true>(q2, k0, b2, len);
        q8_load<false>(qv, k0, bv, len);
        FASTOPT_SIMD_LOOP
        for (int64_t j = 0; j < len; ++j) {
          const int64_t k = k0 + j;
          float p = load_weight<MASTER>(param, master, k);
          float m1 = b1[j];
          float m2 = b2[j];
          float v = bv[j];
          ademamix_element(p, transform_grad(load_f32(grad[k]), x), m1, m2, v, c);
          store_weight<MASTER>(param, master, k, p);
          b1[j] = m1;
          b2[j] = m2;
          bv[j] = v;
        }
        q8_store<true>(q1, k0, b1, len);
        q8_store<true>(q2, k0, b2, len);
        q8_store<false>(qv, k0, bv, len);
      }
    } else {
      FASTOPT_SIMD_LOOP
      for (int64_t k = seg.begin; k < seg.end; ++k) {
        float p = load_weight<MASTER>(param, master, k);
        float m1 = load_f32(exp_avg[k]);
        float m2 = load_f32(exp_avg_slow[k]);
        float v = load_f32(exp_avg_sq[k]);
        ademamix_element(p, transform_grad(load_f32(grad[k]), x), m1, m2, v, c);
        store_weight<MASTER>(param, master, k, p);
        exp_avg[k] = store_f32<S>(m1);
        exp_avg_slow[k] = store_f32<S>(m2);
        exp_avg_sq[k] = store_f32<S>(v);
      }
    }
  }
}

// ---- sum of squares ---------------------------------------------------------------

// NOTE [sum of squares in double]
// Each element goes through the first two steps of the gradient transform
// (g * grad_mul, clamped: NOTE [gradient transform]) in its own precision, is
// widened to double and squared there: the square of an fp32 value is exact
// in double. A chunk's 32K terms are spread over kSumLanes independent
// accumulators (which is also what lets the loop vectorize without
// -ffast-math reassociation). Lanes are added in a fixed order per chunk and
// the chunk partials in chunk order by the host, so the result is
// deterministic and 10^8 elements lose no meaningful precision.
constexpr int kSumLanes = 16;

// The transformed value of one element: fp32 math for fp32/bf16/fp16, as the
// update kernels; fp64 gradients in double (as the reference computes them).
FASTOPT_ALWAYS_INLINE double sumsq_term(double g, double mul, double c) {
  g = g * mul;
  return g > c ? c : (g < -c ? -c : g);
}
template <typename T>
FASTOPT_ALWAYS_INLINE double sumsq_term(T g, float mul, float c) {
  const GradTransform x{mul, c, 1.0f};
  return static_cast<double>(transform_grad(load_f32(g), x));
}

template <typename T>
FASTOPT_ALWAYS_INLINE void sumsq_segment(const T* __restrict__ x, int64_t begin, int64_t end,
                                         float mul, double c, double* __restrict__ lanes) {
  using M = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const M m = mul;
  const M cc = static_cast<M>(c);
  int64_t k = begin;
  for (; k + kSumLanes <= end; k += kSumLanes) {
    FASTOPT_SIMD_LOOP
    for (int j = 0; j < kSumLanes; ++j) {
      const double e = sumsq_term(x[k + j], m, cc);
      lanes[j] += e * e;
    }
  }
  for (int j = 0; k < end; ++k, ++j) {
    const double e = sumsq_term(x[k], m, cc);
    lanes[j] += e * e;
  }
}

// Writes the sum of squares of chunk ci into partials[ci] for every chunk of
// [chunk_begin, chunk_end). Grads of different dtypes may share one call.
FASTOPT_CPU_CLONES inline void grad_sumsq_kernel(const SumsqParams& a, int64_t chunk_begin,
                                                 int64_t chunk_end) {
  for (int64_t ci = chunk_begin; ci < chunk_end; ++ci) {
    double lanes[kSumLanes] = {};
    for (int64_t s = a.chunks.first_segment[ci]; s < a.chunks.first_segment[ci + 1]; ++s) {
      const Segment seg = a.chunks.segments[s];
      const void* g = a.grads[seg.tensor];
      switch (a.dtypes[seg.tensor]) {
        case DType::kFloat:
          sumsq_segment(static_cast<const float*>(g), seg.begin, seg.end, a.grad_mul,
                        a.max_grad_value, lanes);
          break;
        case DType::kBFloat16:
          sumsq_segment(static_cast<const bf16*>(g), seg.begin, seg.end, a.grad_mul,
                        a.max_grad_value, lanes);
          break;
        case DType::kHalf:
          sumsq_segment(static_cast<const fp16*>(g), seg.begin, seg.end, a.grad_mul,
                        a.max_grad_value, lanes);
          break;
        case DType::kDouble:
          sumsq_segment(static_cast<const double*>(g), seg.begin, seg.end, a.grad_mul,
                        a.max_grad_value, lanes);
          break;
      }
    }
    double total = 0.0;
    for (int j = 0; j < kSumLanes; ++j) total += lanes[j];
    a.partials[ci] = total;
  }
}

}  // namespace fastopt::cpu
