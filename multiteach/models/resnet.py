"""CIFAR ResNets: ResNet-18 (3x3 stem, no max-pool, as in the MTARD/RSLAD/ARD code) and ResNet-56.

Parameter names follow the layouts those repositories load (kuangliu-style ResNet-18, chenyaofo-style
ResNet-56), so their released checkpoints load with ``load_state_dict``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Post-activation residual block; ``shortcut_name`` keeps each reference layout's key names."""

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut_name: str = "shortcut") -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self._shortcut_name = shortcut_name
        proj = _projection(cin, cout, stride) if stride != 1 or cin != cout else nn.Sequential()
        setattr(self, shortcut_name, proj)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + getattr(self, self._shortcut_name)(x))


class CifarResNet(nn.Module):
    """A ResNet for 32x32 inputs: 3x3 stem, stages of BasicBlocks, global average pool, linear head."""

    def __init__(
        self,
        blocks: tuple[int, ...],
        widths: tuple[int, ...],
        num_classes: int = 10,
        in_chans: int = 3,
        head_name: str = "linear",
        shortcut_name: str = "shortcut",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = _conv3x3(in_chans, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, (n, width) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            layer = []
            for j in range(n):
                layer.append(BasicBlock(cin, width, stride if j == 0 else 1, shortcut_name))
                cin = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.num_stages = len(blocks)
        self.num_features = cin
        self._head_name = head_name
        setattr(self, head_name, nn.Linear(cin, num_classes))

    def get_classifier(self) -> nn.Module:
        return getattr(self, self._head_name)

    def forward_features(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1)
        return self.get_classifier()(x)


def resnet18(num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_chans)


def resnet56(num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    return CifarResNet((9, 9, 9), (16, 32, 64), num_classes, in_chans, head_name="fc", shortcut_name="downsample")
