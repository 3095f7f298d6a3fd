// What every op's C++ code shares (pyvae/ops/_checks.py mirrors it for the Triton ops):
// - the accumulation dtype rule;
// - the tensor checks of the schema-level argument checks (ops/<op>.cpp), which the CPU kernels
//   and the CUDA adapter both call before touching a data pointer. The messages name the op and
//   the argument: "<op>: <name> has shape [1, 64] but expected [4000000, 64] (like z)".
#pragma once
#include <ATen/ATen.h>

#include <type_traits>

namespace pyvae {

// Every op accumulates (and returns its reductions) in float64 for float64 inputs, float32 for
// float32 and the half types.
inline at::ScalarType accumulation_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}
template <typename scalar_t>
using accumulation_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The dtypes every kernel is instantiated for.
inline void check_kernel_dtype(const char* op, const char* name, const at::Tensor& t) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kHalf ||
                  type == at::kBFloat16,
              op, ": ", name, " must be float16, bfloat16, float32 or float64, got ", type);
}

// t must be defined, of exactly `shape`, `dtype` and `device`, and contiguous: then a kernel may
// read shape.numel() elements of that dtype from t's data pointer. `why` says where the
// expectation comes from (e.g. "like mu"); the messages end with it in parentheses.
inline void check_tensor(const char* op, const char* name, const at::Tensor& t,
                         at::IntArrayRef shape, at::ScalarType dtype, const at::Device& device,
                         const char* why) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is missing (an undefined tensor)");
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " has shape ", t.sizes(), " but expected ",
              shape, " (", why, ")");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(),
              " but expected ", dtype, " (", why, ")");
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but expected ",
              device, " (", why, ")");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ",
              t.strides(), " for shape ", t.sizes());
}

// check_tensor with ref's shape, dtype and device; `why` is e.g. "like mu".
inline void check_like(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& ref, const char* why) {
  check_tensor(op, name, t, ref.sizes(), ref.scalar_type(), ref.device(), why);
}

}  // namespace pyvae
