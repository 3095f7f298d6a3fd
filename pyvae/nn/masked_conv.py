"""The masked (PixelCNN) convolution layer, a module around :func:`pyvae.ops.masked_conv2d`."""
from __future__ import annotations

import math

import torch
from torch import nn

from pyvae._validate import check_int
from pyvae.ops import masked_conv2d, masked_conv2d_mask

MASK_TYPES = ("A", "B")


def check_kernel_size(owner: str, kernel_size) -> int:
    """An odd square kernel size given as ``k`` or ``(k, k)``, returned as the int ``k``."""
    if isinstance(kernel_size, (tuple, list)):
        if len(kernel_size) != 2 or kernel_size[0] != kernel_size[1]:
            raise ValueError(f"{owner}: kernel_size must be square, got {tuple(kernel_size)}")
        kernel_size = kernel_size[0]
    kernel_size = check_int(owner, "kernel_size", kernel_size, 1)
    if kernel_size % 2 != 1:
        # An even kernel has no centre tap, so "pixels before the centre" is not defined.
        raise ValueError(f"{owner}: kernel_size must be odd (the mask is defined relative to "
                         f"the centre tap), got {kernel_size}")
    return kernel_size


def check_groups(owner: str, color_channels, **channels: int) -> int:
    """``color_channels`` (G >= 1) after checking that it divides every named channel count."""
    color_channels = check_int(owner, "color_channels", color_channels, 1)
    for name, count in channels.items():
        if count % color_channels:
            raise ValueError(
                f"{owner}: {name} ({count}) must be a multiple of color_channels "
                f"({color_channels}): channels are split into {color_channels} contiguous "
                f"groups that keep the colour ordering")
    return color_channels


class MaskedConv2d(nn.Module):
    """PixelCNN masked convolution (van den Oord et al. 2016): stride 1, zero "same" padding.

    Output pixel (h, w) sees only the input pixels before it in raster order (the rows above,
    and the pixels left of it in its own row) plus, at the centre tap, the input channel groups
    before its own group (``mask_type="A"``, the first layer of a PixelCNN) or up to and
    including its own group (``"B"``, every later layer). Channels are split into
    ``color_channels`` = G contiguous groups in colour order (R, G, B for G = 3); with G = 1 the
    centre pixel is hidden entirely (A) or visible entirely (B). See
    :func:`pyvae.ops.masked_conv2d`, which runs the forward and backward passes on the selected
    pyvae backend.

    Args:
        in_channels: C_in, a multiple of ``color_channels``.
        out_channels: C_out, a multiple of ``color_channels``.
        kernel_size: odd k (an int, or a square ``(k, k)``); k = 1 gives a channel-masked 1×1
            convolution.
        mask_type: ``"A"`` or ``"B"`` (keyword only).
        color_channels: G, the number of channel groups.
        bias: whether to learn a per-output-channel bias.
        dilation: spacing of the kernel taps in pixels; the padding is ``dilation * (k // 2)``.
        device, dtype: where and how to allocate the parameters, as for :class:`torch.nn.Conv2d`.

    Shapes:
        input (N, C_in, H, W) -> output (N, C_out, H, W).

    Attributes:
        weight: (C_out, C_in, k, k). The entries at masked taps are zero after initialisation
            and never affect the output (their gradient is exactly zero), so ``weight`` is the
            effective kernel.
        bias: (C_out,) or None.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 mask_type: str, color_channels: int = 1, bias: bool = True, dilation: int = 1,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        self.in_channels = check_int(owner, "in_channels", in_channels, 1)
        self.out_channels = check_int(owner, "out_channels", out_channels, 1)
        self.kernel_size = check_kernel_size(owner, kernel_size)
        if mask_type not in MASK_TYPES:
            raise ValueError(f"{owner}: mask_type must be 'A' or 'B', got {mask_type!r}")
        self.mask_type = mask_type
        self.color_channels = check_groups(owner, color_channels, in_channels=in_channels,
                                           out_channels=out_channels)
        self.dilation = check_int(owner, "dilation", dilation, 1)
        factory = dict(device=device, dtype=dtype)
        k = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, k, k, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def mask(self) -> torch.Tensor:
        """The 0/1 mask of the kernel, shape (C_out, C_in, k, k), in the weight's dtype."""
        return masked_conv2d_mask(self.out_channels, self.in_channels, self.kernel_size,
                                  self.mask_type, self.color_channels, dtype=self.weight.dtype,
                                  device=self.weight.device)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """:class:`torch.nn.Conv2d`'s initialisation, then zero the masked taps.

        The bounds use the full fan-in C_in·k² as nn.Conv2d does, so a masked layer starts with
        a smaller output variance than the unmasked one (about half for type A).
        """
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size ** 2)
            nn.init.uniform_(self.bias, -bound, bound)
        self.weight.mul_(self.mask())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Masked convolution of ``x`` (N, C_in, H, W) -> (N, C_out, H, W)."""
        return masked_conv2d(x, self.weight, self.bias, mask_type=self.mask_type,
                             color_channels=self.color_channels, dilation=self.dilation)

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"mask_type={self.mask_type!r}, color_channels={self.color_channels}")
        if self.dilation != 1:
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        return text
