"""Preprocessing step: the zoom rule (``zoom="auto"``), decided on the supports' masks."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..data.preprocess import Preprocess
from ..errors import InputError
from .plan import Decision

ZOOM_BELOW_CELLS = 2.0     # zoom when the supports' median defect is under this many grid cells across
ZOOM_ROOM = 4              # ... and some support has a long side of at least this many x the input size


def defect_cells(masks: list[np.ndarray], pre: Preprocess, stride: int) -> tuple[list[float], int]:
    """The side (in grid cells at zoom 1, as a square) of every 8-connected defect component of the
    masks, and the longest image side among them (strips left out: they are seen at their own scale,
    which zoom does not change)."""
    from scipy import ndimage
    base = dataclasses.replace(pre, zoom=1)
    sides: list[float] = []
    longest = 0
    for m in masks:
        h, w = m.shape
        if not base.is_strip(h, w):
            longest = max(longest, h, w)
        H, W = base.input_size(h, w)
        px = base.cell(H, W, stride) * max(h, w) / max(H, W)     # image pixels per grid cell
        lab, n = ndimage.label(m, structure=np.ones((3, 3), bool))
        if n:
            sides.extend(np.sqrt(np.bincount(lab.ravel())[1:]) / px)
    return sides, longest


def choose_zoom(masks: list[np.ndarray], pre: Preprocess, stride: int) -> int:
    """The ``auto`` zoom rule: 2 when the supports' defects are small for the grid (the median
    connected component, as a square, is less than ``ZOOM_BELOW_CELLS`` grid cells on a side at
    zoom 1) and some support image has the pixels for it (long side >= 4 x the input size);
    else 1. Small defects then cover 4x the cells, at 4x the cells per image (16x the matching)."""
    return ZoomStep().fit(masks, pre, stride).value


@dataclass(frozen=True)
class ZoomStep:
    """``setting``: ``"auto"`` (the rule above, with ``resize="auto"`` only), 1 (never) or 2 (always)."""

    setting: str | int = "auto"

    def __post_init__(self):
        if self.setting not in ("auto", 1, 2):
            raise InputError("zoom", f"choose auto, 1 or 2, got {self.setting!r}")

    def config(self) -> dict:
        return {"zoom": self.setting, "below_cells": ZOOM_BELOW_CELLS, "room": ZOOM_ROOM}

    def fit(self, masks: list[np.ndarray], pre: Preprocess, stride: int) -> Decision:
        if self.setting != "auto":
            return Decision("zoom", int(self.setting), "set")
        if pre.mode != "auto":
            return Decision("zoom", 1, f"resize={pre.mode} (the rule needs resize=auto)")
        sides, longest = defect_cells(masks, pre, stride)
        room = ZOOM_ROOM * pre.size
        med = float(np.median(sides)) if sides else float("inf")
        if longest == 0 and masks:
            return Decision("zoom", 1, "strips only: seen at their own scale (short side at the input size)")
        if longest < room:
            return Decision("zoom", 1, f"long side {longest} < {room}: no pixels to zoom into")
        if med >= ZOOM_BELOW_CELLS:
            return Decision("zoom", 1, f"support defects {med:.1f} cells >= {ZOOM_BELOW_CELLS:g}")
        return Decision("zoom", 2, f"support defects {med:.1f} cells < {ZOOM_BELOW_CELLS:g} and long side "
                                   f"{longest} >= {room}")
