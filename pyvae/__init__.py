"""pyvae: fast, trustworthy VAE kernels and models for PyTorch.

``import pyvae`` loads the ops, the modules and the losses; the other subpackages (data, encode,
metrics, models, train, viz, report, reproduce) load on first access (``pyvae.models``), so
that importing pyvae stays fast and needs neither scikit-learn nor matplotlib.
"""
import importlib

from pyvae import losses, nn, ops

__version__ = "0.1.0"
_LAZY = ("data", "demo", "encode", "metrics", "models", "report", "reproduce", "train", "viz")
__all__ = ["losses", "nn", "ops", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"pyvae.{name}")
    raise AttributeError(f"module 'pyvae' has no attribute {name!r}")
