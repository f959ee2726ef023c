"""The compiled extension ``l2t_fast._C``: C++ CPU kernels and, when built with them, CUDA.

The op schemas live in C++ (``csrc/ops.cpp``); this module registers their fake kernels
and autograd, and is the ``channel_errors`` of the ``"cpu"`` and ``"cuda"`` backends
(the dispatcher picks the kernel from the tensors' device).
"""
import torch

from l2t_fast.matching.backends import registration

BUILD_HINT = ("build it with `pip install -e . --no-build-isolation` "
              "(after `pip install torch`) from the source checkout")

try:
    from l2t_fast import _C
    _LOAD_ERROR = None
except ImportError as error:
    _C = None
    _LOAD_ERROR = error
else:
    registration.register("l2t_fast")


def load_problem():
    """Why the extension cannot be used, or None."""
    if _C is None:
        return f"the compiled extension l2t_fast._C is not built ({_LOAD_ERROR}); {BUILD_HINT}"
    return None


def has_cuda_kernels():
    return _C is not None and _C.has_cuda()


def channel_errors(source, target, weight, bias, pair_source, pair_target):
    return torch.ops.l2t_fast.channel_errors(source, target, weight, bias, pair_source,
                                             pair_target)


def channel_errors_jvp(source, target, weight, bias, pair_source, pair_target, tangent_target,
                       tangent_weight, tangent_bias):
    return registration.errors_tangent(torch.ops.l2t_fast, source, target, weight, bias,
                                        pair_source, pair_target, tangent_target,
                                        tangent_weight, tangent_bias)


def channel_errors_vjp(grad_errors, source, target, weight, bias, pair_source, pair_target):
    return registration.errors_vjp(torch.ops.l2t_fast, grad_errors, source, target, weight,
                                    bias, pair_source, pair_target)
