"""The weighted feature-matching loss (docs/SPEC.md section 1): functional API and module.

The backend computes only the per-channel errors ``E [B, sum_i Cs_i]`` of all pairs, the
part that touches the feature maps. Weighting them by channel weights, pair weights and
beta is a few small tensor ops over ``[B, sum_i Cs_i]``, done here in PyTorch for every
backend alike, so autograd differentiates it (twice) and the kernels stay weight-free.
"""
import math

import torch
from torch import nn

from l2t_fast.matching import backends
from l2t_fast.matching.inputs import check_matching_inputs, check_tangents
from l2t_fast.matching.backends.registration import errors_dtype


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


def weighted_feature_matching(source_feats, target_feats, pairs, weight, bias=None,
                              channel_weights=None, pair_weights=None, beta=0.5,
                              reduction="mean", backend="auto"):
    """Sum over pairs of beta_i * mean_b lam_i[b] * sum_c w_i[b, c] * E_i[b, c].

    See docs/SPEC.md section 1. ``reduction="none"`` returns the ``[P, B]`` per-sample terms.
    """
    inputs, chosen = _prepare(source_feats, target_feats, pairs, weight, bias, channel_weights,
                              pair_weights, beta, reduction, backend)
    errors = chosen.channel_errors(inputs.source, inputs.target, inputs.weight, inputs.bias,
                                   inputs.pair_source, inputs.pair_target)
    return _weigh(errors, inputs, reduction)


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
