"""What every kernel op shares: one definition registers its forward and backward twice.

Each op has a pair of C++ ops ``pyvae::<op>_forward`` / ``pyvae::<op>_backward`` (schema in
``csrc/ops/<op>.cpp``, kernels for the cpu and cuda backends in ``pyvae._C``) and a pair of Triton
custom ops ``pyvae::<op>_forward_triton`` / ``..._backward_triton`` with the same schemas, around the
launchers ``<op>_forward`` / ``<op>_backward`` of ``pyvae.kernels.<op>``. :func:`define_kernel_op`
registers, for both pairs, the fake (meta) kernels and the autograd formula, so that the four ops
behave the same under autograd, ``torch.compile`` and ``torch.library.opcheck``. The op module
keeps only its maths: the reference, the argument checks and those few functions.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from pyvae.ops import _backend


@dataclass(frozen=True)
class KernelOp:
    """The forward ops of one kernel op, by backend (their backward ops are reached by autograd)."""

    name: str
    triton_forward: Callable
    triton_backward: Callable

    def forward(self, backend: str) -> Callable:
        """The forward op that ``backend`` runs: the Triton op, or the C++ op (cpu and cuda: the
        dispatcher picks the kernel by the tensors' device)."""
        if backend == "triton":
            return self.triton_forward
        return getattr(torch.ops.pyvae, f"{self.name}_forward").default


def _without_none(outputs, like: torch.Tensor) -> tuple:
    # A custom op may not return None, nor the same tensor twice: an empty tensor stands for "no
    # gradient", as the C++ ops return one.
    return tuple(like.new_empty((0,)) if out is None else out for out in outputs)


def define_kernel_op(name: str, *, forward_schema: str, backward_schema: str,
                     triton_launchers: Callable[[], ModuleType],
                     check_forward: Callable, check_backward: Callable,
                     fake_forward: Callable, fake_backward: Callable,
                     setup_context: Callable, backward: Callable) -> KernelOp:
    """Register the fake kernels and autograd of ``pyvae::NAME_forward``/``_backward`` (C++, when
    ``pyvae._C`` is built) and define their Triton twins.

    Args:
        name: the op, e.g. ``"masked_conv2d"``.
        forward_schema, backward_schema: the C++ schemas without the name, e.g.
            ``"(Tensor x, int k) -> Tensor"`` (the tests check they equal the C++ ones).
        triton_launchers: returns the module ``pyvae.kernels.NAME`` (called on first use:
            importing triton is slow).
        check_forward, check_backward: raise RuntimeError naming a bad argument of the forward /
            backward op before a Triton kernel reads any pointer (the C++ ops check the same).
        fake_forward, fake_backward: the outputs' shapes and dtypes from the inputs' (the
            ops' signatures).
        setup_context: ``(ctx, inputs, output)``, saves what the backward needs.
        backward: ``(ctx, backward_op, *output_grads) -> input grads``; ``backward_op`` is the
            backward op of the same backend (C++ or Triton).
    """
    _backend.KERNEL_OPS.append(name)

    def register_autograd(forward_op, backward_op) -> None:
        def autograd_backward(ctx, *grads):
            return backward(ctx, backward_op, *grads)

        torch.library.register_autograd(forward_op, autograd_backward,
                                        setup_context=setup_context)

    if _backend.EXTENSION_ERROR is None:
        torch.library.register_fake(f"pyvae::{name}_forward")(fake_forward)
        torch.library.register_fake(f"pyvae::{name}_backward")(fake_backward)
        register_autograd(f"pyvae::{name}_forward",
                          getattr(torch.ops.pyvae, f"{name}_backward").default)

    def triton_forward_impl(*args):
        check_forward(*args)
        return getattr(triton_launchers(), f"{name}_forward")(*args)

    def triton_backward_impl(*args):
        check_backward(*args)
        grads = getattr(triton_launchers(), f"{name}_backward")(*args)
        return _without_none(grads, next(a for a in args if isinstance(a, torch.Tensor)))

    triton_forward = torch.library.custom_op(f"pyvae::{name}_forward_triton", triton_forward_impl,
                                             mutates_args=(), schema=forward_schema)
    triton_backward = torch.library.custom_op(f"pyvae::{name}_backward_triton",
                                              triton_backward_impl, mutates_args=(),
                                              schema=backward_schema)
    triton_forward.register_fake(fake_forward)
    triton_backward.register_fake(fake_backward)
    register_autograd(f"pyvae::{name}_forward_triton", triton_backward)
    return KernelOp(name, triton_forward, triton_backward)
