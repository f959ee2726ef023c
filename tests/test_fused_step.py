"""The fused training step of the `cpu` backend: a differentiated "mean" loss computes its
gradients with its value (`channel_errors_with_grads`), against the spec's float64 math."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import l2t_fast
from matching_reference import as_spec_args, problems, random_problem, spec_loss

pytestmark = pytest.mark.skipif("cpu" not in l2t_fast.available_backends(),
                                reason="needs the compiled extension")
KEYS = ("source_feats", "target_feats", "weight", "bias", "channel_weights", "pair_weights")


def inputs_of(problem):
    return [t for key in KEYS for t in problem.get(key) or [] if t.requires_grad]


def loss_of(problem, **kwargs):
    return l2t_fast.weighted_feature_matching(**problem, backend="cpu", **kwargs)


def is_fused(loss):
    return type(loss.grad_fn).__name__ == "_FusedTrainingStepBackward"


def assert_grads_close(ours, spec, rtol=1e-9, atol=1e-11):
    for a, b in zip(ours, spec):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            assert a is not None
            torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol)


def grads(output, inputs, grad_output=None, **kwargs):
    return torch.autograd.grad(output, inputs, grad_output, allow_unused=True, **kwargs)


@settings(max_examples=15)
@given(case=problems(), beta=st.sampled_from([0.5, 2.0]),
       source_grad=st.booleans())
def test_float64_value_and_gradients_match_spec(case, beta, source_grad):
    source, target, pairs, options, seed = case
    problem = random_problem(source, target, pairs,
                             generator=torch.Generator().manual_seed(seed), **options)
    if not source_grad:  # the usual training step: the source network is fixed
        problem["source_feats"] = [s.detach() for s in problem["source_feats"]]
    inputs = inputs_of(problem)
    spec = spec_loss(**as_spec_args(problem), beta=beta)
    upstream = torch.rand((), dtype=torch.float64) + 0.5
    spec_grads = grads(spec, inputs, upstream, create_graph=True)

    ours = loss_of(problem, beta=beta)
    assert is_fused(ours)
    torch.testing.assert_close(ours, spec, rtol=1e-9, atol=1e-11)
    # The kept gradients, scaled by grad_output; then, through the retained graph, the
    # recomputed ones (the kept ones were handed over).
    assert_grads_close(grads(ours, inputs, upstream, retain_graph=True), spec_grads)
    assert_grads_close(grads(ours, inputs, upstream), spec_grads)

    # Double backward: the gradient of <grad, v> for a random direction v.
    ours_grads = grads(loss_of(problem, beta=beta), inputs, upstream, create_graph=True)
    used = [(a, b) for a, b in zip(ours_grads, spec_grads) if b is not None]
    directions = [torch.randn_like(b) for _, b in used]
    ours_inner = sum((a * v).sum() for (a, _), v in zip(used, directions))
    spec_inner = sum((b * v).sum() for (_, b), v in zip(used, directions))
    assert_grads_close(grads(ours_inner, inputs), grads(spec_inner, inputs))


def shared_problem(dtype=torch.float64, seed=1):
    # Up- and down-sampling, identical sizes, non-square maps and a shared target layer.
    return random_problem([(3, 5, 6, 4), (3, 3, 3, 7)], [(3, 4, 6, 4), (3, 6, 9, 5)],
                          [(0, 0), (1, 0), (0, 1), (1, 1), (1, 1)], dtype=dtype,
                          generator=torch.Generator().manual_seed(seed))


def test_small_maps_several_samples_to_a_block():
    """Samples side by side in one block (4x4 and 3x5 maps, uneven chunks of a batch of 41,
    a channels_last target): the ops against the spec, first and second order."""
    problem = random_problem([(41, 5, 6, 4), (41, 3, 2, 2)], [(41, 4, 4, 4), (41, 6, 3, 5)],
                             [(0, 0), (1, 0), (0, 1), (1, 1)],
                             generator=torch.Generator().manual_seed(3))
    problem["target_feats"][1] = (problem["target_feats"][1].detach()
                                  .to(memory_format=torch.channels_last).requires_grad_())
    inputs = inputs_of(problem)
    spec = spec_loss(**as_spec_args(problem))
    spec_grads = grads(spec, inputs, create_graph=True)
    ours = loss_of(problem)
    assert is_fused(ours)
    torch.testing.assert_close(ours, spec, rtol=1e-9, atol=1e-11)
    assert_grads_close(grads(ours, inputs), spec_grads)
    # The forward op alone, against the errors written out from the spec (no channel or
    # pair weights: one pair's loss is then the mean of its errors).
    errors = torch.ops.l2t_fast.channel_errors(*op_args(problem))
    unweighted = {k: v for k, v in problem.items()
                  if k not in ("channel_weights", "pair_weights")}
    per_pair = spec_loss(**as_spec_args(unweighted), beta=1.0, reduction="none")  # [pairs, B]
    widths = [problem["source_feats"][m].shape[1] for m, _ in problem["pairs"]]
    torch.testing.assert_close(torch.stack([e.mean(1) for e in errors.split(widths, 1)]),
                               per_pair.detach(), rtol=1e-9, atol=1e-11)
    ours_grads = grads(loss_of(problem), inputs, create_graph=True)
    directions = [torch.randn_like(b) for b in spec_grads]
    ours_inner = sum((a * v).sum() for a, v in zip(ours_grads, directions))
    spec_inner = sum((b * v).sum() for b, v in zip(spec_grads, directions))
    assert_grads_close(grads(ours_inner, inputs), grads(spec_inner, inputs))


def test_unfused_where_it_cannot_help():
    problem = shared_problem()
    assert not is_fused(loss_of(problem, reduction="none"))
    with torch.no_grad():
        assert loss_of(problem).grad_fn is None
    detached = {k: [t.detach() for t in v] if k in KEYS else v for k, v in problem.items()}
    assert loss_of(detached).grad_fn is None
    assert not is_fused(l2t_fast.weighted_feature_matching(**problem, backend="reference"))


def test_only_the_weights_require_grad():
    # The meta step's outer gradient: E is the only thing the weights' gradient needs.
    problem = shared_problem()
    for key in ("source_feats", "target_feats", "weight", "bias"):
        problem[key] = [t.detach() for t in problem[key]]
    weights = problem["channel_weights"] + problem["pair_weights"]
    ours = loss_of(problem)
    assert is_fused(ours)
    assert_grads_close(grads(ours, weights), grads(spec_loss(**as_spec_args(problem)), weights))


def op_args(problem):
    groups = tuple([t.detach() for t in problem[key]] for key in KEYS[:4])
    pairs = problem["pairs"]
    return groups + ([m for m, _ in pairs], [n for _, n in pairs])


def test_fused_op_equals_the_forward_and_backward_ops():
    args = op_args(shared_problem(torch.float32))
    width = sum(args[0][m].shape[1] for m in args[4])
    grad_errors = torch.randn(3, width)
    ops = torch.ops.l2t_fast
    for mask in ([True] * 4, [False, True, True, False], [False] * 4):
        errors, *fused = ops.channel_errors_with_grads(grad_errors, *args, mask)
        torch.testing.assert_close(errors, ops.channel_errors(*args), rtol=1e-6, atol=0)
        # the same blocks scaled the same way: the gradients are the backward's, bit for bit
        # (the bias sums are vectorised along with the squares: the same to rounding)
        for group, (ours, theirs) in enumerate(
                zip(fused, ops.channel_errors_backward(grad_errors, *args, mask))):
            assert len(ours) == len(theirs)
            for a, b in zip(ours, theirs):
                if group < 3:
                    assert torch.equal(a, b)
                else:
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_opcheck():
    args = op_args(shared_problem())
    width = sum(args[0][m].shape[1] for m in args[4])
    torch.library.opcheck(torch.ops.l2t_fast.channel_errors_with_grads,
                          (torch.randn(3, width, dtype=torch.float64),) + args + ([True] * 4,))


def test_bit_identical_across_thread_counts():
    # 10x14 and 24x24 maps in tiles of one sample, 4x4 ones several samples to a block; the
    # last pair's regressor (70 x 64) is large enough for the chunks' sums to be merged by
    # several threads.
    problem = random_problem([(37, 6, 5, 7), (37, 70, 3, 3)],
                             [(37, 5, 10, 14), (37, 3, 24, 24), (37, 4, 4, 4), (37, 64, 4, 4)],
                             [(0, 0), (0, 1), (0, 2), (1, 3)], dtype=torch.float32,
                             generator=torch.Generator().manual_seed(0))
    inputs = inputs_of(problem)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            loss = loss_of(problem)
            results.append([loss.detach()] + list(grads(loss, inputs)))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph():
    # Compiled graphs keep the separate ops; the result equals the eager fused step's.
    problem = shared_problem()
    inputs = inputs_of(problem)

    def step(problem):
        return loss_of(problem) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    actual, expected = compiled(problem), step(problem)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)
    assert_grads_close(grads(actual, inputs), grads(expected, inputs), rtol=1e-12, atol=1e-14)
