"""Stride-1 patch encoding of images (:mod:`pyvae.encode.stride1`) and of whole collections from
disk to a resumable feature store (:mod:`pyvae.encode.dataset`, reading through
:mod:`pyvae.encode.sources`, writing :mod:`pyvae.encode.store`), and similarity maps."""
from pyvae.encode.dataset import EncodeResult, encode_dataset
from pyvae.encode.similarity import save_similarity_png, similarity_map
from pyvae.encode.store import StoreError, open_features
from pyvae.encode.stride1 import (EncodeFlops, count_flops, encode_flops, encode_patches,
                                  fully_convolutional)

__all__ = ["EncodeFlops", "EncodeResult", "StoreError", "count_flops", "encode_dataset",
           "encode_flops", "encode_patches", "fully_convolutional", "open_features",
           "save_similarity_png", "similarity_map"]
