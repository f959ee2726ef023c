"""L2TWW against an independent unroll: plain tensors, a functional copy of the tiny
target, the loss and the meta-networks written out here, and a manual SGD loop."""
import copy
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2t_fast.methods.base import Diverged
from l2t_fast.methods.l2tww.engine import L2TWW
from l2t_fast.methods.l2tww.meta import WHERE_ACTIVATIONS

LAYERS = ["layer1", "layer2"]
CLASSES = 3


class TinyNet(nn.Module):
    def __init__(self, widths):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1),
                                    nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(widths[0], widths[1], 3, stride=2, padding=1),
                                    nn.BatchNorm2d(widths[1]), nn.ReLU())
        self.fc = nn.Linear(widths[1], CLASSES)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


def tiny_forward(p, x):
    """TinyNet in train mode (batch statistics) on a dict of plain tensors."""
    def stage(h, name, stride):
        h = F.conv2d(h, p[f"{name}.0.weight"], p[f"{name}.0.bias"], stride=stride, padding=1)
        h = F.batch_norm(h, None, None, p[f"{name}.1.weight"], p[f"{name}.1.bias"], training=True)
        return F.relu(h)
    h1 = stage(x, "layer1", 1)
    h2 = stage(h1, "layer2", 2)
    return F.linear(h2.mean((2, 3)), p["fc.weight"], p["fc.bias"]), [h1, h2]


def matching_loss(source, target, pairs, weight, bias, channel_weights, pair_weights, beta):
    total = 0
    for i, (m, n) in enumerate(pairs):
        s, t = source[m], target[n]
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        projection = torch.einsum("ck,bkhw->bchw", weight[i], t) + bias[i][:, None, None]
        per = (channel_weights[i] * (s - projection).pow(2).mean((2, 3))).sum(1)
        if pair_weights is not None:
            per = per * pair_weights[i]
        total = total + beta * per.mean()
    return total


ACTIVATIONS = {"relu6": F.relu6, "relu": F.relu, "softplus": F.softplus, "sigmoid": torch.sigmoid,
               "elu+1": lambda z: F.elu(z) + 1, "tanh+1": lambda z: torch.tanh(z) + 1}


def tiny_source_features(model, x):
    """TinyNet's hooked layers by calling its stages (eval mode)."""
    h1 = model.layer1(x)
    return [h1, model.layer2(h1)]


def independent_hypergradient(engine, x, y, activation, learn_where, forward=tiny_forward,
                              source_features=tiny_source_features):
    """d CE(theta_{T+1}) / d phi by a plain unroll of SGD with momentum and weight decay;
    ``forward(tensors, x)`` is the target in train mode, ``source_features(model, x)`` the
    source's hooked layers."""
    group = engine.optimizer.param_groups[0]
    lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
    with torch.no_grad():
        source = source_features(engine.source_model, x)
    phi = {n: p.detach().clone().requires_grad_() for n, p in engine._meta_named}
    pooled = [source[m].mean((2, 3)) for m, _ in engine.pairs]
    channel_weights = [torch.softmax(g @ phi[f"what.layers.{i}.weight"].T
                                     + phi[f"what.layers.{i}.bias"], 1)
                       for i, g in enumerate(pooled)]
    pair_weights = None
    if learn_where and activation == "const":
        pair_weights = [F.softplus(10 * a).expand(x.shape[0]) for a in phi["where.scalars"]]
    elif learn_where:
        pair_weights = [ACTIVATIONS[activation](g @ phi[f"where.layers.{i}.weight"].T
                                                + phi[f"where.layers.{i}.bias"])[:, 0]
                        for i, g in enumerate(pooled)]

    target_names = [n for n, _ in engine.target_model.named_parameters()]
    real = list(engine.target_model.parameters()) + list(engine.matching.parameters())
    names = target_names + [f"m.{n}" for n, _ in engine.matching.named_parameters()]
    theta = {n: p.detach().clone().requires_grad_() for n, p in zip(names, real)}
    buffers = {n: engine.optimizer.state[p].get("momentum_buffer") for n, p in zip(names, real)}
    num_pairs = len(engine.pairs)

    def matching(theta):
        _, target = forward(theta, x)
        weight = [theta[f"m.weight.{i}"] for i in range(num_pairs)]
        bias = [theta[f"m.bias.{i}"] for i in range(num_pairs)]
        return matching_loss(source, target, engine.pairs, weight, bias, channel_weights,
                             pair_weights, 0.5)

    def ce(theta):
        return F.cross_entropy(forward(theta, x)[0], y)

    for loss_fn in [matching] * engine.inner_steps + [ce]:
        values = list(theta.values())
        grads = torch.autograd.grad(loss_fn(theta), values, create_graph=True, allow_unused=True)
        for (name, p), g in zip(list(theta.items()), grads):
            d = (torch.zeros_like(p) if g is None else g) + wd * p
            buffers[name] = d if buffers[name] is None else momentum * buffers[name] + d
            theta[name] = p - lr * buffers[name]
    grads = torch.autograd.grad(ce(theta), list(phi.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(phi.items(), grads)}


def make_engine(seed=0, steps_before=1, net=TinyNet, layers=LAYERS, **kwargs):
    torch.manual_seed(seed)
    source, target = net((4, 6)).double(), net((3, 5)).double()
    options = dict(backend="reference", lr=0.1, momentum=0.9, weight_decay=1e-2)
    options.update(kwargs)
    engine = L2TWW(source, target, layers, layers, **options)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (4,))
    with torch.no_grad():  # move the meta-networks off their symmetric start
        for p in engine.what.parameters():
            p.add_(0.3 * torch.randn_like(p))
    for _ in range(steps_before):
        engine.step(x, y)
    return engine, x, y


def assert_same(ours, expected):
    assert ours.keys() == expected.keys()
    for name in ours:
        scale = expected[name].abs().max().clamp_min(1e-30)
        error = (ours[name] - expected[name]).abs().max() / scale
        assert error < 1e-8, (name, error.item())
        assert ours[name].dtype == torch.float64


@pytest.mark.parametrize("activation", sorted(WHERE_ACTIVATIONS))
def test_hypergradient_equals_independent_unroll(activation):
    engine, x, y = make_engine(where_activation=activation)
    expected = independent_hypergradient(engine, x, y, activation, learn_where=True)
    assert any(g.abs().max() > 0 for n, g in expected.items() if n.startswith("where."))
    assert_same(engine.hypergradient(x, y), expected)


@pytest.mark.parametrize("inner_steps, steps_before, momentum",
                         [(1, 0, 0.9), (3, 2, 0.9), (2, 1, 0.0)])
def test_l2t_w_hypergradient_equals_independent_unroll(inner_steps, steps_before, momentum):
    """No Where network; also T = 1 and 3, a first step with no momentum buffers yet, and
    plain SGD without momentum."""
    engine, x, y = make_engine(learn_where=False, inner_steps=inner_steps,
                               steps_before=steps_before, pairs=[(1, 0), (0, 1)],
                               momentum=momentum)
    assert engine.where is None
    ours = engine.hypergradient(x, y)
    assert all(name.startswith("what.") for name in ours)
    assert_same(ours, independent_hypergradient(engine, x, y, None, learn_where=False))
    torch.testing.assert_close(engine.pair_weights(x), torch.ones(2, dtype=torch.float64))


class SharedBlockNet(nn.Module):
    """A block applied twice in one forward: its hook fires twice, and the last output
    (the one the classifier reads) is the feature."""

    def __init__(self, widths):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(widths[0], widths[0], 3, padding=1),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.fc = nn.Linear(widths[0], CLASSES)

    def forward(self, x):
        return self.fc(self.block(self.block(self.stem(x))).mean((2, 3)))


def shared_block_forward(p, x):
    """SharedBlockNet in train mode on plain tensors; features: the stem, the block's
    second output."""
    def stage(h, name):
        h = F.conv2d(h, p[f"{name}.0.weight"], p[f"{name}.0.bias"], padding=1)
        h = F.batch_norm(h, None, None, p[f"{name}.1.weight"], p[f"{name}.1.bias"], training=True)
        return F.relu(h)
    stem = stage(x, "stem")
    second = stage(stage(stem, "block"), "block")
    return F.linear(second.mean((2, 3)), p["fc.weight"], p["fc.bias"]), [stem, second]


def shared_block_source_features(model, x):
    stem = model.stem(x)
    return [stem, model.block(model.block(stem))]


@pytest.mark.parametrize("inner_steps, learn_where", [(1, False), (2, True), (3, True)])
def test_layer_run_twice_hypergradient_equals_independent_unroll(inner_steps, learn_where):
    """The hooked block runs twice per forward: the real step, every lookahead step (the
    forward-mode first step and the rebuilt ones) and the source all match its last output."""
    engine, x, y = make_engine(net=SharedBlockNet, layers=["stem", "block"],
                               inner_steps=inner_steps, learn_where=learn_where)
    expected = independent_hypergradient(engine, x, y, "relu6", learn_where,
                                         forward=shared_block_forward,
                                         source_features=shared_block_source_features)
    assert_same(engine.hypergradient(x, y), expected)


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_meta_step_does_t_hessian_vector_products(monkeypatch, inner_steps):
    """Matching steps 2..T (and the CE step) are differentiated twice; the first matching
    step goes by one forward-mode pass (the replay of the paper's code does T + 1): counted
    as the matching gradients taken with and without a graph."""
    engine, x, y = make_engine(inner_steps=inner_steps)
    create_graph = []  # one entry per matching-gradient computation
    real = engine._lookahead_matching_gradients

    def counting(*args):
        create_graph.append(args[-1])
        return real(*args)

    monkeypatch.setattr(engine, "_lookahead_matching_gradients", counting)
    engine.hypergradient(x, y)
    # the forward sweep takes T gradients; the reverse sweep rebuilds steps 2..T with a graph
    assert create_graph == [False] * inner_steps + [True] * (inner_steps - 1)


class _ReluWithoutJvp(torch.autograd.Function):
    """ReLU as a custom function with a backward (twice differentiable) but no jvp."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0).to(grad.dtype)


class ReluWithoutJvp(nn.Module):
    def forward(self, x):
        return _ReluWithoutJvp.apply(x)


def test_model_without_forward_mode_rules_falls_back_to_double_backward():
    engine, x, y = make_engine(learn_where=False, pairs=[(1, 0), (0, 1)])
    engine.target_model.layer1[2] = ReluWithoutJvp()
    expected = independent_hypergradient(engine, x, y, None, learn_where=False)
    with pytest.warns(UserWarning, match="forward-mode AD"):
        assert_same(engine.hypergradient(x, y), expected)
    assert_same(engine.hypergradient(x, y), expected)  # no second try, no second warning


def snapshot(engine):
    return copy.deepcopy({
        "target": engine.target_model.state_dict(),
        "source": engine.source_model.state_dict(),
        "matching": engine.matching.state_dict(),
        "meta": [p.detach().clone() for _, p in engine._meta_named],
        "grads": [None if p.grad is None else p.grad.clone() for p in engine._theta],
        "optimizer": engine.optimizer.state_dict(),
        "meta_optimizer": engine.meta_optimizer.state_dict(),
        "training": [m.training for m in engine.target_model.modules()],
    })


def assert_equal_nested(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_nested(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_equal_nested(u, v)
    else:
        assert a == b


def test_hypergradient_changes_no_state():
    engine, x, y = make_engine(steps_before=2)
    engine.target_model.eval()  # a mode flag is state too
    before = snapshot(engine)
    engine.hypergradient(x, y)
    assert_equal_nested(snapshot(engine), before)


def test_step_moves_theta_phi_and_batchnorm_statistics():
    engine, x, y = make_engine(steps_before=0, meta_period=2)
    before = snapshot(engine)
    report = engine.step(x, y)
    assert set(report) == {"loss", "ce", "matching"}
    assert all(isinstance(v, float) for v in report.values())
    assert report["loss"] == pytest.approx(report["ce"] + report["matching"])
    after = snapshot(engine)
    for name, value in before["target"].items():
        assert not torch.equal(value, after["target"][name]), name  # params and BN statistics
    assert_equal_nested(after["meta"], before["meta"])  # meta_period=2: no meta step yet
    report = engine.step(x, y)
    assert "meta_ce" in report
    moved = [not torch.equal(a, b) for a, b in zip(before["meta"], snapshot(engine)["meta"])]
    assert all(moved)
    assert engine.iteration == 2


def test_meta_step_uses_hypergradient_with_adam():
    engine, x, y = make_engine()
    twin = copy.deepcopy(engine)
    engine.step(x, y)
    # the twin: the same real step by hand, then Adam on the hypergradient at the new theta
    twin.optimizer.zero_grad()
    source = twin._source_features(x)
    with torch.no_grad():
        channel_weights, pair_weights = twin._meta_weights(source)
    logits, target = twin._target_hooks(x)
    (F.cross_entropy(logits, y) + twin.matching(source, target, channel_weights, pair_weights)
     ).backward()
    twin.optimizer.step()
    for (name, p), g in zip(twin._meta_named, twin.hypergradient(x, y).values()):
        p.grad = g
    twin.meta_optimizer.step()
    for (_, a), (_, b) in zip(engine._meta_named, twin._meta_named):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_pairs_all_is_source_major():
    engine, _, _ = make_engine(steps_before=0)
    assert engine.pairs == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len(engine.matching.weight) == 4
    assert [tuple(w.shape) for w in engine.matching.weight] == [(4, 3), (4, 5), (6, 3), (6, 5)]


def test_models_keep_float64_and_source_is_frozen():
    engine, x, y = make_engine()
    for module in (engine.target_model, engine.matching, engine.what, engine.where):
        assert all(p.dtype == torch.float64 for p in module.parameters())
    assert not engine.source_model.training
    assert not any(p.requires_grad for p in engine.source_model.parameters())
    assert engine.pair_weights(x).shape == (4,) and engine.pair_weights(x).dtype == torch.float64
    assert [tuple(w.shape) for w in engine.channel_weights(x)] == [(4,), (4,), (6,), (6,)]
    optimizer_params = engine.optimizer.param_groups[0]["params"]
    expected = list(engine.target_model.parameters()) + list(engine.matching.parameters())
    assert len(optimizer_params) == len(expected)
    assert all(a is b for a, b in zip(optimizer_params, expected))


def test_state_dict_resumes_exactly():
    engine, x, y = make_engine(steps_before=2)
    state = copy.deepcopy(engine.state_dict())
    resumed, _, _ = make_engine(steps_before=0)  # the same (pretrained) source model
    assert not torch.equal(engine._theta[0], resumed._theta[0])
    resumed.load_state_dict(state)
    engine.step(x, y)
    resumed.step(x, y)
    for a, b in zip(engine._theta + [p for _, p in engine._meta_named],
                    resumed._theta + [p for _, p in resumed._meta_named]):
        assert torch.equal(a, b)


def test_unknown_layer_and_bad_arguments():
    with pytest.raises(ValueError, match="'layer2'"):
        L2TWW(TinyNet((4, 6)), TinyNet((3, 5)), ["layer1", "layer_2"], LAYERS)
    with pytest.raises(ValueError, match="inner_steps"):
        L2TWW(TinyNet((4, 6)), TinyNet((3, 5)), LAYERS, LAYERS, inner_steps=0)
    with pytest.raises(ValueError, match="relu6"):
        L2TWW(TinyNet((4, 6)), TinyNet((3, 5)), LAYERS, LAYERS, where_activation="gelu")


def test_example_input_gives_channels_of_any_model():
    class Doubler(nn.Module):  # output channels that no conv or norm module declares
        def __init__(self):
            super().__init__()
            self.net = TinyNet((3, 5))
            self.cat = nn.Identity()

        def forward(self, x):
            h = self.net.layer1(x)
            self.cat(torch.cat([h, h], 1))
            return self.net.fc(self.net.layer2(h).mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    engine = L2TWW(TinyNet((4, 6)), Doubler(), LAYERS, ["cat", "net.layer2"],
                   backend="reference", example_input=x)
    assert [tuple(w.shape) for w in engine.matching.weight] == [(4, 6), (4, 5), (6, 6), (6, 5)]
    assert set(engine.hypergradient(x, torch.tensor([0, 1]))) == {
        n for n, _ in engine._meta_named}


def test_auto_backend_agrees_with_reference():
    engine, x, y = make_engine(backend="auto")
    reference, _, _ = make_engine(backend="reference")
    ours, expected = engine.hypergradient(x, y), reference.hypergradient(x, y)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-7, atol=1e-12)


def test_step_that_blows_up_raises_diverged_naming_lr():
    engine, x, y = make_engine(steps_before=0, lr=1e6)
    with pytest.raises(Diverged, match=r"non-finite.*lower lr \(now 1e\+06\) or meta_lr") as info:
        for _ in range(5):
            engine.step(x, y)
    assert isinstance(info.value, FloatingPointError)


def test_non_finite_loss_is_named_first():
    engine, x, y = make_engine(steps_before=0)
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(Diverged, match="iteration 1: non-finite loss"):
        engine.step(x, y)


def test_non_finite_updated_parameter_is_named(monkeypatch):
    engine, x, y = make_engine(steps_before=0)
    real = engine.optimizer.step

    def poisoned():
        real()
        engine.target_model.fc.bias.data[1] = float("inf")

    monkeypatch.setattr(engine.optimizer, "step", poisoned)
    with pytest.raises(Diverged, match="non-finite updated parameters: fc.bias;"):
        engine.step(x, y)


def test_nan_hypergradient_is_named(monkeypatch):
    engine, x, y = make_engine()
    real = engine._meta_gradients
    poisoned_index = [name for name, _ in engine._meta_named].index("where.layers.2.weight")

    def poisoned(*args):
        outer, grads = real(*args)
        grads[poisoned_index] = grads[poisoned_index].clone()
        grads[poisoned_index][0, 0] = float("nan")
        return outer, grads

    monkeypatch.setattr(engine, "_meta_gradients", poisoned)
    with pytest.raises(Diverged, match="non-finite hypergradients: where.layers.2.weight;"):
        engine.step(x, y)


def test_finite_step_reports_floats_after_one_host_sync(monkeypatch):
    """The check and the report share one transfer to the host (``tolist``): no other
    ``item``, ``tolist`` or ``bool`` of a tensor in the project's code during a step (Adam's
    own step counters are CPU tensors, whatever the device)."""
    engine, x, y = make_engine()
    syncs = []
    for method in ("item", "tolist", "__bool__"):
        real = getattr(torch.Tensor, method)

        def counting(self, _real=real, _name=method):
            caller = sys._getframe(1).f_code.co_filename
            if os.sep + "l2t_fast" + os.sep in caller:
                syncs.append(_name)
            return _real(self)

        monkeypatch.setattr(torch.Tensor, method, counting)
    report = engine.step(x, y)
    assert syncs == ["tolist"]
    assert set(report) == {"loss", "ce", "matching", "meta_ce"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in report.values())
