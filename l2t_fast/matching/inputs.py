"""Checking and normalising the inputs of the weighted feature-matching loss.

Every bad input is rejected here, before any kernel runs, with an error that names the
argument, the pair index and the shapes involved. What comes out is the canonical form
that every backend takes: 2-D regressors, a bias per pair, ``[B]`` pair weights and one
beta per pair.
"""
from dataclasses import dataclass
from numbers import Real
from typing import Optional, Sequence

from torch import Tensor

REDUCTIONS = ("mean", "none")


@dataclass
class MatchingInputs:
    source: list          # S_m, [B, Cs_m, Hs_m, Ws_m]
    target: list          # T_n, [B, Ct_n, Ht_n, Wt_n]
    pair_source: list     # m of each pair
    pair_target: list     # n of each pair
    weight: list          # W_i, [Cs_m, Ct_n]
    bias: Optional[list]  # b_i, [Cs_m], or None
    channel_weights: Optional[list]  # w_i, [B, Cs_m], or None
    pair_weights: Optional[list]     # lam_i, [B], or None
    beta: object          # one float per pair (a list), or a [P] tensor

    @property
    def source_channels(self):
        """Cs_m of each pair: the width of each pair's block of channel errors."""
        return [self.source[m].shape[1] for m in self.pair_source]


def _shape(t):
    return list(t.shape)


def _check_tensor_list(name, values, allow_none=False):
    if values is None and allow_none:
        return None
    if isinstance(values, Tensor) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of tensors, got {type(values).__name__}")
    for i, t in enumerate(values):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
        if not (t.is_floating_point()):
            raise TypeError(f"{name}[{i}] must be a floating-point tensor, got dtype {t.dtype}")
    return list(values)


def _check_not_empty(name, i, feature_map):
    """Channels, height and width must be at least 1 (an empty map has no mean error and
    would reach the kernels with nothing to resize from); an empty batch is allowed."""
    for axis, what in ((1, "channels"), (2, "height"), (3, "width")):
        if feature_map.shape[axis] == 0:
            raise ValueError(f"{name}[{i}] has no {what} (shape {_shape(feature_map)}): every "
                             f"feature map needs at least one channel, row and column")


def _check_per_pair(name, values, num_pairs):
    if len(values) != num_pairs:
        raise ValueError(
            f"{name} must hold one tensor per pair: got {len(values)} for {num_pairs} pairs")


def _check_pairs(pairs, num_source, num_target):
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"pairs must be a list of (source, target) index pairs, got {type(pairs).__name__}")
    if len(pairs) == 0:
        raise ValueError("pairs is empty: at least one (source, target) pair is needed")
    pair_source, pair_target = [], []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"pairs[{i}] must be a (source, target) index pair, got {pair!r}")
        m, n = pair
        for what, index, count in (("source", m, num_source), ("target", n, num_target)):
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(f"pairs[{i}] = {pair!r}: the {what} index must be an int")
            if not 0 <= index < count:
                raise ValueError(
                    f"pairs[{i}] = {pair!r}: {what} index {index} is out of range "
                    f"for {count} {what} feature maps")
        pair_source.append(m)
        pair_target.append(n)
    return pair_source, pair_target


def _check_beta(beta, num_pairs):
    """One float per pair, or, for a floating-point tensor, a ``[P]`` tensor that keeps its
    autograd graph (a beta that requires grad is differentiated, never detached)."""
    if isinstance(beta, Real) and not isinstance(beta, bool):
        return [float(beta)] * num_pairs
    if isinstance(beta, Tensor):
        if beta.dim() > 1:
            raise ValueError(f"beta must be a float or one float per pair (a 0-D or 1-D "
                             f"tensor), got a tensor of shape {_shape(beta)}")
        if beta.dim() == 1 and beta.shape[0] != num_pairs:
            raise ValueError(f"beta must be a float or one float per pair: got {beta.shape[0]} "
                             f"values for {num_pairs} pairs")
        if not beta.is_floating_point():
            return _check_beta(beta.tolist(), num_pairs)
        return beta.expand(num_pairs)
    if isinstance(beta, Sequence) and not isinstance(beta, (str, bytes)):
        if len(beta) != num_pairs:
            raise ValueError(f"beta must be a float or one float per pair: got {len(beta)} values "
                             f"for {num_pairs} pairs")
        for i, b in enumerate(beta):
            if isinstance(b, bool) or not isinstance(b, Real):
                raise TypeError(f"beta[{i}] must be a number, got {type(b).__name__}")
        return [float(b) for b in beta]
    raise TypeError(f"beta must be a float, a list of floats or a tensor, got {type(beta).__name__}")


def check_matching_inputs(source_feats, target_feats, pairs, weight, bias=None,
                          channel_weights=None, pair_weights=None, beta=0.5,
                          reduction="mean") -> MatchingInputs:
    """Validate the loss's arguments (docs/SPEC.md section 1) and bring them to canonical form."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    source = _check_tensor_list("source_feats", source_feats)
    target = _check_tensor_list("target_feats", target_feats)
    for name, feats in (("source_feats", source), ("target_feats", target)):
        if not feats:
            raise ValueError(f"{name} is empty")
        for i, t in enumerate(feats):
            if t.dim() != 4:
                raise ValueError(f"{name}[{i}] must be 4-D [B, C, H, W], got shape {_shape(t)}")
            _check_not_empty(name, i, t)
    batch = source[0].shape[0]
    for name, feats in (("source_feats", source), ("target_feats", target)):
        for i, t in enumerate(feats):
            if t.shape[0] != batch:
                raise ValueError(f"{name}[{i}] has batch size {t.shape[0]} but source_feats[0] has "
                                 f"{batch} (shapes {_shape(t)} and {_shape(source[0])})")
    pair_source, pair_target = _check_pairs(pairs, len(source), len(target))
    num_pairs = len(pair_source)

    weight = _check_tensor_list("weight", weight)
    _check_per_pair("weight", weight, num_pairs)
    weight2d = []
    for i, (w, m, n) in enumerate(zip(weight, pair_source, pair_target)):
        cs, ct = source[m].shape[1], target[n].shape[1]
        if _shape(w) == [cs, ct, 1, 1]:
            w = w.flatten(1)
        if _shape(w) != [cs, ct]:
            raise ValueError(
                f"weight[{i}] for pair {i} = ({m}, {n}) must have shape [{cs}, {ct}] or "
                f"[{cs}, {ct}, 1, 1] (source channels, target channels), got {_shape(w)}; "
                f"source_feats[{m}] is {_shape(source[m])}, target_feats[{n}] is {_shape(target[n])}")
        weight2d.append(w)

    bias = _check_tensor_list("bias", bias, allow_none=True)
    if bias is not None:
        _check_per_pair("bias", bias, num_pairs)
        for i, (b, m) in enumerate(zip(bias, pair_source)):
            if _shape(b) != [source[m].shape[1]]:
                raise ValueError(f"bias[{i}] for pair {i} must have shape [{source[m].shape[1]}] "
                                 f"(channels of source_feats[{m}] {_shape(source[m])}), got {_shape(b)}")

    channel_weights = _check_tensor_list("channel_weights", channel_weights, allow_none=True)
    if channel_weights is not None:
        _check_per_pair("channel_weights", channel_weights, num_pairs)
        for i, (w, m) in enumerate(zip(channel_weights, pair_source)):
            expected = [batch, source[m].shape[1]]
            if _shape(w) != expected:
                raise ValueError(f"channel_weights[{i}] for pair {i} must have shape {expected} "
                                 f"(batch, channels of source_feats[{m}]), got {_shape(w)}")

    pair_weights = _check_tensor_list("pair_weights", pair_weights, allow_none=True)
    if pair_weights is not None:
        _check_per_pair("pair_weights", pair_weights, num_pairs)
        flat = []
        for i, lam in enumerate(pair_weights):
            if _shape(lam) not in ([batch], [batch, 1]):
                raise ValueError(f"pair_weights[{i}] for pair {i} must have shape [{batch}] or "
                                 f"[{batch}, 1], got {_shape(lam)}")
            flat.append(lam.reshape(batch))
        pair_weights = flat

    _check_same_dtype_and_device(source=source, target=target, weight=weight2d, bias=bias,
                                 channel_weights=channel_weights, pair_weights=pair_weights)
    return MatchingInputs(source, target, pair_source, pair_target, weight2d, bias,
                          channel_weights, pair_weights, _check_beta(beta, num_pairs))


def _check_same_dtype_and_device(**groups):
    first_name, first = None, None
    for name, tensors in groups.items():
        for i, t in enumerate(tensors or ()):
            label = f"{name}[{i}]"
            if first is None:
                first_name, first = label, t
                continue
            if t.dtype != first.dtype:
                raise TypeError(f"mixed dtypes: {label} is {t.dtype} but {first_name} is {first.dtype}")
            if t.device != first.device:
                raise ValueError(f"mixed devices: {label} is on {t.device} but {first_name} is on "
                                 f"{first.device}")


def check_tangents(name, tangents, primals, primal_name):
    """Tangents along ``primals`` (a list of tensors or Nones, None meaning zero), each
    reshaped like its primal (so a [Cs, Ct, 1, 1] regressor tangent becomes 2-D too)."""
    if tangents is None:
        return [None] * len(primals)
    if isinstance(tangents, Tensor) or not isinstance(tangents, Sequence):
        raise TypeError(f"{name} must be a list of tensors (or None), got {type(tangents).__name__}")
    if len(tangents) != len(primals):
        raise ValueError(f"{name} must hold one tensor (or None) per {primal_name} entry: got "
                         f"{len(tangents)} for {len(primals)}")
    checked = []
    for i, (v, p) in enumerate(zip(tangents, primals)):
        if v is not None:
            if not isinstance(v, Tensor):
                raise TypeError(f"{name}[{i}] must be a tensor or None, got {type(v).__name__}")
            if _shape(v) not in (_shape(p), _shape(p) + [1, 1]):
                raise ValueError(f"{name}[{i}] has shape {_shape(v)} but {primal_name}[{i}] has "
                                 f"shape {_shape(p)}")
            if v.dtype != p.dtype or v.device != p.device:
                raise TypeError(f"{name}[{i}] is {v.dtype} on {v.device} but {primal_name}[{i}] "
                                f"is {p.dtype} on {p.device}")
            v = v.reshape(p.shape)
        checked.append(v)
    return checked
