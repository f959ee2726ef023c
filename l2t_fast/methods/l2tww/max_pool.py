"""Max pooling that keeps no indices in the graph, for the meta step's lookahead.

PyTorch's max pooling saves its input and the argmax indices (int64: twice the bytes of
the float32 output) for its backward, and its backward saves them again for a double
backward. In the meta step, up to three graphs of the target are alive at once (the CE
step's gradient graph and the final CE's forward), so on the paper's VGG9 the indices are
about 15 MB per graph. Inside ``lean_max_pool()``, ``F.max_pool2d`` without
``return_indices`` saves its input alone (which PyTorch saves too, and which the preceding
ReLU already keeps) and finds the argmax again in each backward (2x2 windows, stride 2:
in the kernels of ``csrc/max_pool_cpu.cpp``; other shapes: PyTorch's pooling kernel): the
same values, ties and NaNs as PyTorch's, every derivative included. The
backward is linear in its gradient and constant in the input almost everywhere, so the
double backward sends nothing (not a zero map) to the input. Calls with forward-mode
tangents go to PyTorch's own pooling.
"""
import inspect

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from l2t_fast.matching.backends import compiled
from l2t_fast.methods.l2tww.batchnorm import _has_tangent

_MAX_POOL_SIGNATURE = inspect.signature(F._max_pool2d)
_TWO_BY_TWO = ((2, 2), (2, 2), (0, 0), (1, 1), False)  # kernel, stride, padding, dilation, ceil


def _compiled_2x2(input, config):
    """Whether the fused kernels (``csrc/max_pool_cpu.cpp``) take this call: they find the
    argmax in the pass that writes the result, where PyTorch's pooling kernel, which
    recomputes the indices otherwise, is slow on the CPU."""
    return (config == _TWO_BY_TWO and input.device.type == "cpu" and input.is_contiguous()
            and input.dim() >= 3 and input.dtype in (torch.float32, torch.float64)
            and compiled.load_problem() is None)


def _indices(input, config):
    with torch.no_grad():
        return torch.ops.aten.max_pool2d_with_indices(input, *config)[1]


def _scatter(grad, input, config):
    """The pooling's backward: ``grad`` to the argmax of each window of ``input``."""
    if _compiled_2x2(input, config):
        return torch.ops.l2t_fast.max_pool2x2_backward(grad, input)
    return torch.ops.aten.max_pool2d_with_indices_backward(grad, input, *config,
                                                           _indices(input, config))


def _gather(grad_grad_input, input, config):
    """The derivative of the backward in its gradient: ``grad_grad_input`` at each argmax."""
    if _compiled_2x2(input, config):
        return torch.ops.l2t_fast.max_pool2x2_gather(grad_grad_input, input)
    indices = _indices(input, config)
    return grad_grad_input.flatten(-2).gather(-1, indices.flatten(-2)).view_as(indices)


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, config):
        output, _ = torch.ops.aten.max_pool2d_with_indices(input, *config)
        ctx.save_for_backward(input)
        ctx.config = config
        return output

    @staticmethod
    def backward(ctx, grad):
        (input,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the backward itself is differentiated
            return _MaxPoolBackward.apply(grad, input, ctx.config), None
        return _scatter(grad, input, ctx.config), None


class _MaxPoolBackward(torch.autograd.Function):
    """grad -> grad_input; its derivative gathers at the argmax (the input's is zero)."""

    @staticmethod
    def forward(ctx, grad, input, config):
        ctx.save_for_backward(input)
        ctx.config = config
        return _scatter(grad, input, config)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_grad_input):
        (input,) = ctx.saved_tensors
        return _gather(grad_grad_input, input, ctx.config), None, None


class lean_max_pool(TorchFunctionMode):
    """Context in which ``F.max_pool2d`` (no ``return_indices``) keeps no indices."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.max_pool2d:
            call = _MAX_POOL_SIGNATURE.bind(*args, **kwargs)
            call.apply_defaults()
            a = call.arguments
            input = a["input"]
            if (not a["return_indices"] and input.dim() in (3, 4) and input.requires_grad
                    and input.dtype.is_floating_point and not _has_tangent(input)):
                pair = torch.nn.modules.utils._pair
                kernel = pair(a["kernel_size"])
                stride = pair(a["stride"]) if a["stride"] else kernel  # None or []: kernel
                config = (kernel, stride, pair(a["padding"]), pair(a["dilation"]),
                          a["ceil_mode"])
                return _MaxPool.apply(input, config)
        return func(*args, **kwargs)


if compiled.load_problem() is None:
    @torch.library.register_fake("l2t_fast::max_pool2x2_backward")
    def _fake_backward(grad_output, input):
        return torch.empty_like(input)

    @torch.library.register_fake("l2t_fast::max_pool2x2_gather")
    def _fake_gather(grad_grad_input, input):
        return input.new_empty((*input.shape[:-2], input.shape[-2] // 2, input.shape[-1] // 2))
