"""Train-mode BatchNorm whose double backward is one fused kernel, for the meta step.

Every Hessian-vector product of the meta step runs BatchNorm's double backward on each
normalised map of the target. PyTorch computes it as a composite of about twenty
elementwise ops over the whole map (7.4 ms for a [32, 16, 32, 32] map on 2 CPU cores); the
op ``l2t_fast::batch_norm_double_backward`` (``csrc/batch_norm_cpu.cpp``) does it in two
passes. Inside ``fused_batch_norm()``, ``F.batch_norm`` in training mode on CPU float32 /
float64 tensors uses it, so any model built from ``nn.BatchNorm*`` gets it unchanged; every
other call (eval mode, GPU, half precision, forward-mode tangents, or no compiled
extension) goes to PyTorch's own BatchNorm. Values and first derivatives come from the same
ATen kernels as PyTorch's (``native_batch_norm`` and its backward), running statistics
included.
"""
import inspect

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from l2t_fast.matching.backends import compiled

_FUSED_DTYPES = (torch.float32, torch.float64)
_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)


def _native_backward(grad_output, input, weight, mean, invstd, eps):
    return torch.ops.aten.native_batch_norm_backward(
        grad_output, input, weight, None, None, mean, invstd, True, eps, [True, True, True])


class _TrainBatchNorm(torch.autograd.Function):
    """Train-mode BatchNorm; a backward taken with ``create_graph`` is a
    ``_TrainBatchNormBackward``, whose own derivative is the fused kernel."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps):
        output, mean, invstd = torch.native_batch_norm(input, weight, bias, running_mean,
                                                       running_var, True, momentum, eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.eps = eps
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the backward itself is differentiated
            grads = _TrainBatchNormBackward.apply(grad_output, input, weight, mean, invstd,
                                                  ctx.eps)
        else:
            grads = _native_backward(grad_output, input, weight, mean, invstd, ctx.eps)
        return *grads, None, None, None, None


class _TrainBatchNormBackward(torch.autograd.Function):
    """(grad_output, input, weight) -> (grad_input, grad_weight, grad_bias), with the fused
    derivative. ``mean`` and ``invstd`` are functions of ``input``: the kernel's formulas
    account for that, so they enter as constants."""

    @staticmethod
    def forward(ctx, grad_output, input, weight, mean, invstd, eps):
        ctx.save_for_backward(grad_output, input, weight, mean, invstd)
        return _native_backward(grad_output, input, weight, mean, invstd, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_grad_input, grad_grad_weight, grad_grad_bias):
        grad_output, input, weight, mean, invstd = ctx.saved_tensors
        grad_input, grad_weight, grad_grad_output = torch.ops.l2t_fast.batch_norm_double_backward(
            input, weight, grad_output, mean, invstd,
            torch.zeros_like(input) if grad_grad_input is None else grad_grad_input,
            torch.zeros_like(weight) if grad_grad_weight is None else grad_grad_weight,
            torch.zeros_like(weight) if grad_grad_bias is None else grad_grad_bias)
        return grad_grad_output, grad_input, grad_weight, None, None, None


def _has_tangent(tensor):
    return tensor is not None and forward_ad.unpack_dual(tensor).tangent is not None


def _fusable(input, weight, bias, training):
    return (training and input.device.type == "cpu" and input.dtype in _FUSED_DTYPES
            and input.dim() >= 2 and input.numel() > input.size(1)  # else F.batch_norm raises
            and compiled.load_problem() is None
            and not any(_has_tangent(t) for t in (input, weight, bias)))


class fused_batch_norm(TorchFunctionMode):
    """Context in which train-mode ``F.batch_norm`` on CPU uses the fused double backward."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            call = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
            call.apply_defaults()
            a = call.arguments
            if _fusable(a["input"], a["weight"], a["bias"], a["training"]):
                channels = a["input"].size(1)
                like = dict(dtype=a["input"].dtype, device=a["input"].device)
                weight = torch.ones(channels, **like) if a["weight"] is None else a["weight"]
                bias = torch.zeros(channels, **like) if a["bias"] is None else a["bias"]
                return _TrainBatchNorm.apply(a["input"], weight, bias, a["running_mean"],
                                             a["running_var"], a["momentum"], a["eps"])
        return func(*args, **kwargs)


if compiled.load_problem() is None:
    @torch.library.register_fake("l2t_fast::batch_norm_double_backward")
    def _fake_double_backward(input, weight, grad_out, mean, invstd, grad_grad_input,
                              grad_grad_weight, grad_grad_bias):
        return torch.empty_like(input), torch.empty_like(weight), torch.empty_like(input)
