"""The built-in networks: small CIFAR-style ResNets.

A 3x3 stem, three stages of basic blocks with 16/32/64 channels, strides 1/2/2, at depths
small enough to train on two CPU cores in minutes. Their stages are named
``layer1..layer3`` and the head ``fc``, like torchvision's ResNets, so layer suggestions
and head lookup treat both alike.
"""
import torch.nn.functional as F
from torch import nn

# name -> basic blocks per stage
BUILTIN_MODELS = {"resnet8": 1, "resnet14": 2, "resnet20": 3}
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
