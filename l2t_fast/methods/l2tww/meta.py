"""The meta-networks of L2T-ww (docs/SPEC.md section 2): what to transfer and where.

Both read only the source features, which never depend on the target's parameters, so
their outputs are fixed for a whole training iteration; the engine evaluates them once
per iteration and differentiates through them into the unrolled lookahead.
"""
import torch
import torch.nn.functional as F
from torch import nn

WHERE_ACTIVATIONS = {
    "relu6": F.relu6,
    "relu": F.relu,
    "softplus": F.softplus,
    "sigmoid": torch.sigmoid,
    "elu+1": lambda z: F.elu(z) + 1,
    "tanh+1": lambda z: torch.tanh(z) + 1,
    "const": None,  # one learnable scalar per pair, see WhereNetwork
}


def _check_pairs(source_channels, pairs):
    source_channels = [int(c) for c in source_channels]
    if not source_channels or any(c < 1 for c in source_channels):
        raise ValueError(f"source_channels must be a non-empty list of positive ints, "
                         f"got {source_channels}")
    pairs = [tuple(p) for p in pairs]
    if not pairs:
        raise ValueError("pairs is empty: at least one (source, target) pair is needed")
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not 0 <= pair[0] < len(source_channels):
            raise ValueError(f"pairs[{i}] = {pair}: must be (source index, target index) with the "
                             f"source index in [0, {len(source_channels)})")
    return source_channels, pairs


def _pooled_sources(source_feats, source_channels, pairs, caller):
    """Global average pool of each pair's source map, [B, Cs_m], checked against the layout."""
    needed = max(m for m, _ in pairs) + 1
    if len(source_feats) < needed:
        raise ValueError(f"{caller} needs at least {needed} source feature maps, "
                         f"got {len(source_feats)}")
    pooled = {}
    for m, _ in pairs:
        if m in pooled:
            continue
        f = source_feats[m]
        if f.dim() < 2 or f.shape[1] != source_channels[m]:
            raise ValueError(f"{caller}: source_feats[{m}] must be [B, {source_channels[m]}, ...], "
                             f"got shape {list(f.shape)}")
        pooled[m] = f.flatten(2).mean(2) if f.dim() > 2 else f
    return [pooled[m] for m, _ in pairs]


class WhatNetwork(nn.Module):
    """Per pair i = (m, n): channel weights ``softmax(Linear_i(gap(S_m)))``, ``[B, Cs_m]``.

    The linear maps start at zero, so the first weights are uniform (plain feature
    matching with per-channel averaging), as in the paper's code.
    """

    def __init__(self, source_channels, pairs):
        super().__init__()
        self.source_channels, self.pairs = _check_pairs(source_channels, pairs)
        self.layers = nn.ModuleList()
        for m, _ in self.pairs:
            layer = nn.Linear(self.source_channels[m], self.source_channels[m])
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
            self.layers.append(layer)

    def forward(self, source_feats):
        pooled = _pooled_sources(source_feats, self.source_channels, self.pairs, "WhatNetwork")
        return [torch.softmax(layer(g), dim=1) for layer, g in zip(self.layers, pooled)]


class WhereNetwork(nn.Module):
    """Per pair i = (m, n): a pair weight ``act(Linear'_i(gap(S_m)))`` per sample, ``[B]``.

    ``Linear'_i`` keeps PyTorch's default weight init and starts its bias at ``init``, as in
    the paper's code. ``activation="const"`` ignores the features: each pair has one
    learnable scalar ``a_i`` and weight ``softplus(10 * a_i)``; ``a_i`` starts at
    ``init / 10`` so that, like the bias of the other activations, the pre-activation
    starts at ``init``.
    """

    def __init__(self, source_channels, pairs, activation="relu6", init=1.0):
        super().__init__()
        if activation not in WHERE_ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(WHERE_ACTIVATIONS)}, "
                             f"got {activation!r}")
        self.source_channels, self.pairs = _check_pairs(source_channels, pairs)
        self.activation = activation
        if activation == "const":
            self.scalars = nn.Parameter(torch.full((len(self.pairs),), float(init) / 10))
            return
        self.layers = nn.ModuleList()
        for m, _ in self.pairs:
            layer = nn.Linear(self.source_channels[m], 1)
            nn.init.constant_(layer.bias, float(init))
            self.layers.append(layer)

    def forward(self, source_feats):
        if self.activation == "const":
            batch = source_feats[0].shape[0]
            return list(F.softplus(10 * self.scalars).unsqueeze(1).expand(-1, batch).unbind(0))
        act = WHERE_ACTIVATIONS[self.activation]
        pooled = _pooled_sources(source_feats, self.source_channels, self.pairs, "WhereNetwork")
        return [act(layer(g)).squeeze(1) for layer, g in zip(self.layers, pooled)]

    def extra_repr(self):
        return f"activation={self.activation!r}"
