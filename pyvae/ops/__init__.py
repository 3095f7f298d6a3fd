"""pyvae's functional ops: one dispatch module per op over the reference, cpu, cuda and triton
backends (see :mod:`pyvae.ops._backend`)."""
from pyvae.ops._backend import (auto_backend, available_backends, backend_status, last_backend,
                                requested_backend, use_backend)
from pyvae.ops._checks import nan_policy
from pyvae.ops.kl_decomposition import (KLTerms, kl_decomposition, kl_decomposition_reference,
                                        mss_log_weights)
from pyvae.ops.masked_conv2d import masked_conv2d, masked_conv2d_mask, masked_conv2d_reference
from pyvae.ops.reparameterize_kl import reparameterize_kl, reparameterize_kl_reference

__all__ = [
    "KLTerms",
    "auto_backend",
    "available_backends",
    "backend_status",
    "kl_decomposition",
    "kl_decomposition_reference",
    "last_backend",
    "masked_conv2d",
    "masked_conv2d_mask",
    "masked_conv2d_reference",
    "mss_log_weights",
    "nan_policy",
    "reparameterize_kl",
    "reparameterize_kl_reference",
    "requested_backend",
    "use_backend",
]
