"""The loss and every method under ``torch.autocast`` (the ``--amp bf16`` path).

Autocast gives bf16 features and leaves the regressors float32; the loss casts them to the
dtype its backend computes in. On the CPU that is float32 (no half kernels there), so a
loss under CPU autocast must equal the float32 loss of the same bf16 features exactly;
the GPU part (half inputs to the CUDA and Triton kernels) runs where CUDA is.
"""
import pytest
import torch

from l2t_fast.matching import backends
from l2t_fast.matching.loss import (weighted_feature_matching, weighted_feature_matching_grads,
                                    weighted_feature_matching_jvp)
from l2t_fast.methods import registry
from test_methods import make

PAIRS = [(0, 0), (1, 0), (1, 1)]


def problem(feature_dtype, device="cpu"):
    """bf16-like features (as autocast's convolutions give them) and float32 regressors."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=False):
        t = torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)
    source = [randn(3, 4, 6, 6, dtype=feature_dtype), randn(3, 5, 3, 3, dtype=feature_dtype)]
    target = [randn(3, 6, 6, 6, dtype=feature_dtype, grad=True),
              randn(3, 2, 4, 4, dtype=feature_dtype, grad=True)]
    weight = [randn(source[m].shape[1], target[n].shape[1], grad=True) for m, n in PAIRS]
    bias = [randn(source[m].shape[1], grad=True) for m, _ in PAIRS]
    channel_weights = [randn(3, source[m].shape[1]).softmax(1) for m, _ in PAIRS]
    return source, target, weight, bias, channel_weights


def as_float(tensors):
    return [t.detach().float().requires_grad_(t.requires_grad) for t in tensors]


def test_input_dtype_under_autocast():
    cpu = torch.device("cpu")
    assert backends.autocast_input_dtype("auto", cpu) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name in ("auto", "cpu", "reference"):
            assert backends.autocast_input_dtype(name, cpu) is torch.float32


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cpu_autocast_loss_is_the_float32_loss_of_the_same_features(backend):
    if backend not in backends.available_backends():
        pytest.skip(f"backend {backend} is not available here")
    source, target, weight, bias, what = problem(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = weighted_feature_matching(source, target, PAIRS, weight, bias, what,
                                         backend=backend)
    loss.backward()
    f_source, f_target, f_weight, f_bias = map(as_float, (source, target, weight, bias))
    expected = weighted_feature_matching(f_source, f_target, PAIRS, f_weight, f_bias,
                                         as_float(what), backend=backend)
    expected.backward()
    assert loss.dtype == torch.float32
    assert torch.equal(loss, expected)
    for ours, theirs in zip(weight + bias, f_weight + f_bias):
        assert ours.grad.dtype == torch.float32
        assert torch.equal(ours.grad, theirs.grad)
    for ours, theirs in zip(target, f_target):  # the gradient reaches the bf16 maps
        assert ours.grad.dtype == torch.bfloat16
        assert torch.equal(ours.grad, theirs.grad.bfloat16())


def test_cpu_autocast_grads_and_jvp_match_float32():
    source, target, weight, bias, what = problem(torch.bfloat16)
    tangents = [torch.ones_like(t) for t in target]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = weighted_feature_matching_grads(source, target, PAIRS, weight, bias, what)
        jvp = weighted_feature_matching_jvp(source, target, PAIRS, weight, bias, what,
                                            target_tangents=tangents)
    f_args = [as_float(x) for x in (source, target, weight, bias, what)]
    expected_grads = weighted_feature_matching_grads(*f_args[:2], PAIRS, *f_args[2:])
    expected_jvp = weighted_feature_matching_jvp(*f_args[:2], PAIRS, *f_args[2:],
                                                 target_tangents=as_float(tangents))
    for ours, theirs in zip(sum(grads, []), sum(expected_grads, [])):
        assert torch.equal(ours, theirs)
    assert torch.equal(jvp, expected_jvp)


def test_mixed_dtypes_outside_autocast_are_still_an_error():
    source, target, weight, bias, what = problem(torch.bfloat16)
    with pytest.raises(TypeError, match="mixed dtypes"):
        weighted_feature_matching(source, target, PAIRS, weight, bias, what)


def test_float64_is_not_cast_down_under_autocast():
    source, target, weight, bias, what = problem(torch.float64)
    weight = [w.detach().double() for w in weight]
    bias = [b.detach().double() for b in bias]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = weighted_feature_matching(source, target, PAIRS, weight, bias,
                                         [w.double() for w in what])
    assert loss.dtype == torch.float64


@pytest.mark.parametrize("name", list(registry()))
def test_every_method_trains_under_cpu_autocast(name):
    method, _, batch = make(name, lr=0.05)
    before = [p.detach().clone() for p in method.model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = method.train_step(batch)
    assert all(torch.isfinite(torch.tensor(v)) for v in loss.values())
    after = list(method.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert all(p.dtype == torch.float32 for p in after)


CUDA_BACKENDS = [name for name in ("cuda", "triton") if torch.cuda.is_available()
                 and name in backends.available_backends()]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_BACKENDS, reason="needs CUDA and a GPU backend")
@pytest.mark.parametrize("backend", CUDA_BACKENDS or ["cuda"])
def test_cuda_autocast_feeds_half_inputs_to_the_gpu_kernels(backend):
    device = torch.device("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert backends.autocast_input_dtype(backend, device) is torch.bfloat16
    source, target, weight, bias, what = problem(torch.bfloat16, device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = weighted_feature_matching(source, target, PAIRS, weight, bias, what,
                                         backend=backend)
    loss.backward()
    f_args = [as_float(x) for x in (source, target, weight, bias, what)]
    expected = weighted_feature_matching(*f_args[:2], PAIRS, *f_args[2:], backend="reference")
    assert loss.dtype == torch.float32
    # the regressors were rounded to bf16: 3e-2 relative, as the half kernels' own tests
    torch.testing.assert_close(loss, expected, rtol=3e-2, atol=0)
    assert all(w.grad is not None and w.grad.dtype == torch.float32 for w in weight)
