"""The Triton backend against the float64 statement of docs/SPEC.md section 1 in the tests.

Without CUDA the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), which executes every program in Python: shapes stay tiny. Tests
marked ``gpu`` run the same checks at realistic sizes and in half precision on a GPU.
"""
import math

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import l2t_fast
from l2t_fast.matching import backends
from matching_reference import spec_loss

pytestmark = pytest.mark.skipif("triton" not in backends.available_backends(),
                                reason="the triton backend is not available here")


def make_case(batch, source_shapes, target_shapes, pairs, dtype=torch.float64, bias=True,
              channel_weights=False, pair_weights=False, device="cpu", seed=0):
    """Inputs of the loss; source_shapes/target_shapes are (C, H, W) per layer."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(
            device=device, dtype=dtype)

    source = [randn(batch, *shape) for shape in source_shapes]
    target = [randn(batch, *shape) for shape in target_shapes]
    inputs = dict(source_feats=source, target_feats=target, pairs=pairs,
                  weight=[randn(source_shapes[m][0], target_shapes[n][0],
                                scale=1 / math.sqrt(target_shapes[n][0])) for m, n in pairs])
    if bias:
        inputs["bias"] = [randn(source_shapes[m][0], scale=0.3) for m, _ in pairs]
    if channel_weights:
        inputs["channel_weights"] = [torch.softmax(randn(batch, source_shapes[m][0]), dim=1)
                                     for m, _ in pairs]
    if pair_weights:
        inputs["pair_weights"] = [randn(batch).abs() for _ in pairs]
    return inputs


def differentiable(inputs):
    """The tensors of ``inputs`` that the loss differentiates, set to require grad."""
    tensors = []
    for name in ("source_feats", "target_feats", "weight", "bias", "channel_weights",
                 "pair_weights"):
        for t in inputs.get(name) or ():
            t.requires_grad_(True)
            tensors.append(t)
    return tensors


def triton_loss(inputs, **options):
    return l2t_fast.weighted_feature_matching(**inputs, backend="triton", **options)


def reference_loss(inputs, **options):
    return spec_loss(inputs["source_feats"], inputs["target_feats"], inputs["pairs"],
                     inputs["weight"], inputs.get("bias"), inputs.get("channel_weights"),
                     inputs.get("pair_weights"), **options)


# (batch, source (C, H, W) per layer, target (C, H, W) per layer, pairs): resize up, down,
# identity, non-square, batch 1, one pair and many pairs sharing layers.
CASES = {
    "one_pair_same_size": (1, [(3, 4, 4)], [(2, 4, 4)], [(0, 0)]),
    "resize_up_non_square": (2, [(3, 3, 2)], [(4, 6, 5)], [(0, 0)]),
    "resize_down": (2, [(2, 6, 5)], [(3, 4, 3)], [(0, 0)]),
    "all_pairs": (2, [(3, 4, 4), (5, 2, 2)], [(2, 4, 4), (4, 3, 2)],
                  [(0, 0), (0, 1), (1, 0), (1, 1)]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("weights", ["none", "bias", "all"])
def test_forward_and_gradients_match_the_spec_in_float64(case, weights):
    batch, source_shapes, target_shapes, pairs = CASES[case]
    inputs = make_case(batch, source_shapes, target_shapes, pairs, bias=weights != "none",
                       channel_weights=weights == "all", pair_weights=weights == "all")
    tensors = differentiable(inputs)
    loss, expected = triton_loss(inputs), reference_loss(inputs)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss, tensors)
    expected_grads = torch.autograd.grad(expected, tensors)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_double_backward_matches_the_spec():
    """The meta-gradient path: differentiate a function of the loss's own gradient."""
    inputs = make_case(2, [(3, 4, 4), (2, 2, 3)], [(2, 3, 3)], [(0, 0), (1, 0)],
                       channel_weights=True, pair_weights=True)
    tensors = differentiable(inputs)
    directions = [torch.randn_like(t) for t in tensors]

    def second_order(loss_fn):
        grads = torch.autograd.grad(loss_fn(inputs), tensors, create_graph=True)
        along = sum((g * d).sum() for g, d in zip(grads, directions))
        return torch.autograd.grad(along, tensors)

    for got, want in zip(second_order(triton_loss), second_order(reference_loss)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gradcheck_and_gradgradcheck_of_the_full_loss():
    inputs = make_case(2, [(2, 3, 3)], [(2, 2, 4)], [(0, 0)], channel_weights=True,
                       pair_weights=True)
    tensors = differentiable(inputs)
    names = ("source_feats", "target_feats", "weight", "bias", "channel_weights",
             "pair_weights")
    sizes = [len(inputs[name]) for name in names]

    def loss(*flat):
        rebuilt, start = dict(inputs), 0
        for name, size in zip(names, sizes):
            rebuilt[name] = list(flat[start:start + size])
            start += size
        return triton_loss(rebuilt)

    assert torch.autograd.gradcheck(loss, tensors, fast_mode=True)
    assert torch.autograd.gradgradcheck(loss, tensors, fast_mode=True)


@pytest.mark.parametrize("case", ["resize_up_non_square", "all_pairs"])
def test_float32_is_close_to_the_float64_spec(case):
    batch, source_shapes, target_shapes, pairs = CASES[case]
    inputs = make_case(batch, source_shapes, target_shapes, pairs, dtype=torch.float32,
                       channel_weights=True)
    tensors = differentiable(inputs)
    loss = triton_loss(inputs)
    assert loss.dtype == torch.float32
    expected = reference_loss(inputs)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(loss, tensors),
                         torch.autograd.grad(expected, tensors)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)


def test_reduction_none_and_per_pair_beta():
    batch, source_shapes, target_shapes, pairs = CASES["all_pairs"]
    inputs = make_case(batch, source_shapes, target_shapes, pairs, pair_weights=True)
    out = triton_loss(inputs, reduction="none", beta=[0.5, 1.0, 2.0, 0.25])
    assert out.shape == (len(pairs), batch)
    expected = torch.stack([beta * row for beta, row in zip(
        [0.5, 1.0, 2.0, 0.25], reference_loss(inputs, reduction="none", beta=1.0))])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_channels_last_and_non_contiguous_inputs(layout):
    inputs = make_case(2, [(3, 4, 5)], [(4, 3, 4)], [(0, 0)], channel_weights=True)
    for name in ("source_feats", "target_feats"):
        if layout == "channels_last":
            inputs[name] = [t.contiguous(memory_format=torch.channels_last)
                            for t in inputs[name]]
        else:  # every other column of a map twice as wide: no dense layout at all
            inputs[name] = [torch.cat([t, t], dim=3)[..., ::2] for t in inputs[name]]
    inputs["weight"] = [w.t().contiguous().t() for w in inputs["weight"]]  # column-major
    tensors = differentiable(inputs)
    loss, expected = triton_loss(inputs), reference_loss(inputs)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss, tensors)
    for got, want, t in zip(grads, torch.autograd.grad(expected, tensors), tensors):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        if layout == "channels_last" and t.dim() == 4:
            assert got.is_contiguous(memory_format=torch.channels_last)


shape = st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 6))


# No shrinking: under the interpreter each example takes a second or so.
@settings(max_examples=6, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(batch=st.integers(1, 3), source_shapes=st.lists(shape, min_size=1, max_size=2),
       target_shapes=st.lists(shape, min_size=1, max_size=2), seed=st.integers(0, 2**16),
       data=st.data())
def test_random_shapes_match_the_spec(batch, source_shapes, target_shapes, seed, data):
    all_pairs = [(m, n) for m in range(len(source_shapes)) for n in range(len(target_shapes))]
    pairs = data.draw(st.lists(st.sampled_from(all_pairs), min_size=1, max_size=4))
    inputs = make_case(batch, source_shapes, target_shapes, pairs, channel_weights=True,
                       seed=seed)
    tensors = differentiable(inputs)
    loss, expected = triton_loss(inputs), reference_loss(inputs)
    torch.testing.assert_close(loss, expected, rtol=1e-11, atol=1e-12)
    # Layers no pair reads get zero gradients.
    for got, want in zip(torch.autograd.grad(loss, tensors, allow_unused=True,
                                             materialize_grads=True),
                         torch.autograd.grad(expected, tensors, allow_unused=True,
                                             materialize_grads=True)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def count_launches(monkeypatch):
    """Counts the kernel launches of l2t_fast's Triton ops."""
    from l2t_fast.matching.backends.triton import ops
    launches = []
    real_wrap = ops.wrap_triton

    def counting_wrap(kernel):
        wrapped = real_wrap(kernel)

        class Counting:
            def __getitem__(self, grid):
                launches.append(grid)
                return wrapped[grid]
        return Counting()

    monkeypatch.setattr(ops, "wrap_triton", counting_wrap)
    return launches


@pytest.mark.parametrize("layers, launches_per_op", [(2, 1), (5, 2)])
def test_launches_do_not_grow_with_the_number_of_pairs(monkeypatch, layers, launches_per_op):
    """One launch per op for up to four source layers (one per group of four beyond)."""
    pairs = [(m, 0) for m in range(layers)] + [(m, 1) for m in range(layers)]
    inputs = make_case(1, [(2, 2, 2)] * layers, [(2, 2, 2), (3, 1, 2)], pairs)
    tensors = differentiable(inputs)
    launches = count_launches(monkeypatch)
    loss = triton_loss(inputs)
    assert len(launches) == launches_per_op
    torch.testing.assert_close(loss, reference_loss(inputs), rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss, tensors, create_graph=True)
    assert len(launches) == 2 * launches_per_op
    torch.autograd.grad(sum(g.sum() for g in grads), tensors)
    assert len(launches) == 3 * launches_per_op


def op_arguments(requires_grad):
    inputs = make_case(2, [(2, 3, 3), (3, 2, 2)], [(2, 2, 3)], [(0, 0), (1, 0)])
    source, target = inputs["source_feats"], inputs["target_feats"]
    weight, bias = inputs["weight"], inputs["bias"]
    if requires_grad:
        for t in source + target + weight + bias:
            t.requires_grad_(True)
    return source, target, weight, bias, [0, 1], [0, 0]


def test_opcheck_of_the_three_ops():
    ops = torch.ops.l2t_fast_triton
    source, target, weight, bias, pair_source, pair_target = op_arguments(requires_grad=True)
    grad_errors = torch.randn(2, 5, dtype=torch.float64)
    torch.library.opcheck(ops.channel_errors, (source, target, weight, bias, pair_source,
                                               pair_target))
    torch.library.opcheck(ops.channel_errors_backward,
                          (grad_errors, source, target, weight, bias, pair_source, pair_target,
                           [True, False, True, True]))
    # The double backward is not differentiated again (its inputs need no grad).
    source, target, weight, bias, pair_source, pair_target = op_arguments(requires_grad=False)
    tangents = ([torch.randn_like(source[0]), None], [torch.randn_like(target[0])],
                [None, torch.randn_like(weight[1])], [torch.randn_like(bias[0]), None])
    torch.library.opcheck(ops.channel_errors_double_backward,
                          (grad_errors, *tangents, source, target, weight, bias, pair_source,
                           pair_target, [True, True, True, False]))


def test_ops_reject_inconsistent_arguments():
    source, target, weight, bias, _, _ = op_arguments(requires_grad=False)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.l2t_fast_triton.channel_errors(source, target, weight, bias, [0, 2], [0, 0])
    with pytest.raises(ValueError, match="weight must be"):
        torch.ops.l2t_fast_triton.channel_errors(source, target, weight[::-1], bias, [0, 1],
                                                 [0, 0])


def test_torch_compile_fullgraph_of_the_loss():
    """Under the interpreter the ops are opaque nodes (see ops._define) and inductor's CPU
    compile is slow on CI machines: aot_eager checks tracing, fake kernels and autograd."""
    inputs = make_case(2, [(3, 4, 4)], [(2, 3, 3), (2, 4, 4)], [(0, 0), (0, 1)],
                       dtype=torch.float32, channel_weights=True)
    tensors = differentiable(inputs)

    def loss(source, target, weight, bias, channel_weights):
        return l2t_fast.weighted_feature_matching(source, target, inputs["pairs"], weight, bias,
                                                  channel_weights, backend="triton")

    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    args = [inputs[name] for name in ("source_feats", "target_feats", "weight", "bias",
                                      "channel_weights")]
    got, expected = compiled(*args), loss(*args)
    torch.testing.assert_close(got, expected)
    for got_grad, want in zip(torch.autograd.grad(got, tensors),
                              torch.autograd.grad(expected, tensors)):
        torch.testing.assert_close(got_grad, want)


# On a GPU: the target configuration's layer shapes (ResNet34 -> ResNet18 at 224x224),
# smaller batch, all 16 pairs; float32 with TF32 dots, and half precision.
GPU_SHAPES = [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
GPU_PAIRS = [(m, n) for m in range(4) for n in range(4)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 2e-3), (torch.float64, 1e-10),
                                         (torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_gpu_all_pairs_at_realistic_sizes(dtype, rtol):
    inputs = make_case(4, GPU_SHAPES, GPU_SHAPES, GPU_PAIRS, dtype=dtype, device="cuda",
                       channel_weights=True, pair_weights=True)
    tensors = differentiable(inputs)
    loss = triton_loss(inputs)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = reference_loss(inputs)
    torch.testing.assert_close(loss.double(), expected, rtol=rtol, atol=0)
    grads = torch.autograd.grad(loss, tensors)
    for got, want in zip(grads, torch.autograd.grad(expected, tensors)):
        assert got.dtype == dtype
        scale = want.double().abs().max()
        torch.testing.assert_close(got.double() / scale, want.double() / scale, rtol=0,
                                   atol=10 * rtol)


@pytest.mark.gpu
def test_gpu_double_backward_at_realistic_sizes():
    inputs = make_case(2, GPU_SHAPES, GPU_SHAPES, GPU_PAIRS, dtype=torch.float64, device="cuda",
                       channel_weights=True, pair_weights=True)
    tensors = differentiable(inputs)

    def second_order(loss_fn):
        grads = torch.autograd.grad(loss_fn(inputs), tensors, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), tensors)

    for got, want in zip(second_order(triton_loss), second_order(reference_loss)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
