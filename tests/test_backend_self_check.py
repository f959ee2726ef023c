"""A backend other than the reference is checked against it once per (backend, device,
dtype) in a process, before it is first used; a mismatch is an error saying what differed
and how to choose another backend. Faults are injected into the ``cpu`` backend here."""
import pytest
import torch

import l2t_fast
from l2t_fast.matching import backends
from l2t_fast.matching.backends import BackendMismatch, compiled, reference
from matching_reference import random_problem

pytestmark = pytest.mark.skipif("cpu" not in l2t_fast.available_backends(),
                                reason="compiled extension not built")


@pytest.fixture(autouse=True)
def unchecked(monkeypatch):
    """A process in which no backend has been checked yet."""
    monkeypatch.setattr(backends, "_checked", set())


def problem(dtype=torch.float64):
    return random_problem([(2, 3, 4, 4)], [(2, 2, 3, 3)], [(0, 0)], dtype=dtype,
                          generator=torch.Generator().manual_seed(0))


def loss(dtype=torch.float64, backend="cpu"):
    return l2t_fast.weighted_feature_matching(**problem(dtype), backend=backend)


def test_wrong_forward_is_refused_with_what_differed_and_what_to_do(monkeypatch):
    correct = compiled.channel_errors
    monkeypatch.setattr(compiled, "channel_errors",
                        lambda *args: correct(*args) * (1 + 1e-3))
    with pytest.raises(BackendMismatch) as error:
        loss()
    message = str(error.value)
    assert "backend 'cpu' failed its self-check on cpu torch.float64" in message
    assert "the channel errors (forward) differs from the reference backend's by up to" in message
    assert 'backend="reference"' in message and "--backend reference" in message
    # A BackendUnavailable: `l2t-fast transfer` reports it before the first run.
    assert isinstance(error.value, backends.BackendUnavailable)


def test_wrong_gradient_is_refused(monkeypatch):
    correct = compiled.channel_errors

    def wrong_source_gradient(source, *rest):
        errors = correct(source, *rest)
        return errors + 0.01 * (source[0].sum() - source[0].sum().detach())

    monkeypatch.setattr(compiled, "channel_errors", wrong_source_gradient)
    with pytest.raises(BackendMismatch, match=r"the gradient in source\[0\] \(backward\) "
                                              r"differs from the reference backend.s by up to"):
        loss()


def test_wrong_double_backward_is_refused(monkeypatch):
    correct = compiled.channel_errors_jvp
    monkeypatch.setattr(compiled, "channel_errors_jvp", lambda *args: -correct(*args))
    with pytest.raises(BackendMismatch, match=r"channel_errors_jvp, double backward"):
        loss()


def test_nan_is_a_mismatch(monkeypatch):
    correct = compiled.channel_errors_vjp

    def nan_weight_gradient(*args):
        target, weight, bias = correct(*args)
        return target, [torch.full_like(w, float("nan")) for w in weight], bias

    monkeypatch.setattr(compiled, "channel_errors_vjp", nan_weight_gradient)
    with pytest.raises(BackendMismatch, match=r"the gradient in weight\[0\] "
                                              r"\(channel_errors_vjp\) differs .* by up to nan"):
        loss()


def test_runs_once_per_backend_device_and_dtype(monkeypatch):
    calls = []
    counted = reference.channel_errors

    def counting(*args):
        calls.append(args[0][0].dtype)
        return counted(*args)

    monkeypatch.setattr(reference, "channel_errors", counting)
    loss(torch.float64)
    assert calls, "the first use of the cpu backend in float64 ran no self-check"
    checked = len(calls)
    loss(torch.float64)
    loss(torch.float64, backend="auto")  # auto picks the same, already checked, backend
    assert len(calls) == checked
    loss(torch.float32)  # another dtype: checked once more, once
    assert len(calls) > checked and calls[-1] == torch.float32
    checked = len(calls)
    loss(torch.float32)
    assert len(calls) == checked


def test_check_leaves_the_global_random_state_alone():
    before = torch.get_rng_state()
    loss()
    assert torch.equal(torch.get_rng_state(), before)


def test_reference_is_never_self_checked():
    loss(backend="reference")
    assert not backends._checked
