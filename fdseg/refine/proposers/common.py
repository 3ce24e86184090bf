"""Helpers the proposers share: working resolution and lazy optional imports."""
from __future__ import annotations

import importlib

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import MissingExtraError


def need(module: str, feature: str, extra: str, package: str | None = None):
    """Import an optional module or raise :class:`MissingExtraError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(feature, extra, package or module.split(".")[0]) from e


def shrink(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """The image resized (area) so its longer side is at most ``max_side`` (None = as is)."""
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image
    s = max_side / max(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=size, mode="area")
    return t[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def grow_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``shape``."""
    if labels.shape == tuple(shape):
        return labels
    ys = (np.arange(shape[0]) * labels.shape[0] // shape[0]).clip(0, labels.shape[0] - 1)
    xs = (np.arange(shape[1]) * labels.shape[1] // shape[1]).clip(0, labels.shape[1] - 1)
    return labels[ys[:, None], xs[None, :]]


def grow_masks(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an N x h x w bool stack to N x H x W."""
    if not len(masks):
        return np.zeros((0, *shape), bool)
    if masks.shape[1:] == tuple(shape):
        return masks
    t = torch.from_numpy(np.ascontiguousarray(masks)).float()[None]
    return F.interpolate(t, size=tuple(shape), mode="nearest")[0].bool().numpy()
