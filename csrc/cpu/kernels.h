// CPU compute kernels: loops over the packed arguments the host code in
// csrc/cpu/ops_cpu.cpp prepared. Nothing here checks or allocates; it only
// computes (the checks are the host's job).
//
// NOTE [CPU SIMD through function multiversioning]
// The per-element math is the scalar code of fastopt/update_math.h, shared
// with the CUDA kernels. Here it is inlined into plain counted loops over
// restrict pointers marked `omp simd`, which GCC vectorizes, scalar tail
// included. Every kernel entry point is built three times by
// `target_clones` (AVX-512F, AVX2, baseline x86-64) and the dynamic loader
// picks the best one for the running CPU once, so the extension uses zmm
// registers on an AVX-512 machine without being built with -march=native
// (and still runs on an older one). Everything the loops call must be
// inlined into the clone to be compiled for its ISA: the header functions are
// always_inline, and so are the segment lambdas below. The clones are
// selected per ISA feature only (not `arch=`), because GCC refuses to inline
// across different `arch=` settings.
//
// Build flags this relies on (setup.py): -fno-trapping-math, without which
// GCC turns the selects of the 16-bit conversions below into masked
// floating-point operations that the AVX-512F clone cannot vectorize (the
// fp32 loops vectorize either way); -fopenmp for `omp simd` (and for the
// parallel region, see ops_cpu.cpp).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <fastopt/update_math.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "multi_tensor.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    !defined(FASTOPT_NO_CLONES)
#define FASTOPT_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
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

// ---- storage conversions for the vector loops -------------------------------

// NOTE [vectorizable narrowing]
// The c10::BFloat16 / c10::Half conversions that update_math.h's to_f32 /
// from_f32 use are correct (round to nearest even, NaN stays NaN) but GCC does
// not vectorize loops containing them (it reports control flow), so the CPU
// loops load and store through these equivalents written as straight-line
// integer arithmetic with selects. Same results bit for bit as c10's,
// including NaN -> the canonical quiet NaN; tests/test_cpu_kernels.py checks
// them against torch's own conversions on halfway cases, subnormals,
// overflow, infinities and NaN.
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
FASTOPT_ALWAYS_INLINE float load_f32(c10::BFloat16 x) { return f32_from(uint32_t{x.x} << 16); }
FASTOPT_ALWAYS_INLINE float load_f32(c10::Half x) {
  const uint32_t h = x.x;
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
FASTOPT_ALWAYS_INLINE c10::BFloat16 store_f32<c10::BFloat16>(float x) {
  const uint32_t u = f32_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return c10::BFloat16(static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded),
                       c10::BFloat16::from_bits());
}

template <>
FASTOPT_ALWAYS_INLINE c10::Half store_f32<c10::Half>(float x) {
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
  return c10::Half(static_cast<uint16_t>(sign | h), c10::Half::from_bits());
}

// ---- packed arguments ------------------------------------------------------

// One tensor of an AdamW call. Typed pointers are recovered in the kernel from
// its template parameters; pointers of absent states are null.
struct AdamWTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  float* master_param;
  AdamWCoeffs coeffs;
};

struct LionTensor {
  void* param;
  const void* grad;
  void* exp_avg;
  float* master_param;
};

// What every kernel launch shares: the per-tensor sizes and the chunk plan
// (NOTE [multi-tensor chunking]) and the gradient multiplier.
struct Launch {
  const int64_t* numels;
  const Chunk* chunks;
  float grad_mul;  // grad_scale, or 1
};

enum class DType : int32_t { kFloat = 0, kBFloat16 = 1, kHalf = 2, kDouble = 3 };

// ---- AdamW -----------------------------------------------------------------

// Storage dtype of the moments: fp32 under master weights, else the params'.
template <typename P, bool MASTER>
using state_t = std::conditional_t<MASTER, float, P>;

template <typename P, bool MASTER, bool AMSGRAD, bool MAXIMIZE>
FASTOPT_ALWAYS_INLINE void adamw_span(const AdamWTensor& t, int64_t begin, int64_t end,
                                      float grad_mul) {
  using S = state_t<P, MASTER>;
  P* __restrict__ param = static_cast<P*>(t.param);
  const P* __restrict__ grad = static_cast<const P*>(t.grad);
  S* __restrict__ exp_avg = static_cast<S*>(t.exp_avg);
  S* __restrict__ exp_avg_sq = static_cast<S*>(t.exp_avg_sq);
  S* __restrict__ max_exp_avg_sq = static_cast<S*>(t.max_exp_avg_sq);
  float* __restrict__ master = t.master_param;
  const AdamWCoeffs c = t.coeffs;
  FASTOPT_SIMD_LOOP
  for (int64_t k = begin; k < end; ++k) {
    float p = MASTER ? master[k] : load_f32(param[k]);
    float m = load_f32(exp_avg[k]);
    float v = load_f32(exp_avg_sq[k]);
    float vmax = AMSGRAD ? load_f32(max_exp_avg_sq[k]) : 0.0f;
    adamw_element<AMSGRAD, MAXIMIZE>(p, load_f32(grad[k]), m, v, vmax, grad_mul, c);
    if (MASTER) master[k] = p;
    param[k] = store_f32<P>(p);
    exp_avg[k] = store_f32<S>(m);
    exp_avg_sq[k] = store_f32<S>(v);
    if (AMSGRAD) max_exp_avg_sq[k] = store_f32<S>(vmax);
  }
}

// Runs chunks [chunk_begin, chunk_end) of an AdamW launch.
template <typename P, bool MASTER, bool AMSGRAD, bool MAXIMIZE>
FASTOPT_CPU_CLONES void adamw_chunks(const AdamWTensor* tensors, const Launch& launch,
                                     int64_t chunk_begin, int64_t chunk_end) {
  const float grad_mul = launch.grad_mul;
  for (int64_t ci = chunk_begin; ci < chunk_end; ++ci) {
    for_each_segment(launch.chunks[ci], launch.numels,
                     [&](int64_t i, int64_t b, int64_t e) __attribute__((always_inline)) {
                       adamw_span<P, MASTER, AMSGRAD, MAXIMIZE>(tensors[i], b, e, grad_mul);
                     });
  }
}

// ---- Lion ------------------------------------------------------------------

template <typename P, bool MASTER, bool MAXIMIZE>
FASTOPT_ALWAYS_INLINE void lion_span(const LionTensor& t, int64_t begin, int64_t end,
                                     float grad_mul, const LionCoeffs& c) {
  using S = state_t<P, MASTER>;
  P* __restrict__ param = static_cast<P*>(t.param);
  const P* __restrict__ grad = static_cast<const P*>(t.grad);
  S* __restrict__ exp_avg = static_cast<S*>(t.exp_avg);
  float* __restrict__ master = t.master_param;
  FASTOPT_SIMD_LOOP
  for (int64_t k = begin; k < end; ++k) {
    float p = MASTER ? master[k] : load_f32(param[k]);
    float m = load_f32(exp_avg[k]);
    lion_element<MAXIMIZE>(p, load_f32(grad[k]), m, grad_mul, c);
    if (MASTER) master[k] = p;
    param[k] = store_f32<P>(p);
    exp_avg[k] = store_f32<S>(m);
  }
}

template <typename P, bool MASTER, bool MAXIMIZE>
FASTOPT_CPU_CLONES void lion_chunks(const LionTensor* tensors, const LionCoeffs& coeffs,
                                    const Launch& launch, int64_t chunk_begin,
                                    int64_t chunk_end) {
  const float grad_mul = launch.grad_mul;
  const LionCoeffs c = coeffs;
  for (int64_t ci = chunk_begin; ci < chunk_end; ++ci) {
    for_each_segment(launch.chunks[ci], launch.numels,
                     [&](int64_t i, int64_t b, int64_t e) __attribute__((always_inline)) {
                       lion_span<P, MASTER, MAXIMIZE>(tensors[i], b, e, grad_mul, c);
                     });
  }
}

// ---- sum of squares ----------------------------------------------------------

// NOTE [sum of squares in double]
// Each element is squared and accumulated in double: the square of an fp32
// value is exact in double, and a chunk's 32K terms are spread over
// kSumLanes independent accumulators (which is also what lets the loop
// vectorize without -ffast-math reassociation). Lanes are added in a fixed
// order per chunk and the chunk partials in chunk order by the host, so the
// result is deterministic and 10^8 elements lose no meaningful precision.
constexpr int kSumLanes = 16;

template <typename T>
FASTOPT_ALWAYS_INLINE void sumsq_span(const T* __restrict__ x, int64_t begin, int64_t end,
                                      double* __restrict__ lanes) {
  int64_t k = begin;
  for (; k + kSumLanes <= end; k += kSumLanes) {
    FASTOPT_SIMD_LOOP
    for (int j = 0; j < kSumLanes; ++j) {
      const double e = static_cast<double>(load_f32(x[k + j]));
      lanes[j] += e * e;
    }
  }
  for (int j = 0; k < end; ++k, ++j) {
    const double e = static_cast<double>(load_f32(x[k]));
    lanes[j] += e * e;
  }
}

// fp64 gradients are squared in double as they are (not through fp32).
template <>
FASTOPT_ALWAYS_INLINE void sumsq_span<double>(const double* __restrict__ x, int64_t begin,
                                              int64_t end, double* __restrict__ lanes) {
  int64_t k = begin;
  for (; k + kSumLanes <= end; k += kSumLanes) {
    FASTOPT_SIMD_LOOP
    for (int j = 0; j < kSumLanes; ++j) lanes[j] += x[k + j] * x[k + j];
  }
  for (int j = 0; k < end; ++k, ++j) lanes[j] += x[k] * x[k];
}

// Writes the sum of squares of chunk ci into partials[ci] for every chunk of
// [chunk_begin, chunk_end).
FASTOPT_CPU_CLONES inline void sumsq_chunks(const void* const* data, const DType* dtypes,
                                            const Launch& launch, int64_t chunk_begin,
                                            int64_t chunk_end, double* partials) {
  for (int64_t ci = chunk_begin; ci < chunk_end; ++ci) {
    double lanes[kSumLanes] = {};
    for_each_segment(
        launch.chunks[ci], launch.numels,
        [&](int64_t i, int64_t b, int64_t e) __attribute__((always_inline)) {
          switch (dtypes[i]) {
            case DType::kFloat:
              sumsq_span(static_cast<const float*>(data[i]), b, e, lanes);
              break;
            case DType::kBFloat16:
              sumsq_span(static_cast<const c10::BFloat16*>(data[i]), b, e, lanes);
              break;
            case DType::kHalf:
              sumsq_span(static_cast<const c10::Half*>(data[i]), b, e, lanes);
              break;
            case DType::kDouble:
              sumsq_span(static_cast<const double*>(data[i]), b, e, lanes);
              break;
          }
        });
    double total = 0.0;
    for (int j = 0; j < kSumLanes; ++j) total += lanes[j];
    partials[ci] = total;
  }
}

}  // namespace fastopt::cpu
