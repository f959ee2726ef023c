"""The weighted feature-matching loss (docs/SPEC.md section 1): functional API and module.

The backend computes only the per-channel errors ``E [B, sum_i Cs_i]`` of all pairs, the
part that touches the feature maps. Weighting them by channel weights, pair weights and
beta is a few small tensor ops over ``[B, sum_i Cs_i]``, done here in PyTorch for every
backend alike, so autograd differentiates it (twice) and the kernels stay weight-free.
"""
import functools
import inspect
import math
from collections.abc import Sequence

import torch
from torch import nn

from l2t_fast.matching import backends
from l2t_fast.matching.inputs import check_matching_inputs, check_tangents
from l2t_fast.matching.backends.registration import errors_dtype


_TENSOR_LISTS = ("source_feats", "target_feats", "weight", "bias", "channel_weights",
                 "pair_weights", "target_tangents", "weight_tangents", "bias_tangents")


def _autocast_aware(loss_function):
    """Under ``torch.autocast`` the features come in bf16/fp16 and the regressors in
    float32: cast every float32 or half tensor in the tensor-list arguments to the dtype the
    backend computes in (``backends.autocast_input_dtype``) and run with autocast off, so
    the loss takes a mixed-precision step's inputs (beta is applied in float32 anyway).
    float64 stays float64; outside autocast nothing changes (mixed dtypes are an error)."""
    signature = inspect.signature(loss_function)

    @functools.wraps(loss_function)
    def wrapper(*args, **kwargs):
        feats = args[0] if args else kwargs.get("source_feats")
        if not (isinstance(feats, Sequence) and feats and isinstance(feats[0], torch.Tensor)):
            return loss_function(*args, **kwargs)  # the checks say what is wrong
        device = feats[0].device
        if not torch.is_autocast_enabled(device.type):  # the common case: nothing to bind
            return loss_function(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        dtype = backends.autocast_input_dtype(bound.arguments["backend"], device)

        def cast(values):
            if isinstance(values, torch.Tensor) or not isinstance(values, Sequence):
                return values
            return [v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                    and v.dtype != torch.float64 else v for v in values]

        for name in _TENSOR_LISTS:
            if name in bound.arguments:
                bound.arguments[name] = cast(bound.arguments[name])
        with torch.autocast(device.type, enabled=False):
            return loss_function(*bound.args, **bound.kwargs)
    return wrapper


def _pair_sums(columns, channels):
    """[B, P]: each pair's block of columns of ``columns [B, sum_i Cs_i]`` summed.

    Block by block, not as a product with a 0/1 matrix: a product adds ``0 * x`` for every
    other pair's column, so a NaN or Inf in one pair would turn every pair's sum NaN.
    """
    return torch.stack([block.sum(dim=1) for block in torch.split(columns, channels, dim=1)],
                       dim=1)


def _prepare(source_feats, target_feats, pairs, weight, bias, channel_weights, pair_weights,
             beta, reduction, backend):
    """The checked inputs (zero biases where none are given) and the backend that takes them."""
    inputs = check_matching_inputs(source_feats, target_feats, pairs, weight, bias,
                                   channel_weights, pair_weights, beta, reduction)
    first = inputs.source[0]
    chosen = backends.resolve(backend, first.device, first.dtype)
    if inputs.bias is None:
        inputs.bias = [w.new_zeros(w.shape[0]) for w in inputs.weight]
    return inputs, chosen


def _weigh(errors, inputs, reduction):
    """The loss from the channel errors ``[B, sum_i Cs_i]``; linear in ``errors``."""
    channels = inputs.source_channels
    if inputs.channel_weights is None:
        per_sample = _pair_sums(errors, channels) / errors.new_tensor(channels)
    else:
        what = torch.cat(inputs.channel_weights, dim=1).to(errors.dtype)
        per_sample = _pair_sums(errors * what, channels)
    if inputs.pair_weights is not None:
        per_sample = per_sample * torch.stack(inputs.pair_weights, dim=1).to(errors.dtype)
    if isinstance(inputs.beta, torch.Tensor):  # differentiable, one per pair
        beta = inputs.beta.to(dtype=errors.dtype, device=errors.device)
    else:
        beta = errors.new_tensor(inputs.beta)
    per_sample = per_sample * beta
    if reduction == "none":
        return per_sample.t()
    return per_sample.mean(dim=0).sum()


def _error_coefficients(inputs, batch, dtype, device):
    """``d loss / dE``, ``[B, sum_i Cs_i]``, of the "mean" reduction: the loss is
    ``sum(E * coefficients)``. From the channel and pair weights and beta alone (and
    differentiable in the weights), so it is known before the errors are."""
    channels = inputs.source_channels
    per_column = [inputs.beta[i] / batch / (1 if inputs.channel_weights is not None else cs)
                  for i, cs in enumerate(channels) for _ in range(cs)]
    coefficients = torch.tensor(per_column, dtype=dtype, device=device).expand(batch, -1)
    if inputs.channel_weights is not None:
        coefficients = coefficients * torch.cat(inputs.channel_weights, dim=1).to(dtype)
    if inputs.pair_weights is not None:
        pair_of_column = torch.tensor([i for i, cs in enumerate(channels) for _ in range(cs)],
                                      device=device)
        lam = torch.stack(inputs.pair_weights, dim=1).to(dtype)
        coefficients = coefficients * lam.index_select(1, pair_of_column)
    return coefficients.contiguous()


def _split(flat, counts):
    """``flat`` cut into consecutive lists of the given lengths."""
    out, start = [], 0
    for count in counts:
        out.append(list(flat[start:start + count]))
        start += count
    return out


class _FusedTrainingStep(torch.autograd.Function):
    """``sum(E * coefficients)``, with the gradients in the feature maps and regressors made
    in the forward's sweep (``channel_errors_with_grads``: three GEMM passes instead of four).

    The first backward scales the kept gradients by ``grad_output`` in place (unless it is
    1, as in ``ce + matching``: a pass over every kept gradient for nothing) and hands them
    over; a second derivative (``create_graph=True``) or a second backward through a
    retained graph recomputes them with the differentiable ops, so both stay exact.
    """

    @staticmethod
    def forward(ctx, counts, pair_source, pair_target, mask, coefficients, *tensors):
        source, target, weight, bias = _split(tensors, counts)
        errors, *grads = torch.ops.l2t_fast.channel_errors_with_grads(
            coefficients, source, target, weight, bias, pair_source, pair_target, list(mask))
        ctx.counts, ctx.pairs, ctx.mask = counts, (pair_source, pair_target), mask
        ctx.kept_grads = grads
        ctx.save_for_backward(errors, coefficients, *tensors)
        return (errors * coefficients).sum()

    @staticmethod
    def backward(ctx, grad_output):
        errors, coefficients, *tensors = ctx.saved_tensors
        groups = _split(tensors, ctx.counts)
        grads, ctx.kept_grads = ctx.kept_grads, None
        if torch.is_grad_enabled() or grads is None:
            ops = torch.ops.l2t_fast
            grads = ops.channel_errors_backward((grad_output * coefficients).contiguous(),
                                                *groups, *ctx.pairs, list(ctx.mask))
            if torch.is_grad_enabled() and ctx.needs_input_grad[4]:
                errors = ops.channel_errors(*groups, *ctx.pairs)
        elif not (grad_output.device.type == "cpu" and grad_output.item() == 1):
            grads = [[g.mul_(grad_output) for g in group] for group in grads]
        per_tensor = [g if wanted else None
                      for group, like, wanted in zip(grads, groups, ctx.mask)
                      for g in (group if wanted else like)]
        grad_coefficients = grad_output * errors if ctx.needs_input_grad[4] else None
        return (None, None, None, None, grad_coefficients, *per_tensor)


def _fused_step_applies(inputs, chosen, reduction):
    """Whether the loss takes the fused path: a differentiated "mean" loss on a backend
    with the fused op (the C++ CPU kernels), outside torch.compile (whose graphs keep the
    separate ops: the kept gradients are state that the traced backward would not see)."""
    if reduction == "none" or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if chosen.channel_errors_with_grads is None:
        return False
    # an empty batch has no mean to fuse, and a differentiable beta takes the plain path,
    # where autograd differentiates the weighting in it
    if inputs.source[0].shape[0] == 0 or isinstance(inputs.beta, torch.Tensor):
        return False
    differentiable = (inputs.source + inputs.target + inputs.weight + inputs.bias
                      + (inputs.channel_weights or []) + (inputs.pair_weights or []))
    return any(t.requires_grad for t in differentiable)


def _fused_loss(inputs):
    """The "mean" loss through ``_FusedTrainingStep``."""
    first = inputs.source[0]
    coefficients = _error_coefficients(inputs, first.shape[0], first.dtype, first.device)
    groups = (inputs.source, inputs.target, inputs.weight, inputs.bias)
    mask = tuple(any(t.requires_grad for t in group) for group in groups)
    return _FusedTrainingStep.apply(tuple(len(g) for g in groups), tuple(inputs.pair_source),
                                    tuple(inputs.pair_target), mask, coefficients,
                                    *[t for group in groups for t in group])


@_autocast_aware
def weighted_feature_matching(source_feats, target_feats, pairs, weight, bias=None,
                              channel_weights=None, pair_weights=None, beta=0.5,
                              reduction="mean", backend="auto"):
    """Sum over pairs of beta_i * mean_b lam_i[b] * sum_c w_i[b, c] * E_i[b, c].

    See docs/SPEC.md section 1. ``reduction="none"`` returns the ``[P, B]`` per-sample terms.
    A differentiated "mean" loss on the CPU kernels computes its gradients with its value
    (``_FusedTrainingStep``).
    """
    inputs, chosen = _prepare(source_feats, target_feats, pairs, weight, bias, channel_weights,
                              pair_weights, beta, reduction, backend)
    if _fused_step_applies(inputs, chosen, reduction):
        return _fused_loss(inputs)
    errors = chosen.channel_errors(inputs.source, inputs.target, inputs.weight, inputs.bias,
                                   inputs.pair_source, inputs.pair_target)
    return _weigh(errors, inputs, reduction)


@_autocast_aware
def weighted_feature_matching_jvp(source_feats, target_feats, pairs, weight, bias=None,
                                  channel_weights=None, pair_weights=None, beta=0.5,
                                  target_tangents=None, weight_tangents=None,
                                  bias_tangents=None, reduction="mean", backend="auto"):
    """The loss's derivative along tangents of the target features and regressors.

    What forward-mode AD would give (source features held fixed; a None tangent is zero),
    for every backend, although the compiled ops have no forward-mode rule: the backend's
    double backward yields the errors' derivative, and the weighting is linear in the
    errors. The result is differentiable (reverse mode) in the channel and pair weights,
    which is how the meta step gets d<grad loss, v>/d(weights) without a second backward.
    """
    inputs, chosen = _prepare(source_feats, target_feats, pairs, weight, bias, channel_weights,
                              pair_weights, beta, reduction, backend)
    target_tangents = check_tangents("target_tangents", target_tangents, inputs.target,
                                     "target_feats")
    weight_tangents = check_tangents("weight_tangents", weight_tangents, inputs.weight, "weight")
    bias_tangents = check_tangents("bias_tangents", bias_tangents, inputs.bias, "bias")
    errors_tangent = chosen.channel_errors_jvp(
        inputs.source, inputs.target, inputs.weight, inputs.bias, inputs.pair_source,
        inputs.pair_target, target_tangents, weight_tangents, bias_tangents)
    return _weigh(errors_tangent, inputs, reduction)


@_autocast_aware
def weighted_feature_matching_grads(source_feats, target_feats, pairs, weight, bias=None,
                                    channel_weights=None, pair_weights=None, beta=0.5,
                                    create_graph=False, backend="auto"):
    """The loss's gradients in ``target_feats``, ``weight`` and ``bias`` (three lists),
    without its value.

    The loss is linear in the channel errors, so its gradient in them comes from the
    channel and pair weights alone, and the backend's backward runs without its forward:
    a training step that needs only the gradient (as every lookahead step of the meta step
    does) skips one pass of the op. With ``create_graph`` the gradients are differentiable
    (in the features, regressors and weights), as ``torch.autograd.grad`` would give them.
    """
    inputs, chosen = _prepare(source_feats, target_feats, pairs, weight, bias, channel_weights,
                              pair_weights, beta, "mean", backend)
    first = inputs.source[0]
    with torch.enable_grad():
        errors = torch.zeros(first.shape[0], sum(inputs.source_channels),
                             dtype=errors_dtype(first.dtype), device=first.device,
                             requires_grad=True)
        grad_errors, = torch.autograd.grad(_weigh(errors, inputs, "mean"), errors,
                                           create_graph=create_graph)
    with torch.set_grad_enabled(create_graph):
        return chosen.channel_errors_vjp(grad_errors, inputs.source, inputs.target,
                                         inputs.weight, inputs.bias, inputs.pair_source,
                                         inputs.pair_target)


class WeightedFeatureMatching(nn.Module):
    """The loss with its own 1x1 regressors, one per pair, that map target to source channels.

    Regressors start like ``nn.Conv2d``'s default (uniform in +-1/sqrt(Ct)), as in the
    paper's code.
    """

    def __init__(self, source_channels, target_channels, pairs, beta=0.5, bias=True,
                 backend="auto"):
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        if not self.pairs:
            raise ValueError("pairs is empty: at least one (source, target) pair is needed")
        for i, (m, n) in enumerate(self.pairs):
            if not (0 <= m < len(source_channels) and 0 <= n < len(target_channels)):
                raise ValueError(f"pairs[{i}] = {(m, n)} is out of range for "
                                 f"{len(source_channels)} source and {len(target_channels)} "
                                 f"target layers")
        self.source_channels = list(source_channels)
        self.target_channels = list(target_channels)
        self.beta = beta
        self.backend = backend
        self.weight = nn.ParameterList()
        self.bias = nn.ParameterList() if bias else None
        for m, n in self.pairs:
            bound = 1.0 / math.sqrt(target_channels[n])
            cs, ct = source_channels[m], target_channels[n]
            self.weight.append(nn.Parameter(torch.empty(cs, ct).uniform_(-bound, bound)))
            if bias:
                self.bias.append(nn.Parameter(torch.empty(cs).uniform_(-bound, bound)))

    def forward(self, source_feats, target_feats, channel_weights=None, pair_weights=None,
                reduction="mean"):
        return weighted_feature_matching(
            source_feats, target_feats, self.pairs, list(self.weight),
            None if self.bias is None else list(self.bias), channel_weights, pair_weights,
            self.beta, reduction, self.backend)

    def extra_repr(self):
        return f"pairs={self.pairs}, beta={self.beta}, backend={self.backend!r}"
