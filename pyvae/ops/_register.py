"""What every kernel op shares: one definition registers its forward and backward twice.

Each op has a pair of C++ ops ``pyvae::<op>_forward`` / ``pyvae::<op>_backward`` (schema in
``csrc/ops/<op>.cpp``, kernels for the cpu and cuda backends in ``pyvae._C``) and a pair of Triton
custom ops ``pyvae::<op>_forward_triton`` / ``..._backward_triton`` with the same schemas, around the
launchers ``<op>_forward`` / ``<op>_backward`` of ``pyvae.kernels.<op>``. :func:`define_kernel_op`
registers, for both pairs, the fake (meta) kernels and the autograd formula, so that the four ops
behave the same under autograd, ``torch.compile`` and ``torch.library.opcheck``. The op module
keeps only its maths: the reference, the argument checks and those few functions.

``torch.func`` (the model-batched training of ``pyvae.train.fit_grid``): each op may give vmap
rules for its forward and backward ops, registered with ``torch.library.register_vmap`` for both
pairs, so that ``vmap`` of an op is one launch over the models instead of one per model. The
autograd that ``torch.library.register_autograd`` registers does not run under ``torch.func.grad``
or ``vjp`` (torch 2.13 refuses its generated autograd.Function there), so the public ops call the
kernels through :meth:`KernelOp.apply`: an ``autograd.Function`` with the same ``setup_context``
and backward, and ``generate_vmap_rule`` (its forward and backward reach the vmap rules).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch

from pyvae.ops import _backend


@dataclass(frozen=True)
class KernelOp:
    """The forward ops of one kernel op, by backend (their backward ops are reached by autograd)."""

    name: str
    triton_forward: Callable
    triton_backward: Callable
    # "triton" and "native" (the C++ ops): the autograd.Function around that forward op.
    functions: dict = field(default_factory=dict)

    def forward(self, backend: str) -> Callable:
        """The forward op that ``backend`` runs: the Triton op, or the C++ op (cpu and cuda: the
        dispatcher picks the kernel by the tensors' device)."""
        if backend == "triton":
            return self.triton_forward
        return getattr(torch.ops.pyvae, f"{self.name}_forward").default

    def apply(self, backend: str, *args):
        """``forward(backend)(*args)``, differentiable under autograd and ``torch.func``
        (grad, vjp, vmap) alike: through the autograd.Function when a gradient may be taken,
        else the op itself (under vmap alone its vmap rule runs; and torch.compile cannot trace
        the Function when no input requires grad)."""
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                           for a in args):
            return self.functions["triton" if backend == "triton" else "native"].apply(*args)
        return self.forward(backend)(*args)


def batched_args(info, in_dims, args) -> list:
    """The arguments of a vmap rule with every tensor's vmapped dim moved to the front; tensors
    that are not vmapped are expanded (a view, no copy) to ``info.batch_size`` on dim 0, so that
    every tensor has the models first. Other arguments (None, floats, ints) pass unchanged."""
    out = []
    for arg, dim in zip(args, in_dims):
        if not isinstance(arg, torch.Tensor):
            out.append(arg)
        elif dim is None:
            out.append(arg.expand(info.batch_size, *arg.shape))
        else:
            out.append(arg.movedim(dim, 0))
    return out


def per_model_rule(op, info, in_dims, *args):
    """A vmap rule that calls ``op`` once per model and stacks its outputs on dim 0: for the
    cases a single launch cannot express (e.g. a different convolution weight per model)."""
    outputs = []
    for k in range(info.batch_size):
        model_args = [arg if not isinstance(arg, torch.Tensor) or dim is None
                      else arg.select(dim, k) for arg, dim in zip(args, in_dims)]
        outputs.append(op(*[a.contiguous() if isinstance(a, torch.Tensor) else a
                            for a in model_args]))
    if isinstance(outputs[0], torch.Tensor):
        return torch.stack(outputs), 0
    stacked = tuple(torch.stack(parts) for parts in zip(*outputs))
    return stacked, (0,) * len(stacked)


def _autograd_function(label: str, forward_op, backward_op, setup_context, backward):
    """An autograd.Function calling ``forward_op`` with the op's setup_context and backward (the
    backward's ``backward_op`` is ``backward_op``), usable under torch.func transforms."""

    def function_forward(*args):
        return forward_op(*args)

    # The backward ops have no derivative of their own (once_differentiable, which torch.func
    # needs here). A plain autograd double backward (create_graph=True outside torch.func) would
    # silently miss the second-order terms through the kernel when only the inputs require grad,
    # so it is refused; torch.func.grad runs its backward with grad mode on at a functorch level.
    @torch.autograd.function.once_differentiable
    def first_order_backward(ctx, *grads):
        return backward(ctx, backward_op, *grads)

    def function_backward(ctx, *grads):
        if torch.is_grad_enabled() and torch._C._functorch.maybe_current_level() is None:
            raise RuntimeError(
                f"pyvae.ops.{label.rsplit('_', 1)[0]}: second derivatives (backward with "
                f"create_graph=True) through pyvae's "
                f"kernels are not supported; run the op on the reference backend "
                f"(pyvae.ops.use_backend('reference')) for higher-order gradients")
        return first_order_backward(ctx, *grads)

    return type(label, (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": staticmethod(function_forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(function_backward),
    })


def _without_none(outputs, like: torch.Tensor) -> tuple:
    # A custom op may not return None, nor the same tensor twice: an empty tensor stands for "no
    # gradient", as the C++ ops return one.
    return tuple(like.new_empty((0,)) if out is None else out for out in outputs)


def define_kernel_op(name: str, *, forward_schema: str, backward_schema: str,
                     triton_launchers: Callable[[], ModuleType],
                     check_forward: Callable, check_backward: Callable,
                     fake_forward: Callable, fake_backward: Callable,
                     setup_context: Callable, backward: Callable,
                     vmap_forward: Callable | None = None,
                     vmap_backward: Callable | None = None) -> KernelOp:
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
        vmap_forward, vmap_backward: vmap rules ``(op, info, in_dims, *args) -> (outputs,
            out_dims)`` of the forward / backward op (as in ``torch.library.register_vmap``, with
            the op of the backend to call first); None: ``torch.func.vmap`` loops over the models
            (PyTorch's fallback, with a warning).
    """
    _backend.KERNEL_OPS.append(name)

    def register_autograd(forward_op, backward_op) -> None:
        def autograd_backward(ctx, *grads):
            return backward(ctx, backward_op, *grads)

        torch.library.register_autograd(forward_op, autograd_backward,
                                        setup_context=setup_context)

    def register_vmap(op_name: str, op, rule) -> None:
        if rule is not None:
            torch.library.register_vmap(op_name, functools.partial(rule, op))

    functions = {}
    if _backend.EXTENSION_ERROR is None:
        native_forward = getattr(torch.ops.pyvae, f"{name}_forward").default
        native_backward = getattr(torch.ops.pyvae, f"{name}_backward").default
        torch.library.register_fake(f"pyvae::{name}_forward")(fake_forward)
        torch.library.register_fake(f"pyvae::{name}_backward")(fake_backward)
        register_autograd(f"pyvae::{name}_forward", native_backward)
        register_vmap(f"pyvae::{name}_forward", native_forward, vmap_forward)
        register_vmap(f"pyvae::{name}_backward", native_backward, vmap_backward)
        functions["native"] = _autograd_function(f"{name}_native", native_forward,
                                                 native_backward, setup_context, backward)

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
    # The OpOverloads, not the CustomOpDefs: torch.compile traces those inside the Function.
    triton_forward_op = getattr(torch.ops.pyvae, f"{name}_forward_triton").default
    triton_backward_op = getattr(torch.ops.pyvae, f"{name}_backward_triton").default
    register_vmap(f"pyvae::{name}_forward_triton", triton_forward_op, vmap_forward)
    register_vmap(f"pyvae::{name}_backward_triton", triton_backward_op, vmap_backward)
    functions["triton"] = _autograd_function(f"{name}_triton", triton_forward_op,
                                             triton_backward_op, setup_context, backward)
    return KernelOp(name, triton_forward, triton_backward, functions)
