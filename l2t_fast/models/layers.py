"""Which layers to match: stage outputs suggested from a model's structure or a dry run."""
import logging
import re

import torch
from torch import Tensor, nn

from l2t_fast.models.feature_maps import to_feature_map

log = logging.getLogger(__name__)

# Containers that hold a model's stages or blocks, in the order they are looked for:
# torchvision's VGG, MobileNet, EfficientNet, ConvNeXt, DenseNet and Swin keep them in
# ``features``, its ViT in ``encoder.layers``; timm's ViT and EfficientNet in ``blocks``,
# its Swin in ``layers``, its ConvNeXt in ``stages``.
TRUNKS = ("features", "encoder.layers", "blocks", "layers", "stages")
MAX_STAGES = 4
# what a VGG-style ``features`` is made of, and only of (DenseNet's has a max-pool too)
VGG_PARTS = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Dropout)  # the last four resolutions: ResNets' layer1..layer4, the paper's setting


def _stage_number(name):
    match = re.fullmatch(r"layer(\d+)", name)
    return int(match.group(1)) if match else None


def suggest_layers(model, example_input=None):
    """Names of the modules whose outputs make good feature maps to match (stage outputs),
    first rule that applies; what was picked, and by which rule, is logged (INFO) and told
    by ``explain_layers``.

    1. ResNet-style (top-level children ``layer1``, ``layer2``, ...; torchvision's and timm's
       ResNets): those stages, in order.
    2. VGG-style (a top-level ``features`` ``nn.Sequential`` of convolutions, batch norms,
       ReLUs and max-pools alone): the module right before each max-pool, i.e. the last
       conv block output at each resolution.
    3. Otherwise the model runs once (eval mode, no grad) on ``example_input``, by default a
       batch of one at the input size of a torchvision or timm model (224, or the size a
       timm ViT or Swin was built for; other models need ``example_input``). The children
       of its trunk (the first of ``features``, ``encoder.layers``, ``blocks``, ``layers``,
       ``stages`` that is a container, else the model's top-level children) are read as
       feature maps (``l2t_fast.models.feature_maps``): the last child at each resolution
       ends a stage, and the last four stages are suggested (MobileNet, EfficientNet,
       ConvNeXt, DenseNet, Swin). A trunk at one resolution throughout (a ViT's blocks) is
       cut into four equal parts instead, and each part's last block suggested.
    """
    return explain_layers(model, example_input)[0]


def explain_layers(model, example_input=None):
    """``(suggest_layers(model, example_input), a sentence saying what rule picked them)``."""
    layers, rule = _suggest(model, example_input)
    explanation = f"{type(model).__name__}: {', '.join(layers)} ({rule})"
    log.info("suggested layers of %s", explanation)
    return layers, explanation


def _suggest(model, example_input):
    children = dict(model.named_children())
    stages = sorted((n for n in children if _stage_number(n) is not None), key=_stage_number)
    if stages:
        return stages, "its layer1.. stages"
    features = children.get("features")
    if isinstance(features, nn.Sequential) and all(
            isinstance(module, VGG_PARTS) for module in features):
        names = list(features._modules)
        before_pool = [f"features.{names[i - 1]}" for i, name in enumerate(names)
                       if i > 0 and isinstance(features._modules[name], nn.MaxPool2d)]
        if before_pool:
            return before_pool, "the output before each max-pool"
    if example_input is None:
        example_input = _default_input(model)
    if example_input is None:
        raise ValueError(f"cannot suggest layers for {type(model).__name__} from its structure "
                         f"alone (no layer1.. stages, no VGG-style features); pass example_input "
                         f"or name the layers yourself")
    trunk, names = _trunk(model)
    sizes = _output_sizes(model, names, example_input)
    ends = [name for i, (name, size) in enumerate(sizes)
            if i + 1 == len(sizes) or sizes[i + 1][1] != size]
    where = f"of {trunk}" if trunk else "of its top-level children"
    if len(ends) == 1 and len(sizes) >= MAX_STAGES:
        count = len(sizes)
        picked = [sizes[(part + 1) * count // MAX_STAGES - 1][0] for part in range(MAX_STAGES)]
        return picked, f"the last block of each quarter {where}, all at one resolution"
    return ends[-MAX_STAGES:], f"the last module at each of the last {MAX_STAGES} resolutions {where}"


def _default_input(model):
    """A one-image batch at the model's input size, for torchvision and timm models."""
    module = type(model).__module__
    if not module.startswith(("torchvision.", "timm.")):
        return None
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)  # timm ViT, Swin
    if size is None and isinstance(getattr(model, "image_size", None), int):  # torchvision ViT
        size = model.image_size
    height, width = (size, size) if isinstance(size, int) else (size or (224, 224))
    first = next(model.parameters())
    return torch.zeros(1, 3, height, width, dtype=first.dtype, device=first.device)


def _trunk(model):
    """``(prefix, [names of its children])`` of the module that holds the stages."""
    modules = dict(model.named_modules())
    for name in TRUNKS:
        trunk = modules.get(name)
        if isinstance(trunk, (nn.Sequential, nn.ModuleList)) and len(trunk):
            return name, [f"{name}.{child}" for child in trunk._modules]
    return "", [name for name, _ in model.named_children()]


def _output_sizes(model, names, example_input):
    """``[(name, spatial size of its output as a feature map)]`` of the named modules that
    output one, in the order of ``names``, from one eval-mode pass."""
    outputs = {}
    modules = dict(model.named_modules())

    def store(name, output):
        if isinstance(output, Tensor) and output.dim() in (3, 4):
            try:
                outputs[name] = tuple(to_feature_map(model, name, output).shape[-2:])
            except ValueError:  # not a map (e.g. a sequence that fits no grid): not a stage
                pass

    handles = [modules[name].register_forward_hook(
        lambda module, inputs, output, name=name: store(name, output)) for name in names]
    was_training = [m.training for m in model.modules()]
    model.eval()  # a dry run must not move BatchNorm statistics
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in zip(model.modules(), was_training):
            module.training = flag
    return [(name, outputs[name]) for name in names if name in outputs]
