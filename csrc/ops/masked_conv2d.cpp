// Schema of the masked (PixelCNN) convolution op, its argument checks, and (in CUDA builds) the
// adapter from tensors to the plain-CUDA launchers in ops/cuda/masked_conv2d.cu. The CPU kernels
// register themselves in ops/cpu/masked_conv2d.cpp; autograd, fake kernels and the user-facing
// wrapper are in pyvae/ops/masked_conv2d.py. The maths is in ops/masked_conv2d.h.
#include "ops/masked_conv2d.h"

#include <torch/library.h>

#include <array>
#include <limits>

#include "ops/common.h"

#ifdef PYVAE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops/cuda/masked_conv2d.h"
#include "ops/cuda_adapter.h"
#endif

namespace pyvae {

void check_masked_conv2d_args(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, int64_t mask_type,
                              int64_t color_channels, int64_t dilation) {
  constexpr const char* op = "masked_conv2d";
  TORCH_CHECK(x.defined() && x.dim() == 4, op, ": x must be 4-D (N, C_in, H, W), got ",
              x.defined() ? x.sizes() : at::IntArrayRef());
  check_kernel_dtype(op, "x", x);
  TORCH_CHECK(weight.defined() && weight.dim() == 4, op,
              ": weight must be 4-D (C_out, C_in, k, k), got ",
              weight.defined() ? weight.sizes() : at::IntArrayRef());
  const int64_t k = weight.size(2);
  TORCH_CHECK(weight.size(3) == k && k % 2 == 1, op,
              ": weight must have a square kernel of odd size, got ", weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": x has ", x.size(1),
              " channels but weight expects ", weight.size(1));
  TORCH_CHECK(weight.size(0) >= 1 && weight.size(1) >= 1, op,
              ": need at least one input and one output channel, got weight ", weight.sizes());
  check_like(op, "x", x, x, "like x");
  check_tensor(op, "weight", weight, weight.sizes(), x.scalar_type(), x.device(),
               "dtype and device of x");
  if (bias.has_value()) {
    check_tensor(op, "bias", *bias, {weight.size(0)}, x.scalar_type(), x.device(),
                 "C_out of weight, dtype and device of x");
  }
  TORCH_CHECK(mask_type == 0 || mask_type == 1, op,
              ": mask_type must be 0 (A) or 1 (B), got ", mask_type);
  TORCH_CHECK(color_channels >= 1 && x.size(1) % color_channels == 0 &&
                  weight.size(0) % color_channels == 0,
              op, ": color_channels (", color_channels, ") must be >= 1 and divide C_in (",
              x.size(1), ") and C_out (", weight.size(0), ")");
  // The CUDA launchers take the geometry as int; dilation * k also bounds the padding.
  TORCH_CHECK(dilation >= 1 && dilation <= std::numeric_limits<int>::max() / k, op,
              ": dilation must be >= 1 and dilation * k (k = ", k, ") at most ",
              std::numeric_limits<int>::max(), ", got ", dilation);
}

void check_masked_conv2d_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& weight, int64_t mask_type,
                                       int64_t color_channels, int64_t dilation) {
  check_masked_conv2d_args(x, weight, std::nullopt, mask_type, color_channels, dilation);
  // The gradient of y: (N, C_out, H, W) in x's dtype.
  check_tensor("masked_conv2d", "grad_y", grad_y,
               {x.size(0), weight.size(0), x.size(2), x.size(3)}, x.scalar_type(), x.device(),
               "like y = (N, C_out, H, W)");
}

TORCH_LIBRARY_FRAGMENT(pyvae, m) {
  m.def(
      "masked_conv2d_forward(Tensor x, Tensor weight, Tensor? bias, int mask_type, "
      "int color_channels, int dilation) -> Tensor");
  m.def(
      "masked_conv2d_backward(Tensor grad_y, Tensor x, Tensor weight, int mask_type, "
      "int color_channels, int dilation, bool[3] output_mask) -> "
      "(Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
}

#ifdef PYVAE_WITH_CUDA
namespace {

cuda::MaskedConv2dShape cuda_shape(const at::Tensor& x, const at::Tensor& weight,
                                   int64_t mask_type, int64_t color_channels, int64_t dilation) {
  return cuda::MaskedConv2dShape{x.size(0),
                                 x.size(1),
                                 weight.size(0),
                                 x.size(2),
                                 x.size(3),
                                 static_cast<int>(weight.size(2)),
                                 static_cast<int>(dilation),
                                 static_cast<int>(mask_type),
                                 static_cast<int>(color_channels),
                                 cuda_scalar_kind(x.scalar_type())};
}

at::Tensor masked_conv2d_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, int64_t mask_type,
                                      int64_t color_channels, int64_t dilation) {
  check_masked_conv2d_args(x, weight, bias, mask_type, color_channels, dilation);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), weight.size(0), x.size(2), x.size(3)}, x.options());
  if (y.numel() == 0) return y;  // an empty batch or image: no grid to launch
  cuda::MaskedConv2dForward args{x.data_ptr(), weight.data_ptr(), data_or_null(bias),
                                 y.data_ptr(),
                                 cuda_shape(x, weight, mask_type, color_channels, dilation)};
  const cudaError_t status = cuda::masked_conv2d_forward(args, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "masked_conv2d_forward (cuda): ",
              cudaGetErrorString(status));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, int64_t mask_type,
    int64_t color_channels, int64_t dilation, std::array<bool, 3> output_mask) {
  check_masked_conv2d_backward_args(grad_y, x, weight, mask_type, color_channels, dilation);
  const c10::cuda::CUDAGuard guard(x.device());
  // grad_x is written in full by the kernels; the weight and bias gradients are reductions over
  // the batch that the kernels may add into with atomics, hence zeroed buffers in float32
  // (float64) that are rounded to the weight's dtype once at the end.
  const at::TensorOptions acc = x.options().dtype(accumulation_dtype(x.scalar_type()));
  at::Tensor grad_x = output_mask[0] ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor grad_weight = output_mask[1] ? at::zeros(weight.sizes(), acc) : at::Tensor();
  at::Tensor grad_bias = output_mask[2] ? at::zeros({weight.size(0)}, acc) : at::Tensor();
  // An empty batch or image has nothing to launch: grad_x is empty, the reductions stay 0.
  if (x.numel() != 0 && (output_mask[0] || output_mask[1] || output_mask[2])) {
    cuda::MaskedConv2dBackward args{grad_y.data_ptr(),
                                    x.data_ptr(),
                                    weight.data_ptr(),
                                    output_mask[0] ? grad_x.data_ptr() : nullptr,
                                    output_mask[1] ? grad_weight.data_ptr() : nullptr,
                                    output_mask[2] ? grad_bias.data_ptr() : nullptr,
                                    cuda_shape(x, weight, mask_type, color_channels, dilation)};
    const cudaError_t status =
        cuda::masked_conv2d_backward(args, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(status == cudaSuccess, "masked_conv2d_backward (cuda): ",
                cudaGetErrorString(status));
  }
  return {grad_x,
          output_mask[1] ? grad_weight.to(weight.scalar_type()) : at::empty({0}, x.options()),
          output_mask[2] ? grad_bias.to(weight.scalar_type()) : at::empty({0}, x.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvae, CUDA, m) {
  m.impl("masked_conv2d_forward", &masked_conv2d_forward_cuda);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward_cuda);
}
#endif  // PYVAE_WITH_CUDA

}  // namespace pyvae
