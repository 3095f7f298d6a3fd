"""Exact stride-1 patch encoding: the code of every p×p patch of an image in one pass.

A patch encoder built from valid convolutions, pooling, elementwise layers, batch norm and a
final linear layer is the same function as a fully-convolutional network run once over the
whole image: the linear layer becomes a convolution whose kernel covers the last feature map,
and each strided layer's stride becomes dilation of every later layer ("à trous"), so the
output stays at stride 1. :func:`fully_convolutional` does that conversion;
:func:`encode_patches` runs it (in tiles for big images) and equals cutting out every patch and
encoding it alone (``method="unfold"``, the slow path and the benchmarks' baseline).
:func:`count_flops` and :func:`encode_flops` count the work of both ways, exactly, from the
layer shapes.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pyvae._validate import check_int

# Layers that act on each position (and channel) alone: they commute with the conversion.
POINTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
             nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish,
             nn.Identity, nn.Dropout, nn.Dropout2d)
# Pointwise layers that the converted network runs in place when they follow a layer that made a
# new feature map and whose backward does not read that map (convolution, max pooling, batch
# norm): one feature map less allocated and written per layer, and autograd through the network
# still works. (9|3 on 8 64×64 images, 2-core CPU: the network alone 29.5 -> 24 ms in one A/B
# script; encode_patches end to end 27.7 ms before, 28.3 ms after in two separate benchmark runs,
# so the end-to-end gain is within the run-to-run spread.)
IN_PLACE = (nn.ReLU, nn.Hardtanh)  # nn.ReLU6 is a Hardtanh
MAKES_NEW_MAP = (nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d)


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _flatten_modules(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        out = []
        for name, child in module.named_children():
            out += _flatten_modules(child, f"{prefix}.{name}" if prefix else name)
        return out
    return [(prefix, module)]


def _fold_batch_norm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv <- bn ∘ conv with the running statistics (batch norm in eval mode)."""
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(
        bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        new_bias = (bias - bn.running_mean) * scale + shift
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)


def fully_convolutional(encoder: nn.Module, patch_size: int) -> nn.Sequential:
    """The fully-convolutional, stride-1 equivalent of a patch encoder.

    Args:
        encoder: an ``nn.Sequential`` (nested ones are flattened) of unpadded ``Conv2d``,
            ``BatchNorm2d`` (its running statistics are folded into the preceding convolution,
            i.e. eval-mode semantics), unpadded ``MaxPool2d`` / ``AvgPool2d``, pointwise
            activations and dropout, and at the end ``Flatten`` followed by ``Linear`` layers
            (with pointwise layers between them).
        patch_size: p, the side of the square patches the encoder reads.

    Returns:
        An ``nn.Sequential`` in eval mode mapping (N, C, H, W) to (N, out_features, H', W')
        with H' >= H − p + 1; position (y, x) is the encoder's output for the patch whose top-left
        corner is (y, x) (crop to H − p + 1 × W − p + 1; positions beyond read past the image).
        ReLU / Hardtanh layers right after a convolution, max pooling or batch norm run in place
        on that layer's output (never on the network's input).

    Raises:
        ValueError naming the first layer that cannot be converted (padded or dilated-pooling
        layers, channel mixing across positions, batch norm without running statistics, ...).
    """
    layers: list[nn.Module] = []
    dilation = (1, 1)
    size = (patch_size, patch_size)
    channels = None
    flattened = linear = False
    for name, module in _flatten_modules(encoder, ""):
        where = f"encoder layer {name!r} ({type(module).__name__})"
        if isinstance(module, nn.Conv2d) and not flattened:
            if any(_pair(module.padding)) or module.padding == "same":
                raise ValueError(f"fully_convolutional: {where} is padded; a patch encoder "
                                 "must use valid (padding=0) convolutions to be run at stride 1")
            kernel, stride, own = (_pair(module.kernel_size), _pair(module.stride),
                                   _pair(module.dilation))
            conv = nn.Conv2d(module.in_channels, module.out_channels, kernel, stride=1,
                             dilation=(own[0] * dilation[0], own[1] * dilation[1]),
                             groups=module.groups, bias=module.bias is not None)
            conv.load_state_dict(module.state_dict())
            layers.append(conv)
            size = tuple((s - o * (k - 1) - 1) // st + 1
                         for s, o, k, st in zip(size, own, kernel, stride))
            dilation = (dilation[0] * stride[0], dilation[1] * stride[1])
            channels = module.out_channels
        elif isinstance(module, nn.BatchNorm2d) and not flattened:
            if module.running_mean is None:
                raise ValueError(f"fully_convolutional: {where} has no running statistics "
                                 "(track_running_stats=False), so it has no eval-mode form")
            if layers and isinstance(layers[-1], nn.Conv2d):
                _fold_batch_norm(layers[-1], module)
            else:
                layers.append(copy.deepcopy(module).eval())
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)) and not flattened:
            kernel = _pair(module.kernel_size)
            stride = _pair(module.stride if module.stride is not None else module.kernel_size)
            own = _pair(getattr(module, "dilation", 1))
            if any(_pair(module.padding)) or module.ceil_mode:
                raise ValueError(f"fully_convolutional: {where} is padded or uses ceil_mode; "
                                 "only valid pooling can be run at stride 1")
            step = (own[0] * dilation[0], own[1] * dilation[1])
            if isinstance(module, nn.MaxPool2d):
                layers.append(nn.MaxPool2d(kernel, stride=1, dilation=step))
            else:
                if channels is None:
                    raise ValueError(f"fully_convolutional: {where} comes before any "
                                     "convolution; its channel count is unknown")
                # Average pooling has no dilation in PyTorch: a fixed depthwise convolution.
                mean = nn.Conv2d(channels, channels, kernel, dilation=step, groups=channels,
                                 bias=False)
                mean.weight.data.fill_(1.0 / (kernel[0] * kernel[1]))
                mean.weight.requires_grad_(False)
                layers.append(mean)
            size = tuple((s - o * (k - 1) - 1) // st + 1
                         for s, o, k, st in zip(size, own, kernel, stride))
            dilation = (dilation[0] * stride[0], dilation[1] * stride[1])
        elif isinstance(module, nn.Flatten) and not flattened:
            flattened = True
        elif isinstance(module, nn.Linear) and flattened:
            if channels is None or module.in_features != channels * size[0] * size[1]:
                raise ValueError(f"fully_convolutional: {where} expects {module.in_features} "
                                 f"inputs but the feature map is {channels}×{size[0]}×{size[1]}")
            kernel = size
            conv = nn.Conv2d(channels, module.out_features, kernel, dilation=dilation,
                             bias=module.bias is not None)
            with torch.no_grad():
                conv.weight.copy_(module.weight.view(module.out_features, channels, *kernel))
                if module.bias is not None:
                    conv.bias.copy_(module.bias)
            layers.append(conv)
            channels, size, linear = module.out_features, (1, 1), True
        elif isinstance(module, POINTWISE):
            layer = copy.deepcopy(module)
            if isinstance(layer, IN_PLACE) and layers and isinstance(layers[-1], MAKES_NEW_MAP):
                layer.inplace = True  # never the caller's tensor: a map this network made
            layers.append(layer)
        else:
            state = "after Flatten" if flattened else "before Flatten"
            raise ValueError(f"fully_convolutional: cannot convert {where} {state}: supported "
                             "are unpadded Conv2d / MaxPool2d / AvgPool2d, BatchNorm2d and "
                             "pointwise layers, then Flatten and Linear layers")
    if not linear:
        raise ValueError("fully_convolutional: the encoder must end in Flatten and Linear "
                         "(the layer that sees the whole patch)")
    return nn.Sequential(*layers).eval()


# Leaf layers count_flops knows: counted (multiply-adds) and not counted (no multiply-adds).
_COUNTED = (nn.Conv2d, nn.Linear, nn.AvgPool2d)
_UNCOUNTED = POINTWISE + (nn.BatchNorm2d, nn.MaxPool2d, nn.Flatten)


def count_flops(module: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass of ``module`` on an input of shape ``input_shape``, exact from
    the layer shapes.

    FLOPs = 2 × multiply-adds: a ``Conv2d`` makes out_channels × H_out × W_out outputs per image
    of (in_channels / groups) × kh × kw multiply-adds each, a ``Linear`` out_features outputs of
    in_features each, an ``AvgPool2d`` counts as the depthwise convolution it is (kh × kw per
    output, as in :func:`fully_convolutional`). Biases, activations, batch norm and max pooling
    are not counted. The shapes are propagated on the meta device: nothing is computed and the
    module (its mode included) is left as it was.

    Args:
        module: built from the layers :func:`fully_convolutional` accepts (nested
            ``nn.Sequential`` / container modules are walked; their leaf layers are counted).
        input_shape: the input's shape with the batch dimension, e.g. (1, C, p, p) for one
            patch or (N, C, H, W) for N images.

    Returns:
        The FLOPs of the whole batch, an int.

    Raises:
        ValueError naming a leaf layer it cannot count (anything but the layers above).
    """
    shape = tuple(int(v) for v in input_shape)
    if not shape or any(v < 1 for v in shape):
        raise ValueError(f"count_flops: input_shape must be positive sizes, got {input_shape!r}")
    for name, layer in module.named_modules():
        leaf = not isinstance(layer, nn.Sequential) and not any(True for _ in layer.children())
        if leaf and not isinstance(layer, _COUNTED + _UNCOUNTED):
            raise ValueError(f"count_flops: cannot count layer {name!r} "
                             f"({type(layer).__name__}); counted are Conv2d, Linear and "
                             "AvgPool2d, besides pointwise layers, BatchNorm2d, MaxPool2d and "
                             "Flatten")
    total = 0

    def count(layer: nn.Module, inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            kh, kw = layer.kernel_size
            total += 2 * output.numel() * (layer.in_channels // layer.groups) * kh * kw
        elif isinstance(layer, nn.Linear):
            total += 2 * output.numel() * layer.in_features
        else:
            kh, kw = _pair(layer.kernel_size)
            total += 2 * output.numel() * kh * kw

    hooks = [m.register_forward_hook(count) for m in module.modules()
             if isinstance(m, _COUNTED)]
    state = {name: torch.empty_like(t, device="meta") for name, t in
             [*module.named_parameters(), *module.named_buffers()]}
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()  # batch norm on a one-patch batch: its eval form (the shapes are the same)
        with torch.no_grad():
            torch.func.functional_call(module, state, (torch.empty(shape, device="meta"),))
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes:
            m.training = training
    return total


@dataclass(frozen=True)
class EncodeFlops:
    """The work of encoding every p×p patch of one C×H×W image, in FLOPs (see
    :func:`count_flops`).

    Attributes:
        per_patch: one patch through the patch encoder.
        patches: (H − p + 1) · (W − p + 1), the patches at stride 1.
        stride1: the fully-convolutional network over the whole image (untiled; for strided
            encoders it includes the positions past H − p + 1 that its output is cropped from).
    """

    per_patch: int
    patches: int
    stride1: int

    @property
    def per_patch_total(self) -> int:
        """per_patch · patches: encoding every patch alone."""
        return self.per_patch * self.patches

    @property
    def ratio(self) -> float:
        """per_patch_total / stride1: the speed-up the FLOPs allow at equal FLOP/s."""
        return self.per_patch_total / self.stride1


def encode_flops(model, height: int, width: int, *, network: nn.Module | None = None
                 ) -> EncodeFlops:
    """FLOPs of per-patch against stride-1 encoding of one image of ``height`` × ``width``.

    Args:
        model: a patch model (``.encoder``, ``.patch_size``, ``.latent_dim``, ``.channels``).
        height, width: the image's size in pixels, >= the patch size.
        network: its :func:`fully_convolutional` network (built if not given).

    Returns:
        :class:`EncodeFlops` (``.ratio`` is per-patch FLOPs × patches over the stride-1 FLOPs).
    """
    _check_model(model)
    if not isinstance(getattr(model, "channels", None), int):
        raise TypeError(f"encode_flops: model must have an int .channels (the image channels); "
                        f"{type(model).__name__} has {getattr(model, 'channels', None)!r}")
    p, c = model.patch_size, model.channels
    check_int("encode_flops", "height", height, p)
    check_int("encode_flops", "width", width, p)
    if network is None:
        network = fully_convolutional(model.encoder, p)
    return EncodeFlops(per_patch=count_flops(model.encoder, (1, c, p, p)),
                       patches=(height - p + 1) * (width - p + 1),
                       stride1=count_flops(network, (1, c, height, width)))


def _check_model(model) -> None:
    missing = [a for a in ("encoder", "patch_size", "latent_dim") if not hasattr(model, a)]
    if missing:
        raise TypeError(f"encode_patches: model must be a patch model with .encoder, "
                        f".patch_size and .latent_dim (e.g. pyvae.models.PatchVAE); "
                        f"{type(model).__name__} lacks {missing}")


def as_float_images(images: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """(N, C, H, W) images as floats in [0, 1] (uint8 is divided by 255), with clear errors."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"encode_patches: images must be a (N, C, H, W) tensor, got {shape}")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"encode_patches: images have {images.shape[1]} channels, the model "
                         f"reads {channels}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"encode_patches: images must be uint8 or floating, got {images.dtype}")
    return images


def tile_starts(length: int, tile: int, patch: int) -> list[int]:
    """Start rows of tiles of ``tile`` input rows that overlap by patch − 1 and together give
    every output row 0 .. length − patch exactly once."""
    step = tile - patch + 1
    return list(range(0, length - patch + 1, step))


@torch.no_grad()
def encode_patches(model, images: torch.Tensor, *, batch_size: int | None = None,
                   dtype: torch.dtype | None = None, method: str = "conv",
                   return_logvar: bool = False, tile_size: int | None = None,
                   device: torch.device | str | None = None, network: nn.Module | None = None):
    """The posterior means of every p×p patch of every image, at stride 1.

    Args:
        model: a patch model (``.encoder``, ``.patch_size``, ``.latent_dim``, ``.preprocess``;
            e.g. :class:`pyvae.models.PatchVAE`). It is encoded in eval mode (batch norm uses
            its running statistics).
        images: (N, C, H, W), floats in [0, 1] or uint8, with H, W >= p.
        batch_size: images per forward pass (``"unfold"``: patches per pass); default: all
            images at once for ``"conv"``, 4096 patches for ``"unfold"``.
        dtype: compute dtype under autocast (``torch.bfloat16`` / ``torch.float16`` on a GPU);
            default full precision. The result is float32 either way.
        method: ``"conv"`` (the fully-convolutional network, default) or ``"unfold"`` (cut out
            every patch and encode it alone: the slow, obviously-correct path).
        return_logvar: also return the log-variances.
        tile_size: process each image in tiles of at most this many input pixels per side,
            overlapping by p − 1 (identical output; bounds memory for big images). Default:
            whole images.
        device: where to compute (default: the model's device); the result lives there too.
        network: a precomputed :func:`fully_convolutional` of the encoder (reuse across calls).

    Returns:
        mu (N, D, H − p + 1, W − p + 1) float32, or (mu, logvar) with ``return_logvar``.
    """
    _check_model(model)
    if method not in ("conv", "unfold"):
        raise ValueError(f"encode_patches: method must be 'conv' or 'unfold', got {method!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    p, d = model.patch_size, model.latent_dim
    images = as_float_images(images, getattr(model, "channels", None))
    n, _, height, width = images.shape
    if height < p or width < p:
        raise ValueError(f"encode_patches: images of {height}×{width} are smaller than the "
                         f"{p}×{p} patches")
    if tile_size is not None and tile_size < p:
        raise ValueError(f"encode_patches: tile_size ({tile_size}) must be >= patch size {p}")
    was_training = model.training
    model.eval()
    try:
        if method == "unfold":
            out = _encode_unfold(model, images, batch_size or 4096, dtype, device)
        else:
            if network is None:
                network = fully_convolutional(model.encoder, p)
            # Channels-last: oneDNN's and cuDNN's fastest convolution layout (about 2× on CPUs
            # for the few-image batches of whole-image encoding).
            network = network.to(device, memory_format=torch.channels_last)
            out = _encode_conv(model, network, images, batch_size or n, dtype, device,
                               tile_size)
    finally:
        model.train(was_training)
    mu, logvar = out[:, :d], out[:, d:]
    return (mu, logvar) if return_logvar else mu


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _encode_conv(model, network, images, batch_size, dtype, device, tile_size):
    p = model.patch_size
    n, _, height, width = images.shape
    out_h, out_w = height - p + 1, width - p + 1
    out = torch.empty(n, 2 * model.latent_dim, out_h, out_w, device=device)
    tile_h, tile_w = (tile_size or height), (tile_size or width)
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        batch = model.preprocess(batch.float()).contiguous(memory_format=torch.channels_last)
        for y in tile_starts(height, min(tile_h, height), p):
            for x in tile_starts(width, min(tile_w, width), p):
                tile = batch[:, :, y:y + tile_h, x:x + tile_w]
                rows, cols = tile.shape[2] - p + 1, tile.shape[3] - p + 1
                with _autocast(device, dtype):
                    result = network(tile)
                out[start:start + len(batch), :, y:y + rows, x:x + cols] = \
                    result[:, :, :rows, :cols].float()
    return out


def _encode_unfold(model, images, batch_size, dtype, device):
    p = model.patch_size
    n, c, height, width = images.shape
    out_h, out_w = height - p + 1, width - p + 1
    out = torch.empty(n, 2 * model.latent_dim, out_h, out_w, device=device)
    per_image = out_h * out_w
    for index in range(n):
        image = images[index:index + 1].to(device).float()
        # (1, C·p·p, L) -> (L, C, p, p): every patch, row-major over positions.
        patches = F.unfold(image, p).transpose(1, 2).reshape(per_image, c, p, p)
        codes = []
        for start in range(0, per_image, batch_size):
            with _autocast(device, dtype):
                mu, logvar = model.encode(patches[start:start + batch_size])
            codes.append(torch.cat([mu, logvar], dim=1).float())
        out[index] = torch.cat(codes).t().reshape(-1, out_h, out_w)
    return out
