// Launchers of the masked (PixelCNN) convolution CUDA kernels; the op and its mask are defined in
// ops/masked_conv2d.h. Plain CUDA, no torch headers.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "ops/cuda/common.h"

namespace pyvae {
namespace cuda {

struct MaskedConv2dShape {
  int64_t batch;         // N
  int64_t in_channels;   // C_in
  int64_t out_channels;  // C_out
  int64_t height;        // H
  int64_t width;         // W
  int kernel_size;       // k, odd
  int dilation;
  int mask_type;         // 0: A, 1: B
  int color_channels;    // G, divides C_in and C_out
  ScalarKind kind;
};

// x: (N, C_in, H, W), weight: (C_out, C_in, k, k), bias: (C_out,) or nullptr, y: (N, C_out, H, W);
// all contiguous, in the input dtype.
struct MaskedConv2dForward {
  const void* x;
  const void* weight;
  const void* bias;
  void* y;
  MaskedConv2dShape shape;
};

// Any of grad_x / grad_weight / grad_bias may be nullptr (not needed). grad_x is in the input
// dtype. grad_weight (C_out, C_in, k, k) and grad_bias (C_out,) are float32 accumulation buffers
// (float64 for float64 inputs) that the caller zero-fills; the kernels may add into them with
// atomics; the caller casts them to the weight's dtype.
struct MaskedConv2dBackward {
  const void* grad_y;
  const void* x;
  const void* weight;
  void* grad_x;
  void* grad_weight;
  void* grad_bias;
  MaskedConv2dShape shape;
};

cudaError_t masked_conv2d_forward(const MaskedConv2dForward& args, cudaStream_t stream);
cudaError_t masked_conv2d_backward(const MaskedConv2dBackward& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyvae
