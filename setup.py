"""Builds pyvae and its compiled extension pyvae._C.

The C++ CPU kernels are always built. The CUDA kernels are added when the installed torch is a
CUDA build and CUDA_HOME is found, or when FORCE_CUDA=1; PYVAE_NO_CUDA=1 turns them off.
TORCH_CUDA_ARCH_LIST selects the GPU architectures (torch's default: the visible GPUs).
Install without build isolation so that the extension compiles against the installed torch:
    pip install --no-build-isolation -e .
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def build_cuda() -> bool:
    if os.environ.get("PYVAE_NO_CUDA", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    def sources(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    cpp = sources("csrc/*.cpp") + sources("csrc/ops/*.cpp") + sources("csrc/ops/cpu/*.cpp")
    # -fopenmp: at::parallel_for is inline OpenMP; the library resolves to torch's own libgomp.
    # -fno-math-errno -fno-trapping-math: let GCC vectorise the branch-free maths of vec_math.h.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if not build_cuda():
        return CppExtension("pyvae._C", cpp, extra_compile_args={"cxx": cxx}, **common)
    return CUDAExtension(
        "pyvae._C",
        cpp + sources("csrc/ops/cuda/*.cu"),
        define_macros=[("PYVAE_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        **common,
    )


setup(
    # Every package under pyvae/ (found, so a new subpackage cannot be left out of the wheel),
    # plus the Triton kernels, which live in the top-level kernels/ folder.
    packages=find_packages(include=["pyvae", "pyvae.*"]) + ["pyvae.kernels"],
    package_dir={"pyvae.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
