"""How an image of any size becomes network input, and how masks follow it.

Three modes, chosen with :class:`Preprocess`:

* ``resize`` (the paper): every image is squeezed to ``size x size``.
* ``aspect``: the long side becomes ``size``, the short side keeps the aspect
  ratio (rounded to a multiple of 32, at least 32).
* ``auto`` (the default): an image whose long side is at least ``2 x size`` is seen
  aspect-kept at ``2 x size`` with a 2x coarser grid cell (same grid, same matching cost);
  smaller ones are squeezed as the paper does. ``zoom=2`` (chosen by the segmenter when the
  supports' defects are smaller than 2 grid cells) sees an image whose long side is at least
  ``4 x size`` at ``4 x size``, same cell: twice the grid on each side, where the pixels exist.
  A *strip* (line-scan and other extreme-aspect images: long side >= ``STRIP_ASPECT`` (4) x
  short side) is instead seen aspect-kept with its short side scaled to ``size`` (up or
  down), unless its long side would then pass ``STRIP_MAX_LONG`` (16) x ``size``, in which
  case the long side is ``16 x size``; the cell is 2x coarser (as for other large inputs), so
  a strip of aspect ``a`` (<= 16) has ``size/(2 stride)`` cells across and ``a`` times that
  along: ``a / 4`` times the cells of a squeezed square (4x at 16:1), and the matching of two
  such strips costs ``(a / 4)^2`` times the square case (16x at 16:1, as ``zoom=2``). The whole
  strip goes through the backbone in one pass (at most ``16 x size^2`` pixels, the pixels of a
  zoom-2 image), so there are no window seams; zoom does not change how a strip is seen.
* ``tile``: the image is scaled by ``scale`` (1.0 = native pixels), rounded to a
  multiple of 32, and its features are computed tile by tile (``size x size``
  tiles overlapping by ``overlap`` pixels) and stitched; for line-scan strips
  such as 4096x256, or any image whose defects are a few dozen pixels wide.

Resizing is bilinear without antialiasing by default, as OpenCV's
``INTER_LINEAR`` used by the paper's loader; ``antialias=True`` low-pass filters
on downscaling.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

MODES = ("resize", "aspect", "tile", "auto")
STRIP_ASPECT = 4         # resize="auto": long side >= 4 x short side = a strip (kept at its short side)
STRIP_MAX_LONG = 16      # a strip's input long side is at most 16 x size (bounds pixels and cells)


def _round_to(x: float, m: int) -> int:
    return max(m, int(round(x / m)) * m)


@dataclass(frozen=True)
class Preprocess:
    mode: str = "resize"
    size: int = 256
    scale: float = 1.0
    overlap: int = 64
    multiple: int = 32
    antialias: bool = False
    zoom: int = 1

    def __post_init__(self):
        if self.zoom not in (1, 2):
            raise InputError("zoom", f"must be 1 or 2, got {self.zoom!r}")
        if self.mode not in MODES:
            raise InputError("--resize", f"unknown resize mode {self.mode!r} (choose from {', '.join(MODES)})")
        if self.size < self.multiple or self.size % self.multiple:
            raise InputError("--size", f"input size must be a multiple of {self.multiple}, got {self.size}")
        if self.mode == "tile" and not 0 <= self.overlap < self.size // 2:
            raise InputError("--overlap", f"tile overlap must be in [0, size/2), got {self.overlap}")
        if self.scale <= 0:
            raise InputError("--scale", f"scale must be positive, got {self.scale}")

    def is_strip(self, h: int, w: int) -> bool:
        """Whether ``resize="auto"`` sees an h x w image as a strip (aspect >= ``STRIP_ASPECT``)."""
        return self.mode == "auto" and max(h, w) >= STRIP_ASPECT * min(h, w)

    def strip_scale(self, h: int, w: int) -> float:
        """Image -> input scale of a strip: its short side becomes ``size`` (up or down), unless its
        long side would then pass ``STRIP_MAX_LONG x size``, which it is scaled to instead."""
        return min(self.size / min(h, w), STRIP_MAX_LONG * self.size / max(h, w))

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        """Network input size (H, W) for an image of h x w pixels."""
        if self.mode == "resize":
            return self.size, self.size
        if self.is_strip(h, w):
            s = self.strip_scale(h, w)
            return _round_to(h * s, self.multiple), _round_to(w * s, self.multiple)
        if self.mode == "auto" and self.zoom == 2 and max(h, w) >= 4 * self.size:
            s = 4 * self.size / max(h, w)
            return _round_to(h * s, self.multiple), _round_to(w * s, self.multiple)
        if self.mode == "aspect" or (self.mode == "auto" and max(h, w) >= 2 * self.size):
            s = (self.size if self.mode == "aspect" else 2 * self.size) / max(h, w)
            return _round_to(h * s, self.multiple), _round_to(w * s, self.multiple)
        if self.mode == "auto":
            return self.size, self.size
        return _round_to(h * self.scale, self.multiple), _round_to(w * self.scale, self.multiple)

    def cell(self, H: int, W: int, stride: int) -> int:
        """Feature grid cell (network-input pixels) for an input of H x W: ``stride``, doubled
        in ``auto`` mode for inputs seen at twice ``size``, so that the grid stays ``size / stride``
        cells on the long side (same matching cost), and for strips (``size / (2 stride)`` cells
        across, 4x fewer cells than at ``stride``)."""
        return 2 * stride if self.mode == "auto" and max(H, W) > self.size else stride

    def tiles(self, H: int, W: int) -> list[tuple[int, int, int, int]]:
        """(top, left, height, width) windows covering an H x W input."""
        if self.mode != "tile" or (H <= self.size and W <= self.size):
            return [(0, 0, H, W)]
        ys, xs = _starts(H, self.size, self.overlap, self.multiple), _starts(W, self.size, self.overlap, self.multiple)
        th, tw = min(self.size, H), min(self.size, W)
        return [(y, x, th, tw) for y in ys for x in xs]


def _starts(n: int, size: int, overlap: int, multiple: int) -> list[int]:
    if n <= size:
        return [0]
    step = max(multiple, (size - overlap) // multiple * multiple)
    starts = list(range(0, n - size, step))
    starts.append(n - size)          # last tile flush with the far edge
    return sorted(set(starts))


def to_tensor(rgb: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW float32 (0..255), on ``device`` (uint8 travels, float is made there)."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1)[None].float()


def resize_image(x: torch.Tensor, size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                         antialias=antialias and (size[0] < x.shape[-2] or size[1] < x.shape[-1]))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The paper's mask resize: bilinear on 0/255, then > 30."""
    t = torch.from_numpy(mask.astype(np.float32) * 255.0)[None, None]
    r = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return (r[0, 0] > 30).numpy()


def mask_coverage(mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each grid cell covered by the mask (area average), gh x gw."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.adaptive_avg_pool2d(t, grid)[0, 0]


def upsample_scores(score: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """gh x gw score grid -> H x W (bilinear; cells centred as the features are)."""
    if tuple(score.shape[-2:]) == tuple(size):
        return score
    return F.interpolate(score[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
