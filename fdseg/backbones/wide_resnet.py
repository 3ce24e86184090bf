"""Wide ResNet-50-2 / 101-2 (layer2 + layer3, PatchCore-style), weights from a user path.

A native torch ResNet (no torchvision needed) whose parameter names are those of
torchvision's ``wide_resnet50_2`` / ``wide_resnet101_2``, so a torchvision state dict
(e.g. ``wide_resnet50_2-95faca4d.pth`` or ``model.state_dict()``) loads as is; only
the stem, layer1, layer2 and layer3 are built (layer4 and fc in the file are ignored).

Features as in PatchCore (Roth et al. 2022): layer2 (stride 8, 512 ch) and layer3
(stride 16, 1024 ch), each averaged over its 3 x 3 neighbourhood; the feature grid
(``fdseg.features.combine_layers``) then upsamples layer3 to the grid and concatenates.
Input normalisation: ImageNet mean / std.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, load_into, load_state_dict_file
from .registry import register_backbone
from ..errors import InputError

_DEPTHS = {"wide_resnet50_2": (3, 4, 6), "wide_resnet101_2": (3, 4, 23)}   # blocks of layer1..3
_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class _Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3 x 3 conv, 'v1.5'), width_per_group = 128."""

    def __init__(self, cin: int, planes: int, stride: int, width_factor: int = 2):
        super().__init__()
        width, cout = planes * width_factor, planes * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class WideResNet(Backbone):
    """Stem + layer1..3 of a wide ResNet; returns 3 x 3-averaged layer2 and layer3."""

    def __init__(self, name: str, local_avg: int = 3):
        super().__init__()
        if name not in _DEPTHS:
            raise InputError("--backbone", f"unknown wide ResNet {name!r}")
        if local_avg < 1 or local_avg % 2 == 0:
            raise InputError("local_avg", f"must be an odd number >= 1, got {local_avg}")
        self.name, self.local_avg = name, local_avg
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256), _DEPTHS[name]), start=1):
            blocks = []
            for j in range(n):
                blocks.append(_Bottleneck(cin, planes, 2 if (j == 0 and i > 1) else 1))
                cin = planes * 4
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.strides, self.channels = (8, 16), (512, 1024)
        self.mean, self.std = _IMAGENET_MEAN, _IMAGENET_STD

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        f2 = self.layer2(self.layer1(x))
        f3 = self.layer3(f2)
        if self.local_avg > 1:
            k = self.local_avg
            f2, f3 = (F.avg_pool2d(f, k, stride=1, padding=k // 2) for f in (f2, f3))
        return [f2, f3]


def build_wide_resnet(name: str, weights: str | Path | None, local_avg: int = 3) -> WideResNet:
    """``weights``: a torchvision state-dict file, or "random" (untrained, for tests)."""
    model = WideResNet(name, local_avg)
    if weights == "random":
        return model
    if weights is None:
        raise InputError("--weights", f"{name} needs a weights file: a torchvision state dict "
                                      f"(e.g. torchvision's {name} ImageNet weights, saved with torch.save)")
    path = Path(weights)
    state = load_state_dict_file(path, name)
    own = model.state_dict()
    # a deeper ResNet's layer1-3 contain ours: refuse its extra blocks instead of loading a prefix
    extra = [k for k in state if k.split(".")[0] in ("layer1", "layer2", "layer3") and k not in own]
    if extra:
        raise InputError(path, f"these are not {name} weights: {len(extra)} unexpected keys in layer1-3 "
                               f"(e.g. {', '.join(extra[:3])}); a deeper ResNet?")
    load_into(model, state, path, name)
    return model


@register_backbone("wide_resnet50_2", needs_weights=True,
                   summary="Wide ResNet-50-2 (torchvision state dict via --weights), PatchCore layer2 + layer3, "
                   "stride 8 + 16, 512 + 1024 ch")
def wide_resnet50_2(weights: str | Path | None = None, local_avg: int = 3, **_) -> WideResNet:
    return build_wide_resnet("wide_resnet50_2", weights, local_avg)


@register_backbone("wide_resnet101_2", needs_weights=True,
                   summary="Wide ResNet-101-2 (torchvision state dict via --weights), PatchCore layer2 + layer3, "
                   "stride 8 + 16, 512 + 1024 ch")
def wide_resnet101_2(weights: str | Path | None = None, local_avg: int = 3, **_) -> WideResNet:
    return build_wide_resnet("wide_resnet101_2", weights, local_avg)
