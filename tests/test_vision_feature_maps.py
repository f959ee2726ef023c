"""Token sequences and channels-last outputs become [B, C, h, w] maps by the documented
rule (l2t_fast.models.feature_maps); needs no torchvision or timm (stand-in models)."""
import pytest
import torch
from torch import nn

from l2t_fast.models.feature_maps import to_feature_map
from l2t_fast.models.hooks import FeatureHooks


class Tokens(nn.Module):
    """A stand-in for a ViT: ``num_prefix_tokens`` and an optional built patch grid."""

    def __init__(self, prefix, grid=None):
        super().__init__()
        self.num_prefix_tokens = prefix
        if grid is not None:
            self.patch_embed = nn.Identity()
            self.patch_embed.grid_size = grid


def test_tokens_drop_the_prefix_and_fill_the_square_grid_row_major():
    batch, channels = 2, 3
    tokens = torch.randn(batch, 1 + 16, channels)
    result = to_feature_map(Tokens(1), "blocks.0", tokens)
    assert result.shape == (batch, channels, 4, 4)
    for i in range(4):
        for j in range(4):
            torch.testing.assert_close(result[:, :, i, j], tokens[:, 1 + 4 * i + j])


def test_register_and_distillation_tokens_are_prefix_tokens_too():
    tokens = torch.randn(1, 5 + 9, 2)  # class + 4 registers, 3x3 patches
    result = to_feature_map(Tokens(5), "blocks.3", tokens)
    torch.testing.assert_close(result.flatten(2).transpose(1, 2), tokens[:, 5:])


def test_the_grid_the_model_was_built_for_wins_over_a_square():
    tokens = torch.randn(1, 1 + 6, 2)
    result = to_feature_map(Tokens(1, grid=(2, 3)), "blocks.0", tokens)
    assert result.shape == (1, 2, 2, 3)
    torch.testing.assert_close(result[0, :, 1, 0], tokens[0, 1 + 3])
    # a sequence of another length (another input size) falls back to a square grid
    assert to_feature_map(Tokens(1, grid=(2, 3)), "b", torch.randn(1, 1 + 4, 2)).shape == (
        1, 2, 2, 2)


def test_channels_last_models_are_permuted_and_others_left_alone():
    maps = torch.randn(2, 3, 4, 5)
    assert to_feature_map(nn.Identity(), "layer1", maps) is maps
    swin_like = nn.Identity()
    swin_like.output_fmt = "NHWC"
    result = to_feature_map(swin_like, "layers.0", maps)  # read as [B, H=3, W=4, C=5]
    assert result.shape == (2, 5, 3, 4)
    torch.testing.assert_close(result[1, :, 2, 3], maps[1, 2, 3])


def test_features_of_a_linear_layer_are_a_1x1_map():
    features = torch.randn(2, 8)
    assert torch.equal(to_feature_map(nn.Identity(), "fc", features), features.view(2, 8, 1, 1))


@pytest.mark.parametrize("output, message", [
    (torch.randn(2, 8, 1, 1, 1), r"'head' of Tokens outputs shape \[2, 8, 1, 1, 1\]"),
    (torch.randn(2, 1 + 7, 4), r"'head' of Tokens outputs tokens of shape \[2, 8, 4\].*7 patch"),
    ((torch.randn(2, 3, 4, 4),), r"'head' of Tokens outputs a tuple"),
])
def test_an_output_that_fits_no_rule_names_the_layer_and_its_shape(output, message):
    with pytest.raises(ValueError, match=message):
        to_feature_map(Tokens(1), "head", output)


class TinyViT(nn.Module):
    """Patch embedding, a class token and two token blocks: hooks see [B, N, C]."""

    def __init__(self, width=6, patch=4, classes=3):
        super().__init__()
        self.num_prefix_tokens = 1
        self.embed = nn.Conv2d(3, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.Sequential(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width)),
                                    nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width)))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1)
        return self.head(self.blocks(tokens)[:, 0])


def test_hooks_give_maps_of_token_models_and_gradients_flow_through_them():
    model = TinyViT()
    x = torch.randn(2, 3, 8, 8)
    with FeatureHooks(model, ["blocks.0", "blocks.1"]) as hooks:
        _, feats = hooks(x)
    assert [tuple(f.shape) for f in feats] == [(2, 6, 2, 2)] * 2
    feats[1].square().sum().backward()
    assert model.blocks[1][1].weight.grad is not None
