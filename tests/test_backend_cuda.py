"""The CUDA kernels of the channel-error ops (csrc/cuda), against a float64 reference.

Every test needs a CUDA device and an extension built with CUDA kernels, and skips
without them; set L2T_FAST_REQUIRE_CUDA=1 on a GPU machine so that a build without CUDA
kernels fails instead. The errors op is checked directly (forward, backward, double
backward, gradcheck, opcheck, torch.compile) and through the loss.

For compute-sanitizer, the small case of ``test_small_case_for_compute_sanitizer`` runs
every kernel once:

    compute-sanitizer --tool memcheck python -m pytest -q -p no:cacheprovider \
        tests/test_backend_cuda.py -k sanitizer
"""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import l2t_fast
from l2t_fast.matching.backends import compiled, resolve
from matching_reference import as_spec_args, random_problem, spec_loss

CUDA_READY = torch.cuda.is_available() and compiled.has_cuda_kernels()
WORKSPACE_VARIABLE = "L2T_FAST_CUDA_WORKSPACE_BYTES"
HALF_DTYPES = (torch.float16, torch.bfloat16)
# Largest error allowed, relative to the largest reference value of the same tensor.
HALF_TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


# GPU CI sets L2T_FAST_REQUIRE_CUDA=1, so that a build without CUDA kernels fails
# collection instead of passing as skips.
if os.environ.get("L2T_FAST_REQUIRE_CUDA") == "1" and not CUDA_READY:
    pytest.fail("L2T_FAST_REQUIRE_CUDA=1, but there is no CUDA device or the extension was "
                "built without CUDA kernels", pytrace=False)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA device and the "
                                 "extension built with CUDA kernels")]


@pytest.fixture(autouse=True)
def full_precision_float32_matmul():
    """TF32 would change float32 products at the 1e-3 level: keep full float32 here."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def reference_errors(source, target, weight, bias, pair_source, pair_target):
    """E[b, off_i + c] = mean_hw (S~ - W_i T - b_i)^2 in float64, written from docs/SPEC.md."""
    columns = []
    for w, b, m, n in zip(weight, bias, pair_source, pair_target):
        s, t = source[m].double(), target[n].double()
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        projection = torch.einsum("ck,bkhw->bchw", w.double(), t) + b.double()[:, None, None]
        columns.append((s - projection).pow(2).mean(dim=(2, 3)))
    return torch.cat(columns, dim=1)


class Problem:
    """The op's inputs in float64 on the CPU, from which each side makes its own leaves."""

    def __init__(self, source_shapes, target_shapes, pairs, seed=0):
        generator = torch.Generator().manual_seed(seed)

        def rand(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64)

        self.pair_source = [m for m, _ in pairs]
        self.pair_target = [n for _, n in pairs]
        self.groups = (
            [rand(*s) for s in source_shapes],
            [rand(*t) for t in target_shapes],
            [rand(source_shapes[m][1], target_shapes[n][1]) / target_shapes[n][1] ** 0.5
             for m, n in pairs],
            [rand(source_shapes[m][1]) for m, _ in pairs])

    def leaves(self, device, dtype, mask=(True, True, True, True), transform=None):
        """The four input lists, converted; those of groups in `mask` require grad."""
        out = []
        for group, wanted in zip(self.groups, mask):
            tensors = [t.to(device, dtype) for t in group]
            if transform is not None:
                tensors = transform(tensors, len(out))
            out.append([t.requires_grad_(wanted) for t in tensors])
        return out

    def errors(self, leaves, op):
        return op(*leaves, self.pair_source, self.pair_target)


def cuda_errors(source, target, weight, bias, pair_source, pair_target):
    return torch.ops.l2t_fast.channel_errors(source, target, weight, bias, pair_source,
                                             pair_target)


def assert_matches(actual, expected, dtype, rtol, atol):
    actual = actual.detach().double().cpu()
    expected = expected.detach()
    if dtype in HALF_DTYPES:
        scale = max(expected.abs().max().item(), 1e-3)
        error = (actual - expected).abs().max().item()
        assert error <= HALF_TOLERANCE[dtype] * scale, (error, scale)
    else:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def assert_same_grads(ours, reference, dtype, rtol, atol):
    """Gradients equal; one the reference leaves undefined is absent or zero."""
    for a, b in zip(ours, reference):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            assert a is not None
            assert_matches(a, b, dtype, rtol, atol)


def check_op(problem, dtype, rtol, atol, mask=(True, True, True, True), transform=None):
    """Forward, backward and double backward of the CUDA op against the reference."""
    ours = problem.leaves("cuda", dtype, mask, transform)
    reference = problem.leaves("cpu", torch.float64, mask)
    if dtype in HALF_DTYPES:  # the reference sees the same rounded inputs
        reference = [[r.detach().to(dtype).double().requires_grad_(r.requires_grad)
                      for r in group] for group in reference]
    errors = problem.errors(ours, cuda_errors)
    expected = problem.errors(reference, reference_errors)
    assert errors.dtype == (torch.float32 if dtype in HALF_DTYPES else dtype)
    assert errors.shape == expected.shape
    assert_matches(errors, expected, dtype, rtol, atol)

    upstream = torch.rand_like(expected)
    our_upstream = upstream.to("cuda", errors.dtype).requires_grad_()
    reference_upstream = upstream.clone().requires_grad_()
    our_inputs = [t for group in ours for t in group if t.requires_grad]
    reference_inputs = [t for group in reference for t in group if t.requires_grad]
    our_grads = torch.autograd.grad(errors, our_inputs, our_upstream, create_graph=True)
    reference_grads = torch.autograd.grad(expected, reference_inputs, reference_upstream,
                                          create_graph=True, allow_unused=True)
    for grad, leaf in zip(our_grads, our_inputs):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    assert_same_grads(our_grads, reference_grads, dtype, rtol, atol)

    # Double backward: the gradient of <grad, v>, also with respect to the upstream grad
    # (maps that no pair reads have no reference gradient, and no direction).
    used = [(a, b) for a, b in zip(our_grads, reference_grads) if b is not None]
    directions = [torch.randn_like(b) for _, b in used]
    our_inner = sum((a.double() * v.cuda()).sum() for (a, _), v in zip(used, directions))
    reference_inner = sum((b * v).sum() for (_, b), v in zip(used, directions))
    assert_same_grads(
        torch.autograd.grad(our_inner, our_inputs + [our_upstream], allow_unused=True),
        torch.autograd.grad(reference_inner, reference_inputs + [reference_upstream],
                            allow_unused=True),
        dtype, rtol, atol)


def mixed_problem(seed=0):
    # Down- and up-sampling, identical sizes, non-square maps, a target shared by three
    # pairs and a pair repeated (the same source twice in one target group).
    return Problem([(3, 5, 6, 4), (3, 3, 3, 7)], [(3, 4, 6, 4), (3, 6, 9, 5)],
                   [(0, 0), (1, 0), (0, 1), (1, 1), (1, 1)], seed=seed)


FLOAT_TOLERANCES = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-4)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(dtype):
    check_op(mixed_problem(), dtype, *FLOAT_TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_inputs_accumulate_in_float32(dtype):
    check_op(mixed_problem(seed=1), dtype, None, None)


@pytest.mark.parametrize("budget", ["1500", "20000", "200000"])
def test_chunks_and_position_tiles_match_reference(budget, monkeypatch):
    # Small workspace budgets force tiles of a few positions within one sample (not
    # aligned to the map's rows), or chunks of a few samples, so that every chunk and tile
    # boundary is crossed.
    monkeypatch.setenv(WORKSPACE_VARIABLE, budget)
    problem = Problem([(5, 3, 10, 10), (5, 2, 23, 17), (5, 4, 20, 20)], [(5, 5, 20, 20)],
                      [(0, 0), (1, 0), (2, 0)], seed=2)
    check_op(problem, torch.float64, *FLOAT_TOLERANCES[torch.float64])


def test_rejects_a_bad_workspace_budget(monkeypatch):
    monkeypatch.setenv(WORKSPACE_VARIABLE, "lots")
    problem = mixed_problem()
    with pytest.raises(RuntimeError, match=WORKSPACE_VARIABLE):
        problem.errors(problem.leaves("cuda", torch.float32), cuda_errors)


@pytest.mark.parametrize("mask", [(False, True, True, True), (True, False, False, False),
                                  (False, False, True, False), (False, True, False, True)])
def test_gradients_of_some_inputs_only(mask):
    check_op(mixed_problem(seed=3), torch.float64, *FLOAT_TOLERANCES[torch.float64], mask=mask)


def channels_last_and_views(tensors, group):
    """Sources and targets channels_last or seen through strided views; regressors transposed."""
    if group in (0, 1):
        return [t.contiguous(memory_format=torch.channels_last) if i % 2 == 0
                else torch.stack([t, t], dim=2).flatten(1, 2)[:, ::2]  # channel stride 2HW
                for i, t in enumerate(tensors)]
    if group == 2:
        return [t.t().contiguous().t() for t in tensors]
    return tensors


def test_channels_last_and_strided_inputs():
    check_op(mixed_problem(seed=4), torch.float64, *FLOAT_TOLERANCES[torch.float64],
             transform=channels_last_and_views)


def test_gradients_keep_their_inputs_layout():
    problem = mixed_problem(seed=5)
    leaves = problem.leaves("cuda", torch.float32, transform=channels_last_and_views)
    errors = problem.errors(leaves, cuda_errors)
    flat = [t for group in leaves for t in group]
    for grad, leaf in zip(torch.autograd.grad(errors.sum(), flat), flat):
        assert grad.stride() == torch.empty_like(leaf).stride()


map_sizes = st.tuples(st.integers(1, 12), st.integers(1, 12))


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 4))
    num_source, num_target = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    source = [(batch, draw(st.integers(1, 9)), *draw(map_sizes)) for _ in range(num_source)]
    target = [(batch, draw(st.integers(1, 9)), *draw(map_sizes)) for _ in range(num_target)]
    all_pairs = [(m, n) for m in range(num_source) for n in range(num_target)]
    pairs = draw(st.lists(st.sampled_from(all_pairs), min_size=1, max_size=12))
    return Problem(source, target, pairs, seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=40)
@given(problem=problems(), budget=st.sampled_from([None, "500", "5000"]))
def test_random_shapes_match_reference(problem, budget):
    # Up to 12 pairs: more than 8 on one target split its epilogue into several launches.
    previous = os.environ.pop(WORKSPACE_VARIABLE, None)
    if budget is not None:
        os.environ[WORKSPACE_VARIABLE] = budget
    try:
        check_op(problem, torch.float64, *FLOAT_TOLERANCES[torch.float64])
    finally:
        os.environ.pop(WORKSPACE_VARIABLE, None)
        if previous is not None:
            os.environ[WORKSPACE_VARIABLE] = previous


@settings(max_examples=15)
@given(problem=problems(), dtype=st.sampled_from([torch.float32, *HALF_DTYPES]))
def test_random_shapes_in_lower_precision(problem, dtype):
    check_op(problem, dtype, *FLOAT_TOLERANCES.get(dtype, (None, None)))


def test_gradcheck_and_gradgradcheck():
    problem = Problem([(2, 3, 3, 2), (2, 2, 2, 3)], [(2, 4, 4, 3), (2, 3, 3, 2)],
                      [(0, 0), (1, 0), (0, 1), (1, 1)], seed=6)
    leaves = problem.leaves("cuda", torch.float64)
    sizes = [len(group) for group in leaves]

    def errors(*flat):
        groups, start = [], 0
        for size in sizes:
            groups.append(list(flat[start:start + size]))
            start += size
        return problem.errors(groups, cuda_errors)

    flat = tuple(t for group in leaves for t in group)
    assert torch.autograd.gradcheck(errors, flat)
    assert torch.autograd.gradgradcheck(errors, flat, fast_mode=True)


def test_opcheck_on_every_op():
    problem = mixed_problem(seed=7)
    source, target, weight, bias = problem.leaves("cuda", torch.float64)
    pairs = (problem.pair_source, problem.pair_target)
    ops = torch.ops.l2t_fast
    torch.library.opcheck(ops.channel_errors, (source, target, weight, bias) + pairs)
    grad_errors = torch.randn(3, sum(source[m].shape[1] for m in problem.pair_source),
                              dtype=torch.float64, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.channel_errors_backward,
                          (grad_errors, source, target, weight, bias) + pairs + ([True] * 4,))
    plain = tuple([t.detach() for t in group] for group in (source, target, weight, bias))
    tangents = ([None, torch.randn_like(source[1])], [torch.randn_like(t) for t in target],
                [torch.randn_like(w) for w in weight], [None] * len(bias))
    torch.library.opcheck(ops.channel_errors_double_backward,
                          (grad_errors.detach(),) + tangents + plain + pairs + ([True] * 4,))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    problem = mixed_problem(seed=8)
    source, target, weight, bias = problem.leaves("cuda", torch.float32)
    pairs = (problem.pair_source, problem.pair_target)

    def step(source, target, weight, bias):
        return (0.5 * cuda_errors(source, target, weight, bias, *pairs).square()).sum()

    compiled_step = torch.compile(step, fullgraph=True, backend=compiler)
    expected = step(source, target, weight, bias)
    actual = compiled_step(source, target, weight, bias)
    torch.testing.assert_close(actual, expected)
    flat = source + target + weight + bias
    torch.testing.assert_close(torch.autograd.grad(actual, flat),
                               torch.autograd.grad(expected, flat))


def test_results_are_deterministic():
    problem = Problem([(4, 16, 7, 7), (4, 8, 28, 28)], [(4, 32, 14, 14)], [(0, 0), (1, 0)],
                      seed=9)
    runs = []
    for _ in range(2):
        leaves = problem.leaves("cuda", torch.float32)
        errors = problem.errors(leaves, cuda_errors)
        runs.append((errors,) + torch.autograd.grad(errors.square().sum(),
                                                    [t for g in leaves for t in g]))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_small_case_for_compute_sanitizer(dtype):
    # Every kernel once (epilogues of all three ops, resize transposes both ways, identity
    # pairs, tangents of every input), on maps small enough for compute-sanitizer.
    check_op(mixed_problem(seed=10), dtype, *FLOAT_TOLERANCES.get(dtype, (None, None)))


def test_loss_on_cuda_backend_matches_spec():
    problem = random_problem([(3, 5, 6, 4), (3, 3, 3, 7)], [(3, 4, 6, 4), (3, 6, 9, 5)],
                             [(0, 0), (1, 0), (0, 1), (1, 1)],
                             generator=torch.Generator().manual_seed(11))
    on_cuda = {key: [t.detach().cuda().requires_grad_() for t in value]
               if isinstance(value, list) and value and torch.is_tensor(value[0]) else value
               for key, value in problem.items()}
    loss = l2t_fast.weighted_feature_matching(**on_cuda, backend="cuda")
    expected = spec_loss(**as_spec_args(problem))
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-9, atol=1e-11)
    leaves = [t for value in on_cuda.values() if isinstance(value, list)
              for t in value if torch.is_tensor(t)]
    reference_leaves = [t for value in problem.values() if isinstance(value, list)
                        for t in value if torch.is_tensor(t)]
    for ours, theirs in zip(torch.autograd.grad(loss, leaves),
                            torch.autograd.grad(expected, reference_leaves)):
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-9, atol=1e-11)


def test_cuda_backend_takes_every_float_dtype():
    assert "cuda" in l2t_fast.available_backends()
    for dtype in (torch.float32, torch.float64, *HALF_DTYPES):
        assert resolve("cuda", torch.device("cuda"), dtype).name == "cuda"


def test_inputs_on_different_devices_are_rejected():
    problem = mixed_problem()
    source, target, weight, bias = problem.leaves("cuda", torch.float32)
    with pytest.raises(RuntimeError, match="is on cpu"):
        cuda_errors(source, [t.cpu() for t in target], weight, bias, problem.pair_source,
                    problem.pair_target)
