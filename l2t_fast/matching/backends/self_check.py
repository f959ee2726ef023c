"""The self-check of a backend against the reference backend, on one tiny problem.

The compiled and Triton backends are fast because they never materialise what the
reference computes plainly; a kernel that is wrong on some device (or was never run
there) would otherwise train silently on wrong gradients. Before ``resolve`` hands such a
backend out for the first time in a process for a (device, dtype), it computes a tiny
problem, with maps resized up and down along each axis, an unresized pair and two pairs sharing a target map,
and compares every result the loss uses with the reference's: the channel errors, their
gradients by autograd, the backward alone (``channel_errors_vjp``) and the derivative along
tangents (``channel_errors_jvp``, the double backward). Its own generator leaves the global
random state alone, so a run's results do not depend on when the check happened.
"""
import torch

from l2t_fast.matching.backends import reference

SOURCE_SHAPES = [(2, 3, 3, 5), (2, 2, 4, 4)]
TARGET_SHAPES = [(2, 4, 4, 4), (2, 3, 2, 6)]
PAIR_SOURCE = [0, 1, 1]
PAIR_TARGET = [0, 0, 1]
# Largest difference allowed, relative to the largest value of the reference's result.
# Half inputs are rounded the same for both; both accumulate in float32.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2,
             torch.bfloat16: 3e-2}


def _problem(device, dtype):
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device, dtype)

    source = [rand(*shape) for shape in SOURCE_SHAPES]
    target = [rand(*shape) for shape in TARGET_SHAPES]
    weight = [rand(SOURCE_SHAPES[m][1], TARGET_SHAPES[n][1])
              for m, n in zip(PAIR_SOURCE, PAIR_TARGET)]
    bias = [rand(SOURCE_SHAPES[m][1]) for m in PAIR_SOURCE]
    return source, target, weight, bias, generator


def _results(module, source, target, weight, bias, grad_errors, tangents):
    """{what: tensor} of everything compared, for one backend's functions."""
    with torch.inference_mode(False), torch.enable_grad():
        leaves = [[t.detach().requires_grad_() for t in group]
                  for group in (source, target, weight, bias)]
        errors = module.channel_errors(*leaves, PAIR_SOURCE, PAIR_TARGET)
        grads = torch.autograd.grad(errors, [t for group in leaves for t in group],
                                    grad_errors, allow_unused=True)
    results = {"the channel errors (forward)": errors.detach()}
    names = [f"{group}[{i}]" for group, tensors in zip(("source", "target", "weight", "bias"),
                                                       leaves) for i in range(len(tensors))]
    for name, grad, like in zip(names, grads, [t for group in leaves for t in group]):
        results[f"the gradient in {name} (backward)"] = (
            torch.zeros_like(like) if grad is None else grad)
    with torch.no_grad():
        vjp = module.channel_errors_vjp(grad_errors, source, target, weight, bias, PAIR_SOURCE,
                                        PAIR_TARGET)
        for group, grads in zip(("target", "weight", "bias"), vjp):
            for i, grad in enumerate(grads):
                results[f"the gradient in {group}[{i}] (channel_errors_vjp)"] = grad
        results["the derivative along tangents (channel_errors_jvp, double backward)"] = (
            module.channel_errors_jvp(source, target, weight, bias, PAIR_SOURCE, PAIR_TARGET,
                                      *tangents))
    return results


def first_difference(backend, device, dtype):
    """A sentence naming the first result that differs beyond the tolerance, or None."""
    source, target, weight, bias, generator = _problem(device, dtype)
    width = sum(source[m].shape[1] for m in PAIR_SOURCE)
    accumulate = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    grad_errors = torch.randn(source[0].shape[0], width, generator=generator,
                              dtype=torch.float64).to(device, accumulate)
    tangents = tuple([torch.randn(t.shape, generator=generator, dtype=torch.float64)
                      .to(device, dtype) for t in group] for group in (target, weight, bias))
    expected = _results(reference, source, target, weight, bias, grad_errors, tangents)
    actual = _results(backend, source, target, weight, bias, grad_errors, tangents)
    tolerance = TOLERANCE.get(dtype, 1e-4)
    for what, want in expected.items():
        got = actual[what]
        if got.shape != want.shape:
            return f"{what} has shape {list(got.shape)}, the reference's {list(want.shape)}"
        want, got = want.double(), got.double()
        error = (got - want).abs().max().item() if want.numel() else 0.0
        scale = max(want.abs().max().item() if want.numel() else 0.0, 1e-30)
        if not error <= tolerance * scale:  # a NaN fails too
            return (f"{what} differs from the reference backend's by up to {error:.3g} "
                    f"(relative {error / scale:.3g}, tolerance {tolerance:g})")
    return None
