// Shared by the CPU and CUDA implementations of pyvae::masked_conv2d_{forward,backward}. The
// convolution and its mask are defined in ops/cuda/masked_conv2d.h.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace pyvae {

// Checks what every backend relies on: x (N, C_in, H, W) and weight (C_out, C_in, k, k) with k
// odd, bias (C_out,) when given, all contiguous of one floating dtype and device; mask_type 0 (A)
// or 1 (B); color_channels >= 1 dividing C_in and C_out; dilation >= 1.
void check_masked_conv2d_args(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t mask_type,
                              int64_t color_channels, int64_t dilation);

// The forward's checks (without bias) plus grad_y: (N, C_out, H, W), contiguous, like x.
void check_masked_conv2d_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& weight, int64_t mask_type,
                                       int64_t color_channels, int64_t dilation);

// float64 for float64 inputs, float32 otherwise: the dtype reductions are accumulated in.
inline at::ScalarType masked_conv2d_acc_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace pyvae
