"""Networks by name (built-in ResNets, torchvision and timm models) and the helpers that
find their parts: the classifier head, the stages, the layers to match.
"""
import importlib

from torch import nn

from l2t_fast.models.builtin import BUILTIN_MODELS, BasicBlock, SmallResNet  # noqa: F401

EXTERNAL_PREFIXES = ("torchvision:", "timm:")


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
