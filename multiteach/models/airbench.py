"""A fast natural teacher: Keller Jordan's airbench94 CIFAR-10 network, its layout alone or with its own start.

Three groups of two 3x3 convolutions (64, 256, 256 channels), each group halving the resolution with a max-pool
between its convolutions; GELU; global max-pool; a bias-free linear head whose logits are scaled by 1/9. About a
fifth of a CIFAR ResNet-18's multiply-adds per image, so a natural teacher that costs seconds, not tens of
seconds. airbench reaches 94% in under ten epochs with more than this layout, which this module leaves out: its
2x2 stem is a frozen whitening convolution (with a bias, no BatchNorm) fitted to the training images' patches,
where here it is a learned convolution followed by BatchNorm; its BatchNorm scales are frozen at 1 and its
convolutions start from an identity; it trains with lookahead and evaluates with test-time flips. Every
multiteach recipe trains this one (``cifar_airbench``) like any other model. The 1/9 on the logits acts as a
temperature the head's weights learn to undo.

:class:`Airbench94` (``cifar_airbench94``) adds what the network itself carries of airbench94: the whitening
stem (fitted to training images by :meth:`Airbench94.init_from_data`, which
:func:`multiteach.build.build_trainer` calls before the trainer copies the model for its EMA; a model trained
otherwise calls it first, and training an unfitted stem is refused), identity-initialized convolutions,
BatchNorm scales frozen at 1 (momentum 0.4, eps 1e-12) and a 64x learning rate for the BatchNorm biases
(:meth:`Airbench94.param_lr_scales`). :data:`AIRBENCH94_RECIPE` is its training recipe in this library's terms.
Left out: lookahead (the trainer's EMA, selected on validation, stands in), test-time augmentation, the
alternating flip and the whitening bias frozen after 3 epochs (here it trains throughout).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Images


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


class WhiteningConv(nn.Conv2d):
    """A frozen convolution that whitens the input's ``kernel`` x ``kernel`` patches (airbench's stem): its
    filters are the patch covariance's eigenvectors scaled by 1/sqrt(eigenvalue + eps), each also negated
    (so 2 x C x k^2 channels), fitted by :meth:`fit`. The per-channel standardization airbench applies first is
    folded into the filters and a fixed offset (a buffer), so the stem takes raw images in [0, 1]; the bias
    starts at 0 and trains, decayed towards 0, as airbench's. Training an unfitted stem is refused."""

    def __init__(self, in_chans: int = 3, kernel: int = 2) -> None:
        super().__init__(in_chans, 2 * in_chans * kernel * kernel, kernel, bias=True)
        self.weight.requires_grad_(False)
        nn.init.zeros_(self.bias)
        self.register_buffer("offset", torch.zeros(self.out_channels))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._fit_seen = False  # checked once (a host sync), not every step

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not self._fit_seen:
            if not bool(self.fitted):
                raise RuntimeError("the whitening stem is not fitted to data: call model.init_from_data(images) "
                                   "first (multiteach's build_trainer does), or load a fitted model's checkpoint")
            self._fit_seen = True
        return self._conv_forward(x, self.weight, self.bias + self.offset)  # one bias, added in the conv

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._fit_seen = False  # weights loaded: their `fitted` is checked again

    @torch.no_grad()
    def fit(self, images: Tensor | Images, eps: float = 5e-4, chunk: int = 500) -> None:
        """Fit to ``images`` (N, C, H, W) in [0, 1], a float tensor or uint8 :class:`~multiteach.data.Images`
        (converted a chunk at a time): airbench whitens the patches of per-channel standardized images (their
        uncentered covariance, eps relative to unit variance)."""
        def parts() -> Iterator[Tensor]:
            for lo in range(0, len(images), chunk):
                yield images[lo:lo + chunk].to("cpu").to(torch.float64)

        k, c = self.kernel_size[0], self.in_channels
        moments = torch.zeros(2, c, dtype=torch.float64)
        pixels = 0
        for part in parts():
            moments += torch.stack([part.sum(dim=(0, 2, 3)), part.square().sum(dim=(0, 2, 3))])
            pixels += part.numel() // c
        mean = moments[0] / pixels
        std = (moments[1] / pixels - mean.square()).clamp_min(1e-24).sqrt()
        cov = torch.zeros(c * k * k, c * k * k, dtype=torch.float64)
        count = 0
        for part in parts():
            z = (part - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
            patches = F.unfold(z, k).transpose(1, 2).reshape(-1, c * k * k)  # (patches, C*k*k), the filters' order
            cov += patches.T @ patches
            count += len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov / max(count, 1))
        order = eigenvalues.argsort(descending=True)
        filters = (eigenvectors[:, order] / (eigenvalues[order] + eps).sqrt()).T.reshape(-1, c, k, k)
        weight = torch.cat([filters, -filters]) / std.view(1, -1, 1, 1)  # (z = (x - mean) / std) folded in
        self.weight.copy_(weight.to(self.weight.dtype))
        self.offset.copy_((-(weight * mean.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))).to(self.offset.dtype))
        self.fitted.fill_(True)


class Airbench94(AirbenchNet):
    """airbench94's network with its own start: a whitening stem fitted to the data, identity-initialized
    convolutions, BatchNorm scales frozen at 1 (momentum 0.4, eps 1e-12) and BatchNorm biases at 64x the LR,
    their weight decay divided by as much (airbench decouples the two)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths: tuple[int, int, int] = (64, 256, 256),
                 bn_momentum: float = 0.4, bias_lr_scale: float = 64.0, logit_scale: float = 1 / 9) -> None:
        super().__init__(num_classes, in_chans, widths, stem_width=8 * in_chans, logit_scale=logit_scale)
        self.stem = nn.Sequential(WhiteningConv(in_chans, 2), nn.GELU())
        self.bias_lr_scale = bias_lr_scale
        for m in self.groups.modules():
            if isinstance(m, nn.Conv2d):
                with torch.no_grad():
                    nn.init.dirac_(m.weight[: m.in_channels])
            elif isinstance(m, nn.BatchNorm2d):
                m.momentum, m.eps = bn_momentum, 1e-12
                m.weight.requires_grad_(False)

    def init_from_data(self, images: Tensor | Images) -> None:
        """Fit the whitening stem to training images (N, C, H, W) in [0, 1]; airbench takes 5,000."""
        self.stem[0].fit(images)

    def param_lr_scales(self) -> dict[str, float]:
        """Parameter name -> LR multiplier (its weight decay divided by as much): the BatchNorm biases'."""
        return {f"groups.{name}": self.bias_lr_scale for name, p in self.groups.named_parameters()
                if name.endswith(".bias") and p.requires_grad}


# airbench94's training recipe (batch 1024, lr 11.5 and weight decay 0.0153 "per 1024 examples" on a summed
# loss, Nesterov momentum 0.85, label smoothing 0.2, ~10 epochs, a linear one-cycle) in this library's terms: a
# mean loss, so lr 11.5 / (1 + 1 / (1 - 0.85)) = 1.5 at batch 1024 and weight decay 0.0153 / 11.5 = 1.33e-3; the
# one-cycle schedule stands in for its linear ramp (0.2 -> 1 over 23% of the steps, then -> 0.07).
AIRBENCH94_RECIPE = {
    "train": {"batch_size": 1024, "lr": 1.5, "momentum": 0.85, "nesterov": True, "weight_decay": 0.0153 / 11.5,
              "schedule": "onecycle", "warmup_epochs": 0.0, "milestones": []},
    "options": {"label_smoothing": 0.2},
}
