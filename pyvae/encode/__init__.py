"""Stride-1 patch encoding of images and whole collections (DESIGN.md §1)."""
from pyvae.encode.stride1 import encode_patches, fully_convolutional

__all__ = ["encode_patches", "fully_convolutional"]
