"""DINOv2 ViT-S/B/L-14 through ``timm``, weights from a user path.

Needs the ``timm`` extra (timm needs torchvision, so it lives beside torch 2.14.1 +
torchvision 0.29.1, not in the core torch 2.13.0 venv)::

    pip install torch==2.14.1 torchvision==0.29.1 && pip install 'fdseg[timm]'

Weights (``--weights PATH``): a timm state dict (``vit_small_patch14_dinov2.lvd142m``'s
``pytorch_model.bin`` / ``model.safetensors``, or ``model.state_dict()``) or the original
facebookresearch file (``dinov2_vits14_pretrain.pth``, ``..._reg4_pretrain.pth``); timm's
own checkpoint filter maps the latter. ``register_tokens`` in the file select the
register variant by themselves (or pass ``registers=True``).

Features: the patch tokens (stride 14) of the last block by default, after the final
LayerNorm; ``layers`` picks other blocks (0-based). The input is resized to the nearest
multiple of 14 per side and the position embeddings are interpolated to that grid (timm
``dynamic_img_size``), so any input size works. Input normalisation: ImageNet mean / std.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .base import Backbone, load_into, load_state_dict_file
from .registry import register_backbone
from ..errors import InputError, MissingExtraError

# fdseg name -> (timm architecture, embed dim, depth)
_ARCH = {"dinov2_vits14": ("vit_small_patch14", 384, 12), "dinov2_vitb14": ("vit_base_patch14", 768, 12),
         "dinov2_vitl14": ("vit_large_patch14", 1024, 24)}
_PATCH = 14


def _timm():
    try:
        import timm
    except ImportError as e:
        err = MissingExtraError("DINOv2 backbones", "timm", "timm")
        err.msg = (f"DINOv2 backbones need the package 'timm' (which needs torchvision; {e.msg}): install, in a "
                   "venv of their own, pip install torch==2.14.1 torchvision==0.29.1 && pip install 'fdseg[timm]'")
        err.args = (err.msg,)
        raise err from None
    return timm


def _load_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise MissingExtraError("reading .safetensors weights", "timm", "safetensors") from None
    try:
        return load_file(str(path))
    except Exception as e:
        raise InputError(path, f"cannot load DINOv2 weights: not a safetensors file ({e})") from None


class DINOv2(Backbone):
    """A timm DINOv2 ViT returning patch-token maps ``B x D x H/14 x W/14``."""

    def __init__(self, name: str, registers: bool = False, layers: tuple[int, ...] | None = None):
        super().__init__()
        if name not in _ARCH:
            raise InputError("--backbone", f"unknown DINOv2 model {name!r}")
        arch, dim, depth = _ARCH[name]
        timm = _timm()
        self.name, self.registers = name, registers
        model_name = f"{arch}_reg4_dinov2" if registers else f"{arch}_dinov2"
        self.vit = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=518,
                                     dynamic_img_size=True)
        layers = (depth - 1,) if layers is None else tuple(int(i) for i in layers)
        bad = [i for i in layers if not 0 <= i < depth]
        if bad or not layers:
            raise InputError("layers", f"{name}: block indices must be in 0..{depth - 1}, got {list(layers)}")
        self.taps = tuple(sorted(set(layers)))
        self.strides = (_PATCH,) * len(self.taps)
        self.channels = (dim,) * len(self.taps)
        self.mean = (0.485 * 255, 0.456 * 255, 0.406 * 255)
        self.std = (0.229 * 255, 0.224 * 255, 0.225 * 255)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        gh, gw = max(1, round(h / _PATCH)), max(1, round(w / _PATCH))
        if (gh * _PATCH, gw * _PATCH) != (h, w):
            x = F.interpolate(x, size=(gh * _PATCH, gw * _PATCH), mode="bilinear", align_corners=False)
        maps = self.vit.forward_intermediates(x, indices=list(self.taps), norm=True, output_fmt="NCHW",
                                              intermediates_only=True, stop_early=True)
        return list(maps)


def build_dinov2(name: str, weights: str | Path | None, registers: bool | None = None,
                 layers: tuple[int, ...] | None = None) -> DINOv2:
    """``weights``: a timm / facebookresearch state-dict file, or "random" (untrained, for tests)."""
    if weights is None:
        raise InputError("--weights", f"{name} needs a weights file (timm or facebookresearch DINOv2 state dict); "
                                      "fdseg downloads nothing")
    if weights == "random":
        return DINOv2(name, bool(registers), layers)
    path = Path(weights)
    if path.suffix == ".safetensors" and path.is_file():
        state = _load_safetensors(path)
    else:
        state = load_state_dict_file(path, name)
    if registers is None:
        registers = "register_tokens" in state or "reg_token" in state
    model = DINOv2(name, registers, layers)
    from timm.models.vision_transformer import checkpoint_filter_fn
    try:
        state = checkpoint_filter_fn(state, model.vit)
    except Exception as e:   # a foreign checkpoint can break the filter (e.g. a wrong pos_embed shape)
        raise InputError(path, f"these are not {name} weights: {type(e).__name__}: {e}") from None
    load_into(model.vit, state, path, name)
    return model


def _register(name: str, size: str):
    dim = _ARCH[name][1]

    @register_backbone(name, extra="timm", needs_weights=True,
                       summary=f"DINOv2 ViT-{size}/14 via timm (weights via --weights), patch tokens, "
                       f"stride 14, {dim} ch")
    def builder(weights: str | Path | None = None, registers: bool | None = None,
                layers: tuple[int, ...] | None = None, **_) -> DINOv2:
        return build_dinov2(name, weights, registers, layers)

    builder.__qualname__ = f"build_{name}"
    return builder


dinov2_vits14 = _register("dinov2_vits14", "S")
dinov2_vitb14 = _register("dinov2_vitb14", "B")
dinov2_vitl14 = _register("dinov2_vitl14", "L")
