"""Fuzzing the op's input checks and the ``cpu`` kernels over shapes with zeros and ones.

An empty channel, row or column of any feature map is a ValueError naming the argument,
the layer and the shape (and a RuntimeError from the raw ops, never a crash); every other
shape, an empty batch included, gives the spec's float64 result and gradients.
"""
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import l2t_fast
from matching_reference import as_spec_args, random_problem, spec_loss

BACKENDS = [b for b in ("reference", "cpu") if b in l2t_fast.available_backends()]
AXES = ("channels", "height", "width")


@st.composite
def shapes_with_zeros(draw):
    """Source and target shapes (sizes 1 to 3), pairs, and, half the time, one map with an
    empty channel, row or column axis; the batch may be 0 too."""
    batch = draw(st.integers(0, 2))
    counts = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    maps = [[[batch] + [draw(st.integers(1, 3)) for _ in AXES] for _ in range(count)]
            for count in counts]
    if draw(st.booleans()):
        side = draw(st.integers(0, 1))
        index = draw(st.integers(0, counts[side] - 1))
        maps[side][index][draw(st.integers(1, 3))] = 0
    all_pairs = [(m, n) for m in range(counts[0]) for n in range(counts[1])]
    pairs = draw(st.lists(st.sampled_from(all_pairs), min_size=1, max_size=3))
    options = dict(bias=draw(st.booleans()), channel_weights=draw(st.booleans()),
                   pair_weights=draw(st.booleans()))
    return maps[0], maps[1], pairs, options, draw(st.integers(0, 2**31 - 1))


def first_empty(source, target):
    """(argument, index, axis name, shape) of the first map the checks must refuse."""
    for name, maps in (("source_feats", source), ("target_feats", target)):
        for i, shape in enumerate(maps):
            for axis, what in enumerate(AXES, start=1):
                if shape[axis] == 0:
                    return name, i, what, shape
    return None


def raw_op_args(problem):
    source, target = problem["source_feats"], problem["target_feats"]
    pairs = problem["pairs"]
    bias = problem.get("bias") or [w.new_zeros(w.shape[0]) for w in problem["weight"]]
    detach = lambda tensors: [t.detach() for t in tensors]  # noqa: E731
    return (detach(source), detach(target), detach(problem["weight"]), detach(bias),
            [m for m, _ in pairs], [n for _, n in pairs])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60)
@given(case=shapes_with_zeros(), reduction=st.sampled_from(["mean", "none"]))
def test_empty_maps_are_refused_and_the_rest_match_the_spec(backend, case, reduction):
    source, target, pairs, options, seed = case
    problem = random_problem(source, target, pairs,
                             generator=torch.Generator().manual_seed(seed), **options)
    empty = first_empty(source, target)
    if empty is not None:
        name, i, what, shape = empty
        with pytest.raises(ValueError, match=re.escape(f"{name}[{i}] has no {what} "
                                                       f"(shape {shape})")):
            l2t_fast.weighted_feature_matching(**problem, reduction=reduction, backend=backend)
        if backend == "cpu":  # the raw op checks too: an error, not a crash
            with pytest.raises(RuntimeError, match="channels, height and width must be >= 1"):
                torch.ops.l2t_fast.channel_errors(*raw_op_args(problem))
        return

    ours = l2t_fast.weighted_feature_matching(**problem, reduction=reduction, backend=backend)
    spec = spec_loss(**as_spec_args(problem), reduction=reduction)
    torch.testing.assert_close(ours, spec, rtol=1e-9, atol=1e-11, equal_nan=True)
    if source[0][0] == 0:
        return  # an empty batch: the mean is NaN (as the spec's), there is nothing to differentiate
    inputs = [t for key in ("source_feats", "target_feats", "weight", "bias", "channel_weights",
                            "pair_weights") for t in problem.get(key) or []]
    upstream = torch.rand_like(spec)
    ours_grads = torch.autograd.grad(ours, inputs, upstream, allow_unused=True)
    spec_grads = torch.autograd.grad(spec, inputs, upstream, allow_unused=True)
    for a, b in zip(ours_grads, spec_grads):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
