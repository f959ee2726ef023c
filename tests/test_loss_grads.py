"""weighted_feature_matching_grads: the loss's gradients without its value, on every backend
that runs here, against autograd on the spec's float64 math, first and second order."""
import pytest
import torch
from hypothesis import given, settings

import l2t_fast
from l2t_fast.matching.loss import weighted_feature_matching_grads
from matching_reference import as_spec_args, problems, random_problem, spec_loss

BACKENDS = [b for b in ("reference", "cpu", "triton") if b in l2t_fast.available_backends()]
# The Triton interpreter is slow: fewer random problems there.
EXAMPLES = {"reference": 12, "cpu": 12, "triton": 3}
KEYS = ("target_feats", "weight", "bias")


def zeros_for_none(grads, like):
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


def differentiated(problem):
    """Everything the gradients may depend on: features, regressors and weights."""
    return [t for key in KEYS + ("channel_weights", "pair_weights")
            for t in problem.get(key) or []]


def check(backend, problem, seed):
    wrt = [t for key in KEYS for t in problem.get(key) or []]
    expected = zeros_for_none(torch.autograd.grad(spec_loss(**as_spec_args(problem)), wrt,
                                                  create_graph=True, allow_unused=True), wrt)
    grads = weighted_feature_matching_grads(**problem, create_graph=True, backend=backend)
    ours = [g for group, key in zip(grads, KEYS) if problem.get(key) is not None for g in group]
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)

    # second order: d<grads, v>/d(everything), which the meta step's Hessian-vector
    # products take through the backend's double backward
    generator = torch.Generator().manual_seed(seed)
    directions = [torch.randn(g.shape, generator=generator, dtype=g.dtype) for g in ours]
    inputs = differentiated(problem)

    def second(first):
        inner = sum((g * v).sum() for g, v in zip(first, directions))
        return zeros_for_none(torch.autograd.grad(inner, inputs, allow_unused=True), inputs)

    for a, b in zip(second(ours), second(expected)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)

    plain = weighted_feature_matching_grads(**problem, backend=backend)
    for a, b in zip([g for group in plain for g in group], [g for group in grads for g in group]):
        assert not a.requires_grad
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_spec_on_random_shapes(backend):
    def run(case):
        source, target, pairs, options, seed = case
        problem = random_problem(source, target, pairs,
                                 generator=torch.Generator().manual_seed(seed), **options)
        check(backend, problem, seed + 1)
    # the example count depends on the backend, so settings are applied here
    settings(max_examples=EXAMPLES[backend], deadline=None)(given(case=problems())(run))()


def test_bad_inputs_are_named_before_any_kernel():
    problem = random_problem([(2, 3, 4, 4)], [(2, 2, 8, 8)], [(0, 0)],
                             generator=torch.Generator().manual_seed(0))
    problem["weight"] = [torch.zeros(3, 5, dtype=torch.float64)]
    with pytest.raises(ValueError, match=r"weight\[0\]"):
        weighted_feature_matching_grads(**problem, backend="reference")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_backends_match_the_spec(backend, dtype):
    """On CUDA tensors: the gradients without the value, and their derivative in the
    channel weights, against the spec's float64 autograd."""
    if backend not in l2t_fast.available_backends() or not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA device and the {backend} backend")
    problem = random_problem([(4, 8, 7, 7), (4, 16, 4, 4)], [(4, 6, 14, 14), (4, 12, 7, 7)],
                             [(0, 0), (0, 1), (1, 0), (1, 1)],
                             generator=torch.Generator().manual_seed(3))
    wrt = [t for key in KEYS for t in problem[key]]
    expected = torch.autograd.grad(spec_loss(**as_spec_args(problem)), wrt, create_graph=True)
    on_gpu = {key: ([t.detach().to("cuda", dtype).requires_grad_() for t in value]
                    if isinstance(value, list) and torch.is_tensor(value[0]) else value)
              for key, value in problem.items()}
    grads = weighted_feature_matching_grads(**on_gpu, create_graph=True, backend=backend)
    ours = [g for group in grads for g in group]
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a.double().cpu(), b.detach(), rtol=tolerance,
                                   atol=tolerance)
    # one second-order term: d<grads, 1>/d(channel weights)
    second = torch.autograd.grad(sum(g.sum() for g in ours), on_gpu["channel_weights"])
    expected_second = torch.autograd.grad(sum(g.sum() for g in expected),
                                          problem["channel_weights"])
    for a, b in zip(second, expected_second):
        torch.testing.assert_close(a.double().cpu(), b, rtol=tolerance, atol=tolerance)
