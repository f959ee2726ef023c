"""The Triton backend: fused kernels for every pair in a constant number of launches.

Importing it registers the ops ``l2t_fast_triton::channel_errors*`` (kernels in
``kernels.py``, launches in ``ops.py``) with the fake kernels and autograd shared by
all compiled backends.
"""
import torch

from l2t_fast.matching.backends import registration
from l2t_fast.matching.backends.triton import ops

registration.register(ops.NAMESPACE)


def channel_errors(source, target, weight, bias, pair_source, pair_target):
    """E [B, sum_i Cs_i] of every pair (see ``backends/registration.py``)."""
    return torch.ops.l2t_fast_triton.channel_errors(source, target, weight, bias, pair_source,
                                                    pair_target)


def channel_errors_jvp(source, target, weight, bias, pair_source, pair_target, tangent_target,
                       tangent_weight, tangent_bias):
    return registration.errors_tangent(torch.ops.l2t_fast_triton, source, target, weight,
                                        bias, pair_source, pair_target, tangent_target,
                                        tangent_weight, tangent_bias)


def channel_errors_vjp(grad_errors, source, target, weight, bias, pair_source, pair_target):
    return registration.errors_vjp(torch.ops.l2t_fast_triton, grad_errors, source, target,
                                    weight, bias, pair_source, pair_target)
