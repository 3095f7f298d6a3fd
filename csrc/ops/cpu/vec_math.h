// Branch-free float32 math for the CPU kernels: written with selects and bit operations only, so
// that GCC vectorises loops that call these (libm's expf/logf/sincosf are opaque calls that stop
// vectorisation). Polynomials are the classic Cephes single-precision ones (≈1 ulp on the
// reduced ranges); argument reduction keeps that accuracy over the ranges noted per function.
#pragma once
#include <stdint.h>
#include <string.h>

#define PYVAE_INLINE inline __attribute__((always_inline))

// The hot loops are compiled for these instruction sets and the best one is picked at load time.
// x86-64-v3 is AVX2 with FMA: a plain "avx2" clone gets no FMA, and its polynomials then cost a
// multiply and an add per term (1.3x slower on an AVX2-only EPYC). GCC 12 dispatches it with
// __builtin_cpu_supports; older GCCs get the plain AVX2 clone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define PYVAE_VECTORIZE __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYVAE_VECTORIZE __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PYVAE_VECTORIZE
#endif

namespace pyvae {
namespace cpu {

PYVAE_INLINE float bits_to_float(uint32_t bits) {
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

PYVAE_INLINE uint32_t float_to_bits(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// 2^n for integer n in [-126, 127], built directly in the exponent field.
PYVAE_INLINE float exp2_int(int32_t n) {
  return bits_to_float(static_cast<uint32_t>(n + 127) << 23);
}

// exp(x) for all finite x: overflows to inf above ~88.72 and underflows through subnormals to 0.
PYVAE_INLINE float exp_f32(float x) {
  x = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
  const float n = __builtin_rintf(x * 1.44269504088896341f);
  // Cody-Waite: ln 2 split so that n * kLn2Hi is exact.
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // Two factors keep each scale inside the normal range for n in [-150, 129].
  const int32_t e = static_cast<int32_t>(n);
  const int32_t half = e >> 1;
  return p * exp2_int(half) * exp2_int(e - half);
}

// 2^x for x <= 127, flushed to 0 below -127 (as a term of a logsumexp's shifted sum, 2^-127 of
// the largest term never changes a float32 sum). The kernels' logsumexps run in base 2, so that
// the argument needs no scaling; Cephes' exp2f polynomial, within 2 ulp.
PYVAE_INLINE float exp2_f32(float x) {
  x = x < -127.0f ? -127.0f : (x > 127.0f ? 127.0f : x);
  const float n = __builtin_rintf(x);
  const float r = x - n;  // [-0.5, 0.5], exact
  float p = 1.535336188319500e-4f;
  p = p * r + 1.339887440266574e-3f;
  p = p * r + 9.618437357674640e-3f;
  p = p * r + 5.550332471162809e-2f;
  p = p * r + 2.402264791363012e-1f;
  p = p * r + 6.931472028550421e-1f;
  p = p * r + 1.0f;
  return p * exp2_int(static_cast<int32_t>(n));  // exp2_int(-127) is +0
}

// log(x) for positive normal x (what the noise generator feeds it: uniforms in (0, 1)).
PYVAE_INLINE float log_f32(float x) {
  const uint32_t bits = float_to_bits(x);
  int32_t e = static_cast<int32_t>(bits >> 23) - 126;
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f000000u);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float ef = static_cast<float>(e);
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  return m + y + 0.693359375f * ef;
}

// (cos, sin)(2 pi u) for u in [0, 1]. The reduction to [-pi/4, pi/4] is exact in float32
// because u is a multiple of 2^-24, so the only error is the polynomials'.
PYVAE_INLINE void sincos_2pi_f32(float u, float* cos_out, float* sin_out) {
  const float t = u - __builtin_rintf(u);               // [-0.5, 0.5], exact
  const float quarter = __builtin_rintf(4.0f * t);       // nearest multiple of pi/2
  const float a = (t - 0.25f * quarter) * 6.28318530717958648f;  // [-pi/4, pi/4]
  const float a2 = a * a;
  const float sin_a = a + a * a2 * (-1.6666654611e-1f + a2 * (8.3321608736e-3f +
                                                               a2 * -1.9515295891e-4f));
  const float cos_a = 1.0f - 0.5f * a2 + a2 * a2 * (4.166664568298827e-2f +
                                                    a2 * (-1.388731625493765e-3f +
                                                          a2 * 2.443315711809948e-5f));
  const int32_t k = static_cast<int32_t>(quarter) & 3;   // rotate by k quarter turns
  const float c = (k & 1) ? sin_a : cos_a;
  const float s = (k & 1) ? cos_a : sin_a;
  *cos_out = (k == 1 || k == 2) ? -c : c;
  *sin_out = (k >= 2) ? -s : s;
}

}  // namespace cpu
}  // namespace pyvae
