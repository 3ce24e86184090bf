"""Patch description networks (PDN), the EfficientAD teacher architectures.

``pdn_small`` (4 convs, 128/256/256/384 ch, 2,694,144 parameters) and ``pdn_medium``
(6 convs, 256/512/512/512/384/384 ch, 8,026,624 parameters) are layer for layer the
networks of Batzner et al., *EfficientAD* (2024), built as one ``nn.Sequential`` so a
state dict with EfficientAD's indexing (``0.weight``, ``3.weight``, ...: the files
``teacher_small.pth`` / ``teacher_medium.pth``) loads unchanged from a path. With the
padding on (as here) a 256 x 256 input gives a 64 x 64 x 384 map: one map at stride 4.

``pdn_tiny`` is a CPU-minded variant of ours (same strides, padding and output; 252,064
parameters, ~1/11 of pdn_small's FLOPs). With no path it loads the student distilled here
by ``fdseg distill`` (``fdseg/weights/pdn_tiny_lite0.pt``, fp16; ``fdseg/weights/WEIGHTS.md``);
pdn_small / pdn_medium need a path (no PDN-small student could be trained far enough on this
project's shared 2-core CPU: see BENCHMARKS.md). A student file
also holds ``feature_mean`` / ``feature_std`` (384 each): the network was trained on
per-channel standardised targets, and the output is mapped back with them so that
cosines match the teacher's feature grid. Files without those keys (EfficientAD's) give
the raw network output.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .base import Backbone, load_into, load_state_dict_file
from .registry import register_backbone
from ..errors import InputError

# conv layers: (out channels, kernel, padding) and whether a 2x2 average pool follows
_ARCHS: dict[str, list[tuple[int, int, int, bool]]] = {
    "pdn_small": [(128, 4, 3, True), (256, 4, 3, True), (256, 3, 1, False), (384, 4, 0, False)],
    "pdn_medium": [(256, 4, 3, True), (512, 4, 3, True), (512, 1, 0, False), (512, 3, 1, False),
                   (384, 4, 0, False), (384, 1, 0, False)],
    # CPU-minded variant (ours, not EfficientAD's): same strides, padding and 384-ch output,
    # 1/4 of the channels early, a 1x1 to 384 at the end: 252,064 parameters, 3.2 GFLOP at 256^2
    "pdn_tiny": [(32, 4, 3, True), (64, 4, 3, True), (64, 3, 1, False), (128, 4, 0, False),
                 (384, 1, 0, False)],
}
PUBLISHED_PARAMS = {"pdn_small": 2_694_144, "pdn_medium": 8_026_624}
SHIPPED = {"pdn_tiny": "pdn_tiny_lite0.pt"}
_IMAGENET_MEAN = (123.675, 116.28, 103.53)
_IMAGENET_STD = (58.395, 57.12, 57.375)
_STRIP = ("module.", "teacher.", "student.", "pdn.", "model.")


def _sequential(arch: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    spec = _ARCHS[arch]
    for i, (cout, k, pad, pool) in enumerate(spec):
        layers.append(nn.Conv2d(cin, cout, k, padding=pad))
        if i < len(spec) - 1:          # no ReLU after the last conv
            layers.append(nn.ReLU(inplace=True))
        if pool:
            layers.append(nn.AvgPool2d(2, stride=2, padding=1))
        cin = cout
    return nn.Sequential(*layers)


class PDN(Backbone):
    """A PDN as a backbone: one 384-channel map at stride 4 (ImageNet input normalisation)."""

    def __init__(self, arch: str = "pdn_small"):
        super().__init__()
        if arch not in _ARCHS:
            raise InputError("--backbone", f"unknown PDN architecture {arch!r} (have {sorted(_ARCHS)})")
        self.name = arch
        self.net = _sequential(arch)
        self.strides, self.channels = (4,), (384,)
        self.mean, self.std = _IMAGENET_MEAN, _IMAGENET_STD
        # output de-standardisation (identity unless the weights file carries it); not in state_dict
        self.register_buffer("out_mean", torch.zeros(1, 384, 1, 1), persistent=False)
        self.register_buffer("out_std", torch.ones(1, 384, 1, 1), persistent=False)

    @property
    def min_input_size(self) -> int:
        return 16

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The network's own output (what distillation trains)."""
        return self.net(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.net(x) * self.out_std + self.out_mean]

    def set_output_stats(self, mean: torch.Tensor | None, std: torch.Tensor | None) -> None:
        self.out_mean = (torch.zeros(384) if mean is None else mean.float()).reshape(1, 384, 1, 1).clone()
        self.out_std = (torch.ones(384) if std is None else std.float()).reshape(1, 384, 1, 1).clone()


def pdn_state_dict(state: dict) -> tuple[dict, torch.Tensor | None, torch.Tensor | None]:
    """Strip common prefixes; split off the optional output statistics."""
    out = {}
    for k, v in state.items():
        for p in _STRIP:
            if k.startswith(p):
                k = k[len(p):]
                break
        if k.startswith("net."):
            k = k[4:]
        out[k] = v
    mean, std = out.pop("feature_mean", None), out.pop("feature_std", None)
    return out, mean, std


def shipped_weights_path(arch: str) -> Path:
    if arch not in SHIPPED:
        raise InputError("--weights", f"{arch} ships no weights: give a state dict file with --weights "
                                      f"(e.g. EfficientAD's teacher_{arch.split('_')[1]}.pth)")
    return Path(__file__).resolve().parent.parent / "weights" / SHIPPED[arch]


def load_pdn(model: PDN, path: str | Path) -> PDN:
    """Load a state dict file (``weights_only=True``) into ``model``, with clear errors."""
    state = load_state_dict_file(path, model.name)
    state, mean, std = pdn_state_dict(state)
    for name, t in (("feature_mean", mean), ("feature_std", std)):
        if t is not None and t.numel() != 384:
            raise InputError(path, f"{name} has {t.numel()} values, expected 384")
    load_into(model.net, state, path, model.name)
    model.set_output_stats(mean, std)
    return model


def build_pdn(arch: str, weights: str | Path | None = None) -> PDN:
    """``weights``: None -> the shipped distilled student; "random" -> untrained; else a path."""
    model = PDN(arch)
    if weights == "random":
        return model
    path = Path(weights) if weights is not None else shipped_weights_path(arch)
    if weights is None and not path.is_file():
        raise InputError(path, f"the shipped {arch} weights are missing from this installation; "
                               "reinstall fdseg or pass --weights")
    return load_pdn(model, path)


@register_backbone("pdn_tiny", summary="CPU-minded PDN (0.25 M params, stride 4, 384 ch); default weights: "
                   "distilled here from efficientnet_lite0 (fdseg distill; fdseg/weights/WEIGHTS.md)")
def pdn_tiny(weights: str | Path | None = None, **_) -> PDN:
    return build_pdn("pdn_tiny", weights)


@register_backbone("pdn_small", summary="EfficientAD PDN-small (2.7 M params, stride 4, 384 ch); "
                   "needs --weights (EfficientAD teacher_small.pth or an fdseg distill student.pt)",
                   needs_weights=True)
def pdn_small(weights: str | Path | None = None, **_) -> PDN:
    return build_pdn("pdn_small", weights)


@register_backbone("pdn_medium", summary="EfficientAD PDN-medium (8.0 M params, stride 4, 384 ch); "
                   "needs --weights (e.g. EfficientAD teacher_medium.pth)", needs_weights=True)
def pdn_medium(weights: str | Path | None = None, **_) -> PDN:
    return build_pdn("pdn_medium", weights)
