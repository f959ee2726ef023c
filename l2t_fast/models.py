"""Networks for the transfer job: small built-in ResNets, and torchvision/timm models by name.

The built-in ResNets are the CIFAR-style ones (3x3 stem, three stages of basic blocks with
16/32/64 channels, strides 1/2/2) at depths small enough to train on two CPU cores in
minutes. Their stages are named ``layer1..layer3`` and the head ``fc``, like torchvision's
ResNets, so layer suggestions and head lookup treat both alike.
"""
import importlib

import torch.nn.functional as F
from torch import nn

# name -> basic blocks per stage
BUILTIN_MODELS = {"resnet8": 1, "resnet14": 2, "resnet20": 3}
EXTERNAL_PREFIXES = ("torchvision:", "timm:")
STAGE_WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """CIFAR-style ResNet: ``stem``, ``layer1..layer3``, global average pool, ``fc``."""

    def __init__(self, num_classes, blocks_per_stage=1, in_channels=3, widths=STAGE_WIDTHS):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        channels = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks = []
            for _ in range(blocks_per_stage):
                blocks.append(BasicBlock(channels, width, stride))
                channels, stride = width, 1
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def build_model(name, num_classes, in_channels=3):
    """A fresh, randomly initialised model by name.

    ``name`` is a built-in (``resnet8``, ``resnet14``, ``resnet20``), ``torchvision:NAME`` or
    ``timm:NAME``; the last two need that package installed and take 3-channel input.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if name in BUILTIN_MODELS:
        return SmallResNet(num_classes, BUILTIN_MODELS[name], in_channels)
    for prefix in EXTERNAL_PREFIXES:
        if name.startswith(prefix):
            return _build_external(prefix[:-1], name[len(prefix):], num_classes)
    raise ValueError(f"unknown model {name!r}: use one of {sorted(BUILTIN_MODELS)}, "
                     f"'torchvision:NAME' or 'timm:NAME'")


def _build_external(package, model_name, num_classes):
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise ValueError(f"model '{package}:{model_name}' needs the {package} package, which "
                         f"does not import here ({error}); pip install {package}") from error
    if package == "timm":
        return module.create_model(model_name, pretrained=False, num_classes=num_classes)
    try:
        return module.models.get_model(model_name, weights=None, num_classes=num_classes)
    except ValueError as error:
        raise ValueError(f"torchvision has no model {model_name!r}: {error}") from error


def head_name(model):
    """Name of the classifier head: the last ``nn.Linear`` in ``named_modules()`` order."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head")
    return linears[-1]


def get_module(model, name):
    return dict(model.named_modules())[name]


def replace_head(model, num_classes):
    """Swap the classifier head for a fresh one with ``num_classes`` outputs (in place)."""
    name = head_name(model)
    old = get_module(model, name)
    parent_name, _, attribute = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    setattr(parent, attribute, new)
    return model


def stage_names(model):
    """Top-level children that hold parameters, the classifier head excluded: what
    ``--freeze-stages k`` counts (``stem``, ``layer1``, ... for the built-in ResNets)."""
    head_root = head_name(model).split(".")[0]
    return [name for name, child in model.named_children()
            if name != head_root and any(True for _ in child.parameters())]
