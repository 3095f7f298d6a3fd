"""pyvae: fast, trustworthy VAE kernels and models for PyTorch."""
from pyvae import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
