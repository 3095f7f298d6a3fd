"""Triton kernels of pyvae (installed as pyvae.kernels)."""
