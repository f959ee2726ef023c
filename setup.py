"""Builds l2t_fast and its extension l2t_fast._C.

The C++ CPU kernels are always built; the CUDA kernels (csrc/cuda/*.cu) only when a CUDA
toolkit and a CUDA-enabled torch are both present. TORCH_CUDA_ARCH_LIST is honoured and
defaults to include sm_90 (H100). Build without isolation so the installed torch is used:
``pip install -e . --no-build-isolation``. The C++ standard is the one the installed
torch's headers require (C++17 up to torch 2.13, C++20 from 2.14). With
``L2T_FAST_SANITIZE=1`` the C++ kernels are built with AddressSanitizer and UBSan (load
the extension with libasan preloaded; see .ci/run).
"""
import glob
import os
import re

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension, CUDAExtension,
                                       include_paths)

SANITIZE = os.environ.get("L2T_FAST_SANITIZE") == "1"
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                   "-fno-sanitize-recover=undefined"]


def cxx_standard():
    """``c++17`` or ``c++20``: what ATen.h of the installed torch insists on."""
    header = os.path.join(include_paths()[0], "ATen", "ATen.h")
    with open(header) as file:
        match = re.search(r"#error C\+\+(\d+) or later", file.read())
    return f"c++{match.group(1)}" if match else "c++17"


def compile_flags():
    flags = ["-O1", "-g"] + SANITIZER_FLAGS if SANITIZE else ["-O3"]
    # No fused multiply-adds: the vectorised clones of the row loops (channel_errors_cpu.cpp)
    # then round as the baseline does.
    return flags + [f"-std={cxx_standard()}", "-fopenmp", "-ffp-contract=off"]


def link_flags():
    return ["-fopenmp"] + (SANITIZER_FLAGS if SANITIZE else [])


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
        return CppExtension("l2t_fast._C", sources,
                            extra_compile_args={"cxx": compile_flags()},
                            extra_link_args=link_flags())
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return CUDAExtension(
        "l2t_fast._C", sources + cuda_sources,
        define_macros=[("L2T_FAST_WITH_CUDA", None)],
        extra_compile_args={"cxx": compile_flags(),
                            "nvcc": ["-O3", f"-std={cxx_standard()}"]},
        extra_link_args=link_flags())


if __name__ == "__main__":  # not when other build tools read cxx_standard()
    setup(
        name="l2t_fast",
        version="0.1.0",
        description="Fast 'Learning What and Where to Transfer' (L2T-ww) for PyTorch",
        packages=find_packages(include=["l2t_fast", "l2t_fast.*"]),
        python_requires=">=3.9",
        install_requires=["torch>=2.8", "numpy", "tqdm", "matplotlib", "scikit-learn", "pyyaml"],
        extras_require={
            "triton": ["triton"],
            "sweep": ["ray[tune]"],
            "test": ["pytest", "pytest-benchmark", "hypothesis", "expecttest"],
            # torchvision must match torch: install the pair first (README), then this extra
            "vision": ["torchvision", "timm", "pillow"],
        },
        entry_points={"console_scripts": ["l2t-fast=l2t_fast.cli:main"]},
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension},
    )
