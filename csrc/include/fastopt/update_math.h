// Per-element update math shared by every compiled backend: the CPU kernels
// (csrc/cpu) and the CUDA kernels (csrc/cuda) both call the functions below,
// so the arithmetic the CPU tests check is the arithmetic a GPU runs. The
// Triton kernels (triton_kernels/) and the reference backend
// (fastopt/backends/reference.py) write the same formulas in their language.
//
// NOTE [one precision policy]
// Every value is loaded from its storage dtype (fp32, bf16 or fp16), computed
// in fp32 registers, and narrowed back on the store with round-to-nearest-even.
// Per-tensor scalars (bias corrections, schedules) are computed in double,
// as torch's single-tensor optimizers do on Python floats, and rounded once to
// fp32 into a coefficient struct.
//
// NOTE [one formula per quantity]
// Every backend uses the same formulas, chosen to match torch's
// single-tensor AdamW (`torch.optim.AdamW(foreach=False)`) operation by
// operation, as torch 2.14's CPU kernels evaluate each op on fp32 tensors
// (measured bit for bit on the reference backend, which calls those ops):
// * moments with a "weight" (m, and AdEMAMix's slow m2, and Lion's c and m)
//   are torch.lerp: fma(w, b - a, a) when w < 0.5, else fma(w - 1, b - a, b);
// * the second moment is torch's mul_ then addcmul_:
//   fma((1 - b2) * g, g, v * b2) (addcmul's `self + value * t1 * t2`, which
//   torch's kernel fuses into one fma);
// * AdamW's step is torch's addcdiv_: p + ((-step_size) * m) / denom, with
//   denom = sqrt(v) / sqrt(1 - b2^t) + eps (addcdiv's `self + value * t1 / t2`
//   has nothing to fuse; torch's CUDA addcdiv computes fma(value, t1 / t2,
//   self) instead, so a reference run on a GPU can differ by an ulp here);
// * AdEMAMix's step is torch's add_(u, alpha=-lr): fma(u, -lr, p).
// The build turns off implicit floating-point contraction (setup.py:
// -ffp-contract=off, nvcc --fmad=false) so only the fmas written here fuse.
//
// NOTE [gradient transform]
// Every update reads g through one transform, in this order (SPEC §3):
//   g <- g * grad_mul            the loss-scale reciprocal, times -1 for maximize
//   g <- clamp(g, -c, c)          value clipping (c = +inf when off); NaN stays NaN
//   g <- g * clip_coef            the global-norm clip coefficient
// When value clipping is off the optimizer folds clip_coef into grad_mul and
// passes clip_coef = 1, so the common case is one multiply. maximize is always
// a sign folded into grad_mul: clamp is odd and -1 is exact, so the result is
// the same bits as negating g afterwards.
//
// NOTE [master remainder]
// master_weights="remainder" stores a bf16 parameter p and an int16 remainder
// r instead of an fp32 master w: 4 bytes per element, like the master alone,
// and w is rebuilt exactly from (p, r) in registers. On the bits of w (u, 32
// bits, wrapping arithmetic):
//   split:  p = (u + 0x8000) >> 16          r = u & 0xFFFF
//   join:   u = (p << 16) + sign_extend(r)
// Adding 0x8000 to the magnitude bits before truncating rounds the magnitude
// half up, so p is w rounded to nearest with ties AWAY from zero (a carry into
// the exponent is the correct next binade; the largest finite values round to
// inf, as round-to-nearest does). When p was rounded up, r's top bit is set
// (the dropped half was >= 0x8000) and its sign extension subtracts exactly the
// 0x10000 the carry added, so join(split(u)) == u for every finite or infinite
// u: +-0, subnormals, ties and +-inf round trip bit for bit. Half-even ties
// cannot be encoded: which of the two neighbours p is must follow from r's top
// bit alone. So p differs from master_weights=True's RNE parameter exactly on
// ties (low half 0x8000), and a forward pass reading p sees that difference.
// NaN gets its own rule, because rounding up a NaN can carry it into an
// infinity (0x7F80_xxxx with a low half < 0x8000 truncates to inf) or wrap it
// to a zero (0x7FFF_8000 + 0x8000): a NaN master must stay a NaN parameter.
// For a NaN w, p = (u >> 16) | 0x0040 (the quiet bit, so p is a NaN) and
// join, seeing a NaN p, concatenates without the sign extension:
// u = (p << 16) | r. Finite and infinite masters never give a NaN p, so the
// two rules cannot be confused. A quiet NaN (every NaN arithmetic produces)
// round trips bit for bit; a signalling NaN comes back quieted, same sign and
// payload otherwise.
// tests/test_compressed.py checks every bf16 pattern against ties, zeros,
// subnormals, infinities and NaNs; the Triton kernels
// (triton_kernels/elementwise.py) and the reference backend
// (fastopt/_compressed.py) write the same two functions.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTOPT_HD __host__ __device__ __forceinline__
#else
#define FASTOPT_HD inline __attribute__((always_inline))
#endif

namespace fastopt {

// ---- shared pieces ---------------------------------------------------------

// Where the weight an update runs on lives: in the param itself, in an fp32
// master (master_weights=True) or in the bf16 param plus an int16 remainder
// (NOTE [master remainder]).
enum class Master : int { kNone = 0, kFp32 = 1, kRemainder = 2 };

// NOTE [master remainder]: the fp32 bits of the master from the bf16 param's
// bits and the remainder's bits.
FASTOPT_HD uint32_t join_remainder(uint16_t param_bits, uint16_t remainder) {
  const uint32_t hi = static_cast<uint32_t>(param_bits) << 16;
  const bool nan = (param_bits & 0x7FFFu) > 0x7F80u;
  const uint32_t low = static_cast<uint32_t>(static_cast<int32_t>(static_cast<int16_t>(remainder)));
  return nan ? (hi | remainder) : hi + low;
}

// NOTE [master remainder]: the bf16 param's bits (the master rounded to
// nearest, ties away from zero) and the remainder's bits.
FASTOPT_HD uint16_t split_param(uint32_t master_bits) {
  const bool nan = (master_bits & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? ((master_bits >> 16) | 0x0040u) : (master_bits + 0x8000u) >> 16);
}
FASTOPT_HD uint16_t split_remainder(uint32_t master_bits) {
  return static_cast<uint16_t>(master_bits & 0xFFFFu);
}

// ---- 8-bit moments (state_dtype="int8") ----------------------------------------
//
// NOTE [int8 moments]
// A moment tensor of n elements is stored as ceil(n / 256) blocks of 256
// one-byte codes followed by one fp32 scale per block (the block's largest
// magnitude), in one uint8 tensor of q8_bytes(n) bytes; the codes of the
// last block past n are zero padding. A code is companded: the first moments
// (m, AdEMAMix's slow m2, Lion's m) as the signed byte q = rint(127 *
// sqrt(|x| / s)) * sign(x), the second moment v >= 0 as the unsigned byte
// q = rint(255 * (v / s)^(1/4)), and never 0 for a v > 0 (so a tiny v cannot
// decode to 0 and divide a non-zero m by eps alone). Decoding is
// s * sign(q) * (q/127)^2 and s * (q/255)^4, with the divisions written as
// products by fp32 reciprocals, and coding divides by s as a product by 1/s
// (q8_inverse): the formulas below are the definition every backend follows.
// The block's largest element
// codes to the top code and decodes to s exactly, so a block whose elements
// all decay decays exactly; the scale is fp32 because a rounded (bf16) scale
// makes that element drift by the scale's rounding every store, which
// beta2 = 0.999 compounds about a thousand-fold (measured, NOTE [int8 moments]
// in fastopt/_compressed.py, with the comparison against bitsandbytes'
// dynamic code at block 256 that chose this code). Every store rounds to
// nearest even. A block holding a NaN or an infinity gets that scale, which
// decodes the whole block to NaN: a non-finite moment stays non-finite, for
// its block. Each kernel updates the 256 elements of a block from the decoded
// values in fp32 registers, then takes the block's new scale and codes it.
constexpr int kQ8Block = 256;

FASTOPT_HD int64_t q8_blocks(int64_t n) { return (n + kQ8Block - 1) / kQ8Block; }
// Bytes of the uint8 state of an n-element moment: codes, then the fp32 scales.
FASTOPT_HD int64_t q8_bytes(int64_t n) { return q8_blocks(n) * (kQ8Block + 4); }

// What coding a block needs of its scale s, computed once per block: codes
// use |x| * (1/s), not |x| / s (one division per block instead of two per
// element, which bounded the CPU kernel). For a subnormal s both factors are
// first scaled by 2^64 (exactly) so 1/s cannot overflow. inv = 0 when s is 0
// or not finite: every code of such a block is then 0 (but v's rule below).
struct Q8Inverse {
  float e;    // 2^64 for a subnormal (or zero) s, else 1
  float inv;  // 1 / (s * e), or 0
};

FASTOPT_HD Q8Inverse q8_inverse(float s) {
  Q8Inverse k;
  k.e = s < 0x1p-126f ? 0x1p64f : 1.0f;
  k.inv = (s > 0.0f && s <= 0x1.fffffep127f) ? 1.0f / (s * k.e) : 0.0f;
  return k;
}

// |x| / s as |x| * e * inv, clamped to [0, 1] (the top element may land an ulp
// above 1); NaN (a non-finite element of an unusable block) gives 0.
FASTOPT_HD float q8_ratio(float a, const Q8Inverse& k) {
  const float r = (a * k.e) * k.inv;
  return r < 1.0f ? r : (r >= 1.0f ? 1.0f : 0.0f);
}

// Decoding multiplies by the fp32 reciprocals of 127 and 255, for which
// 127 * (1/127) and 255 * (1/255) are exactly 1: the top code decodes to s.
constexpr float kQ8InvSigned = 0x1.020408p-7f;    // fp32(1/127)
constexpr float kQ8InvUnsigned = 0x1.010102p-8f;  // fp32(1/255)

FASTOPT_HD uint8_t q8_encode_signed(float x, const Q8Inverse& k) {
  const float q = ::rintf(::sqrtf(q8_ratio(::fabsf(x), k)) * 127.0f);
  const int code = static_cast<int>(q);
  return static_cast<uint8_t>(x < 0.0f ? -code : code);
}
FASTOPT_HD float q8_decode_signed(uint8_t bits, float s) {
  const float t = static_cast<float>(static_cast<int8_t>(bits)) * kQ8InvSigned;
  return (t * ::fabsf(t)) * s;
}

FASTOPT_HD uint8_t q8_encode_unsigned(float v, const Q8Inverse& k) {
  const float q = ::rintf(::sqrtf(::sqrtf(q8_ratio(v, k))) * 255.0f);
  const int code = static_cast<int>(q);
  return static_cast<uint8_t>(code == 0 && v > 0.0f ? 1 : code);
}
FASTOPT_HD float q8_decode_unsigned(uint8_t bits, float s) {
  const float t = static_cast<float>(bits) * kQ8InvUnsigned;
  const float t2 = t * t;
  return (t2 * t2) * s;
}

// torch.lerp(a, b, w) (NOTE [one formula per quantity]).
FASTOPT_HD float lerp(float a, float b, float w) {
  const float diff = b - a;
  return w < 0.5f ? ::fmaf(w, diff, a) : ::fmaf(w - 1.0f, diff, b);
}

// Scalars of the gradient transform (NOTE [gradient transform]).
struct GradTransform {
  float grad_mul;        // loss-scale reciprocal (1 if none), negated for maximize
  float max_grad_value;  // +inf when value clipping is off
  float clip_coef;       // global-norm clip coefficient (1 if none or folded)
};

FASTOPT_HD float transform_grad(float g, const GradTransform& x) {
  g = g * x.grad_mul;
  // Written with comparisons (not fminf/fmaxf) so a NaN passes through.
  g = g > x.max_grad_value ? x.max_grad_value : (g < -x.max_grad_value ? -x.max_grad_value : g);
  return g * x.clip_coef;
}

// beta^t for the bias corrections, in double.
FASTOPT_HD double power(double beta, double step) { return ::pow(beta, step); }

// ---- AdamW -----------------------------------------------------------------

// Scalars of one tensor's AdamW step.
struct AdamWCoeffs {
  float one_minus_beta1;  // lerp weight of m
  float beta2;
  float one_minus_beta2;
  float eps;
  float decay;            // 1 - lr * weight_decay
  float step_size;        // lr / (1 - beta1^t)
  float bias_corr2_sqrt;  // sqrt(1 - beta2^t)
};

FASTOPT_HD AdamWCoeffs adamw_coeffs(double lr, double beta1, double beta2, double eps,
                                    double weight_decay, double step) {
  AdamWCoeffs c;
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.eps = static_cast<float>(eps);
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  c.step_size = static_cast<float>(lr / (1.0 - power(beta1, step)));
  c.bias_corr2_sqrt = static_cast<float>(::sqrt(1.0 - power(beta2, step)));
  return c;
}

// One AdamW element; g is already transformed (transform_grad).
//   p *= 1 - lr*wd
//   m = lerp(m, g, 1-b1) ; v = v*b2 + (1-b2)*g*g ; (amsgrad) vmax = max(vmax, v)
//   p -= ((lr / (1-b1^t)) * m) / (sqrt(v) / sqrt(1-b2^t) + eps)
template <bool AMSGRAD>
FASTOPT_HD void adamw_element(float& p, float g, float& m, float& v, float& vmax,
                              const AdamWCoeffs& c) {
  p = p * c.decay;
  m = lerp(m, g, c.one_minus_beta1);
  v = ::fmaf(c.one_minus_beta2 * g, g, v * c.beta2);
  float v_used = v;
  if (AMSGRAD) {
    // NaN-propagating max, like torch.maximum.
    vmax = (vmax > v || vmax != vmax) ? vmax : v;
    v_used = vmax;
  }
  const float denom = ::sqrtf(v_used) / c.bias_corr2_sqrt + c.eps;
  p = p + ((-c.step_size) * m) / denom;
}

// ---- Lion ------------------------------------------------------------------

struct LionCoeffs {
  float lr;
  float one_minus_beta1;  // lerp weight of the update direction c
  float one_minus_beta2;  // lerp weight of m
  float decay;            // 1 - lr * weight_decay
};

FASTOPT_HD LionCoeffs lion_coeffs(double lr, double beta1, double beta2, double weight_decay) {
  LionCoeffs c;
  c.lr = static_cast<float>(lr);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  return c;
}

// sign with sign(0) = 0 and sign(NaN) = NaN (the input is returned for both).
FASTOPT_HD float sign_or_self(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x); }

//   c = lerp(m, g, 1-b1) ; p *= 1 - lr*wd ; p -= lr*sign(c) ; m = lerp(m, g, 1-b2)
FASTOPT_HD void lion_element(float& p, float g, float& m, const LionCoeffs& c) {
  const float update = lerp(m, g, c.one_minus_beta1);
  p = p * c.decay;
  p = p - c.lr * sign_or_self(update);
  m = lerp(m, g, c.one_minus_beta2);
}

// ---- AdEMAMix -----------------------------------------------------------------

// Scalars of one tensor's AdEMAMix step (Pagliardini et al. 2024, Algorithm 1).
struct AdEMAMixCoeffs {
  float one_minus_beta1;   // lerp weight of the fast EMA m1
  float one_minus_beta3;   // lerp weight of the slow EMA m2: 1 - beta3_t
  float beta2;
  float one_minus_beta2;
  float alpha;             // alpha_t
  float eps;
  float lr;
  float weight_decay;
  float bias_corr1;        // 1 - beta1^t
  float bias_corr2_sqrt;   // sqrt(1 - beta2^t)
};

// t_alpha / t_beta3 <= 0 mean "no warm-up" (the Python side's None).
//   alpha_t = min(t * alpha / t_alpha, alpha)
//   beta3_t = min(exp(ln b1 * ln b3 / ((1 - t/T) ln b3 + (t/T) ln b1)), b3)
FASTOPT_HD AdEMAMixCoeffs ademamix_coeffs(double lr, double beta1, double beta2, double beta3,
                                          double alpha, double t_alpha, double t_beta3,
                                          double eps, double weight_decay, double step) {
  double alpha_t = alpha;
  if (t_alpha > 0.0) alpha_t = ::fmin(step * alpha / t_alpha, alpha);
  double beta3_t = beta3;
  if (t_beta3 > 0.0) {
    const double frac = step / t_beta3;
    const double log1 = ::log(beta1), log3 = ::log(beta3);
    beta3_t = ::fmin(::exp(log1 * log3 / ((1.0 - frac) * log3 + frac * log1)), beta3);
  }
  AdEMAMixCoeffs c;
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.one_minus_beta3 = static_cast<float>(1.0 - beta3_t);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.alpha = static_cast<float>(alpha_t);
  c.eps = static_cast<float>(eps);
  c.lr = static_cast<float>(lr);
  c.weight_decay = static_cast<float>(weight_decay);
  c.bias_corr1 = static_cast<float>(1.0 - power(beta1, step));
  c.bias_corr2_sqrt = static_cast<float>(::sqrt(1.0 - power(beta2, step)));
  return c;
}

// One AdEMAMix element; g is already transformed.
//   m1 = lerp(m1, g, 1-b1) ; m2 = lerp(m2, g, 1-b3_t) ; v = v*b2 + (1-b2)*g*g
//   u  = (m1 / (1-b1^t) + alpha_t * m2) / (sqrt(v) / sqrt(1-b2^t) + eps) + wd * p
//   p -= lr * u
FASTOPT_HD void ademamix_element(float& p, float g, float& m1, float& m2, float& v,
                                 const AdEMAMixCoeffs& c) {
  m1 = lerp(m1, g, c.one_minus_beta1);
  m2 = lerp(m2, g, c.one_minus_beta3);
  v = ::fmaf(c.one_minus_beta2 * g, g, v * c.beta2);
  const float denom = ::sqrtf(v) / c.bias_corr2_sqrt + c.eps;
  const float update = (m1 / c.bias_corr1 + c.alpha * m2) / denom + c.weight_decay * p;
  p = ::fmaf(update, -c.lr, p);
}

}  // namespace fastopt
