// Per-element update math shared by every compiled backend.
//
// NOTE [one precision policy]
// Every value is loaded from its storage dtype (fp32, bf16 or fp16), computed
// in fp32 registers, and narrowed back on the store with round-to-nearest-even
// (c10::BFloat16 / c10::Half constructors round RNE and keep NaN a NaN). The
// CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda) both call the
// functions below, so the arithmetic the CPU tests check is the arithmetic a
// GPU runs. Variants (amsgrad, maximize) are template parameters, resolved at
// compile time; per-tensor scalars are folded into a coefficient struct once
// per tensor (host side on CPU, once per block on the GPU).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTOPT_HD __host__ __device__ __forceinline__
#else
#define FASTOPT_HD inline __attribute__((always_inline))
#endif

namespace fastopt {

// ---- storage <-> fp32 ------------------------------------------------------

template <typename T>
FASTOPT_HD float to_f32(T x) {
  return static_cast<float>(x);
}

// Narrowing store. For c10::BFloat16 and c10::Half the converting
// constructor rounds to nearest even; for float it is the identity.
template <typename T>
FASTOPT_HD T from_f32(float x) {
  return T(x);
}

// ---- AdamW -----------------------------------------------------------------

// Scalars of one tensor's step. Computed in double like torch's single-tensor
// AdamW (which does its bias-correction arithmetic on Python floats), then
// rounded once to fp32.
struct AdamWCoeffs {
  float lr;
  float beta1;
  float beta2;
  float eps;
  float decay;            // 1 - lr * weight_decay
  float step_size;        // lr / (1 - beta1^t)
  float bias_corr2_sqrt;  // sqrt(1 - beta2^t)
};

FASTOPT_HD AdamWCoeffs adamw_coeffs(double lr, double beta1, double beta2,
                                    double eps, double weight_decay,
                                    double step) {
  AdamWCoeffs c;
  c.lr = static_cast<float>(lr);
  c.beta1 = static_cast<float>(beta1);
  c.beta2 = static_cast<float>(beta2);
  c.eps = static_cast<float>(eps);
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  c.step_size = static_cast<float>(lr / (1.0 - ::pow(beta1, step)));
  c.bias_corr2_sqrt = static_cast<float>(::sqrt(1.0 - ::pow(beta2, step)));
  return c;
}

// One AdamW element. `g` is the raw gradient; `grad_mul` folds loss-scale
// unscaling and the global-norm clip coefficient (1 when neither is used).
//   p *= 1 - lr*wd
//   m = b1*m + (1-b1)*g ; v = b2*v + (1-b2)*g*g ; (amsgrad) vmax = max(vmax, v)
//   p -= (lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps)
template <bool AMSGRAD, bool MAXIMIZE>
FASTOPT_HD void adamw_element(float& p, float g, float& m, float& v,
                              float& vmax, float grad_mul,
                              const AdamWCoeffs& c) {
  g = g * grad_mul;
  if (MAXIMIZE) g = -g;
  p = p * c.decay;
  m = c.beta1 * m + (1.0f - c.beta1) * g;
  v = c.beta2 * v + (1.0f - c.beta2) * (g * g);
  float v_used = v;
  if (AMSGRAD) {
    // NaN-propagating max, like torch.maximum.
    vmax = (vmax > v || vmax != vmax) ? vmax : v;
    v_used = vmax;
  }
  const float denom = ::sqrtf(v_used) / c.bias_corr2_sqrt + c.eps;
  p = p - c.step_size * (m / denom);
}

// ---- Lion ------------------------------------------------------------------

struct LionCoeffs {
  float lr;
  float beta1;
  float beta2;
  float decay;  // 1 - lr * weight_decay
};

FASTOPT_HD LionCoeffs lion_coeffs(double lr, double beta1, double beta2,
                                  double weight_decay) {
  LionCoeffs c;
  c.lr = static_cast<float>(lr);
  c.beta1 = static_cast<float>(beta1);
  c.beta2 = static_cast<float>(beta2);
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  return c;
}

// sign with sign(0) = 0 and sign(NaN) = NaN (the input is returned for both).
FASTOPT_HD float sign_or_self(float x) {
  return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x);
}

//   c = b1*m + (1-b1)*g ; p *= 1 - lr*wd ; p -= lr*sign(c) ; m = b2*m + (1-b2)*g
template <bool MAXIMIZE>
FASTOPT_HD void lion_element(float& p, float g, float& m, float grad_mul,
                             const LionCoeffs& c) {
  g = g * grad_mul;
  if (MAXIMIZE) g = -g;
  const float update = c.beta1 * m + (1.0f - c.beta1) * g;
  p = p * c.decay;
  p = p - c.lr * sign_or_self(update);
  m = c.beta2 * m + (1.0f - c.beta2) * g;
}

}  // namespace fastopt
