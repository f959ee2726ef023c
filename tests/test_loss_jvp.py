"""weighted_feature_matching_jvp: the loss's derivative along tangents, on every backend that
runs here, against autograd on the spec's float64 math."""
import pytest
import torch
from hypothesis import given, settings

import l2t_fast
from l2t_fast.matching.loss import weighted_feature_matching_jvp
from matching_reference import as_spec_args, problems, random_problem, spec_loss

BACKENDS = [b for b in ("reference", "cpu", "triton") if b in l2t_fast.available_backends()]
# The Triton interpreter is slow: fewer random problems there.
EXAMPLES = {"reference": 15, "cpu": 15, "triton": 4}


def random_tangents(problem, seed):
    """A tangent for every target map, regressor and bias; every third one left None."""
    generator = torch.Generator().manual_seed(seed)
    tangents = {}
    for key in ("target_feats", "weight", "bias"):
        primals = problem.get(key)
        tangents[key] = None if primals is None else [
            None if i % 3 == 2 else torch.randn(p.shape, generator=generator, dtype=p.dtype)
            for i, p in enumerate(primals)]
    return tangents


def spec_directional(problem, tangents):
    """<grad of the spec loss in (target, weight, bias), tangents>, by reverse mode."""
    spec = spec_loss(**as_spec_args(problem))
    primals, directions = [], []
    for key in ("target_feats", "weight", "bias"):
        for p, v in zip(problem.get(key) or [], tangents[key] or []):
            if v is not None:
                primals.append(p)
                directions.append(v)
    grads = torch.autograd.grad(spec, primals, create_graph=True, allow_unused=True)
    return sum((g * v).sum() for g, v in zip(grads, directions) if g is not None)


def ours_directional(problem, tangents, backend):
    return weighted_feature_matching_jvp(
        **problem, target_tangents=tangents["target_feats"], weight_tangents=tangents["weight"],
        bias_tangents=tangents["bias"], backend=backend)


def check(backend, case):
    source, target, pairs, options, seed = case
    problem = random_problem(source, target, pairs,
                             generator=torch.Generator().manual_seed(seed), **options)
    tangents = random_tangents(problem, seed + 1)
    ours = ours_directional(problem, tangents, backend)
    expected = spec_directional(problem, tangents)
    if not torch.is_tensor(expected):  # no tangent at all
        expected = torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-11)
    weights = (problem.get("channel_weights") or []) + (problem.get("pair_weights") or [])
    if weights and expected.requires_grad:
        for a, b in zip(torch.autograd.grad(ours, weights, allow_unused=True),
                        torch.autograd.grad(expected, weights, allow_unused=True)):
            if b is None:  # a pair that no tangent moves
                assert a is None or torch.count_nonzero(a) == 0
            else:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_spec_on_random_shapes(backend):
    # the example count depends on the backend, so settings are applied here
    settings(max_examples=EXAMPLES[backend], deadline=None)(given(case=problems())(
        lambda case: check(backend, case)))()


def test_tangent_along_everything_is_the_derivative_of_the_loss():
    """A finite-difference check that does not go through any gradient formula."""
    problem = random_problem([(2, 3, 4, 4)], [(2, 2, 8, 8), (2, 4, 3, 3)], [(0, 0), (0, 1)],
                             generator=torch.Generator().manual_seed(0), requires_grad=False)
    tangents = random_tangents(problem, 1)
    step = 1e-6

    def moved(sign):
        shifted = dict(problem)
        for key in ("target_feats", "weight", "bias"):
            shifted[key] = [p if v is None else p + sign * step * v
                            for p, v in zip(problem[key], tangents[key])]
        return l2t_fast.weighted_feature_matching(**shifted, backend="reference")

    numeric = (moved(1) - moved(-1)) / (2 * step)
    for backend in BACKENDS:
        torch.testing.assert_close(ours_directional(problem, tangents, backend), numeric,
                                   rtol=1e-6, atol=1e-9)


def test_bad_tangents_are_named():
    problem = random_problem([(2, 3, 4, 4)], [(2, 2, 8, 8), (2, 4, 3, 3)], [(0, 0), (0, 1)],
                             generator=torch.Generator().manual_seed(0), requires_grad=False)
    good = random_tangents(problem, 1)

    def call(**override):
        tangents = {**{f"{k}_tangents": v for k, v in
                       (("target", good["target_feats"]), ("weight", good["weight"]),
                        ("bias", good["bias"]))}, **override}
        return weighted_feature_matching_jvp(**problem, **tangents, backend="reference")

    with pytest.raises(ValueError, match=r"target_tangents\[1\] has shape \[2, 4, 3, 4\] but "
                                         r"target_feats\[1\] has shape \[2, 4, 3, 3\]"):
        call(target_tangents=[None, torch.zeros(2, 4, 3, 4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="weight_tangents must hold one tensor .* got 1 for 2"):
        call(weight_tangents=[None])
    with pytest.raises(TypeError, match=r"bias_tangents\[0\] is torch.float32"):
        call(bias_tangents=[torch.zeros(3), None])
    with pytest.raises(TypeError, match="target_tangents must be a list"):
        call(target_tangents=torch.zeros(2, 2, 8, 8, dtype=torch.float64))
    # a [Cs, Ct, 1, 1] tangent of a 2-D regressor is accepted, like the regressor itself
    conv_shaped = [w[:, :, None, None] for w in good["weight"]]
    torch.testing.assert_close(call(weight_tangents=conv_shaped), call())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_backends_match_the_spec(backend, dtype):
    """On CUDA tensors: the fused jvp against the spec's float64 directional derivative."""
    if backend not in l2t_fast.available_backends() or not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA device and the {backend} backend")
    problem = random_problem([(4, 8, 7, 7), (4, 16, 4, 4)], [(4, 6, 14, 14), (4, 12, 7, 7)],
                             [(0, 0), (0, 1), (1, 0), (1, 1)],
                             generator=torch.Generator().manual_seed(3))
    tangents = random_tangents(problem, 4)
    expected = spec_directional(problem, tangents)
    on_gpu = {key: ([t.detach().to("cuda", dtype) for t in value]
                    if isinstance(value, list) and torch.is_tensor(value[0]) else value)
              for key, value in problem.items()}
    gpu_tangents = {key: [None if v is None else v.to("cuda", dtype) for v in value]
                    for key, value in tangents.items()}
    ours = ours_directional(on_gpu, gpu_tangents, backend)
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(ours.double().cpu(), expected.detach(), rtol=tolerance,
                               atol=tolerance)
