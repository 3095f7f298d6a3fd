// Element-type plumbing shared by the CUDA kernels: the maths runs in float32 for
// float32/float16/bfloat16 inputs and in float64 for float64 inputs.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "ops/cuda/common.h"

namespace pyvae {
namespace cuda {

// Calls fn with a null pointer of the C++ element type of `kind` (the type is the argument):
//   dispatch_scalar_kind(kind, [&](auto* tag) { return launch<std::remove_pointer_t<decltype(tag)>>(); })
template <typename Fn>
cudaError_t dispatch_scalar_kind(ScalarKind kind, Fn&& fn) {
  switch (kind) {
    case ScalarKind::kFloat32: return fn(static_cast<float*>(nullptr));
    case ScalarKind::kFloat64: return fn(static_cast<double*>(nullptr));
    case ScalarKind::kFloat16: return fn(static_cast<__half*>(nullptr));
    case ScalarKind::kBFloat16: return fn(static_cast<__nv_bfloat16*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

template <typename T>
using acc_t = std::conditional_t<std::is_same<T, double>::value, double, float>;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x) {
  if constexpr (std::is_same<T, __half>::value) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

}  // namespace cuda
}  // namespace pyvae
