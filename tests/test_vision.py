"""torchvision and timm models in the engine: models by name, pretrained weights through
the libraries' own loaders (never the network here), suggested layers, and L2T-ww steps
with random weights on small inputs. Marked ``vision``; skipped where torchvision or timm
do not import (.ci/vision.sh runs them in a venv that has both)."""
import importlib
import math

import pytest
import torch

from l2t_fast.methods.l2tww.engine import L2TWW
from l2t_fast.models import build_model
from l2t_fast.models.layers import explain_layers, suggest_layers

pytestmark = pytest.mark.vision


def _import_or_skip(name):
    try:  # a torchvision built for another torch fails with more than ImportError
        return importlib.import_module(name)
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"{name} does not import here ({type(error).__name__}: {error})",
                    allow_module_level=True)


torchvision = _import_or_skip("torchvision")
timm = _import_or_skip("timm")

RESNET_STAGES = ["layer1", "layer2", "layer3", "layer4"]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("name, image_size, expected", [
    ("torchvision:resnet34", 64, RESNET_STAGES),
    ("torchvision:vgg11", 64, ["features.1", "features.4", "features.9", "features.14",
                               "features.19"]),
    ("torchvision:mobilenet_v2", 64, ["features.3", "features.6", "features.13",
                                      "features.18"]),
    ("torchvision:efficientnet_b0", 64, ["features.2", "features.3", "features.5",
                                         "features.8"]),
    ("torchvision:convnext_tiny", 64, ["features.1", "features.3", "features.5", "features.7"]),
    ("torchvision:densenet121", 64, ["features.denseblock1", "features.denseblock2",
                                     "features.denseblock3", "features.norm5"]),
    ("timm:resnet18", 64, RESNET_STAGES),
    ("timm:vit_tiny_patch16_224", 32, ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]),
    ("timm:swin_tiny_patch4_window7_224", 64, ["layers.0", "layers.1", "layers.2",
                                               "layers.3"]),
])
def test_suggested_layers_are_stage_outputs(name, image_size, expected):
    model = build_model(name, 5, image_size=image_size)
    # timm's ViT and Swin tell their own input size; the others get a small example
    example = None if image_size == 32 or "swin" in name else torch.zeros(1, 3, 64, 64)
    layers, explanation = explain_layers(model, example)
    assert layers == expected
    assert ", ".join(expected) in explanation
    assert suggest_layers(model, example) == expected


def test_pretrained_torchvision_weights_load_through_torchvision(tmp_path, monkeypatch):
    """torchvision's own loader reads its cache before it downloads: a file put there is
    what ``weights=`` loads, with no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    saved = torchvision.models.resnet18()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(saved.state_dict(), cache / weights.url.rsplit("/", 1)[1])
    pretrained = build_model("torchvision:resnet18", None, weights="IMAGENET1K_V1")
    assert pretrained.fc.out_features == 1000
    torch.testing.assert_close(pretrained.layer1[0].conv1.weight, saved.layer1[0].conv1.weight)
    with_head = build_model("torchvision:resnet18", 7, weights="DEFAULT")
    assert with_head.fc.out_features == 7
    torch.testing.assert_close(with_head.conv1.weight, saved.conv1.weight)


def test_weights_that_cannot_be_had_say_why_and_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        build_model("torchvision:resnet18", None, weights="IMAGENET9K")
    with pytest.raises(ValueError, match="no pretrained tag 'nope'.*a1_in1k"):
        build_model("timm:resnet18", None, weights="nope")
    with pytest.raises(ValueError, match="built in and has no pretrained weights"):
        build_model("resnet8", 3, weights="DEFAULT")

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError, match="needs the network.*--source-checkpoint"):
        build_model("torchvision:resnet18", None, weights="DEFAULT")
    from huggingface_hub.errors import LocalEntryNotFoundError

    def hub_offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline mode is enabled")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", hub_offline)
    with pytest.raises(ValueError, match="timm's pretrained weights.*--source-checkpoint"):
        build_model("timm:resnet18", 3, weights="a1_in1k")


def _engine(source, target, x, **options):
    return L2TWW(source.eval(), target, suggest_layers(source, x), suggest_layers(target, x),
                 example_input=x, **options)


def _steps_change_what_and_where(engine, x, y, steps=2):
    before = {name: p.detach().clone() for name, p in engine._meta_named}
    for _ in range(steps):
        report = engine.step(x, y)
        assert all(math.isfinite(value) for value in report.values()), report
        assert "meta_ce" in report
    moved = {name for name, p in engine._meta_named if not torch.equal(p, before[name])}
    assert any(name.startswith("what.") for name in moved)
    assert any(name.startswith("where.") for name in moved)


def test_l2tww_resnet34_to_resnet18_with_all_16_pairs():
    """The paper's ImageNet -> CUB setting: four stages each, every pair, T = 2."""
    source = build_model("torchvision:resnet34", 10)
    target = build_model("torchvision:resnet18", 4)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    engine = _engine(source, target, x, inner_steps=2)
    assert engine.pairs == [(m, n) for m in range(4) for n in range(4)]
    assert [w.shape for w in engine.matching.weight][::5] == [
        (64, 64), (128, 128), (256, 256), (512, 512)]
    _steps_change_what_and_where(engine, x, y)


def test_hypergradient_of_torchvision_resnets_matches_the_reference_backend():
    source = build_model("torchvision:resnet18", 10).double()
    target = build_model("torchvision:resnet18", 3).double()
    # 4 images of 64 px: layer4's maps are 2x2, so its BatchNorm statistics are not taken
    # over 2 values (with 1x1 maps of 2 images the hypergradient is too ill-conditioned to
    # compare two backends)
    x, y = torch.randn(4, 3, 64, 64, dtype=torch.float64), torch.tensor([0, 2, 1, 0])
    fast = _engine(source, target, x, backend="cpu")
    reference = _engine(source, target, x, backend="reference")
    reference.load_state_dict(fast.state_dict())
    ours, expected = fast.hypergradient(x, y), reference.hypergradient(x, y)
    assert set(ours) == set(expected)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-6, atol=1e-10)


# timm families as targets of a torchvision ResNet source (CNN -> CNN, CNN -> ViT,
# CNN -> Swin); the image size is what the ViT and Swin are built for
TIMM_TARGETS = [("timm:resnet18", 32), ("timm:vit_tiny_patch16_224", 32),
                ("timm:swin_tiny_patch4_window7_224", 32)]


@pytest.mark.parametrize("name, image_size", TIMM_TARGETS)
def test_l2tww_steps_on_timm_targets(name, image_size):
    source = build_model("torchvision:resnet18", 10)
    target = build_model(name, 3, image_size=image_size)
    x, y = torch.randn(4, 3, image_size, image_size), torch.tensor([0, 1, 2, 0])
    _steps_change_what_and_where(_engine(source, target, x), x, y, steps=1)


@pytest.mark.parametrize("name", ["timm:vit_tiny_patch16_224",
                                  "timm:deit_tiny_distilled_patch16_224"])
def test_vit_sources_teach_a_cnn(name):
    """ViT -> CNN: token blocks (with class, or class and distillation tokens) as maps."""
    source = build_model(name, 10, image_size=32)
    assert source.num_prefix_tokens == (2 if "distilled" in name else 1)
    target = build_model("torchvision:resnet18", 3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    engine = _engine(source, target, x)
    assert [tuple(w.shape) for w in engine.matching.weight][:4] == [(192, 64), (192, 128),
                                                                   (192, 256), (192, 512)]
    _steps_change_what_and_where(engine, x, y, steps=1)


def test_register_tokens_are_dropped_before_the_grid():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, reg_tokens=4, num_classes=3)
    from l2t_fast.models.hooks import FeatureHooks

    x = torch.randn(2, 3, 32, 32)
    with FeatureHooks(model, ["blocks.11"]) as hooks, torch.no_grad():
        _, (feature,) = hooks(x)
        expected = model.forward_intermediates(x, indices=[11], intermediates_only=True)[0]
    torch.testing.assert_close(feature, expected)


def test_analyze_takes_a_vit_and_a_cnn_by_name(tmp_path):
    """``analyze --models`` builds each network for the job's image size, as a transfer
    job does: a timm ViT exists only for its patch grid."""
    import numpy as np

    from l2t_fast.jobs.analyze import run_analysis

    result = run_analysis({"models": ["timm:vit_tiny_patch16_224", "resnet14"],
                           "image_size": 32, "analyses": ["cka"], "analysis_images": 16},
                          output_dir=tmp_path, progress=False)
    assert result["layers"]["a"] == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    matrix = np.array(result["cka"]["matrix"])
    assert matrix.shape == (4, len(result["layers"]["b"])) and np.isfinite(matrix).all()
