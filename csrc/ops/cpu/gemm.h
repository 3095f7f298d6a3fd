// Single-threaded GEMM for the small, cache-resident products of the CPU kernels:
//
//   C (M, N) = A (M, K) · B (K, N)     or, accumulating,     C += A · B
//
// with A at any strides (a transposed view works), B and C with unit column stride.
//
// Why not only ATen's GEMM: on some CPUs MKL's sgemm runs these skinny shapes (N = 32..128
// output channels, K = a few hundred gathered taps × channels) far below the FMA peak; on an AMD
// EPYC (Zen 4) core it reaches about 55 GFLOP/s where the register-blocked AVX-512 micro-kernel
// below reaches about 100. float32 on CPUs with AVX-512F takes the micro-kernel; everything else
// (float64, other CPUs) takes at::mm_out / addmm_.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PYVAE_GEMM_AVX512 1
#endif

namespace pyvae {
namespace cpu {

#ifdef PYVAE_GEMM_AVX512
namespace gemm_detail {

// The accumulators only live in registers when the tile loops are fully unrolled.
#define PYVAE_UNROLL _Pragma("GCC unroll 8")

constexpr int kRows = 6;     // rows of C per micro-tile
constexpr int kVectors = 4;  // 16-float vectors of C per micro-tile row (64 columns)

// C[0..MR) × [0..16·NV) (+)= Σ_k A(r, k) B(k, ·): MR × NV accumulators stay in zmm registers,
// B's row is loaded once per k and each A element broadcast once. `last` masks the columns of
// the last vector (N tails).
template <int MR, int NV>
__attribute__((target("avx512f"))) void micro_tile(int64_t K, const float* A, int64_t a_row,
                                                   int64_t a_col, const float* B, int64_t ldb,
                                                   float* C, int64_t ldc, bool accumulate,
                                                   __mmask16 last) {
  __m512 acc[MR][NV];
  PYVAE_UNROLL for (int r = 0; r < MR; ++r) {
    PYVAE_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b_row = B + k * ldb;
    __m512 b[NV];
    PYVAE_UNROLL for (int v = 0; v < NV; ++v) {
      b[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, b_row + 16 * v)
                         : _mm512_loadu_ps(b_row + 16 * v);
    }
    const float* a = A + k * a_col;
    PYVAE_UNROLL for (int r = 0; r < MR; ++r) {
      const __m512 a_r = _mm512_set1_ps(a[r * a_row]);
      PYVAE_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a_r, b[v], acc[r][v]);
    }
  }
  PYVAE_UNROLL for (int r = 0; r < MR; ++r) {
    PYVAE_UNROLL for (int v = 0; v < NV; ++v) {
      float* c = C + r * ldc + 16 * v;
      const __mmask16 m = v == NV - 1 ? last : __mmask16{0xFFFF};
      __m512 out = acc[r][v];
      if (accumulate) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(m, c));
      _mm512_mask_storeu_ps(c, m, out);
    }
  }
}

#undef PYVAE_UNROLL

template <int MR>
void micro_rows(int vectors, int64_t K, const float* A, int64_t a_row, int64_t a_col,
                const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate,
                __mmask16 last) {
  switch (vectors) {
    case 1: return micro_tile<MR, 1>(K, A, a_row, a_col, B, ldb, C, ldc, accumulate, last);
    case 2: return micro_tile<MR, 2>(K, A, a_row, a_col, B, ldb, C, ldc, accumulate, last);
    case 3: return micro_tile<MR, 3>(K, A, a_row, a_col, B, ldb, C, ldc, accumulate, last);
    default: return micro_tile<MR, 4>(K, A, a_row, a_col, B, ldb, C, ldc, accumulate, last);
  }
}

inline void gemm_avx512(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_row,
                        int64_t a_col, const float* B, int64_t ldb, float* C, int64_t ldc,
                        bool accumulate) {
  constexpr int64_t kColumns = 16 * kVectors;
  for (int64_t n0 = 0; n0 < N; n0 += kColumns) {
    const int64_t columns = std::min(kColumns, N - n0);
    const int vectors = static_cast<int>((columns + 15) / 16);
    const int64_t tail = columns % 16;
    const __mmask16 last = tail == 0 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << tail) - 1);
    const float* b = B + n0;
    float* c = C + n0;
    int64_t m0 = 0;
    for (; m0 + kRows <= M; m0 += kRows) {
      micro_rows<kRows>(vectors, K, A + m0 * a_row, a_row, a_col, b, ldb, c + m0 * ldc, ldc,
                        accumulate, last);
    }
    const float* a = A + m0 * a_row;
    c += m0 * ldc;
    switch (M - m0) {
      case 1: micro_rows<1>(vectors, K, a, a_row, a_col, b, ldb, c, ldc, accumulate, last); break;
      case 2: micro_rows<2>(vectors, K, a, a_row, a_col, b, ldb, c, ldc, accumulate, last); break;
      case 3: micro_rows<3>(vectors, K, a, a_row, a_col, b, ldb, c, ldc, accumulate, last); break;
      case 4: micro_rows<4>(vectors, K, a, a_row, a_col, b, ldb, c, ldc, accumulate, last); break;
      case 5: micro_rows<5>(vectors, K, a, a_row, a_col, b, ldb, c, ldc, accumulate, last); break;
      default: break;
    }
  }
}

inline bool has_avx512() {
  static const bool supported = __builtin_cpu_supports("avx512f");
  return supported;
}

}  // namespace gemm_detail
#endif

// out (M, N) = a (M, K) · b (K, N), or out += a · b when `accumulate`; out and b must have unit
// column stride for the micro-kernel path (ATen's GEMM takes the rest).
inline void matmul(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
#ifdef PYVAE_GEMM_AVX512
  if (out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
      b.scalar_type() == at::kFloat && out.stride(1) == 1 && b.stride(1) == 1 &&
      gemm_detail::has_avx512()) {
    gemm_detail::gemm_avx512(out.size(0), out.size(1), a.size(1), a.const_data_ptr<float>(),
                             a.stride(0), a.stride(1), b.const_data_ptr<float>(), b.stride(0),
                             out.mutable_data_ptr<float>(), out.stride(0), accumulate);
    return;
  }
#endif
  if (accumulate) {
    out.addmm_(a, b);
  } else {
    at::mm_out(out, a, b);
  }
}

}  // namespace cpu
}  // namespace pyvae
