// CPU kernels of the fused reparameterize+KL op: parallel over rows (at::parallel_for), each row
// in chunks of 64 columns whose noise is generated, used and dropped in registers/L1. float32
// work is done by branch-free loops that GCC vectorises (vec_math.h); float64 uses libm.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "ops/cpu/vec_math.h"
#include "ops/philox.h"
#include "ops/reparameterize_kl.h"

namespace pyvae {
namespace cpu {
namespace {

constexpr int64_t kChunk = 64;           // columns per step
constexpr int64_t kGroups = kChunk / 4;  // Philox groups per step

// ---- noise -------------------------------------------------------------------------------------

// The Philox words of kGroups consecutive groups of a row (portable version).
void philox_chunk_scalar(int64_t seed, int64_t row, int64_t group0, uint32_t (*w)[kGroups]) {
  for (int64_t g = 0; g < kGroups; ++g) {
    const Philox4 words = noise_words(seed, row, group0 + g);
    for (int k = 0; k < 4; ++k) w[k][g] = words.w[k];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The 32x32->64 products of Philox do not auto-vectorise, and they are most of the cost of the
// noise: with AVX2 each round runs on 8 groups at once (even and odd lanes multiplied apart).
__attribute__((target("avx2"))) inline void mulhilo_avx2(__m256i a, __m256i m, __m256i* hi,
                                                         __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) void philox_chunk_avx2(int64_t seed, int64_t row, int64_t group0,
                                                        uint32_t (*w)[kGroups]) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const uint64_t r = static_cast<uint64_t>(row), s = static_cast<uint64_t>(seed);
  for (int64_t first = 0; first < kGroups; first += 8) {
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(group0 + first)),
                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(r)));
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(r >> 32)));
    __m256i c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo_avx2(c0, m0, &hi0, &lo0);
      mulhilo_avx2(c2, m1, &hi1, &lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[0] + first), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[1] + first), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[2] + first), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[3] + first), c3);
  }
}
#endif

void philox_chunk(int64_t seed, int64_t row, int64_t group0, uint32_t (*w)[kGroups]) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return philox_chunk_avx2(seed, row, group0, w);
#endif
  philox_chunk_scalar(seed, row, group0, w);
}

// Box-Muller on the words of kGroups groups: kChunk normals (float32 maths, vectorised).
PYVAE_VECTORIZE void normals_from_words_f32(const uint32_t (*w)[kGroups], float* out) {
  for (int64_t g = 0; g < kGroups; ++g) {
    const float radius_a = __builtin_sqrtf(-2.0f * log_f32(unit_uniform(w[0][g])));
    const float radius_b = __builtin_sqrtf(-2.0f * log_f32(unit_uniform(w[2][g])));
    float cos_a, sin_a, cos_b, sin_b;
    sincos_2pi_f32(unit_uniform(w[1][g]), &cos_a, &sin_a);
    sincos_2pi_f32(unit_uniform(w[3][g]), &cos_b, &sin_b);
    out[4 * g + 0] = radius_a * cos_a;
    out[4 * g + 1] = radius_a * sin_a;
    out[4 * g + 2] = radius_b * cos_b;
    out[4 * g + 3] = radius_b * sin_b;
  }
}

// kChunk normals of `row` starting at column 4 * group0.
void noise_chunk_f32(int64_t seed, int64_t row, int64_t group0, float* out) {
  uint32_t w[4][kGroups];
  philox_chunk(seed, row, group0, w);
  normals_from_words_f32(w, out);
}

// The same normals in float64 maths (the uniforms are identical).
void noise_chunk_f64(int64_t seed, int64_t row, int64_t group0, double* out) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  for (int64_t g = 0; g < kGroups; ++g) {
    const Philox4 words = noise_words(seed, row, group0 + g);
    const double radius_a = std::sqrt(-2.0 * std::log(double(unit_uniform(words.w[0]))));
    const double radius_b = std::sqrt(-2.0 * std::log(double(unit_uniform(words.w[2]))));
    const double angle_a = kTwoPi * unit_uniform(words.w[1]);
    const double angle_b = kTwoPi * unit_uniform(words.w[3]);
    out[4 * g + 0] = radius_a * std::cos(angle_a);
    out[4 * g + 1] = radius_a * std::sin(angle_a);
    out[4 * g + 2] = radius_b * std::cos(angle_b);
    out[4 * g + 3] = radius_b * std::sin(angle_b);
  }
}

// ---- elementwise maths on one chunk ------------------------------------------------------------

PYVAE_INLINE float exp_acc(float x) { return exp_f32(x); }
PYVAE_INLINE double exp_acc(double x) { return std::exp(x); }

// z and the per-element KL terms (doubled: the row sum is halved once at the end).
template <typename T>
PYVAE_INLINE void forward_chunk(const T* mu, const T* lv, const T* eps, const T* pm, const T* plv,
                                int64_t n, T* z, T* kl_terms) {
  if (pm == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const T sigma = exp_acc(T(0.5) * lv[i]);
      z[i] = mu[i] + sigma * eps[i];
      kl_terms[i] = mu[i] * mu[i] + sigma * sigma - T(1) - lv[i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T sigma = exp_acc(T(0.5) * lv[i]);
      const T diff = mu[i] - pm[i];
      z[i] = mu[i] + sigma * eps[i];
      kl_terms[i] = plv[i] - lv[i] + (sigma * sigma + diff * diff) * exp_acc(-plv[i]) - T(1);
    }
  }
}

// Gradients of one chunk; gz is the upstream gradient of z (zeros when none reaches it) and gk the
// row's upstream gradient of kl.
template <typename T>
PYVAE_INLINE void backward_chunk(const T* gz, T gk, const T* mu, const T* lv, const T* eps,
                                 const T* pm, const T* plv, int64_t n, T* g_mu, T* g_lv, T* g_pm,
                                 T* g_plv) {
  if (pm == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const T sigma = exp_acc(T(0.5) * lv[i]);
      g_mu[i] = gz[i] + gk * mu[i];
      g_lv[i] = T(0.5) * (gz[i] * sigma * eps[i] + gk * (sigma * sigma - T(1)));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T sigma = exp_acc(T(0.5) * lv[i]);
      const T inv_prior_var = exp_acc(-plv[i]);
      const T diff = mu[i] - pm[i];
      const T sigma2 = sigma * sigma;
      g_mu[i] = gz[i] + gk * diff * inv_prior_var;
      g_lv[i] = T(0.5) * (gz[i] * sigma * eps[i] + gk * (sigma2 * inv_prior_var - T(1)));
      g_pm[i] = -gk * diff * inv_prior_var;
      g_plv[i] = T(0.5) * gk * (T(1) - (sigma2 + diff * diff) * inv_prior_var);
    }
  }
}

PYVAE_VECTORIZE void forward_chunk_f32(const float* mu, const float* lv, const float* eps,
                                       const float* pm, const float* plv, int64_t n, float* z,
                                       float* kl_terms) {
  forward_chunk(mu, lv, eps, pm, plv, n, z, kl_terms);
}

PYVAE_VECTORIZE void backward_chunk_f32(const float* gz, float gk, const float* mu,
                                        const float* lv, const float* eps, const float* pm,
                                        const float* plv, int64_t n, float* g_mu, float* g_lv,
                                        float* g_pm, float* g_plv) {
  backward_chunk(gz, gk, mu, lv, eps, pm, plv, n, g_mu, g_lv, g_pm, g_plv);
}

// ---- per-dtype plumbing ------------------------------------------------------------------------

// Chunk-sized scratch for inputs that are not already in the compute type.
template <typename scalar_t>
struct ChunkIn {
  using acc_t = accumulation_t<scalar_t>;
  acc_t buffer[kChunk];
  // Pointer to n values of src in acc_t: src itself when no conversion is needed.
  const acc_t* load(const scalar_t* src, int64_t n) {
    if (src == nullptr) return nullptr;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return src;
    } else {
      for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<acc_t>(src[i]);
      return buffer;
    }
  }
};

template <typename scalar_t>
struct ChunkOut {
  using acc_t = accumulation_t<scalar_t>;
  acc_t buffer[kChunk];
  acc_t* target(scalar_t* dst) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) return dst;
    else return dst == nullptr ? nullptr : buffer;
  }
  void store(scalar_t* dst, int64_t n) {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      if (dst == nullptr) return;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(buffer[i]);
    }
  }
};

template <typename acc_t>
void noise_chunk(int64_t seed, int64_t row, int64_t group0, acc_t* out) {
  if constexpr (std::is_same_v<acc_t, double>) noise_chunk_f64(seed, row, group0, out);
  else noise_chunk_f32(seed, row, group0, out);
}

template <typename acc_t>
void forward_chunk_any(const acc_t* mu, const acc_t* lv, const acc_t* eps, const acc_t* pm,
                       const acc_t* plv, int64_t n, acc_t* z, acc_t* kl_terms) {
  if constexpr (std::is_same_v<acc_t, double>) forward_chunk(mu, lv, eps, pm, plv, n, z, kl_terms);
  else forward_chunk_f32(mu, lv, eps, pm, plv, n, z, kl_terms);
}

template <typename acc_t>
void backward_chunk_any(const acc_t* gz, acc_t gk, const acc_t* mu, const acc_t* lv,
                        const acc_t* eps, const acc_t* pm, const acc_t* plv, int64_t n,
                        acc_t* g_mu, acc_t* g_lv, acc_t* g_pm, acc_t* g_plv) {
  if constexpr (std::is_same_v<acc_t, double>)
    backward_chunk(gz, gk, mu, lv, eps, pm, plv, n, g_mu, g_lv, g_pm, g_plv);
  else
    backward_chunk_f32(gz, gk, mu, lv, eps, pm, plv, n, g_mu, g_lv, g_pm, g_plv);
}

// Sum of n values with 8 independent partial sums (vectorisable without reassociation flags).
template <typename acc_t>
acc_t chunk_sum(const acc_t* values, int64_t n) {
  acc_t partial[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) partial[j] += values[i + j];
  for (; i < n; ++i) partial[i & 7] += values[i];
  return ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
         ((partial[4] + partial[5]) + (partial[6] + partial[7]));
}

template <typename T>
const T* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Rows per task: enough columns to amortise the task, at least one row.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

template <typename scalar_t>
void forward_impl(const at::Tensor& mu_t, const at::Tensor& lv_t,
                  const std::optional<at::Tensor>& eps_t, int64_t seed,
                  const std::optional<at::Tensor>& pm_t, const std::optional<at::Tensor>& plv_t,
                  at::Tensor& z_t, at::Tensor& kl_t) {
  using acc_t = accumulation_t<scalar_t>;
  const int64_t rows = mu_t.size(0), cols = mu_t.size(1);
  const scalar_t* mu = mu_t.data_ptr<scalar_t>();
  const scalar_t* lv = lv_t.data_ptr<scalar_t>();
  const scalar_t* eps = optional_ptr<scalar_t>(eps_t);
  const scalar_t* pm = optional_ptr<scalar_t>(pm_t);
  const scalar_t* plv = optional_ptr<scalar_t>(plv_t);
  scalar_t* z = z_t.data_ptr<scalar_t>();
  acc_t* kl = kl_t.data_ptr<acc_t>();
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    ChunkIn<scalar_t> in_mu, in_lv, in_eps, in_pm, in_plv;
    ChunkOut<scalar_t> out_z;
    acc_t noise[kChunk], terms[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      acc_t row_sum = 0;
      for (int64_t c = 0; c < cols; c += kChunk) {
        const int64_t n = std::min(kChunk, cols - c);
        const int64_t at = r * cols + c;
        const acc_t* e;
        if (eps != nullptr) {
          e = in_eps.load(eps + at, n);
        } else {
          noise_chunk<acc_t>(seed, r, c / 4, noise);
          e = noise;
        }
        acc_t* z_out = out_z.target(z + at);
        forward_chunk_any<acc_t>(in_mu.load(mu + at, n), in_lv.load(lv + at, n), e,
                                 in_pm.load(pm ? pm + at : nullptr, n),
                                 in_plv.load(plv ? plv + at : nullptr, n), n, z_out, terms);
        out_z.store(z + at, n);
        row_sum += chunk_sum(terms, n);
      }
      kl[r] = acc_t(0.5) * row_sum;
    }
  });
}

template <typename scalar_t>
void backward_impl(const std::optional<at::Tensor>& gz_t, const std::optional<at::Tensor>& gk_t,
                   const at::Tensor& mu_t, const at::Tensor& lv_t,
                   const std::optional<at::Tensor>& eps_t, int64_t seed,
                   const std::optional<at::Tensor>& pm_t, const std::optional<at::Tensor>& plv_t,
                   at::Tensor& gmu_t, at::Tensor& glv_t, at::Tensor& gpm_t, at::Tensor& gplv_t) {
  using acc_t = accumulation_t<scalar_t>;
  const int64_t rows = mu_t.size(0), cols = mu_t.size(1);
  const scalar_t* gz = optional_ptr<scalar_t>(gz_t);
  const acc_t* gk = optional_ptr<acc_t>(gk_t);
  const scalar_t* mu = mu_t.data_ptr<scalar_t>();
  const scalar_t* lv = lv_t.data_ptr<scalar_t>();
  const scalar_t* eps = optional_ptr<scalar_t>(eps_t);
  const scalar_t* pm = optional_ptr<scalar_t>(pm_t);
  const scalar_t* plv = optional_ptr<scalar_t>(plv_t);
  scalar_t* gmu = gmu_t.data_ptr<scalar_t>();
  scalar_t* glv = glv_t.data_ptr<scalar_t>();
  scalar_t* gpm = pm ? gpm_t.data_ptr<scalar_t>() : nullptr;
  scalar_t* gplv = pm ? gplv_t.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    ChunkIn<scalar_t> in_gz, in_mu, in_lv, in_eps, in_pm, in_plv;
    ChunkOut<scalar_t> out_mu, out_lv, out_pm, out_plv;
    acc_t noise[kChunk], zeros[kChunk] = {};
    for (int64_t r = begin; r < end; ++r) {
      const acc_t row_gk = gk ? gk[r] : acc_t(0);
      for (int64_t c = 0; c < cols; c += kChunk) {
        const int64_t n = std::min(kChunk, cols - c);
        const int64_t at = r * cols + c;
        const acc_t* e;
        if (eps != nullptr) {
          e = in_eps.load(eps + at, n);
        } else {
          noise_chunk<acc_t>(seed, r, c / 4, noise);
          e = noise;
        }
        const acc_t* g = gz ? in_gz.load(gz + at, n) : zeros;
        backward_chunk_any<acc_t>(g, row_gk, in_mu.load(mu + at, n), in_lv.load(lv + at, n), e,
                                  in_pm.load(pm ? pm + at : nullptr, n),
                                  in_plv.load(plv ? plv + at : nullptr, n), n,
                                  out_mu.target(gmu + at), out_lv.target(glv + at),
                                  out_pm.target(gpm ? gpm + at : nullptr),
                                  out_plv.target(gplv ? gplv + at : nullptr));
        out_mu.store(gmu + at, n);
        out_lv.store(glv + at, n);
        out_pm.store(gpm ? gpm + at : nullptr, n);
        out_plv.store(gplv ? gplv + at : nullptr, n);
      }
    }
  });
}

int64_t read_seed(const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& eps) {
  return eps.has_value() ? 0 : seed->data_ptr<int64_t>()[0];
}

std::tuple<at::Tensor, at::Tensor> reparameterize_kl_forward_cpu(
    const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& prior_mu,
    const std::optional<at::Tensor>& prior_logvar) {
  check_reparameterize_kl_args(mu, logvar, eps, seed, prior_mu, prior_logvar);
  at::Tensor z = at::empty_like(mu);
  at::Tensor kl =
      at::empty({mu.size(0)}, mu.options().dtype(accumulation_dtype(mu.scalar_type())));
  const int64_t seed_value = read_seed(seed, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(),
                                  "reparameterize_kl_forward_cpu", [&] {
    forward_impl<scalar_t>(mu, logvar, eps, seed_value, prior_mu, prior_logvar, z, kl);
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reparameterize_kl_backward_cpu(
    const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_kl,
    const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& prior_mu,
    const std::optional<at::Tensor>& prior_logvar) {
  check_reparameterize_kl_backward_args(grad_z, grad_kl, mu, logvar, eps, seed, prior_mu,
                                        prior_logvar);
  at::Tensor grad_mu = at::empty_like(mu);
  at::Tensor grad_logvar = at::empty_like(mu);
  const bool has_prior = prior_mu.has_value();
  at::Tensor grad_prior_mu = has_prior ? at::empty_like(mu) : at::empty({0}, mu.options());
  at::Tensor grad_prior_logvar = has_prior ? at::empty_like(mu) : at::empty({0}, mu.options());
  const int64_t seed_value = read_seed(seed, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(),
                                  "reparameterize_kl_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_z, grad_kl, mu, logvar, eps, seed_value, prior_mu, prior_logvar,
                            grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar);
  });
  return {grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvae, CPU, m) {
  m.impl("reparameterize_kl_forward", &reparameterize_kl_forward_cpu);
  m.impl("reparameterize_kl_backward", &reparameterize_kl_backward_cpu);
}

}  // namespace cpu
}  // namespace pyvae
