"""Every transfer method trains through the common interface and is evaluated alike."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from l2t_fast.matching.loss import weighted_feature_matching
from l2t_fast.methods import build_method, registry
from l2t_fast.methods.base import Batch, Setup, evaluate, resolve_pairs
from l2t_fast.methods.distillation import attention_map
from l2t_fast.models import build_model, head_name, stage_names

METHODS = list(registry())

LAYERS = ["layer1", "layer2", "layer3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_setup(seed=0, source_classes=4):
    """A 4-class source (3, the target's classes, for methods that need shared labels), a
    3-class target, and a batch with every extra a method may need."""
    torch.manual_seed(seed)
    source = build_model("resnet8", source_classes).eval()
    target = build_model("resnet8", 3)
    x = torch.randn(12, 3, 8, 8)
    y = torch.arange(12) % 3
    batch = Batch(x, y, unlabelled=torch.randn(12, 3, 8, 8), source_x=torch.randn(12, 3, 8, 8),
                  source_y=torch.arange(12) % source_classes)
    return source, target, batch


def make(name, **options):
    source_classes = 3 if "shared_labels" in registry()[name].needs else 4
    source, target, batch = tiny_setup(source_classes=source_classes)
    setup = Setup(source, target, 3, LAYERS, LAYERS, batch.x[:2],
                  num_source_classes=source_classes)
    taken = {option.name for option in registry()[name].options}
    if "backend" in taken:
        options.setdefault("backend", "reference")
    return build_method(name, setup, **options), source, batch


@pytest.mark.parametrize("name", METHODS)
def test_every_method_lowers_its_loss_and_is_evaluated(name):
    method, _, batch = make(name, lr=0.05)
    losses = [method.train_step(batch) for _ in range(8)]
    assert {"loss", "ce"} <= set(losses[0])
    assert losses[-1]["loss"] < losses[0]["loss"]
    assert method.model(batch.x).shape == (12, 3)
    accuracy = evaluate(method.model, batch.x, batch.y)
    assert 0.0 <= accuracy <= 1.0


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip_continues_identically(name):
    method, _, batch = make(name)
    method.train_step(batch)
    saved = copy.deepcopy(method.state_dict())
    first = method.train_step(batch)
    twin, _, _ = make(name)
    twin.load_state_dict(saved)
    assert twin.train_step(batch) == first


def test_source_model_is_left_untouched():
    for name in METHODS:
        method, source, batch = make(name)
        before = copy.deepcopy(source.state_dict())
        method.train_step(batch)
        for key, value in source.state_dict().items():
            assert torch.equal(value, before[key]), (name, key)


def test_finetune_starts_from_the_source_and_freezes_stages():
    method, source, batch = make("finetune", freeze_stages=2)
    model = method.model
    frozen = stage_names(model)[:2]
    assert frozen == ["stem", "layer1"]
    assert torch.equal(model.layer2[0].conv1.weight, source.layer2[0].conv1.weight)
    before = copy.deepcopy(model.state_dict())
    method.train_step(batch)
    after = model.state_dict()
    for key in before:
        if key.startswith(tuple(frozen)):
            assert torch.equal(before[key], after[key]), key
    for key in ("layer2.0.conv1.weight", "layer3.0.bn1.running_mean", "fc.weight"):
        assert not torch.equal(before[key], after[key]), key
    assert model.fc.out_features == 3


def test_finetune_rejects_too_many_frozen_stages():
    with pytest.raises(ValueError, match="freeze_stages"):
        make("finetune", freeze_stages=5)


def test_lwf_keeps_a_trainable_copy_of_the_source_head():
    method, source, batch = make("lwf")
    head = method.old_head
    assert torch.equal(head.weight, source.fc.weight)
    losses = method.train_step(batch)
    assert losses["distill"] >= 0
    assert not torch.equal(head.weight, source.fc.weight)
    assert head_name(method.model) == "fc" and method.model.fc.out_features == 3


def test_fm_equals_the_unweighted_matching_loss():
    method, source, batch = make("fm")
    with torch.no_grad():
        _, source_feats, target_feats = method.features(batch.x)
        expected = weighted_feature_matching(
            source_feats, target_feats, method.pairs, list(method.matching.weight),
            list(method.matching.bias), beta=0.5, backend="reference")
        assert torch.allclose(method.losses(batch)["matching"], expected)
    assert len(method.pairs) == 9


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 8), st.integers(1, 8), st.integers(1, 8))
def test_attention_map_is_unit_norm_at_the_asked_size(batch, channels, height, width):
    features = torch.randn(batch, channels, height, width)
    maps = attention_map(features, (4, 5))
    assert maps.shape == (batch, 20)
    assert torch.allclose(maps.norm(dim=1), torch.ones(batch), atol=1e-5)
    same = attention_map(features)
    assert same.shape == (batch, height * width)


def test_at_loss_is_zero_when_the_attention_matches():
    features = torch.rand(2, 4, 6, 6)
    scaled = torch.cat([features, features], dim=1) * 3  # same mean_c F^2 up to scale
    assert torch.allclose(attention_map(features), attention_map(scaled), atol=1e-6)


def test_l2t_w_has_no_where_network_and_l2t_ww_has_one():
    assert make("l2t-w")[0].engine.where is None
    learned = make("l2t-ww")[0]
    assert learned.engine.where is not None
    assert learned.pair_weights(torch.randn(4, 3, 8, 8)).shape == (9,)


def test_resolve_pairs():
    assert resolve_pairs("all", 2, 2) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert resolve_pairs([[1, 0]], 2, 1) == [(1, 0)]
    with pytest.raises(ValueError, match="out of range"):
        resolve_pairs([(2, 0)], 2, 2)
    with pytest.raises(ValueError, match="empty"):
        resolve_pairs([], 2, 2)
    with pytest.raises(ValueError, match="'all'"):
        resolve_pairs("diagonal", 2, 2)


def test_unknown_method_and_options_are_rejected():
    source, target, batch = tiny_setup()
    setup = Setup(source, target, 3, LAYERS, LAYERS, batch.x[:2])
    with pytest.raises(ValueError, match="unknown method 'distill'"):
        build_method("distill", setup)
    with pytest.raises(ValueError, match=r"takes no options \['beta'\]"):
        build_method("scratch", setup, beta=0.5)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        build_method("scratch", setup, lr=float("nan"))


def test_evaluate_restores_training_mode():
    model = build_model("resnet8", 3).train()
    x, y = torch.randn(5, 3, 8, 8), torch.zeros(5, dtype=torch.int64)
    evaluate(model, x, y, batch_size=2)
    assert all(m.training for m in model.modules())


class SharedBlockNet(torch.nn.Module):
    """A block applied twice per forward (a shared block)."""

    def __init__(self, classes, width=4):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU())
        self.block = torch.nn.Sequential(torch.nn.Conv2d(width, width, 3, padding=1),
                                         torch.nn.ReLU())
        self.fc = torch.nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.block(self.block(self.stem(x))).mean((2, 3)))

    def features(self, x):
        stem = self.stem(x)
        return [stem, self.block(self.block(stem))]


@pytest.mark.parametrize("name", ["at", "fm", "l2t-ww"])
def test_layer_run_twice_gives_every_method_its_last_output(name):
    """The rule of FeatureHooks on every path: source and target features, the real step
    and (L2T-ww) the lookahead's early-stopping passes all see the block's last output."""
    torch.manual_seed(0)
    source, target = SharedBlockNet(4).eval(), SharedBlockNet(3)
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6) % 3
    layers = ["stem", "block"]
    options = {} if name == "at" else {"backend": "reference"}
    method = build_method(name, Setup(source, target, 3, layers, layers, x[:2]), **options)
    method.train_step(Batch(x, y))
    with torch.no_grad():
        expected_source, expected_target = source.features(x), target.features(x)
    if name == "l2t-ww":
        engine = method.engine
        theta = [p.detach() for p in engine._theta]
        seen = [(engine._source_features(x), engine._run_target(theta, x)[1]),
                (engine._source_features(x), engine._run_target(theta, x, stop_early=True)[1]),
                (engine._source_features(x), engine._feature_tangents(
                    theta[:len(engine._target_names)], [None] * len(theta), x)[0])]
    else:
        seen = [method.features(x)[1:] for _ in range(2)]  # the second one stops early
    for source_feats, target_feats in seen:
        for ours, expected in zip(source_feats + target_feats, expected_source + expected_target):
            torch.testing.assert_close(ours, expected)
