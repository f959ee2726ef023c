"""The weighted feature-matching loss on the CPU backends, against the spec's float64 math."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import l2t_fast
from l2t_fast.matching.backends import BackendUnavailable
from l2t_fast.matching.loss import weighted_feature_matching_grads
from matching_reference import as_spec_args, problems, random_problem, spec_loss

CPU_BACKENDS = [b for b in ("reference", "cpu") if b in l2t_fast.available_backends()]


def test_compiled_extension_is_built_when_required():
    # CI builds the extension and sets this, so a broken build cannot pass as a skip.
    if os.environ.get("L2T_FAST_REQUIRE_EXTENSION") == "1":
        assert "cpu" in l2t_fast.available_backends()
    assert "reference" in l2t_fast.available_backends()


def loss_of(problem, backend, **kwargs):
    return l2t_fast.weighted_feature_matching(**problem, backend=backend, **kwargs)


def grads(output, inputs, grad_output=None, create_graph=False):
    return torch.autograd.grad(output, inputs, grad_output, create_graph=create_graph,
                               allow_unused=True)


def differentiable_inputs(problem):
    return [t for key in ("source_feats", "target_feats", "weight", "bias", "channel_weights",
                          "pair_weights") for t in problem.get(key) or [] if t.requires_grad]


def check_against_spec(problem, backend, rtol, atol, reduction="mean", beta=0.5):
    """Forward, backward and double backward of a backend against the spec's math."""
    inputs = differentiable_inputs(problem)
    ours = loss_of(problem, backend, reduction=reduction, beta=beta)
    spec = spec_loss(**as_spec_args(problem), reduction=reduction, beta=beta)
    torch.testing.assert_close(ours.double(), spec, rtol=rtol, atol=atol)
    upstream = torch.rand_like(spec)
    ours_grads = grads(ours, inputs, upstream.to(ours.dtype), create_graph=True)
    spec_grads = grads(spec, inputs, upstream, create_graph=True)
    assert_same_grads(ours_grads, spec_grads, rtol, atol)
    # Double backward: the gradient of <grad, v> for a random direction v.
    used = [(a, b) for a, b in zip(ours_grads, spec_grads) if b is not None]
    directions = [torch.randn_like(b, dtype=torch.float64) for _, b in used]
    ours_inner = sum((a.double() * v).sum() for (a, _), v in zip(used, directions))
    spec_inner = sum((b.double() * v).sum() for (_, b), v in zip(used, directions))
    assert_same_grads(grads(ours_inner, inputs), grads(spec_inner, inputs), rtol, atol)


def assert_same_grads(ours, spec, rtol, atol):
    """Gradients equal; one the spec leaves undefined (an unused input) is absent or zero."""
    for a, b in zip(ours, spec):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=15)
@given(case=problems(), reduction=st.sampled_from(["mean", "none"]),
       beta=st.sampled_from([0.5, 2.0]))
def test_float64_matches_spec_on_random_shapes(backend, case, reduction, beta):
    source, target, pairs, options, seed = case
    problem = random_problem(source, target, pairs,
                             generator=torch.Generator().manual_seed(seed), **options)
    check_against_spec(problem, backend, rtol=1e-9, atol=1e-11, reduction=reduction, beta=beta)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=10)
@given(case=problems())
def test_float32_matches_spec_within_tolerance(backend, case):
    source, target, pairs, options, seed = case
    problem = random_problem(source, target, pairs, dtype=torch.float32,
                             generator=torch.Generator().manual_seed(seed), **options)
    check_against_spec(problem, backend, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_and_gradgradcheck(backend):
    pairs = [(0, 0), (1, 0), (0, 1), (1, 1)]
    problem = random_problem([(2, 3, 3, 2), (2, 2, 2, 3)], [(2, 4, 4, 3), (2, 3, 3, 2)], pairs,
                             generator=torch.Generator().manual_seed(0))
    keys = ["source_feats", "target_feats", "weight", "bias", "channel_weights", "pair_weights"]
    sizes = [len(problem[k]) for k in keys]

    def loss(*flat):
        rebuilt, start = {"pairs": pairs}, 0
        for key, size in zip(keys, sizes):
            rebuilt[key] = list(flat[start:start + size])
            start += size
        return l2t_fast.weighted_feature_matching(**rebuilt, beta=[0.3, 0.5, 1.0, 2.0],
                                                  backend=backend)

    flat = tuple(t for k in keys for t in problem[k])
    assert torch.autograd.gradcheck(loss, flat, fast_mode=True)
    assert torch.autograd.gradgradcheck(loss, flat, fast_mode=True)


def resized_problem(dtype=torch.float64):
    # Up- and down-sampling, identical sizes, non-square maps and a shared target layer.
    return random_problem([(3, 5, 6, 4), (3, 3, 3, 7)], [(3, 4, 6, 4), (3, 6, 9, 5)],
                          [(0, 0), (1, 0), (0, 1), (1, 1), (1, 1)], dtype=dtype,
                          generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_and_non_contiguous_inputs(backend):
    problem = resized_problem()
    reshaped = dict(problem)
    reshaped["source_feats"] = [problem["source_feats"][0].contiguous(
        memory_format=torch.channels_last), problem["source_feats"][1]]
    # A target map seen through a transposed view and another through a channel slice.
    wide = torch.randn(3, 12, 9, 5, dtype=torch.float64)
    reshaped["target_feats"] = [
        problem["target_feats"][0].detach().transpose(2, 3).contiguous().transpose(2, 3)
        .requires_grad_(),
        wide[:, ::2].requires_grad_()]
    reshaped["weight"] = [w.detach().t().contiguous().t().requires_grad_()
                          for w in problem["weight"]]
    assert not reshaped["target_feats"][0].is_contiguous()
    check_against_spec(reshaped, backend, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_targets(backend):
    problem = resized_problem()
    problem["target_feats"] = [t.detach().contiguous(memory_format=torch.channels_last)
                               .requires_grad_() for t in problem["target_feats"]]
    problem["source_feats"] = [s.detach().contiguous(memory_format=torch.channels_last)
                               .requires_grad_() for s in problem["source_feats"]]
    check_against_spec(problem, backend, rtol=1e-9, atol=1e-11)
    if backend == "reference":
        return  # plain autograd: layouts are PyTorch's business
    # The op's gradients keep their inputs' layout (what its fake kernels promise).
    maps = problem["source_feats"] + problem["target_feats"]
    for feature_map, grad in zip(maps, grads(loss_of(problem, backend), maps)):
        assert grad.stride() == feature_map.stride()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sources_without_grad_and_4d_regressors(backend):
    problem = resized_problem()
    problem["source_feats"] = [s.detach() for s in problem["source_feats"]]
    problem["weight"] = [w.detach()[:, :, None, None].requires_grad_() for w in problem["weight"]]
    check_against_spec(problem, backend, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_maps_span_several_blocks(backend):
    # 40x40 targets: several row blocks per sample in the compiled kernels.
    problem = random_problem([(2, 3, 10, 10), (2, 2, 40, 40)], [(2, 5, 40, 40)],
                             [(0, 0), (1, 0)], generator=torch.Generator().manual_seed(2))
    check_against_spec(problem, backend, rtol=1e-9, atol=1e-11)


def test_reduction_none_sums_to_mean():
    problem = resized_problem()
    per_sample = l2t_fast.weighted_feature_matching(**problem, reduction="none")
    assert per_sample.shape == (5, 3)
    total = l2t_fast.weighted_feature_matching(**problem)
    torch.testing.assert_close(per_sample.mean(1).sum(), total)


def test_half_inputs_on_reference_return_float32():
    problem = random_problem([(2, 3, 4, 4)], [(2, 2, 4, 4)], [(0, 0)], dtype=torch.bfloat16)
    loss = l2t_fast.weighted_feature_matching(**problem, backend="reference")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), spec_loss(**as_spec_args(problem)), rtol=1e-2,
                               atol=1e-3)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="compiled extension not built")
def test_opcheck_on_every_registered_op():
    problem = resized_problem()
    source, target = problem["source_feats"], problem["target_feats"]
    weight, bias = problem["weight"], problem["bias"]
    pair_source = [m for m, _ in problem["pairs"]]
    pair_target = [n for _, n in problem["pairs"]]
    errors_args = (source, target, weight, bias, pair_source, pair_target)
    ops = torch.ops.l2t_fast
    torch.library.opcheck(ops.channel_errors, errors_args)
    grad_errors = torch.randn(3, sum(source[m].shape[1] for m in pair_source),
                              dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.channel_errors_backward,
                          (grad_errors,) + errors_args + ([True, True, True, True],))
    # The double backward is not differentiable itself: check it on plain tensors.
    plain = tuple([t.detach() for t in group] for group in errors_args[:4]) + errors_args[4:]
    tangents = ([None, torch.randn_like(source[1])], [torch.randn_like(t) for t in target],
                [torch.randn_like(w) for w in weight], [None] * len(bias))
    torch.library.opcheck(ops.channel_errors_double_backward,
                          (grad_errors.detach(),) + tangents + plain + ([True] * 4,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    crit = l2t_fast.WeightedFeatureMatching([3, 5], [4, 6], [(0, 0), (1, 0), (1, 1)],
                                            backend=backend).double()
    source = [torch.randn(2, 3, 4, 4, dtype=torch.float64),
              torch.randn(2, 5, 2, 2, dtype=torch.float64)]
    target = [torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True),
              torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)]
    weights = [torch.softmax(torch.randn(2, c, dtype=torch.float64), 1) for c in (3, 5, 5)]

    def step(source, target, weights):
        return crit(source, target, channel_weights=weights) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    expected = step(source, target, weights)
    actual = compiled(source, target, weights)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(torch.autograd.grad(actual, target),
                               torch.autograd.grad(expected, target))


def test_module_owns_regressors_in_pair_order():
    crit = l2t_fast.WeightedFeatureMatching([3, 5], [4, 6], [(1, 1), (0, 0)], bias=True)
    assert [tuple(w.shape) for w in crit.weight] == [(5, 6), (3, 4)]
    assert [tuple(b.shape) for b in crit.bias] == [(5,), (3,)]
    assert l2t_fast.WeightedFeatureMatching([3], [4], [(0, 0)], bias=False).bias is None


def test_auto_picks_the_compiled_backend_for_cpu_floats():
    from l2t_fast.matching.backends import resolve
    expected = "cpu" if "cpu" in CPU_BACKENDS else "reference"
    assert resolve("auto", torch.device("cpu"), torch.float32).name == expected
    assert resolve("auto", torch.device("cpu"), torch.bfloat16).name == "reference"


def test_unavailable_backend_says_why():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    problem = resized_problem()
    with pytest.raises(BackendUnavailable, match="'cuda' is not available"):
        loss_of(problem, "cuda")


def test_cpu_backend_refuses_half_inputs():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("compiled extension not built")
    problem = random_problem([(2, 3, 4, 4)], [(2, 2, 4, 4)], [(0, 0)], dtype=torch.float16)
    with pytest.raises(BackendUnavailable, match="float16"):
        loss_of(problem, "cpu")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channel_weights", [False, True])
def test_nan_in_one_pair_leaves_the_other_pairs_terms(backend, channel_weights):
    # Summing each pair's channel errors as a product with a 0/1 matrix added 0 * NaN
    # into every other pair's terms.
    problem = resized_problem()
    source = [s.detach().clone() for s in problem["source_feats"]]
    source[0][1, 2, 3, 1] = float("nan")  # pairs 0 and 2 read source 0, at sample 1
    problem = {**problem, "source_feats": source}
    if not channel_weights:
        problem["channel_weights"] = None
    terms = loss_of(problem, backend, reduction="none")
    assert torch.isnan(terms[[0, 2], 1]).all()
    clean = {**problem, "source_feats": [s.nan_to_num(0.0) for s in source]}
    expected = spec_loss(**as_spec_args(clean), reduction="none")
    others = torch.ones_like(terms, dtype=torch.bool)
    others[[0, 2], 1] = False
    torch.testing.assert_close(terms[others], expected[others].to(terms.dtype), rtol=1e-9,
                               atol=1e-11)


WIDE_RESIZES = [(8, 32), (16, 32), (13, 40), (32, 16), (33, 16), (64, 8), (100, 40), (40, 100),
                (17, 16)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("source_width, target_width", WIDE_RESIZES)
@pytest.mark.parametrize("source_height, target_height", [(3, 5), (5, 3)])
def test_float32_resize_along_wide_rows(backend, source_width, target_width, source_height,
                                        target_height):
    # On AVX-512 the CPU kernels resize float32 rows by permuting windows of 32 inputs where
    # 16 outputs read within one, and by scalar loads where they do not (64 -> 8, 100 -> 40):
    # whole windows, windows cut at the row's end, and both kinds in one row; rows upsampled
    # (each source row resized once) and downsampled (blended rows resized).
    problem = random_problem([(2, 3, source_height, source_width)],
                             [(2, 4, target_height, target_width)], [(0, 0)],
                             dtype=torch.float32, generator=torch.Generator().manual_seed(4))
    check_against_spec(problem, backend, rtol=1e-4, atol=1e-5)


RESIZES = [((2, 2), (4, 4)), ((3, 3), (5, 4)), ((4, 4), (2, 2)), ((3, 5), (3, 2)),
           ((2, 3), (6, 3)), ((5, 4), (3, 7))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("source_size, target_size", RESIZES)
def test_infinite_source_value_gives_the_references_result(backend, dtype, source_size,
                                                           target_size):
    # F.interpolate blends (1 - w) * lo + w * hi: an infinite tap gives inf, or NaN where it
    # weighs 0. The blend lo + w * (hi - lo) gave NaN (inf - inf) where it gives inf.
    generator = torch.Generator().manual_seed(3)
    positions = [(y, x) for y in range(source_size[0]) for x in range(source_size[1])]
    source = torch.randn(len(positions), 1, *source_size, generator=generator,
                         dtype=torch.float64)
    for sample, (y, x) in enumerate(positions):  # one infinite value per sample
        source[sample, 0, y, x] = float("inf") if sample % 2 else -float("inf")
    target = torch.randn(len(positions), 2, *target_size, generator=generator,
                         dtype=torch.float64)
    weight = torch.randn(1, 2, generator=generator, dtype=torch.float64)
    args = dict(source_feats=[source.to(dtype)], target_feats=[target.to(dtype)],
                pairs=[(0, 0)], weight=[weight.to(dtype)])
    terms = l2t_fast.weighted_feature_matching(**args, reduction="none", backend=backend)
    expected = spec_loss(**as_spec_args(args), reduction="none")
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(terms.double(), expected, equal_nan=True, **tolerance)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("per_pair", [False, True])
def test_beta_that_requires_grad_is_differentiated(backend, per_pair):
    # Such a beta used to be read with .tolist(): silently detached, its gradient lost.
    problem = resized_problem()
    pairs = len(problem["pairs"])
    beta = (torch.linspace(0.2, 1.5, pairs, dtype=torch.float64) if per_pair
            else torch.tensor(0.7, dtype=torch.float64)).requires_grad_()
    inputs = differentiable_inputs(problem) + [beta]
    ours = loss_of(problem, backend, beta=beta)
    spec = spec_loss(**as_spec_args(problem),
                     beta=list(beta.unbind()) if per_pair else [beta] * pairs)
    torch.testing.assert_close(ours, spec, rtol=1e-9, atol=1e-11)
    assert_same_grads(grads(ours, inputs), grads(spec, inputs, create_graph=True), rtol=1e-9,
                      atol=1e-11)

    fixed = {key: [t.detach() for t in value] if isinstance(value, list) and key != "pairs"
             else value for key, value in problem.items()}
    assert torch.autograd.gradcheck(lambda b: loss_of(fixed, backend, beta=b, reduction="none"),
                                    (beta,))
    # The gradient without the loss (the lookahead steps') is differentiable in beta too.
    target = problem["target_feats"]
    ours_first = weighted_feature_matching_grads(**problem, beta=beta, create_graph=True,
                                                 backend=backend)[0]
    spec_first = torch.autograd.grad(spec, target, create_graph=True)
    assert_same_grads(grads(sum(g.sum() for g in ours_first), [beta]),
                      grads(sum(g.sum() for g in spec_first), [beta]), rtol=1e-9, atol=1e-11)
