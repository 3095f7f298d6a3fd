// Shared by the CPU and CUDA implementations of pyvae::masked_conv2d_{forward,backward}: the op
// and its mask, and the argument checks.
//
// y[n, o, h, w] = bias[o] + sum over allowed taps (r, s) and input channels i of
//                 weight[o, i, r, s] * x[n, i, h + (r - c) * dilation, w + (s - c) * dilation]
// with c = k / 2, zero padding outside the image (output H x W, stride 1). A tap (r, s) is
// allowed when r < c, or r == c and s < c; the centre tap (c, c) is allowed for the channel pair
// (o, i) when group(i) < group(o) (mask type A) or group(i) <= group(o) (type B), where
// group(o) = o / (C_out / G) and group(i) = i / (C_in / G) for G = color_channels. The kernels
// visit only allowed taps; masked weights are never read and their gradients are exactly 0.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "ops/common.h"

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

}  // namespace pyvae
