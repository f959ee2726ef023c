"""The `cpu` kernels sum over samples in a fixed order: the same inputs give bit-identical
values and gradients (first and second order) on every call and at every thread count."""
import pytest
import torch

import l2t_fast
from matching_reference import random_problem

pytestmark = pytest.mark.skipif("cpu" not in l2t_fast.available_backends(),
                                reason="needs the compiled extension")
THREADS = (1, 2, 3, 8)


def outputs(problem):
    """Loss, its gradients in everything, and one second-order product."""
    inputs = [t for key in ("source_feats", "target_feats", "weight", "bias", "channel_weights",
                            "pair_weights") for t in problem[key]]
    loss = l2t_fast.weighted_feature_matching(**problem, backend="cpu")
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    second = torch.autograd.grad(sum(g.square().sum() for g in grads), problem["weight"])
    return [loss.detach()] + [g.detach() for g in grads] + list(second)


def test_bit_identical_across_calls_and_thread_counts():
    # a batch of 37 (not a multiple of any thread count) and maps big enough to split into
    # several blocks, float32 so that a change of summation order shows in the last bits
    generator = torch.Generator().manual_seed(0)
    problem = random_problem([(37, 6, 5, 7), (37, 4, 12, 12)], [(37, 5, 10, 14), (37, 3, 24, 24)],
                             [(0, 0), (0, 1), (1, 1)], dtype=torch.float32, generator=generator)
    previous = torch.get_num_threads()
    results = {}
    try:
        for threads in THREADS:
            torch.set_num_threads(threads)
            results[threads] = [outputs(problem) for _ in range(3)]
    finally:
        torch.set_num_threads(previous)
    first = results[THREADS[0]][0]
    for threads, calls in results.items():
        for call in calls:
            for ours, expected in zip(call, first):
                assert torch.equal(ours, expected), f"{threads} threads differ from 1 thread"
