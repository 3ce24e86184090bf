"""``superpixel``: scikit-image Felzenszwalb (default) or SLIC segments as candidates (no weights)."""
from __future__ import annotations

import numpy as np

from .common import grow_labels, need, shrink
from .registry import Proposer, register_proposer
from ...errors import InputError


@register_proposer("superpixel", summary="scikit-image Felzenszwalb / SLIC superpixels (offline, no weights)",
                   extra="refine", needs_weights=False)
class Superpixel(Proposer):
    """Parameters: ``algorithm`` 'felzenszwalb' | 'slic'; ``max_side`` working resolution
    (labels are computed there and resized to the image); ``scale``, ``sigma``, ``min_size``
    (Felzenszwalb, at the working resolution); ``n_segments``, ``compactness`` (SLIC)."""

    at_mask_resolution = True      # the refiner hands it the image at the mask's size (bench: 256 x 256)

    def __init__(self, algorithm: str = "felzenszwalb", max_side: int | None = 256, scale: float = 100.0,
                 sigma: float = 0.8, min_size: int = 30, n_segments: int = 150, compactness: float = 10.0):
        if algorithm not in ("felzenszwalb", "slic"):
            raise InputError("refine algorithm", f"choose felzenszwalb or slic, got {algorithm!r}")
        self.algorithm, self.max_side = algorithm, max_side
        self.scale, self.sigma, self.min_size = scale, sigma, min_size
        self.n_segments, self.compactness = n_segments, compactness
        self._seg = need("skimage.segmentation", "the superpixel proposer", "refine", "scikit-image")

    def propose(self, image: np.ndarray) -> np.ndarray:
        small = shrink(image, self.max_side)
        if self.algorithm == "felzenszwalb":
            lab = self._seg.felzenszwalb(small, scale=self.scale, sigma=self.sigma, min_size=self.min_size)
        else:
            lab = self._seg.slic(small, n_segments=self.n_segments, compactness=self.compactness, start_label=0)
        return grow_labels(lab.astype(np.int32) + 1, image.shape[:2])

    def describe(self) -> dict:
        return {"refine": self.name, "algorithm": self.algorithm, "max_side": self.max_side}
