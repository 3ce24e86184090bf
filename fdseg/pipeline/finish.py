"""The one finish path from a margin grid to a :class:`Prediction`: upsample, threshold, the post
steps, the score map kept consistent with the refined mask, component boxes. ``predict``, the bench,
the server and the Ray actors all end here."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.preprocess import upsample_scores
from .post import Post


def connected_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x0, y0, x1, y1; x1/y1 exclusive) of the 8-connected components."""
    from scipy import ndimage
    if not mask.any():
        return []
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    boxes = []
    for sl in ndimage.find_objects(lab):
        if sl is not None:
            boxes.append((int(sl[1].start), int(sl[0].start), int(sl[1].stop), int(sl[0].stop)))
    return boxes


@dataclass
class Prediction:
    """One query's result at the query's original resolution (or the size asked for)."""

    mask: np.ndarray                 # H x W bool
    score: np.ndarray                # H x W float32 in [0, 1]; 0.5 is the decision boundary
    margin_grid: np.ndarray          # the method's raw margins on its own grid (> threshold = defect)
    source: str = ""
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    image: np.ndarray | None = field(default=None, repr=False)   # the query as loaded (RGB), if decoded
    query_size: tuple[int, int] | None = None                     # the query's own (H, W)

    @property
    def defect_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def max_score(self) -> float:
        return float(self.score.max()) if self.score.size else 0.0


def finish(margin: torch.Tensor, size: tuple[int, int], post: Post, temperature: float, *,
           image: np.ndarray | None = None, source: str = "", query_size: tuple[int, int] | None = None) -> Prediction:
    """``margin`` (gh x gw) -> :class:`Prediction` of ``size`` (H, W). ``image`` (the query, RGB at any
    size) is needed when ``post.refines``."""
    full = upsample_scores(margin.float(), size)
    t = post.threshold
    score = torch.sigmoid((full - t) / temperature).cpu().numpy()
    mask = (full > t).cpu().numpy()
    if post.refines:
        if image is None:
            raise ValueError("refinement needs the query image")
        mask = post.refine(image, mask)
        # keep the score map consistent with the refined mask (0.5 = decision boundary)
        score = np.where(mask, np.maximum(score, 0.5 + 1e-3), np.minimum(score, 0.5 - 1e-3))
    return Prediction(mask, score.astype(np.float32, copy=False), margin.float().cpu().numpy(), source,
                      connected_boxes(mask), image, tuple(query_size or size))
