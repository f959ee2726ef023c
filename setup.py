"""Builds l2t_fast and its extension l2t_fast._C.

The C++ CPU kernels are always built; the CUDA kernels (csrc/cuda/*.cu) only when a CUDA
toolkit and a CUDA-enabled torch are both present. TORCH_CUDA_ARCH_LIST is honoured and
defaults to include sm_90 (H100). Build without isolation so the installed torch is used:
``pip install -e . --no-build-isolation``.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp"]


def torch_at_least(major, minor):
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return version >= (major, minor)


def extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    # The CUDA kernels use float32-output products of half inputs (torch >= 2.8).
    with_cuda = (bool(cuda_sources) and torch.version.cuda is not None
                 and CUDA_HOME is not None and torch_at_least(2, 8))
    if not with_cuda:
        return CppExtension("l2t_fast._C", sources, extra_compile_args={"cxx": CXX_FLAGS},
                            extra_link_args=["-fopenmp"])
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return CUDAExtension(
        "l2t_fast._C", sources + cuda_sources,
        define_macros=[("L2T_FAST_WITH_CUDA", None)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-std=c++17"]},
        extra_link_args=["-fopenmp"])


setup(
    name="l2t_fast",
    version="0.1.0",
    description="Fast 'Learning What and Where to Transfer' (L2T-ww) for PyTorch",
    packages=find_packages(include=["l2t_fast", "l2t_fast.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib", "scikit-learn", "pyyaml"],
    extras_require={
        "triton": ["triton"],
        "sweep": ["ray[tune]"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "expecttest"],
    },
    entry_points={"console_scripts": ["l2t-fast=l2t_fast.cli:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
