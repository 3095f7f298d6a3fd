// Shared by the CPU and CUDA implementations of pyvae::kl_decomposition_{forward,backward}.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace pyvae {

// z, mu, logvar: 2-D (B, D) contiguous tensors of one kernel dtype and device, B >= 2, D >= 1.
void check_kl_decomposition_args(const at::Tensor& z, const at::Tensor& mu,
                                 const at::Tensor& logvar);

// The forward's checks plus those of the saved outputs (log_qz (B,), lse_marginal (B, D)) and
// the optional incoming gradients of the same shapes, all contiguous in kl_dtype of z.
void check_kl_decomposition_backward_args(const std::optional<at::Tensor>& grad_log_qz,
                                          const std::optional<at::Tensor>& grad_lse_marginal,
                                          const at::Tensor& z, const at::Tensor& mu,
                                          const at::Tensor& logvar, const at::Tensor& log_qz,
                                          const at::Tensor& lse_marginal);

}  // namespace pyvae
