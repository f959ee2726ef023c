"""Host memory: let glibc's malloc keep the blocks a training step frees, for the next step.

PyTorch's CPU allocator has no cache: every tensor is a malloc and a free. glibc serves
blocks above its mmap threshold (128 KiB at first, then the size of the largest block freed)
with a fresh mapping and unmaps them on free, and gives the top of the heap back to the OS
once more than twice that is free. So each training step faults its big tensors back in,
page by page, zero-filled by the kernel: on the loss benchmark's "cifar" step (31.5 MB of
target gradients) 3,000-7,700 page faults and 5-10 ms of a 50 ms step
(benchmarks/RESULTS.md). PyTorch's CPU tuning guide preloads jemalloc or tcmalloc for
this; ``retain_freed_memory`` gets the same effect from glibc itself, without a preload.
"""
import ctypes
import platform
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses mmap thresholds above half its heap size: 32 MiB on 64-bit machines
_LARGEST_MMAP_THRESHOLD = 32 << 20
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def retain_freed_memory():
    """Serve blocks of up to 32 MiB from the heap and never give freed heap back to the OS.

    The process keeps its high-water mark of host memory (as PyTorch's CUDA caching
    allocator does on the GPU) and stops page-faulting it in again every step. It changes
    how malloc behaves for the whole process, so the ``l2t-fast`` command calls it and a
    library only suggests it. Returns whether it took effect (False where the C library is
    not glibc).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)
                and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
