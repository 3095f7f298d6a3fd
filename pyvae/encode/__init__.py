"""Stride-1 patch encoding of images and whole collections (DESIGN.md §1)."""
from pyvae.encode.dataset import EncodeResult, StoreError, encode_dataset, open_features
from pyvae.encode.similarity import save_similarity_png, similarity_map
from pyvae.encode.stride1 import (EncodeFlops, count_flops, encode_flops, encode_patches,
                                  fully_convolutional)

__all__ = ["EncodeFlops", "EncodeResult", "StoreError", "count_flops", "encode_dataset",
           "encode_flops", "encode_patches", "fully_convolutional", "open_features",
           "save_similarity_png", "similarity_map"]
