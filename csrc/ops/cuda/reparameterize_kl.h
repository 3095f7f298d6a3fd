// Launchers of the fused reparameterize+KL CUDA kernels. Plain CUDA, no torch headers: the .cu
// file compiles with nvcc alone (`make cuda-check`); csrc/ops/reparameterize_kl.cpp adapts
// tensors to these structs.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "ops/cuda/common.h"

namespace pyvae {
namespace cuda {

// All tensors are contiguous row-major (rows, cols) views, except kl / grad_kl: (rows,).
// kl and grad_kl are float64 when the inputs are float64 and float32 otherwise.
struct ReparameterizeKLForward {
  const void* mu;
  const void* logvar;
  const void* eps;            // nullptr: generate the noise from *seed (device pointer)
  const int64_t* seed;        // device pointer to one int64; used when eps == nullptr
  const void* prior_mu;       // nullptr: standard-normal prior (then prior_logvar is nullptr too)
  const void* prior_logvar;
  void* z;                    // (rows, cols), input dtype
  void* kl;                   // (rows,), float32 (float64 for float64 inputs)
  int64_t rows;
  int64_t cols;
  ScalarKind kind;
};

struct ReparameterizeKLBackward {
  const void* grad_z;         // nullptr: no gradient reaches z
  const void* grad_kl;        // nullptr: no gradient reaches kl; else (rows,), kl's dtype
  const void* mu;
  const void* logvar;
  const void* eps;            // as in the forward
  const int64_t* seed;
  const void* prior_mu;
  const void* prior_logvar;
  void* grad_mu;              // (rows, cols), input dtype
  void* grad_logvar;
  void* grad_prior_mu;        // written only when prior_mu != nullptr
  void* grad_prior_logvar;
  int64_t rows;
  int64_t cols;
  ScalarKind kind;
};

cudaError_t reparameterize_kl_forward(const ReparameterizeKLForward& args, cudaStream_t stream);
cudaError_t reparameterize_kl_backward(const ReparameterizeKLBackward& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyvae
