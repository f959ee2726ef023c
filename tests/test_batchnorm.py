"""The fused train-mode BatchNorm (l2t_fast.methods.l2tww.batchnorm) against PyTorch's own: values,
running statistics, first derivatives and the double backward that the meta step runs."""
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import forward_ad

from l2t_fast.matching.backends import compiled
from l2t_fast.methods.l2tww.batchnorm import fused_batch_norm

pytestmark = pytest.mark.skipif(compiled.load_problem() is not None,
                                reason="compiled extension not built")


def double_backward(shape, dtype, fused, affine=True, seed=0, channels_last=False):
    """Output, running statistics, first derivatives and the double backward along random
    adjoints, of train-mode F.batch_norm with or without the fused context."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=generator, dtype=dtype)

    channels = shape[1]
    x = randn(*shape) * 3 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = randn(channels).requires_grad_() if affine else None
    bias = randn(channels).requires_grad_() if affine else None
    running_mean, running_var = randn(channels), randn(channels).exp()
    with fused_batch_norm() if fused else nullcontext():
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training=True,
                         momentum=0.3, eps=1e-3)
    assert type(y.grad_fn).__name__.startswith("_TrainBatchNorm") == fused
    grad_out = randn(*shape).requires_grad_()
    inputs = [x] + ([weight, bias] if affine else [])
    first = torch.autograd.grad(y, inputs, grad_out, create_graph=True)
    adjoints = [randn(*t.shape) for t in first]
    wrt = [x, grad_out] + ([weight] if affine else [])
    second = torch.autograd.grad(first, wrt, adjoints)
    return [y, running_mean, running_var, *first, *second]


shapes = st.integers(2, 4).flatmap(lambda dims: st.tuples(
    st.integers(2, 5), st.integers(1, 6), *[st.integers(1, 7)] * (dims - 2)))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, affine=st.booleans(), seed=st.integers(0, 2**16))
def test_same_as_pytorch_in_float64(shape, affine, seed):
    expected = double_backward(shape, torch.float64, fused=False, affine=affine, seed=seed)
    actual = double_backward(shape, torch.float64, fused=True, affine=affine, seed=seed)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
def test_same_as_pytorch_in_float32_on_a_real_map(channels_last):
    expected = double_backward((8, 16, 12, 12), torch.float32, False, channels_last=channels_last)
    actual = double_backward((8, 16, 12, 12), torch.float32, True, channels_last=channels_last)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_the_fused_kernel_runs_and_its_second_derivatives_are_numerically_right():
    def first_derivatives(x, weight, bias, grad_out):
        with fused_batch_norm():
            y = F.batch_norm(x, None, None, weight, bias, training=True)
        return torch.autograd.grad(y, (x, weight, bias), grad_out, create_graph=True)

    generator = torch.Generator().manual_seed(1)
    args = [torch.randn(*s, generator=generator, dtype=torch.float64, requires_grad=True)
            for s in [(3, 2, 4), (2,), (2,), (3, 2, 4)]]
    profiled = torch.profiler.profile()
    with profiled:
        assert torch.autograd.gradcheck(first_derivatives, args)
    assert any(e.key == "l2t_fast::batch_norm_double_backward"
               for e in profiled.key_averages())


def test_eval_mode_and_forward_mode_tangents_go_to_pytorch():
    x, weight = torch.randn(4, 3, 5), torch.randn(3)
    mean, var = torch.zeros(3), torch.ones(3)
    with fused_batch_norm():
        y = F.batch_norm(x, mean, var, weight, training=False)
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(x, torch.ones_like(x))
            tangent = forward_ad.unpack_dual(F.batch_norm(dual, None, None, weight,
                                                          training=True)).tangent
    torch.testing.assert_close(y, F.batch_norm(x, mean, var, weight, training=False))
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        expected = forward_ad.unpack_dual(F.batch_norm(dual, None, None, weight,
                                                       training=True)).tangent
    torch.testing.assert_close(tangent, expected)


def test_one_value_per_channel_still_raises_pytorchs_error():
    with fused_batch_norm(), pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(torch.randn(1, 3), None, None, training=True)


def test_opcheck():
    generator = torch.Generator().manual_seed(2)
    x, grad_out, grad_grad_input = (torch.randn(3, 4, 5, generator=generator) for _ in range(3))
    weight, grad_grad_weight, grad_grad_bias = (torch.randn(4, generator=generator)
                                                for _ in range(3))
    mean = x.mean((0, 2))
    invstd = (x.var((0, 2), unbiased=False) + 1e-5).rsqrt()
    torch.library.opcheck(torch.ops.l2t_fast.batch_norm_double_backward,
                          (x, weight, grad_out, mean, invstd, grad_grad_input,
                           grad_grad_weight, grad_grad_bias))


@pytest.mark.gpu
def test_cuda_tensors_go_to_pytorchs_batch_norm():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = torch.randn(4, 3, 5, 5, device="cuda", requires_grad=True)
    weight = torch.randn(3, device="cuda", requires_grad=True)
    with fused_batch_norm():
        y = F.batch_norm(x, None, None, weight, training=True)
    assert not type(y.grad_fn).__name__.startswith("_TrainBatchNorm")
    torch.testing.assert_close(y, F.batch_norm(x, None, None, weight, training=True))
