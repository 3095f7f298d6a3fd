"""Masked (PixelCNN) 2-D convolutions (van den Oord et al. 2016).

A k×k convolution (k odd, stride 1, zero "same" padding, optional dilation) whose kernel only
sees pixels before the output pixel in raster order: with centre c = k // 2, the tap (r, s) is
allowed when r < c, or r == c and s < c. With ``color_channels = G`` the input and output
channels are split into G contiguous groups; at the centre tap output group g reads input
groups < g (mask type "A") or <= g (type "B"). Type A with G = 1 never reads the centre pixel.

The kernel backends visit only the allowed taps (about half of the k² for type A), so they do
about half the arithmetic of ``conv2d(x, weight * mask)``; masked weights are never read and
their gradients are exactly 0.

Under ``torch.func.vmap`` over K models: when only ``x`` is vmapped the models fold into the
image batch (one launch on K·N images); when the weight or bias is vmapped (each model its own
kernel) the vmap rule calls the op once per model, and the backward does so whenever a weight or
bias gradient is wanted (each model's own). The numbers are those of the per-model calls.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from pyvae._validate import check_int
from pyvae.ops import _backend, _checks, _register

OP = "masked_conv2d"
MASK_TYPES = ("A", "B")


def _mask_type_index(mask_type) -> int:
    if mask_type not in MASK_TYPES:
        raise ValueError(f"{OP}: mask_type must be 'A' or 'B', got {mask_type!r}")
    return MASK_TYPES.index(mask_type)


# The kernels take the geometry as 32-bit ints: dilation * k (which bounds the padding) must fit.
INT32_MAX = 2**31 - 1


def _check_dilation(dilation, kernel_size: int) -> int:
    dilation = check_int(OP, "dilation", dilation, 1)
    if dilation * kernel_size > INT32_MAX:
        raise ValueError(f"{OP}: dilation must be at most {INT32_MAX // kernel_size} for "
                         f"k = {kernel_size} (dilation * k must fit a 32-bit int), got {dilation}")
    return dilation


def _check_mask_args(out_channels, in_channels, kernel_size, mask_type, color_channels) -> None:
    check_int(OP, "out_channels", out_channels, 1)
    check_int(OP, "in_channels", in_channels, 1)
    check_int(OP, "kernel_size", kernel_size, 1)
    if kernel_size % 2 != 1:
        raise ValueError(f"{OP}: kernel_size must be odd, got {kernel_size}")
    _mask_type_index(mask_type)
    check_int(OP, "color_channels", color_channels, 1)
    if in_channels % color_channels or out_channels % color_channels:
        raise ValueError(f"{OP}: color_channels ({color_channels}) must divide both in_channels "
                         f"({in_channels}) and out_channels ({out_channels})")


def masked_conv2d_mask(out_channels: int, in_channels: int, kernel_size: int,
                       mask_type: str = "A", color_channels: int = 1, *,
                       dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """The 0/1 mask of a PixelCNN kernel, shape (out_channels, in_channels, k, k).

    1 at the taps above the centre row, left of the centre in the centre row, and at the centre
    for the channel pairs (o, i) with group(i) < group(o) (type "A") or <= (type "B"), where
    group(o) = o // (out_channels / G) and group(i) = i // (in_channels / G).
    """
    _check_mask_args(out_channels, in_channels, kernel_size, mask_type, color_channels)
    c = kernel_size // 2
    mask = torch.zeros(out_channels, in_channels, kernel_size, kernel_size, dtype=dtype,
                       device=device)
    mask[:, :, :c, :] = 1
    mask[:, :, c, :c] = 1
    group_out = torch.arange(out_channels, device=device) // (out_channels // color_channels)
    group_in = torch.arange(in_channels, device=device) // (in_channels // color_channels)
    if mask_type == "A":
        centre = group_in[None, :] < group_out[:, None]
    else:
        centre = group_in[None, :] <= group_out[:, None]
    mask[:, :, c, c] = centre.to(dtype)
    return mask


def masked_conv2d_reference(x: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None = None, *, mask_type: str = "A",
                            color_channels: int = 1, dilation: int = 1) -> torch.Tensor:
    """Eager PyTorch version of the op, ``conv2d(x, where(mask, weight, 0))``: the ground truth
    of the tests and the eager baseline of the benchmarks. Same conventions as
    :func:`masked_conv2d` (masked weights are never used, so NaN or inf there changes nothing),
    except that NaN or inf in ``x`` also spreads through the masked taps (0 · NaN = NaN), which
    the kernels never read."""
    out_channels, in_channels, k, _ = weight.shape
    mask = masked_conv2d_mask(out_channels, in_channels, k, mask_type, color_channels,
                              dtype=torch.bool, device=weight.device)
    kernel = torch.where(mask, weight, weight.new_zeros(()))
    n, _, height, width = x.shape
    if height == 0 or width == 0:
        # conv2d refuses an image with no pixels; the output has none either, like the kernels'.
        # The sums keep it differentiable, with zero gradients (NaN-free: a sum of nothing).
        anchor = x.sum() * 0 + kernel.sum() * 0 + (0 if bias is None else bias.sum() * 0)
        return x.new_zeros((n, out_channels, height, width)) + anchor
    return F.conv2d(x, kernel, bias, padding=dilation * (k // 2), dilation=dilation)


# ---- the kernel ops (pyvae::masked_conv2d_forward / _backward and their Triton twins) ---------

def _fake_forward(x, weight, bias, mask_type, color_channels, dilation):
    return x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]))


def _fake_backward(grad_y, x, weight, mask_type, color_channels, dilation, output_mask):
    return (torch.empty_like(x) if output_mask[0] else x.new_empty((0,)),
            torch.empty_like(weight) if output_mask[1] else x.new_empty((0,)),
            weight.new_empty((weight.shape[0],)) if output_mask[2] else x.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask_type, color_channels, dilation = inputs
    ctx.conv_args = (mask_type, color_channels, dilation)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, backward_op, grad_y):
    x, weight = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
             ctx.has_bias and ctx.needs_input_grad[2])
    grad_x, grad_weight, grad_bias = backward_op(grad_y.contiguous(), x, weight, *ctx.conv_args,
                                                 list(needs))
    return (grad_x if needs[0] else None, grad_weight if needs[1] else None,
            grad_bias if needs[2] else None, None, None, None)


def _check_kernel_args(x, weight, bias, mask_type, color_channels, dilation) -> None:
    """The checks of check_masked_conv2d_args (csrc/ops/masked_conv2d.cpp), for the Triton
    custom ops: RuntimeErrors naming the argument before a kernel reads any pointer."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise RuntimeError(f"{OP}: x must be 4-D (N, C_in, H, W), got "
                           f"{getattr(x, 'shape', type(x).__name__)}")
    _checks.kernel_dtype(OP, "x", x)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise RuntimeError(f"{OP}: weight must be 4-D (C_out, C_in, k, k), got "
                           f"{getattr(weight, 'shape', type(weight).__name__)}")
    out_channels, in_channels, k, kw = weight.shape
    if kw != k or k % 2 != 1:
        raise RuntimeError(f"{OP}: weight must have a square kernel of odd size, got "
                           f"{list(weight.shape)}")
    if in_channels != x.shape[1]:
        raise RuntimeError(f"{OP}: x has {x.shape[1]} channels but weight expects {in_channels}")
    if out_channels < 1 or in_channels < 1:
        raise RuntimeError(f"{OP}: need at least one input and one output channel, got weight "
                           f"{list(weight.shape)}")
    _checks.kernel_like(OP, "x", x, x, "like x")
    _checks.kernel_tensor(OP, "weight", weight, weight.shape, x.dtype, x.device,
                          "dtype and device of x")
    if bias is not None:
        _checks.kernel_tensor(OP, "bias", bias, (out_channels,), x.dtype, x.device,
                              "C_out of weight, dtype and device of x")
    if mask_type not in (0, 1):
        raise RuntimeError(f"{OP}: mask_type must be 0 (A) or 1 (B), got {mask_type}")
    if color_channels < 1 or in_channels % color_channels or out_channels % color_channels:
        raise RuntimeError(f"{OP}: color_channels ({color_channels}) must be >= 1 and divide "
                           f"C_in ({in_channels}) and C_out ({out_channels})")
    if dilation < 1 or dilation > INT32_MAX // k:
        raise RuntimeError(f"{OP}: dilation must be >= 1 and dilation * k (k = {k}) at most "
                           f"{INT32_MAX}, got {dilation}")


def _check_kernel_backward_args(grad_y, x, weight, mask_type, color_channels, dilation,
                                output_mask) -> None:
    """The forward's kernel checks (without bias) plus grad_y: (N, C_out, H, W) like y."""
    _check_kernel_args(x, weight, None, mask_type, color_channels, dilation)
    _checks.kernel_tensor(OP, "grad_y", grad_y,
                          (x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), x.dtype,
                          x.device, "like y = (N, C_out, H, W)")


def _triton_launchers():
    from pyvae.kernels import masked_conv2d
    return masked_conv2d


def _fold_images(info, in_dims, tensors):
    """(K·N, C, H, W) tensors of the models' (N, C, H, W) ones."""
    return [t.reshape(-1, *t.shape[2:]).contiguous()
            for t in _register.batched_args(info, in_dims, tensors)]


def _vmap_forward(op, info, in_dims, x, weight, bias, mask_type, color_channels, dilation):
    """vmap of the forward op: K models' images in one launch when only x is vmapped; one
    launch per model when the weight or bias is."""
    if in_dims[1] is not None or in_dims[2] is not None:
        return _register.per_model_rule(op, info, in_dims, x, weight, bias, mask_type,
                                        color_channels, dilation)
    (images,) = _fold_images(info, in_dims[:1], (x,))
    y = op(images, weight, bias, mask_type, color_channels, dilation)
    return y.reshape(info.batch_size, -1, *y.shape[1:]), 0


def _vmap_backward(op, info, in_dims, grad_y, x, weight, mask_type, color_channels, dilation,
                   output_mask):
    """vmap of the backward op: one launch on the K·N images for grad_x alone with a shared
    weight; one launch per model when the weight is vmapped or a weight or bias gradient (one
    per model) is wanted."""
    if in_dims[2] is not None or output_mask[1] or output_mask[2]:
        return _register.per_model_rule(op, info, in_dims, grad_y, x, weight, mask_type,
                                        color_channels, dilation, output_mask)
    grad_y, x = _fold_images(info, in_dims[:2], (grad_y, x))
    grad_x, grad_weight, grad_bias = op(grad_y, x, weight, mask_type, color_channels, dilation,
                                        output_mask)
    if output_mask[0]:
        grad_x = grad_x.reshape(info.batch_size, -1, *grad_x.shape[1:])
    # The weight and bias gradients are empty placeholders here, shared by the models.
    return (grad_x, grad_weight, grad_bias), (0 if output_mask[0] else None, None, None)


KERNEL_OP = _register.define_kernel_op(
    OP,
    forward_schema="(Tensor x, Tensor weight, Tensor? bias, int mask_type, int color_channels, "
                   "int dilation) -> Tensor",
    backward_schema="(Tensor grad_y, Tensor x, Tensor weight, int mask_type, "
                    "int color_channels, int dilation, bool[3] output_mask) -> (Tensor grad_x, "
                    "Tensor grad_weight, Tensor grad_bias)",
    triton_launchers=_triton_launchers, check_forward=_check_kernel_args,
    check_backward=_check_kernel_backward_args, fake_forward=_fake_forward,
    fake_backward=_fake_backward, setup_context=_setup_context, backward=_backward,
    vmap_forward=_vmap_forward, vmap_backward=_vmap_backward)


# ---- the public op ------------------------------------------------------------------------------

def _check_args(x, weight, bias, mask_type, color_channels, dilation) -> None:
    _checks.check_float_tensor(OP, "x", x)
    _checks.check_float_tensor(OP, "weight", weight)
    if x.dim() != 4:
        raise ValueError(f"{OP}: x must be 4-D (N, C_in, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{OP}: weight must be 4-D (C_out, C_in, k, k), got shape "
                         f"{tuple(weight.shape)}")
    out_channels, in_channels, kh, kw = weight.shape
    if kh != kw or kh % 2 != 1:
        raise ValueError(f"{OP}: weight must have a square kernel of odd size k, got "
                         f"{kh}x{kw}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{OP}: x has {x.shape[1]} channels but weight expects {in_channels} "
                         f"(weight shape {tuple(weight.shape)})")
    if out_channels < 1:
        raise ValueError(f"{OP}: weight must have at least one output channel")
    if weight.dtype != x.dtype:
        raise TypeError(f"{OP}: weight is {weight.dtype} but x is {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{OP}: weight is on {weight.device} but x is on {x.device}")
    if bias is not None:
        _checks.check_float_tensor(OP, "bias", bias)
        if tuple(bias.shape) != (out_channels,):
            raise ValueError(f"{OP}: bias must have shape ({out_channels},) (C_out,), got "
                             f"{tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{OP}: bias is {bias.dtype} but x is {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"{OP}: bias is on {bias.device} but x is on {x.device}")
    _check_mask_args(out_channels, in_channels, kh, mask_type, color_channels)
    _check_dilation(dilation, kh)


def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  mask_type: str = "A", color_channels: int = 1,
                  dilation: int = 1) -> torch.Tensor:
    """PixelCNN masked convolution: stride 1, zero "same" padding, odd square kernels.

    Args:
        x: input images, shape (N, C_in, H, W), float16 / bfloat16 / float32 / float64. N, H
            and W may be 0: the output is then empty on every backend, the gradients zero.
        weight: kernel, shape (C_out, C_in, k, k) with k odd, same dtype and device as ``x``.
            The entries at masked taps are ignored (they need not be zero) and get a zero
            gradient.
        bias: optional per-output-channel bias, shape (C_out,), same dtype and device.
        mask_type: ``"A"`` (the centre pixel's own and later channel groups are hidden: the
            first layer of a PixelCNN) or ``"B"`` (the centre pixel's own group is visible:
            every later layer).
        color_channels: G, the number of channel groups (e.g. 3 for RGB); must divide C_in and
            C_out. With G = 1 the centre tap is fully masked (A) or fully visible (B).
        dilation: spacing of the kernel taps in pixels (>= 1, with dilation · k < 2³¹); the
            padding is ``dilation * (k // 2)`` so the output keeps the input's H × W.

    Returns:
        ``y`` of shape (N, C_out, H, W) in ``x``'s dtype, equal to
        ``conv2d(x, weight * masked_conv2d_mask(...), bias, padding=dilation * (k // 2),
        dilation=dilation)``; half-precision inputs are accumulated in float32.
        Differentiable with respect to ``x``, ``weight`` and ``bias``.
    """
    _check_args(x, weight, bias, mask_type, color_channels, dilation)
    _checks.check_finite(OP, x=x, weight=weight, bias=bias)

    backend = _backend.resolve(OP, x.device)
    if backend == "reference":
        return masked_conv2d_reference(x, weight, bias, mask_type=mask_type,
                                       color_channels=color_channels, dilation=dilation)
    return KERNEL_OP.apply(backend, x.contiguous(), weight.contiguous(),
                           None if bias is None else bias.contiguous(),
                           _mask_type_index(mask_type), int(color_channels), int(dilation))
