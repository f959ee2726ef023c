"""Every bad input is refused before any kernel runs, with an error naming what is wrong."""
import re

import pytest
import torch

import l2t_fast
from l2t_fast.matching.backends import BackendUnavailable
from matching_reference import random_problem


@pytest.fixture
def problem():
    return random_problem([(2, 3, 4, 4), (2, 5, 2, 2)], [(2, 4, 4, 4), (2, 6, 3, 3)],
                          [(0, 0), (1, 1)], generator=torch.Generator().manual_seed(0))


def call(problem, **changes):
    return l2t_fast.weighted_feature_matching(**{**problem, **changes})


def test_valid_problem_runs(problem):
    assert call(problem).dim() == 0


@pytest.mark.parametrize("pairs, message", [
    ([], "pairs is empty"),
    ([(0, 2)], r"pairs\[0\] = \(0, 2\): target index 2 is out of range for 2 target"),
    ([(0, 0), (-1, 1)], r"pairs\[1\] = \(-1, 1\): source index -1 is out of range"),
    ([(0, 0), (0,)], r"pairs\[1\] must be a \(source, target\) index pair"),
])
def test_bad_pairs(problem, pairs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(problem, pairs=pairs, weight=problem["weight"][:len(pairs)] or [torch.zeros(1)])


def test_pair_index_must_be_int(problem):
    with pytest.raises(TypeError, match=r"pairs\[0\] = \(0.0, 0\): the source index must be an int"):
        call(problem, pairs=[(0.0, 0), (1, 1)])


def test_regressor_shape_names_pair_and_shapes(problem):
    weight = [problem["weight"][0], torch.randn(5, 7)]
    with pytest.raises(ValueError, match=r"weight\[1\] for pair 1 = \(1, 1\) must have shape "
                                         r"\[5, 6\] or \[5, 6, 1, 1\].*got \[5, 7\]"):
        call(problem, weight=weight)


def test_fewer_regressors_than_pairs(problem):
    with pytest.raises(ValueError, match="weight must hold one tensor per pair: got 1 for 2"):
        call(problem, weight=problem["weight"][:1])


def test_bias_shape(problem):
    with pytest.raises(ValueError, match=r"bias\[0\] for pair 0 must have shape \[3\].*got \[4\]"):
        call(problem, bias=[torch.randn(4, dtype=torch.float64), problem["bias"][1]])


def test_batch_sizes_differ(problem):
    target = [problem["target_feats"][0], torch.randn(3, 6, 3, 3, dtype=torch.float64)]
    with pytest.raises(ValueError, match=r"target_feats\[1\] has batch size 3 but "
                                         r"source_feats\[0\] has 2"):
        call(problem, target_feats=target)


def test_feature_map_not_4d(problem):
    with pytest.raises(ValueError, match=r"source_feats\[1\] must be 4-D.*got shape \[2, 5, 4\]"):
        call(problem, source_feats=[problem["source_feats"][0], torch.randn(2, 5, 4)])


def test_channel_weights_shape(problem):
    weights = [problem["channel_weights"][0], torch.rand(2, 4, dtype=torch.float64)]
    with pytest.raises(ValueError, match=r"channel_weights\[1\] for pair 1 must have shape "
                                         r"\[2, 5\].*got \[2, 4\]"):
        call(problem, channel_weights=weights)


def test_pair_weights_shape(problem):
    with pytest.raises(ValueError, match=r"pair_weights\[0\] for pair 0 must have shape \[2\] "
                                         r"or \[2, 1\], got \[2, 2\]"):
        call(problem, pair_weights=[torch.rand(2, 2, dtype=torch.float64),
                                    problem["pair_weights"][1]])


def test_pair_weights_as_column_are_accepted(problem):
    column = [lam.detach().reshape(2, 1) for lam in problem["pair_weights"]]
    torch.testing.assert_close(call(problem, pair_weights=column), call(problem))


def test_mixed_dtypes(problem):
    weight = [problem["weight"][0].float(), problem["weight"][1]]
    with pytest.raises(TypeError, match=r"mixed dtypes: weight\[0\] is torch.float32"):
        call(problem, weight=weight)


def test_mixed_devices(problem):
    weight = [problem["weight"][0].to("meta"), problem["weight"][1]]
    with pytest.raises(ValueError, match=r"mixed devices: weight\[0\] is on meta"):
        call(problem, weight=weight)


def test_integer_tensors(problem):
    source = [torch.ones(2, 3, 4, 4, dtype=torch.int64), problem["source_feats"][1]]
    with pytest.raises(TypeError, match=r"source_feats\[0\] must be a floating-point tensor"):
        call(problem, source_feats=source)


def test_beta_list_length(problem):
    with pytest.raises(ValueError, match="beta must be a float or one float per pair: got 3"):
        call(problem, beta=[0.1, 0.2, 0.3])


def test_beta_per_pair_weighs_each_pair(problem):
    per_pair = call(problem, beta=[1.0, 0.0], reduction="none")
    assert torch.count_nonzero(per_pair[1]) == 0 and torch.count_nonzero(per_pair[0]) > 0


def test_unknown_reduction(problem):
    with pytest.raises(ValueError, match="reduction must be one of"):
        call(problem, reduction="sum")


def test_unknown_backend(problem):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        call(problem, backend="fast")


def test_not_a_list(problem):
    with pytest.raises(TypeError, match="source_feats must be a list of tensors, got Tensor"):
        call(problem, source_feats=problem["source_feats"][0])


def test_triton_without_gpu_or_interpreter_says_why(problem, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(BackendUnavailable, match="'triton' is not available: .*TRITON_INTERPRET"):
        call(problem, backend="triton")


def test_errors_come_before_any_kernel(problem, monkeypatch):
    from l2t_fast.matching import backends

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel was reached")

    monkeypatch.setattr(backends, "resolve", no_kernel)
    with pytest.raises(ValueError):
        call(problem, weight=problem["weight"][:1])


@pytest.mark.parametrize("argument, index, shape, what", [
    ("target_feats", 0, [2, 4, 4, 0], "width"),
    ("source_feats", 1, [2, 5, 0, 2], "height"),
    ("source_feats", 0, [2, 0, 4, 4], "channels"),
    ("target_feats", 1, [2, 0, 3, 3], "channels"),
])
def test_empty_feature_map_names_argument_layer_and_shape(problem, monkeypatch, argument,
                                                          index, shape, what):
    # On the cpu backend, these killed the process (SIGFPE, SIGSEGV) or gave NaN.
    from l2t_fast.matching import backends

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel was reached")

    maps = list(problem[argument])
    maps[index] = torch.randn(*shape, dtype=torch.float64)
    monkeypatch.setattr(backends, "resolve", no_kernel)
    message = re.escape(f"{argument}[{index}] has no {what} (shape {shape})")
    with pytest.raises(ValueError, match=message):
        call(problem, **{argument: maps})


def test_empty_batch_keeps_its_behaviour():
    problem = random_problem([(0, 3, 4, 4)], [(0, 2, 2, 2)], [(0, 0)])
    assert call(problem, reduction="none").shape == (1, 0)
    assert torch.isnan(call(problem))


@pytest.mark.parametrize("beta, message", [
    (torch.full((2, 1), 0.5), r"beta must be a float or one float per pair \(a 0-D or 1-D "
                              r"tensor\), got a tensor of shape \[2, 1\]"),
    (torch.tensor([0.5, 0.5, 0.5]), "beta must be a float or one float per pair: got 3 values"),
    ([torch.tensor(0.5), 0.5], r"beta\[0\] must be a number, got Tensor"),
])
def test_bad_beta_names_beta(problem, beta, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(problem, beta=beta)
