"""Modules built on pyvae's ops: masked (PixelCNN) convolutions and a conditional PixelCNN with a
discrete likelihood, the autoregressive decoder of patch VAEs."""
from pyvae.nn.masked_conv import MaskedConv2d
from pyvae.nn.pixelcnn import PixelCNN, PixelCNNBlock, bits_per_dim

__all__ = ["MaskedConv2d", "PixelCNN", "PixelCNNBlock", "bits_per_dim"]
