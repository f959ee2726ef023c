"""Max pooling without saved indices (l2t_fast.methods.l2tww.max_pool) against PyTorch's own,
bit for bit: the output, the backward and both derivatives of the backward, on maps with
ties (ReLU zeros), NaN and -inf, odd sizes and other window shapes; and the graph keeps no
index tensor."""
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import forward_ad

from l2t_fast.matching.backends import compiled
from l2t_fast.methods.l2tww import max_pool
from l2t_fast.methods.l2tww.max_pool import lean_max_pool

CONFIGS = [dict(kernel_size=2), dict(kernel_size=2, stride=2),
           dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2, ceil_mode=True),
           dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1))]


def pool_derivatives(x, config, lean, seed=0):
    """Output, backward along u, and the double backward along w into (u, x)."""
    generator = torch.Generator().manual_seed(seed)
    x = x.clone().requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with lean_max_pool() if lean else nullcontext(), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = F.max_pool2d(x, **config)
        u = torch.randn(y.shape, generator=generator, dtype=x.dtype).requires_grad_()
        (g,) = torch.autograd.grad(y, x, u, create_graph=True)
    w = torch.randn(g.shape, generator=generator, dtype=x.dtype)
    grad_u, grad_x = torch.autograd.grad((g * w).sum(), [u, x], allow_unused=True)
    grad_x = torch.zeros_like(x) if grad_x is None else grad_x  # ours: None for the zero
    return [y, g, grad_u, grad_x], saved


def special_map(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=dtype).relu()  # ties at zero
    flat = x.view(-1)
    flat[0] = float("nan")
    flat[-1] = -float("inf")
    flat[len(flat) // 2] = float("nan")
    return x


def assert_bits_equal(ours, theirs):
    """Equal bits, NaN for NaN (the sign of a zero counts)."""
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a.isnan(), b.isnan())
        bits = torch.int64 if a.dtype == torch.float64 else torch.int32
        assert torch.equal(torch.nan_to_num(a, 0.0).reshape(-1).view(bits),
                           torch.nan_to_num(b, 0.0).reshape(-1).view(bits))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 7, 9), (3, 6, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_bits_as_pytorch_and_no_indices_saved(config, shape, dtype):
    x = special_map(shape, dtype, seed=1)
    theirs, saved_by_pytorch = pool_derivatives(x, config, lean=False)
    ours, saved_by_us = pool_derivatives(x, config, lean=True)
    assert_bits_equal(ours, theirs)
    assert any(t.dtype == torch.int64 for t in saved_by_pytorch)
    assert not any(t.dtype == torch.int64 for t in saved_by_us)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), channels=st.integers(1, 4), height=st.integers(2, 11),
       width=st.integers(2, 11), seed=st.integers(0, 2 ** 16), double=st.booleans())
def test_random_2x2_maps_same_bits_as_pytorch(batch, channels, height, width, seed, double):
    dtype = torch.float64 if double else torch.float32
    x = special_map((batch, channels, height, width), dtype, seed)
    theirs, _ = pool_derivatives(x, dict(kernel_size=2), lean=False, seed=seed)
    ours, _ = pool_derivatives(x, dict(kernel_size=2), lean=True, seed=seed)
    assert_bits_equal(ours, theirs)


@pytest.mark.skipif(compiled.load_problem() is not None, reason="compiled extension not built")
def test_2x2_kernels_are_taken_pass_opcheck_and_refuse_bad_shapes(monkeypatch):
    x = special_map((2, 3, 6, 7), torch.float64, seed=2)
    calls = []
    real = max_pool._scatter
    monkeypatch.setattr(max_pool, "_scatter",
                        lambda *args: calls.append(max_pool._compiled_2x2(*args[1:])) or real(*args))
    pool_derivatives(x, dict(kernel_size=2), lean=True)
    assert calls == [True]
    grad = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.l2t_fast.max_pool2x2_backward.default, (grad, x))
    torch.library.opcheck(torch.ops.l2t_fast.max_pool2x2_gather.default, (torch.randn_like(x), x))
    with pytest.raises(RuntimeError, match=r"grad_output is \[2, 3, 3, 4\], expected \[2, 3, 3, 3\]"):
        torch.ops.l2t_fast.max_pool2x2_backward(torch.zeros(2, 3, 3, 4, dtype=torch.float64), x)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.l2t_fast.max_pool2x2_gather(torch.randn_like(x), x.transpose(2, 3))


def test_forward_mode_and_no_grad_calls_go_to_pytorch():
    x = special_map((2, 3, 8, 8), torch.float64, seed=3)
    direction = torch.randn_like(x)

    def tangent(lean):
        with lean_max_pool() if lean else nullcontext(), forward_ad.dual_level():
            return forward_ad.unpack_dual(F.max_pool2d(forward_ad.make_dual(x, direction),
                                                       2)).tangent

    assert torch.equal(tangent(lean=True), tangent(lean=False))
    with lean_max_pool():
        assert F.max_pool2d(x, 2).grad_fn is None
        assert type(F.max_pool2d(x.requires_grad_(), 2).grad_fn).__name__ == "_MaxPoolBackward"
