"""Layer outputs as feature maps ``[B, C, h, w]``, the shape the matching loss takes.

CNNs give such maps already; transformers give token sequences or channels-last maps. A
hooked output of layer L in model M becomes a map by this rule, and by nothing else:

1. A 4-D output is ``[B, C, H, W]``, unless M is channels-last: a timm model whose
   ``output_fmt`` is ``"NHWC"`` (Swin and its kin) or torchvision's ``SwinTransformer``.
   Then it is ``[B, H, W, C]`` and is permuted to ``[B, C, H, W]``.
2. A 3-D output ``[B, N, C]`` is a token sequence (ViT, DeiT). Its first P tokens are
   dropped, P being M's prefix tokens: timm's ``num_prefix_tokens`` (class, distillation
   and register tokens), 1 for torchvision's ``VisionTransformer`` (its class token), else
   0. The other N - P tokens are patches in row-major order on M's patch grid: the grid M
   was built for (timm's ``patch_embed.grid_size``, torchvision's ``image_size //
   patch_size``) when it has N - P cells, else a square grid when N - P is a square.
3. A 2-D output ``[B, C]`` (pooled features, logits) is a 1x1 map ``[B, C, 1, 1]``.
4. Any other output (another rank, a tuple, a sequence that fits no grid) is a ValueError
   naming the layer and its shape.
"""
import math

from torch import Tensor


def to_feature_map(model, layer, output):
    """``output`` of ``model``'s layer named ``layer`` as ``[B, C, h, w]`` (see the module
    docstring for the rule); a 4-D output of a channels-first model is returned as is."""
    if not isinstance(output, Tensor):
        raise ValueError(f"layer {layer!r} of {type(model).__name__} outputs a "
                         f"{type(output).__name__}, not a tensor: match a layer that outputs "
                         f"one feature map or token sequence")
    if output.dim() == 4:
        return output.permute(0, 3, 1, 2) if is_channels_last(model) else output
    if output.dim() == 3:
        batch, tokens, channels = output.shape
        prefix = prefix_tokens(model)
        height, width = _patch_grid(model, layer, output, tokens - prefix)
        return output[:, prefix:].transpose(1, 2).reshape(batch, channels, height, width)
    if output.dim() == 2:
        return output[:, :, None, None]
    raise ValueError(f"layer {layer!r} of {type(model).__name__} outputs shape "
                     f"{list(output.shape)}: a feature map must be [B, C, H, W] (or [B, H, W, C] "
                     f"in a channels-last model), a token sequence [B, N, C] or features [B, C]")


def is_channels_last(model):
    """Whether the model's 4-D layer outputs are ``[B, H, W, C]``."""
    if getattr(model, "output_fmt", None) == "NHWC":  # timm's own flag
        return True
    return _is_torchvision(model, "SwinTransformer")


def prefix_tokens(model):
    """Tokens before the patch tokens in the model's sequences."""
    count = getattr(model, "num_prefix_tokens", None)  # timm
    if isinstance(count, int):
        return count
    return 1 if _is_torchvision(model, "VisionTransformer") else 0


def _patch_grid(model, layer, output, patches):
    built = _built_grid(model)
    if built is not None and built[0] * built[1] == patches:
        return built
    side = math.isqrt(max(patches, 0))
    if patches > 0 and side * side == patches:
        return side, side
    grid = f"the {built[0]}x{built[1]} grid it was built for" if built else "no grid of its own"
    raise ValueError(f"layer {layer!r} of {type(model).__name__} outputs tokens of shape "
                     f"{list(output.shape)}: after its {prefix_tokens(model)} prefix token(s), "
                     f"{patches} patch tokens fit neither {grid} nor a square grid")


def _built_grid(model):
    embed = getattr(model, "patch_embed", None)
    grid = getattr(embed, "grid_size", None)
    if grid is not None and len(grid) == 2:
        return int(grid[0]), int(grid[1])
    if _is_torchvision(model, "VisionTransformer"):
        side = model.image_size // model.patch_size
        return side, side
    return None


def _is_torchvision(model, class_name):
    cls = type(model)
    return cls.__name__ == class_name and cls.__module__.startswith("torchvision.")
