// Counter-based noise shared by every pyvae backend (CPU, CUDA; the Triton kernels and the
// PyTorch reference in pyvae/ops/_noise.py implement the same function).
//
// The specification, for a (rows x cols) tensor viewed in row-major order and a 64-bit seed s:
//   key      = (s & 0xffffffff, s >> 32)
//   counter  = (q, r & 0xffffffff, r >> 32, 0)   for row r and column group q = col / 4
//   (w0..w3) = Philox4x32-10(counter, key)         (Salmon et al. 2011, Random123)
//   u_k      = (2 * (w_k >> 9) + 1) * 2^-24        exactly representable, strictly inside (0, 1)
//   eps[r, 4q + 0] = sqrt(-2 ln u0) * cos(2 pi u1)  eps[r, 4q + 1] = sqrt(-2 ln u0) * sin(2 pi u1)
//   eps[r, 4q + 2] = sqrt(-2 ln u2) * cos(2 pi u3)  eps[r, 4q + 3] = sqrt(-2 ln u2) * sin(2 pi u3)
// The noise therefore depends only on (seed, row, column), never on the memory layout, the
// backend, or how the work is split, and the backward pass can regenerate it exactly.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define PYVAE_HD __host__ __device__ __forceinline__
#else
#define PYVAE_HD inline __attribute__((always_inline))
#endif

namespace pyvae {

struct Philox4 {
  uint32_t w[4];
};

PYVAE_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

// Philox4x32 with 10 rounds.
PYVAE_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four random words of column group q in row r under the given seed.
PYVAE_HD Philox4 noise_words(int64_t seed, int64_t row, int64_t group) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint64_t r = static_cast<uint64_t>(row);
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(r),
                       static_cast<uint32_t>(r >> 32), 0u, static_cast<uint32_t>(s),
                       static_cast<uint32_t>(s >> 32));
}

// Uniform in (0, 1), exactly representable in float32: odd multiples of 2^-24.
PYVAE_HD float unit_uniform(uint32_t w) {
  return static_cast<float>(2u * (w >> 9) + 1u) * 5.9604644775390625e-08f;  // 2^-24
}

}  // namespace pyvae
