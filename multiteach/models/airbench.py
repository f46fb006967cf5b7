"""A fast natural teacher: the layout of Keller Jordan's airbench94 CIFAR-10 network, trained plainly.

Three groups of two 3x3 convolutions (64, 256, 256 channels), each group halving the resolution with a max-pool
between its convolutions; GELU; global max-pool; a bias-free linear head whose logits are scaled by 1/9. About a
fifth of a CIFAR ResNet-18's multiply-adds per image, so a natural teacher that costs seconds, not tens of
seconds. airbench reaches 94% in under ten epochs with more than this layout, which this module leaves out: its
2x2 stem is a frozen whitening convolution (with a bias, no BatchNorm) fitted to the training images' patches,
where here it is a learned convolution followed by BatchNorm; its BatchNorm scales are frozen at 1 and its
convolutions start from an identity; it trains with lookahead and evaluates with test-time flips. Every
multiteach recipe trains this one like any other model. The 1/9 on the logits acts as a temperature the head's
weights learn to undo.
"""

from __future__ import annotations

from torch import Tensor, nn


def _conv_bn(cin: int, cout: int, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class ConvGroup(nn.Sequential):
    """conv -> max-pool 2 -> BN -> GELU -> conv -> BN -> GELU: one resolution step."""

    def __init__(self, cin: int, cout: int) -> None:
        conv1, bn1 = _conv_bn(cin, cout)
        conv2, bn2 = _conv_bn(cout, cout)
        super().__init__(conv1, nn.MaxPool2d(2), bn1, nn.GELU(), conv2, bn2, nn.GELU())


class AirbenchNet(nn.Module):
    """airbench94's layout for 32x32 inputs in [0, 1]: a 2x2 stem (24 channels) and three ``ConvGroup``s."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths: tuple[int, int, int] = (64, 256, 256),
                 stem_width: int = 24, logit_scale: float = 1 / 9) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.logit_scale = logit_scale
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_width, 2, bias=False), nn.BatchNorm2d(stem_width),
                                  nn.GELU())
        groups, cin = [], stem_width
        for width in widths:
            groups.append(ConvGroup(cin, width))
            cin = width
        self.groups = nn.Sequential(*groups)
        self.head = nn.Linear(cin, num_classes, bias=False)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: Tensor) -> Tensor:
        return self.groups(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x).amax(dim=(2, 3))
        return self.head(x) * self.logit_scale
