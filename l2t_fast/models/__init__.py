"""Networks by name (built-in ResNets, torchvision and timm models) and the helpers that
find their parts: the classifier head, the stages, the layers to match.
"""
import importlib

from torch import nn

from l2t_fast.models.builtin import BUILTIN_MODELS, BasicBlock, SmallResNet  # noqa: F401

EXTERNAL_PREFIXES = ("torchvision:", "timm:")


def build_model(name, num_classes, in_channels=3, *, weights=None, image_size=None):
    """A model by name, randomly initialised unless ``weights`` names pretrained ones.

    - ``name``: a built-in (``resnet8``, ``resnet14``, ``resnet20``), ``torchvision:NAME``
      or ``timm:NAME``; the last two need that package installed and take 3-channel input.
    - ``weights`` (torchvision and timm only): torchvision's weight names of the model
      (``DEFAULT``, ``IMAGENET1K_V1``, ...) or a timm pretrained tag (``a1_in1k``, ...;
      ``DEFAULT``: timm's default tag), loaded by that library, which downloads them in
      normal use. ``num_classes=None`` keeps the pretrained head; any other count gets a
      fresh head of that size.
    - ``image_size``: the input size that timm models with a fixed patch grid (ViT, Swin)
      are built for (their ``img_size``); other models ignore it.
    """
    if not (num_classes is None and weights is not None) and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if name in BUILTIN_MODELS:
        if weights is not None:
            raise ValueError(f"model {name!r} is built in and has no pretrained weights: give "
                             f"a source checkpoint instead of weights {weights!r}")
        return SmallResNet(num_classes, BUILTIN_MODELS[name], in_channels)
    if name.startswith("torchvision:"):
        return _build_torchvision(name[len("torchvision:"):], num_classes, weights)
    if name.startswith("timm:"):
        return _build_timm(name[len("timm:"):], num_classes, weights, image_size)
    raise ValueError(f"unknown model {name!r}: use one of {sorted(BUILTIN_MODELS)}, "
                     f"'torchvision:NAME' or 'timm:NAME'")


def _library(package, model_name):
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise ValueError(f"model '{package}:{model_name}' needs the {package} package, which "
                         f"does not import here ({error}); pip install {package}") from error


def _offline(what, error):
    return ValueError(f"could not get {what} ({type(error).__name__}: {error}); they are "
                      f"downloaded on first use, which needs the network: offline, use "
                      f"--source-checkpoint with a local state_dict file instead")


def _build_torchvision(model_name, num_classes, weights):
    torchvision = _library("torchvision", model_name)
    if model_name not in torchvision.models.list_models():
        raise ValueError(f"torchvision has no model {model_name!r}; it has e.g. "
                         f"{', '.join(torchvision.models.list_models()[:8])}, ...")
    if weights is None:
        return torchvision.models.get_model(model_name, weights=None, num_classes=num_classes)
    known = torchvision.models.get_model_weights(model_name).__members__
    if weights not in known:
        raise ValueError(f"torchvision model {model_name!r} has no weights {weights!r}; "
                         f"choose from {', '.join(known)}")
    try:
        model = torchvision.models.get_model(model_name, weights=weights)
    except OSError as error:  # urllib's URLError, a refused or absent connection
        raise _offline(f"torchvision's {model_name} weights {weights}", error) from error
    return model if num_classes is None else replace_head(model, num_classes)


def _build_timm(model_name, num_classes, weights, image_size):
    timm = _library("timm", model_name)
    if not timm.is_model(model_name):
        raise ValueError(f"timm has no model {model_name!r} (timm.list_models() lists them)")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if weights is not None:
        tags = [name.partition(".")[2] for name in timm.list_pretrained(model_name + ".*")]
        if weights != "DEFAULT" and weights not in tags:
            raise ValueError(f"timm model {model_name!r} has no pretrained tag {weights!r}; "
                             f"choose DEFAULT or one of {', '.join(tags) or '(none)'}")
        if not tags:
            raise ValueError(f"timm model {model_name!r} has no pretrained weights")
        model_name = model_name if weights == "DEFAULT" else f"{model_name}.{weights}"
    try:
        return _create_timm(timm, model_name, weights is not None, image_size, kwargs)
    except OSError as error:  # huggingface_hub's and urllib's errors are OSErrors
        raise _offline(f"timm's pretrained weights of {model_name}", error) from error


def _create_timm(timm, model_name, pretrained, image_size, kwargs):
    """``timm.create_model``, with ``img_size=image_size`` for the models that take one."""
    if image_size is not None:
        try:
            return timm.create_model(model_name, pretrained=pretrained, img_size=image_size,
                                     **kwargs)
        except TypeError as error:  # a model without a fixed input size (a CNN)
            if "img_size" not in str(error):
                raise
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)


def pretrained_statistics(name, weights):
    """``(mean, std)`` per RGB channel that the pretrained weights ``weights`` of model
    ``name`` were trained with, from the library's own record of them (torchvision's
    weights' transforms, timm's pretrained_cfg), so that target images are normalised as
    the source saw its images; None for built-in models, no weights, or no record."""
    if weights is None or name in BUILTIN_MODELS:
        return None
    if name.startswith("torchvision:"):
        model_name = name[len("torchvision:"):]
        torchvision = _library("torchvision", model_name)
        try:
            preset = torchvision.models.get_model_weights(model_name)[weights].transforms()
        except (KeyError, ValueError):
            return None
        mean, std = getattr(preset, "mean", None), getattr(preset, "std", None)
    elif name.startswith("timm:"):
        model_name = name[len("timm:"):]
        timm = _library("timm", model_name)
        tagged = model_name if weights == "DEFAULT" else f"{model_name}.{weights}"
        config = timm.models.get_pretrained_cfg(tagged)
        mean, std = getattr(config, "mean", None), getattr(config, "std", None)
    else:
        return None
    if mean is None or std is None:
        return None
    return [float(m) for m in mean], [float(s) for s in std]


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
