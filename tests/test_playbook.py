"""The standard playbook's methods (linear probe, layer transfer, L2-SP, multi-task,
progressive networks, DANN), each against a small reference written here: the built-in
ResNet's forward pass spelled out stage by stage, and SGD's first step by hand."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2t_fast.methods import build_method, registry
from l2t_fast.methods.adversarial import reversal_coefficient, reverse_gradient
from l2t_fast.methods.base import Batch, Setup
from l2t_fast.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ["layer1", "layer2", "layer3"]
STAGES = ["stem", "layer1", "layer2", "layer3"]


def setup_and_batch(source_classes=4, target_classes=3, seed=0):
    """A source whose BatchNorm statistics are not the initial ones (so that kept and
    reset statistics differ), a fresh target, and a batch with every extra."""
    torch.manual_seed(seed)
    source = build_model("resnet8", source_classes).train()
    with torch.no_grad():
        source(torch.randn(16, 3, 8, 8) * 2 + 1)
    source.eval()
    target = build_model("resnet8", target_classes)
    x = torch.randn(10, 3, 8, 8)
    batch = Batch(x, torch.arange(10) % target_classes, unlabelled=torch.randn(10, 3, 8, 8),
                  source_x=torch.randn(10, 3, 8, 8),
                  source_y=torch.arange(10) % source_classes)
    setup = Setup(source, target, target_classes, LAYERS, LAYERS, x[:2],
                  num_source_classes=source_classes)
    return setup, batch


def stage_outputs(model, x):
    """The built-in ResNet's stage outputs, by hand."""
    outputs = [model.stem(x)]
    for name in LAYERS:
        outputs.append(getattr(model, name)(outputs[-1]))
    return outputs


def penultimate(model, x):
    return stage_outputs(model, x)[-1].mean(dim=(2, 3))


def sgd_first_step(parameters, loss, lr, weight_decay):
    """SGD's first step (momentum buffers start as the gradient): ``p - lr * (g + wd p)``."""
    grads = torch.autograd.grad(loss, parameters)
    return [(p - lr * (g + weight_decay * p)).detach() for p, g in zip(parameters, grads)]


def assert_close_all(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def same_state(a, b, prefixes):
    return all(torch.equal(a[key], b[key]) for key in a if key.startswith(tuple(prefixes)))


# ---- linear-probe ---------------------------------------------------------------------------

def test_linear_probe_trains_logistic_regression_on_frozen_source_features():
    setup, batch = setup_and_batch()
    method = build_method("linear-probe", setup, lr=0.1, momentum=0.9, weight_decay=1e-3)
    head = method.model.fc
    weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
    with torch.no_grad():
        features = penultimate(setup.source_model, batch.x)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    loss = F.cross_entropy(features @ w.T + b, batch.y)
    expected = sgd_first_step([w, b], loss, lr=0.1, weight_decay=1e-3)

    losses = method.train_step(batch)
    assert losses["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert_close_all([head.weight, head.bias], expected)
    trunk = {k: v for k, v in method.model.state_dict().items() if not k.startswith("fc.")}
    assert same_state(trunk, setup.source_model.state_dict(), STAGES)  # BN statistics too
    assert head.out_features == 3


# ---- layer-transfer -------------------------------------------------------------------------

def test_layer_transfer_copies_k_stages_and_reinitialises_the_rest():
    setup, batch = setup_and_batch()
    source = setup.source_model.state_dict()
    method = build_method("layer-transfer", setup, transfer_stages=2)
    model = method.model
    state = model.state_dict()
    assert same_state(state, source, ["stem", "layer1"])
    for key in state:
        if key.startswith(("layer2", "layer3")):
            if key.endswith("running_mean"):
                assert torch.equal(state[key], torch.zeros_like(state[key])), key
            elif key.endswith("running_var"):
                assert torch.equal(state[key], torch.ones_like(state[key])), key
            elif key.endswith("num_batches_tracked"):
                assert state[key] == 0, key
            elif key.endswith("conv1.weight") or key.endswith("conv2.weight"):
                assert not torch.equal(state[key], source[key]), key
    # PyTorch's default conv init, kaiming_uniform(a=sqrt 5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    weights = model.layer3[0].conv2.weight  # 64 -> 64 channels, 3x3
    fan_in = 64 * 9
    assert weights.abs().max() <= 1 / math.sqrt(fan_in)
    assert weights.std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.05)
    assert model.fc.out_features == 3

    before = copy.deepcopy(state)
    method.train_step(batch)
    after = model.state_dict()
    assert not torch.equal(before["stem.0.weight"], after["stem.0.weight"])  # AnB+: fine-tuned
    assert not torch.equal(before["layer3.0.conv1.weight"], after["layer3.0.conv1.weight"])


def test_layer_transfer_frozen_keeps_the_copied_stages_and_their_statistics():
    setup, batch = setup_and_batch()
    method = build_method("layer-transfer", setup, transfer_stages=3, freeze_transferred=True)
    before = copy.deepcopy(method.model.state_dict())
    method.train_step(batch)
    after = method.model.state_dict()
    assert same_state(after, setup.source_model.state_dict(), ["stem", "layer1", "layer2"])
    for key in ("layer3.0.conv1.weight", "layer3.0.bn1.running_mean", "fc.weight"):
        assert not torch.equal(before[key], after[key]), key


def test_layer_transfer_of_every_stage_is_finetunes_start_and_bounds_are_checked():
    setup, _ = setup_and_batch()
    everything = build_method("layer-transfer", setup, transfer_stages=4).model.state_dict()
    finetune = build_method("finetune", setup).model.state_dict()
    assert same_state(everything, finetune, STAGES)
    with pytest.raises(ValueError, match="transfer_stages must be in \\[0, 4\\]"):
        build_method("layer-transfer", setup, transfer_stages=5)


# ---- l2-sp ----------------------------------------------------------------------------------

def test_l2_sp_pulls_towards_the_source_weights_and_has_no_weight_decay():
    setup, batch = setup_and_batch()
    alpha, beta, lr = 0.3, 0.2, 0.05
    method = build_method("l2-sp", setup, lr=lr, weight_decay=0.1, l2sp_alpha=alpha,
                          l2sp_beta=beta)
    with torch.no_grad():  # away from the source, so that the pull is not zero
        for p in method.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = copy.deepcopy(method.model).train()
    source = dict(setup.source_model.named_parameters())
    names, parameters = zip(*reference.named_parameters())
    to_source = sum((p - source[n]).pow(2).sum() for n, p in zip(names, parameters)
                    if not n.startswith("fc."))
    head = reference.fc.weight.pow(2).sum() + reference.fc.bias.pow(2).sum()
    loss = (F.cross_entropy(reference(batch.x), batch.y) + alpha / 2 * to_source
            + beta / 2 * head)
    expected = sgd_first_step(list(parameters), loss, lr=lr, weight_decay=0.0)

    losses = method.train_step(batch)
    assert losses["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert_close_all(list(method.model.parameters()), expected)


def test_l2_sp_defaults_and_names_apart_from_feature_matchings_beta():
    options = {option.name: option.default for option in registry()["l2-sp"].options}
    assert options["l2sp_alpha"] == options["l2sp_beta"] == 0.01
    assert "beta" not in options


# ---- multitask ------------------------------------------------------------------------------

def test_multitask_is_target_ce_plus_lambda_source_ce_on_a_shared_trunk():
    setup, batch = setup_and_batch()
    method = build_method("multitask", setup, lr=0.1, momentum=0.9, weight_decay=1e-3,
                          multitask_lambda=0.7)
    assert torch.equal(method.source_head.weight, setup.source_model.fc.weight)
    model, source_head = copy.deepcopy(method.model).train(), copy.deepcopy(method.source_head)
    features = penultimate(model, torch.cat([batch.x, batch.source_x]))
    loss = (F.cross_entropy(model.fc(features[:10]), batch.y)
            + 0.7 * F.cross_entropy(source_head(features[10:]), batch.source_y))
    parameters = list(model.parameters()) + list(source_head.parameters())
    expected = sgd_first_step(parameters, loss, lr=0.1, weight_decay=1e-3)

    losses = method.train_step(batch)
    assert losses["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert_close_all(list(method.model.parameters()) + list(method.source_head.parameters()),
                     expected)
    assert registry()["multitask"].needs == {"source_batches"}


# ---- progressive ----------------------------------------------------------------------------

def test_progressive_target_stages_read_the_source_stages_through_1x1_adapters():
    setup, batch = setup_and_batch()
    method = build_method("progressive", setup)
    network = method.model
    source, target, adapters = network.source, network.target, network.adapters
    assert [tuple(a.weight.shape) for a in adapters] == [(16, 16, 1, 1), (16, 16, 1, 1),
                                                         (32, 32, 1, 1), (64, 64, 1, 1)]
    network.eval()
    with torch.no_grad():
        lateral = stage_outputs(source, batch.x)
        h = target.stem(batch.x) + adapters[0](lateral[0])
        for i, name in enumerate(LAYERS, start=1):
            h = getattr(target, name)(h) + adapters[i](lateral[i])
        expected = target.fc(h.mean(dim=(2, 3)))
        torch.testing.assert_close(network(batch.x), expected)

    source_before = copy.deepcopy(source.state_dict())
    adapter_before = adapters[2].weight.detach().clone()
    method.train_step(batch)
    assert same_state(source.state_dict(), source_before, STAGES + ["fc"])  # statistics too
    assert not any(p.requires_grad for p in source.parameters())
    assert not torch.equal(adapters[2].weight, adapter_before)
    assert network.training and not source.training


class TwoStages(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.layer1(self.stem(x)).mean(dim=(2, 3)))


def test_progressive_refuses_columns_of_different_depths():
    setup, _ = setup_and_batch()
    setup.target_model = TwoStages()
    with pytest.raises(ValueError, match="as many in both"):
        build_method("progressive", setup)


# ---- dann -----------------------------------------------------------------------------------

def test_gradient_reversal_is_the_identity_forward_and_minus_coefficient_backward():
    x = torch.randn(5, 4, requires_grad=True)
    upstream = torch.randn(5, 4)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)
    (y * upstream).sum().backward()
    torch.testing.assert_close(x.grad, -0.3 * upstream)


def test_reversal_schedule_rises_from_zero_to_almost_one():
    assert reversal_coefficient(0.0) == 0.0
    for p in (0.1, 0.5, 1.0):
        assert reversal_coefficient(p) == pytest.approx(2 / (1 + math.exp(-10 * p)) - 1)
    assert reversal_coefficient(1.0) > 0.9999
    values = [reversal_coefficient(i / 20) for i in range(21)]
    assert values == sorted(values)
    with pytest.raises(ValueError, match="progress"):
        reversal_coefficient(1.5)


def test_dann_gradients_label_terms_plus_reversed_domain_term():
    setup, batch = setup_and_batch(source_classes=3)
    method = build_method("dann", setup)
    method.set_progress(0.3)
    coefficient = 2 / (1 + math.exp(-10 * 0.3)) - 1
    model = copy.deepcopy(method.model).train()
    classifier = copy.deepcopy(method.domain_classifier)
    features = penultimate(model, torch.cat([batch.x, batch.source_x, batch.unlabelled]))
    logits = model.fc(features)
    labels = F.cross_entropy(logits[:10], batch.y) + F.cross_entropy(logits[10:20],
                                                                     batch.source_y)
    domain = F.binary_cross_entropy_with_logits(
        classifier(features[10:]).squeeze(1), torch.cat([torch.zeros(10), torch.ones(10)]))
    trunk = list(model.parameters())
    label_grads = torch.autograd.grad(labels, trunk, retain_graph=True, allow_unused=True)
    domain_grads = torch.autograd.grad(domain, trunk + list(classifier.parameters()),
                                       allow_unused=True)
    zero = [torch.zeros_like(p) for p in trunk]
    expected = [(g if g is not None else z) - coefficient * (d if d is not None else z)
                for g, d, z in zip(label_grads, domain_grads, zero)]
    expected += list(domain_grads[len(trunk):])  # the domain classifier is not reversed

    method.model.train()
    losses = method.losses(batch)
    assert sum(losses.values()).item() == pytest.approx((labels + domain).item(), rel=1e-5)
    sum(losses.values()).backward()
    actual = list(method.model.parameters()) + list(method.domain_classifier.parameters())
    assert_close_all([p.grad for p in actual], expected)


def test_dann_needs_a_source_with_the_targets_classes():
    setup, _ = setup_and_batch(source_classes=4)
    with pytest.raises(ValueError, match="the source has 4, the target 3"):
        build_method("dann", setup)
    assert registry()["dann"].needs == {"source_batches", "unlabelled", "shared_labels"}


def test_the_job_tells_methods_their_training_progress(tmp_path, monkeypatch):
    from l2t_fast.jobs.transfer import run_transfer
    from l2t_fast.methods.base import Method

    seen = []
    monkeypatch.setattr(Method, "set_progress", lambda self, p: seen.append(p))
    config = {"image_size": 8, "source_model": "resnet8", "target_model": "resnet8",
              "source_epochs": 1, "epochs": 2, "labels_per_class": 2, "batch_size": 5,
              "seeds": [0], "methods": ["scratch"], "cache_dir": str(tmp_path / "cache")}
    run_transfer(config, output_dir=tmp_path / "out", progress=False)
    assert seen == [0.0, 0.25, 0.5, 0.75]  # 10 labelled images in batches of 5, 2 epochs
