import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from l2t_fast.methods.l2tww.meta import WHERE_ACTIVATIONS, WhatNetwork, WhereNetwork

CHANNELS = [3, 5]
PAIRS = [(0, 0), (1, 0), (1, 1)]


def features(batch=4, scale=1.0):
    torch.manual_seed(0)
    return [scale * torch.randn(batch, 3, 6, 6, dtype=torch.float64),
            scale * torch.randn(batch, 5, 3, 3, dtype=torch.float64)]


def test_what_starts_uniform_with_one_softmax_per_pair():
    what = WhatNetwork(CHANNELS, PAIRS).double()
    out = what(features())
    assert [tuple(w.shape) for w in out] == [(4, 3), (4, 5), (4, 5)]
    for w, (m, _) in zip(out, PAIRS):
        assert torch.allclose(w, torch.full_like(w, 1 / CHANNELS[m]))


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 5), channels=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_what_matches_softmax_of_linear_on_pooled_source(batch, channels, seed):
    torch.manual_seed(seed)
    what = WhatNetwork([channels], [(0, 0)]).double()
    torch.nn.init.normal_(what.layers[0].weight)
    torch.nn.init.normal_(what.layers[0].bias)
    source = torch.randn(batch, channels, 4, 3, dtype=torch.float64)
    pooled = source.mean((2, 3))
    expected = torch.softmax(pooled @ what.layers[0].weight.T + what.layers[0].bias, dim=1)
    (out,) = what([source])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum(1), torch.ones(batch, dtype=torch.float64))


EXPECTED_AT_ZERO_FEATURES = {  # pre-activation = init = 1.0
    "relu6": 1.0, "relu": 1.0, "softplus": math.log1p(math.e), "sigmoid": 1 / (1 + math.exp(-1)),
    "elu+1": 2.0, "tanh+1": math.tanh(1.0) + 1, "const": math.log1p(math.e),
}


@pytest.mark.parametrize("activation", sorted(WHERE_ACTIVATIONS))
def test_where_activation_value_and_shape(activation):
    where = WhereNetwork(CHANNELS, PAIRS, activation=activation, init=1.0).double()
    out = where(features(scale=0.0))
    assert len(out) == len(PAIRS)
    for lam in out:
        assert lam.shape == (4,)
        torch.testing.assert_close(lam, torch.full_like(lam, EXPECTED_AT_ZERO_FEATURES[activation]))


@pytest.mark.parametrize("activation", sorted(set(WHERE_ACTIVATIONS) - {"const"}))
def test_where_is_activation_of_linear(activation):
    where = WhereNetwork(CHANNELS, PAIRS, activation=activation, init=0.3).double()
    feats = features()
    out = where(feats)
    functions = {"relu6": F.relu6, "relu": F.relu, "softplus": F.softplus,
                 "sigmoid": torch.sigmoid, "elu+1": lambda z: F.elu(z) + 1,
                 "tanh+1": lambda z: torch.tanh(z) + 1}
    for lam, layer, (m, _) in zip(out, where.layers, PAIRS):
        pre = feats[m].mean((2, 3)) @ layer.weight.T + layer.bias
        torch.testing.assert_close(lam, functions[activation](pre).squeeze(1))
    for layer in where.layers:  # 0.3 rounded to float32 at construction
        torch.testing.assert_close(layer.bias, torch.full_like(layer.bias, 0.3))


def test_const_has_one_learnable_scalar_per_pair():
    where = WhereNetwork(CHANNELS, PAIRS, activation="const", init=0.0).double()
    assert [n for n, _ in where.named_parameters()] == ["scalars"]
    assert where.scalars.shape == (len(PAIRS),)
    out = where(features())
    sum(lam.sum() for lam in out).backward()
    # d/da softplus(10 a) at a = 0 is 10 * sigmoid(0) = 5, summed over a batch of 4
    torch.testing.assert_close(where.scalars.grad, torch.full((3,), 20.0, dtype=torch.float64))


def test_unknown_activation_lists_valid_ones():
    with pytest.raises(ValueError, match="relu6") as info:
        WhereNetwork(CHANNELS, PAIRS, activation="swish")
    assert "swish" in str(info.value) and "tanh+1" in str(info.value)


def test_gradients_reach_both_networks():
    what, where = WhatNetwork(CHANNELS, PAIRS).double(), WhereNetwork(CHANNELS, PAIRS).double()
    feats = features()
    weights = torch.randn(4, 5, dtype=torch.float64)
    loss = (what(feats)[1] * weights).sum() + sum(lam.sum() for lam in where(feats))
    loss.backward()
    assert what.layers[1].weight.grad.abs().sum() > 0
    assert where.layers[0].weight.grad.abs().sum() > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="pairs"):
        WhatNetwork(CHANNELS, [])
    with pytest.raises(ValueError, match=r"pairs\[0\]"):
        WhatNetwork(CHANNELS, [(2, 0)])
    what = WhatNetwork(CHANNELS, PAIRS)
    with pytest.raises(ValueError, match=r"source_feats\[1\] must be \[B, 5"):
        what([torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4)])
    with pytest.raises(ValueError, match="at least 2"):
        WhereNetwork(CHANNELS, PAIRS)([torch.randn(2, 3, 4, 4)])
