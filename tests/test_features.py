import pytest
import torch
from torch import nn
from torch.func import functional_call

from l2t_fast.models.hooks import FeatureHooks
from l2t_fast.models.layers import suggest_layers


class ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(self.conv1(x))).mean((2, 3)))


class VGGLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Linear(6 * 2 * 2, 2)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class PlainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block_a = nn.Conv2d(4, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.block_b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.block_b(self.down(self.block_a(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_features_in_requested_order_match_the_modules_outputs():
    model = ResNetLike()
    x = torch.randn(2, 3, 8, 8)
    with FeatureHooks(model, ["layer2", "layer1", "layer2"]) as hooks:
        out, feats = hooks(x)
    h1 = model.layer1(model.conv1(x))
    torch.testing.assert_close(feats[1], h1)
    torch.testing.assert_close(feats[0], model.layer2(h1))
    assert feats[2] is feats[0]
    torch.testing.assert_close(out, model(x))


def test_remove_and_context_manager_take_hooks_off():
    model = ResNetLike()
    hooks = FeatureHooks(model, ["layer1"])
    assert len(model.layer1._forward_hooks) == 1
    hooks.remove()
    assert len(model.layer1._forward_hooks) == 0
    with FeatureHooks(model, ["layer1", "layer2"]):
        assert len(model.layer2._forward_hooks) == 1
    assert len(model.layer2._forward_hooks) == 0


def test_run_with_functional_call_and_stop_early():
    model = ResNetLike()
    params = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 8, 8)
    with FeatureHooks(model, ["layer1"]) as hooks:
        # the first pass runs to the end: it counts how often each layer runs
        out, (feat,) = hooks.run(functional_call, model, params, (x,), stop_early=True)
        assert out.shape == (2, 2) and torch.count_nonzero(feat) == 0
        out, (feat,) = hooks.run(functional_call, model, params, (x,), stop_early=True)
        assert out is None and torch.count_nonzero(feat) == 0
        out, (feat,) = hooks(x)  # the next call collects afresh, to the end
        assert out.shape == (2, 2) and torch.count_nonzero(feat) > 0


class SharedBlockNet(nn.Module):
    """``block`` runs twice per forward; ``after`` runs once, between its two calls."""

    def __init__(self):
        super().__init__()
        self.block = nn.Conv2d(3, 3, 3, padding=1)
        self.after = nn.ReLU()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.block(self.after(self.block(x))).mean((2, 3)))


def test_layer_run_twice_reports_its_last_output_also_when_stopping_early():
    model = SharedBlockNet()
    x = torch.randn(2, 3, 8, 8)
    last = model.block(model.after(model.block(x)))
    head_calls = []
    model.head.register_forward_hook(lambda *args: head_calls.append(1))
    with FeatureHooks(model, ["block", "after"]) as hooks:
        for stop_early, head_ran in [(False, True), (True, False)]:
            head_calls.clear()
            out, (block, after) = hooks.run(model, x, stop_early=stop_early)
            torch.testing.assert_close(block, last)
            torch.testing.assert_close(after, model.after(model.block(x)))
            assert (out is not None) == head_ran and bool(head_calls) == head_ran


def test_unknown_layer_names_close_matches():
    with pytest.raises(ValueError, match="layer3") as info:
        FeatureHooks(ResNetLike(), ["layer1", "layer3"])
    assert "'layer1'" in str(info.value) and "'layer2'" in str(info.value)


def test_layer_that_does_not_run_is_reported():
    model = ResNetLike()
    model.unused = nn.ReLU()
    with FeatureHooks(model, ["unused"]) as hooks, pytest.raises(RuntimeError, match="unused"):
        hooks(torch.randn(1, 3, 8, 8))


def test_suggest_resnet_stages():
    model = ResNetLike()
    for i in range(3, 11):
        setattr(model, f"layer{i}", nn.Identity())
    assert suggest_layers(model) == [f"layer{i}" for i in range(1, 11)]


def test_suggest_vgg_outputs_before_each_pool():
    model = VGGLike()
    assert suggest_layers(model) == ["features.1", "features.5"]
    with FeatureHooks(model, suggest_layers(model)) as hooks:
        _, feats = hooks(torch.randn(1, 3, 8, 8))
    assert [tuple(f.shape[1:]) for f in feats] == [(4, 8, 8), (6, 4, 4)]


def test_suggest_other_models_needs_example_input_and_keeps_stage_ends():
    model = PlainNet().train()
    with pytest.raises(ValueError, match="example_input"):
        suggest_layers(model)
    assert suggest_layers(model, torch.randn(1, 3, 8, 8)) == ["block_a", "block_b"]
    assert model.training and not model.stem._forward_hooks
