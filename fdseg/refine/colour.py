"""Support colour refinement: a predicted pixel stays defect only if its colour is not much more
typical of the supports' background around their defects than of the defects themselves.

Matching decides on grid cells (8-16 px of a 256-px frame), so a thin crack or a spot a few pixels
wide comes out as a blob a cell wide. The supports say which colours the defect has: a coarse RGB
histogram of the supports' defect pixels (``p_fg``) and one of the background in a ring around them
(``p_bg``), both with add-one smoothing. A predicted pixel is kept where ``p_fg / p_bg >= tau``; the
rule only removes pixels, never adds them. A colour neither histogram has seen gets the ratio of the
two totals (background pixels / defect pixels, normally > 1): it is kept.

    model = ColourModel().fit(support_images, support_masks)
    refined = model(query_image, predicted_mask)

Statistics are taken in a fixed frame (each support squeezed to ``frame`` x ``frame`` with the
paper's mask resize, ``ring`` pixels there), so they do not depend on the images' resolution.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError


def _resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from ..data.preprocess import resize_image, to_tensor
    if rgb.shape[:2] == tuple(size):
        return rgb
    return resize_image(to_tensor(rgb), size).round().clamp(0, 255)[0].permute(1, 2, 0).byte().numpy()


@dataclass
class ColourModel:
    """RGB-histogram ratio of the supports' defect pixels to the background ring around them."""

    tau: float = 0.3          # keep a predicted pixel when p_fg / p_bg >= tau (0 = keep all)
    bins: int = 8             # histogram levels per RGB channel (bins ** 3 colours)
    ring: int = 8             # background ring width, pixels of the frame (0 = all background)
    frame: int = 256          # supports are squeezed to frame x frame for their statistics
    table: np.ndarray | None = field(default=None, repr=False)   # bins ** 3 ratios once fitted

    def __post_init__(self):
        if self.tau < 0:
            raise InputError("colour_refine", f"tau must be >= 0, got {self.tau}")
        if not 2 <= self.bins <= 64:
            raise InputError("colour_refine", f"bins must be in 2..64, got {self.bins}")
        if self.ring < 0 or self.frame < 8:
            raise InputError("colour_refine", f"need ring >= 0 and frame >= 8, got {self.ring}, {self.frame}")

    def _index(self, rgb: np.ndarray) -> np.ndarray:
        q = (rgb[..., :3].astype(np.int64) * self.bins) // 256
        return (q[..., 0] * self.bins + q[..., 1]) * self.bins + q[..., 2]

    def fit(self, images: list[np.ndarray], masks: list[np.ndarray]) -> "ColourModel":
        """Histograms from support images (H x W x 3 uint8) and their boolean masks."""
        from scipy import ndimage

        from ..data.preprocess import resize_mask
        n = self.bins ** 3
        fg, bg = np.ones(n), np.ones(n)
        seen = 0
        for rgb, m in zip(images, masks):
            size = (self.frame, self.frame)
            idx = self._index(_resize_rgb(rgb, size))
            m = resize_mask(m, size)
            near = (ndimage.binary_dilation(m, iterations=self.ring) & ~m) if self.ring else ~m
            fg += np.bincount(idx[m], minlength=n)
            bg += np.bincount(idx[near], minlength=n)
            seen += int(m.any())
        # no defect pixel survived the frame: nothing is known about the defect's colour, keep everything
        self.table = (fg / fg.sum()) / (bg / bg.sum()) if seen else None
        return self

    def ratio(self, image: np.ndarray) -> np.ndarray | None:
        """p_fg / p_bg of each pixel's colour (None before fit or without defect pixels)."""
        return None if self.table is None else self.table[self._index(image)]

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``mask`` with the pixels whose colour ratio is below ``tau`` removed; ``image`` is
        resized (bilinear) to the mask's resolution first when they differ."""
        if self.table is None or self.tau <= 0 or not mask.any():
            return mask
        if image is None:
            raise InputError("colour_refine", "colour refinement needs the query image")
        if image.ndim != 3 or image.shape[2] < 3:
            raise InputError("colour_refine", f"expected an H x W x 3 image, got shape {image.shape}")
        rgb = _resize_rgb(np.ascontiguousarray(image[..., :3]), mask.shape)
        out = mask.copy()
        out[mask] = self.table[self._index(rgb[mask])] >= self.tau     # only predicted pixels can change
        return out

    def describe(self) -> dict:
        return {"tau": self.tau, "bins": self.bins, "ring": self.ring, "frame": self.frame}
