// CUDA kernels of the fused reparameterize + KL op: z = mu + exp(logvar / 2) * eps and the
// per-row KL divergence to a standard-normal or diagonal-Gaussian prior, with the backward.
//
// Work split: a row is cut into groups of 4 columns, the unit served by one Philox call
// (ops/philox.h), and each row belongs to a sub-warp of `lanes` threads, a power of two up to 32
// chosen from the number of groups, so that narrow rows pack several rows into a warp. Each lane
// walks the row's groups with stride `lanes`; the forward reduces the KL across the sub-warp
// with shuffles in a fixed order, which keeps it deterministic without atomics. The noise is
// regenerated from the seed wherever it is needed, so the backward never reads a stored eps.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "ops/cuda/device_math.cuh"
#include "ops/cuda/reparameterize_kl.h"
#include "ops/philox.h"

namespace pyvae {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;


// One group of 4 consecutive elements. The alignment makes a whole group a single 8-byte
// (float16, bfloat16) or 16-byte (float32) access, and two 16-byte accesses for float64.
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// Reads the first n (<= 4) elements of a group and zero-fills the rest. kVec groups are whole
// and Pack4-aligned.
template <bool kVec, typename T>
__device__ __forceinline__ void load_group(const T* p, int n, acc_t<T> (&x)[4]) {
  if constexpr (kVec) {
    const Pack4<T> pack = *reinterpret_cast<const Pack4<T>*>(p);
#pragma unroll
    for (int j = 0; j < 4; ++j) x[j] = to_acc(pack.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) x[j] = j < n ? to_acc(p[j]) : acc_t<T>(0);
  }
}

template <bool kVec, typename T>
__device__ __forceinline__ void store_group(T* p, int n, const acc_t<T> (&x)[4]) {
  if constexpr (kVec) {
    Pack4<T> pack;
#pragma unroll
    for (int j = 0; j < 4; ++j) pack.v[j] = from_acc<T>(x[j]);
    *reinterpret_cast<Pack4<T>*>(p) = pack;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < n) p[j] = from_acc<T>(x[j]);
    }
  }
}

// Box-Muller on one pair of uniforms. sincospi takes 2u exactly, where cos(2 * pi * u) would
// first round the angle.
__device__ __forceinline__ void box_muller(float u_radius, float u_angle, float& c, float& s) {
  const float radius = sqrtf(-2.0f * logf(u_radius));
  sincospif(2.0f * u_angle, &s, &c);
  c *= radius;
  s *= radius;
}

__device__ __forceinline__ void box_muller(double u_radius, double u_angle, double& c,
                                           double& s) {
  const double radius = sqrt(-2.0 * log(u_radius));
  sincospi(2.0 * u_angle, &s, &c);
  c *= radius;
  s *= radius;
}

// The noise of the 4 columns of one group (ops/philox.h); float64 inputs get the normals in
// double precision from the same (exactly representable) uniforms.
template <typename A>
__device__ __forceinline__ void noise_group(int64_t seed, int64_t row, int64_t group,
                                            A (&eps)[4]) {
  const Philox4 words = noise_words(seed, row, group);
  box_muller(A(unit_uniform(words.w[0])), A(unit_uniform(words.w[1])), eps[0], eps[1]);
  box_muller(A(unit_uniform(words.w[2])), A(unit_uniform(words.w[3])), eps[2], eps[3]);
}

// This thread's place in the split of rows over sub-warps. warp_row and step are warp-uniform,
// so a loop over `base` runs equally often on every lane of a warp.
struct RowSplit {
  int lanes;         // threads per row
  int lane;          // index within the row's sub-warp
  int sub;           // row of this sub-warp relative to the warp's first row
  int64_t warp_row;  // first row of this warp
  int64_t step;      // rows covered by the whole grid per iteration

  __device__ explicit RowSplit(int lanes_log2) {
    lanes = 1 << lanes_log2;
    lane = threadIdx.x & (lanes - 1);
    sub = (threadIdx.x % kWarpSize) >> lanes_log2;
    const int rows_per_warp = kWarpSize >> lanes_log2;
    const int64_t warp =
        (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarpSize;
    warp_row = warp * rows_per_warp;
    step = static_cast<int64_t>(gridDim.x) * (kThreads / kWarpSize) * rows_per_warp;
  }
};

template <typename T>
struct ForwardParams {
  const T* mu;
  const T* logvar;
  const T* eps;
  const int64_t* seed;
  const T* prior_mu;
  const T* prior_logvar;
  T* z;
  acc_t<T>* kl;
  int64_t rows;
  int64_t cols;
  int lanes_log2;
};

template <typename T>
struct BackwardParams {
  const T* grad_z;
  const acc_t<T>* grad_kl;
  const T* mu;
  const T* logvar;
  const T* eps;
  const int64_t* seed;
  const T* prior_mu;
  const T* prior_logvar;
  T* grad_mu;
  T* grad_logvar;
  T* grad_prior_mu;
  T* grad_prior_logvar;
  int64_t rows;
  int64_t cols;
  int lanes_log2;
};

// Resident blocks per SM that ptxas must leave room for, which caps the registers per thread at
// 80 (float32), 48 (float16, bfloat16) and 128 (float64). Every kernel fits these without
// spilling on sm_80 and sm_90; without the hint ptxas spills some float64 kernels on sm_90.
template <typename T>
constexpr int kMinBlocksPerSm = std::is_same<T, double>::value  ? 2
                                : std::is_same<T, float>::value ? 3
                                                                : 5;

// kPrior: general diagonal-Gaussian prior; kNoise: eps is generated from *seed; kVec: every
// group is whole and Pack4-aligned.
template <typename T, bool kPrior, bool kNoise, bool kVec>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<T>)
    reparameterize_kl_forward_kernel(const ForwardParams<T> p) {
  using A = acc_t<T>;
  const RowSplit split(p.lanes_log2);
  const int64_t groups = (p.cols + 3) / 4;
  const int64_t seed = kNoise ? *p.seed : 0;

  // The loop bound is warp-uniform: all 32 lanes reach the full-mask shuffles, and lanes past
  // the last row take part with kl = 0.
  for (int64_t base = split.warp_row; base < p.rows; base += split.step) {
    const int64_t row = base + split.sub;
    A kl = 0;
    if (row < p.rows) {
      for (int64_t q = split.lane; q < groups; q += split.lanes) {
        const int64_t col = 4 * q;
        const int64_t offset = row * p.cols + col;
        const int n = kVec ? 4 : static_cast<int>(p.cols - col < 4 ? p.cols - col : 4);
        A mu[4], lv[4], eps[4], z[4];
        load_group<kVec>(p.mu + offset, n, mu);
        load_group<kVec>(p.logvar + offset, n, lv);
        if constexpr (kNoise) {
          noise_group(seed, row, q, eps);
        } else {
          load_group<kVec>(p.eps + offset, n, eps);
        }
        A pm[4], plv[4];
        if constexpr (kPrior) {
          load_group<kVec>(p.prior_mu + offset, n, pm);
          load_group<kVec>(p.prior_logvar + offset, n, plv);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const A sigma2 = exp_acc(lv[j]);
          z[j] = mu[j] + exp_acc(A(0.5) * lv[j]) * eps[j];
          A term;
          if constexpr (kPrior) {
            const A d = mu[j] - pm[j];
            term = plv[j] - lv[j] + (sigma2 + d * d) * exp_acc(-plv[j]) - A(1);
          } else {
            term = mu[j] * mu[j] + sigma2 - A(1) - lv[j];
          }
          if (j < n) kl += term;
        }
        store_group<kVec>(p.z + offset, n, z);
      }
    }
    for (int mask = split.lanes >> 1; mask > 0; mask >>= 1) {
      kl += __shfl_xor_sync(kFullMask, kl, mask);
    }
    if (row < p.rows && split.lane == 0) p.kl[row] = A(0.5) * kl;
  }
}

// Same split and template flags as the forward. An absent grad_z or grad_kl reads as zeros;
// without grad_z the noise is not generated at all (it is multiplied by zero).
template <typename T, bool kPrior, bool kNoise, bool kVec>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<T>)
    reparameterize_kl_backward_kernel(const BackwardParams<T> p) {
  using A = acc_t<T>;
  const RowSplit split(p.lanes_log2);
  const int64_t groups = (p.cols + 3) / 4;
  const bool has_grad_z = p.grad_z != nullptr;
  const int64_t seed = kNoise && has_grad_z ? *p.seed : 0;

  // No cross-lane traffic here, so each thread simply stops after its last row.
  for (int64_t row = split.warp_row + split.sub; row < p.rows; row += split.step) {
    const A gk = p.grad_kl != nullptr ? p.grad_kl[row] : A(0);
    for (int64_t q = split.lane; q < groups; q += split.lanes) {
      const int64_t col = 4 * q;
      const int64_t offset = row * p.cols + col;
      const int n = kVec ? 4 : static_cast<int>(p.cols - col < 4 ? p.cols - col : 4);
      A mu[4], lv[4], gz[4] = {}, eps[4] = {};
      load_group<kVec>(p.mu + offset, n, mu);
      load_group<kVec>(p.logvar + offset, n, lv);
      if (has_grad_z) {
        load_group<kVec>(p.grad_z + offset, n, gz);
        if constexpr (kNoise) {
          noise_group(seed, row, q, eps);
        } else {
          load_group<kVec>(p.eps + offset, n, eps);
        }
      }
      A grad_mu[4], grad_lv[4];
      if constexpr (kPrior) {
        A pm[4], plv[4], grad_pm[4], grad_plv[4];
        load_group<kVec>(p.prior_mu + offset, n, pm);
        load_group<kVec>(p.prior_logvar + offset, n, plv);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const A sigma2 = exp_acc(lv[j]);
          const A d = mu[j] - pm[j];
          const A ip = exp_acc(-plv[j]);
          const A kl_mu = gk * d * ip;
          grad_mu[j] = gz[j] + kl_mu;
          grad_lv[j] = A(0.5) * gz[j] * exp_acc(A(0.5) * lv[j]) * eps[j] +
                       A(0.5) * gk * (sigma2 * ip - A(1));
          grad_pm[j] = -kl_mu;
          grad_plv[j] = A(0.5) * gk * (A(1) - (sigma2 + d * d) * ip);
        }
        store_group<kVec>(p.grad_prior_mu + offset, n, grad_pm);
        store_group<kVec>(p.grad_prior_logvar + offset, n, grad_plv);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const A sigma2 = exp_acc(lv[j]);
          grad_mu[j] = gz[j] + gk * mu[j];
          grad_lv[j] = A(0.5) * gz[j] * exp_acc(A(0.5) * lv[j]) * eps[j] +
                       A(0.5) * gk * (sigma2 - A(1));
        }
      }
      store_group<kVec>(p.grad_mu + offset, n, grad_mu);
      store_group<kVec>(p.grad_logvar + offset, n, grad_lv);
    }
  }
}

// log2 of the threads per row: one per group of 4 columns, rounded up to a power of two and
// capped at a warp (wider rows loop).
int lanes_log2_for(int64_t cols) {
  const int64_t groups = (cols + 3) / 4;
  int lanes_log2 = 0;
  while (lanes_log2 < 5 && (int64_t{1} << lanes_log2) < groups) ++lanes_log2;
  return lanes_log2;
}

// Enough blocks to cover the rows once, capped at what the device keeps resident; the kernels
// grid-stride over the rest.
template <typename Kernel>
cudaError_t grid_size(Kernel kernel, int64_t rows, int lanes_log2, int* blocks) {
  int device = 0;
  int sm_count = 0;
  int blocks_per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  }
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, 0);
  }
  if (err != cudaSuccess) return err;
  const int64_t rows_per_block = kThreads >> lanes_log2;
  const int64_t needed = (rows + rows_per_block - 1) / rows_per_block;
  const int64_t resident = static_cast<int64_t>(sm_count) * std::max(blocks_per_sm, 1);
  *blocks = static_cast<int>(std::min(needed, resident));
  return cudaSuccess;
}

template <typename T, bool kPrior, bool kNoise, bool kVec>
cudaError_t launch_forward(const ForwardParams<T>& params, cudaStream_t stream) {
  const auto kernel = reparameterize_kl_forward_kernel<T, kPrior, kNoise, kVec>;
  int blocks = 0;
  const cudaError_t err = grid_size(kernel, params.rows, params.lanes_log2, &blocks);
  if (err != cudaSuccess) return err;
  kernel<<<blocks, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

template <typename T, bool kPrior, bool kNoise, bool kVec>
cudaError_t launch_backward(const BackwardParams<T>& params, cudaStream_t stream) {
  const auto kernel = reparameterize_kl_backward_kernel<T, kPrior, kNoise, kVec>;
  int blocks = 0;
  const cudaError_t err = grid_size(kernel, params.rows, params.lanes_log2, &blocks);
  if (err != cudaSuccess) return err;
  kernel<<<blocks, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

// Whole groups can move as Pack4 when the row length is a multiple of 4 and every (rows, cols)
// tensor starts Pack4-aligned: then every group is. Absent (nullptr) tensors pass trivially.
template <typename T, typename... Ptrs>
bool groups_vectorizable(int64_t cols, Ptrs... ptrs) {
  return cols % 4 == 0 &&
         ((reinterpret_cast<std::uintptr_t>(ptrs) % sizeof(Pack4<T>) == 0) && ...);
}

// Calls f with std::true_type or std::false_type, turning a runtime flag into a template one.
template <typename F>
cudaError_t dispatch_flag(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

template <typename T>
cudaError_t forward_typed(const ReparameterizeKLForward& args, cudaStream_t stream) {
  const ForwardParams<T> params{static_cast<const T*>(args.mu),
                                static_cast<const T*>(args.logvar),
                                static_cast<const T*>(args.eps),
                                args.seed,
                                static_cast<const T*>(args.prior_mu),
                                static_cast<const T*>(args.prior_logvar),
                                static_cast<T*>(args.z),
                                static_cast<acc_t<T>*>(args.kl),
                                args.rows,
                                args.cols,
                                lanes_log2_for(args.cols)};
  const bool vec = groups_vectorizable<T>(args.cols, args.mu, args.logvar, args.eps,
                                          args.prior_mu, args.prior_logvar, args.z);
  return dispatch_flag(args.prior_mu != nullptr, [&](auto prior) {
    return dispatch_flag(args.eps == nullptr, [&](auto noise) {
      return dispatch_flag(vec, [&](auto vectorized) {
        return launch_forward<T, decltype(prior)::value, decltype(noise)::value,
                              decltype(vectorized)::value>(params, stream);
      });
    });
  });
}

template <typename T>
cudaError_t backward_typed(const ReparameterizeKLBackward& args, cudaStream_t stream) {
  const BackwardParams<T> params{static_cast<const T*>(args.grad_z),
                                 static_cast<const acc_t<T>*>(args.grad_kl),
                                 static_cast<const T*>(args.mu),
                                 static_cast<const T*>(args.logvar),
                                 static_cast<const T*>(args.eps),
                                 args.seed,
                                 static_cast<const T*>(args.prior_mu),
                                 static_cast<const T*>(args.prior_logvar),
                                 static_cast<T*>(args.grad_mu),
                                 static_cast<T*>(args.grad_logvar),
                                 static_cast<T*>(args.grad_prior_mu),
                                 static_cast<T*>(args.grad_prior_logvar),
                                 args.rows,
                                 args.cols,
                                 lanes_log2_for(args.cols)};
  const bool vec = groups_vectorizable<T>(
      args.cols, args.grad_z, args.mu, args.logvar, args.eps, args.prior_mu, args.prior_logvar,
      args.grad_mu, args.grad_logvar, args.grad_prior_mu, args.grad_prior_logvar);
  return dispatch_flag(args.prior_mu != nullptr, [&](auto prior) {
    return dispatch_flag(args.eps == nullptr, [&](auto noise) {
      return dispatch_flag(vec, [&](auto vectorized) {
        return launch_backward<T, decltype(prior)::value, decltype(noise)::value,
                               decltype(vectorized)::value>(params, stream);
      });
    });
  });
}

}  // namespace

cudaError_t reparameterize_kl_forward(const ReparameterizeKLForward& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  if (args.cols == 0) {
    // The KL of an empty row is 0 (all-zero bits in float32 and float64 alike).
    const size_t kl_bytes = args.kind == ScalarKind::kFloat64 ? sizeof(double) : sizeof(float);
    return cudaMemsetAsync(args.kl, 0, static_cast<size_t>(args.rows) * kl_bytes, stream);
  }
  return dispatch_scalar_kind(args.kind, [&](auto* tag) {
    return forward_typed<std::remove_pointer_t<decltype(tag)>>(args, stream);
  });
}

cudaError_t reparameterize_kl_backward(const ReparameterizeKLBackward& args,
                                       cudaStream_t stream) {
  if (args.rows == 0 || args.cols == 0) return cudaSuccess;
  return dispatch_scalar_kind(args.kind, [&](auto* tag) {
    return backward_typed<std::remove_pointer_t<decltype(tag)>>(args, stream);
  });
}

}  // namespace cuda
}  // namespace pyvae
