"""Which layers to match: stage outputs suggested from a model's structure or a dry run."""
import re

import torch
from torch import Tensor, nn


def _stage_number(name):
    match = re.fullmatch(r"layer(\d+)", name)
    return int(match.group(1)) if match else None


def suggest_layers(model, example_input=None):
    """Names of the modules whose outputs make good feature maps to match (stage outputs).

    - ResNet-style (top-level children ``layer1``, ``layer2``, ...): those stages, in order.
    - VGG-style (a top-level ``features`` ``nn.Sequential`` with ``MaxPool2d``): the module
      right before each max-pool, i.e. the last conv block output at each resolution.
    - Anything else needs ``example_input``: the model runs once and, among its top-level
      children that output 4-D maps, the last one before each change of spatial size
      (the end of each resolution stage) is suggested.
    """
    children = dict(model.named_children())
    stages = sorted((n for n in children if _stage_number(n) is not None), key=_stage_number)
    if stages:
        return stages
    features = children.get("features")
    if isinstance(features, nn.Sequential):
        names = list(features._modules)
        before_pool = [f"features.{names[i - 1]}" for i, name in enumerate(names)
                       if i > 0 and isinstance(features._modules[name], nn.MaxPool2d)]
        if before_pool:
            return before_pool
    if example_input is None:
        raise ValueError(f"cannot suggest layers for {type(model).__name__} from its structure "
                         f"alone (no layer1.. stages, no VGG-style features); pass example_input "
                         f"or name the layers yourself")
    return _stage_ends(model, example_input)


def _stage_ends(model, example_input):
    outputs = {}
    handles = [child.register_forward_hook(
        lambda module, inputs, output, name=name: outputs.__setitem__(name, output))
        for name, child in model.named_children()]
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
    maps = [(name, out.shape[-2:]) for name, out in outputs.items()
            if isinstance(out, Tensor) and out.dim() == 4]
    return [name for i, (name, size) in enumerate(maps)
            if i + 1 == len(maps) or maps[i + 1][1] != size]
