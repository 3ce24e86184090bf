"""What every backbone provides: multi-layer feature maps of an RGB batch."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import read_torch_file
from ..errors import InputError


class Backbone(nn.Module):
    """A frozen feature extractor.

    ``forward`` takes a normalised float batch ``B x 3 x H x W`` and returns a list
    of feature maps, one per entry of ``strides`` / ``channels``.
    ``mean`` / ``std`` are the input normalisation in 0..255 units.
    """

    name: str = "backbone"
    strides: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)

    @property
    def min_input_size(self) -> int:
        """Smallest image side that still gives one cell on the coarsest map."""
        return max(self.strides) if self.strides else 1

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        """uint8/float RGB ``B x 3 x H x W`` in 0..255 -> network input."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=rgb.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=rgb.device).view(1, 3, 1, 1)
        return (rgb.float() - mean) / std

    def fold_batchnorm(self) -> "Backbone":
        """Fold BatchNorm layers into the convolutions before them, for inference (the same function
        up to rounding); a backbone that has none returns itself. ``FeatureExtractor`` calls it on a
        backbone in eval mode."""
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def load_state_dict_file(path: str | Path, what: str) -> dict:
    """Load a checkpoint safely (``weights_only=True``) and return its state dict."""
    path = Path(path)
    obj = read_torch_file(path, missing=f"{what} weights file does not exist",
                          unreadable=f"cannot load {what} weights: not a plain state dict or corrupt file")
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "params"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(path, f"{what} weights: expected a state dict of tensors, got {type(obj).__name__}")
    return obj


def load_into(module: nn.Module, state: dict, path: str | Path, what: str) -> None:
    """``load_state_dict`` with a message that names the file and the mismatch."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or shape:
        parts = []
        if shape:
            parts.append("shape mismatch " + "; ".join(shape[:3]) + (" ..." if len(shape) > 3 else ""))
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise InputError(path, f"these are not {what} weights: " + "; ".join(parts))
    module.load_state_dict({k: state[k] for k in own}, strict=True)
