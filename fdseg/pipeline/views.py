"""Support views and query views: the supports seen rotated / flipped (more bank cells) and the query
matched as is and flipped (margins averaged)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .plan import Decision

Op = Callable[[np.ndarray], np.ndarray]

# support views: extra copies of each support (image and mask alike)
AUGMENTATIONS: dict[str, list[Op]] = {
    "none": [],
    "flip": [lambda a: a[:, ::-1], lambda a: a[::-1]],
    "dihedral": [lambda a: a[:, ::-1], lambda a: a[::-1], lambda a: a[::-1, ::-1], lambda a: np.rot90(a, 1),
                 lambda a: np.rot90(a, 3), lambda a: np.rot90(a, 1)[::-1], lambda a: np.rot90(a, 1)[:, ::-1]],
}

# test-time views of a query: (image op, grid dims that flip its margins back)
QUERY_VIEWS: dict[str, list[tuple[Op, list[int]]]] = {
    "none": [],
    "flip": [(lambda a: a[:, ::-1], [-1]), (lambda a: a[::-1], [-2])],
}


@dataclass(frozen=True)
class SupportViews:
    """``"auto"``: ``"dihedral"`` for a single support (one defect's bank gets the orientations it lacks),
    ``"flip"`` for more (their defects already vary; 8 views would cost 8x the matching), and flips for a
    method that stacks support grids (rotations transpose them); or a fixed ``none|flip|dihedral``."""

    setting: str = "auto"

    def __post_init__(self):
        if self.setting not in (*AUGMENTATIONS, "auto"):
            raise InputError("support_augment", f"choose from auto, {', '.join(AUGMENTATIONS)}, got {self.setting!r}")

    def config(self) -> dict:
        return {"support_augment": self.setting}

    def fit(self, n_supports: int, stacks_supports: bool = False) -> Decision:
        if self.setting != "auto":
            return Decision("support views", self.setting, "set")
        if stacks_supports:
            return Decision("support views", "flip", "the method stacks support grids (rotations transpose them)")
        if n_supports == 1:
            return Decision("support views", "dihedral", "one support: its 8 rotated / flipped views")
        return Decision("support views", "flip", f"{n_supports} supports: flips only")

    @staticmethod
    def ops(views: str) -> list[Op]:
        return AUGMENTATIONS[views]


@dataclass(frozen=True)
class QueryViews:
    """``"auto"``: ``"flip"`` after fitting a single support (a one-support bank gives noisy best matches,
    which averaging the query's flipped views steadies), ``"none"`` otherwise; or fixed ``none|flip``."""

    setting: str = "auto"

    def __post_init__(self):
        if self.setting not in (*QUERY_VIEWS, "auto"):
            raise InputError("query_augment", f"choose from auto, {', '.join(QUERY_VIEWS)}, got {self.setting!r}")

    def config(self) -> dict:
        return {"query_augment": self.setting}

    def fit(self, n_supports: int) -> Decision:
        if self.setting != "auto":
            return Decision("query views", self.setting, "set")
        if n_supports == 1:
            return Decision("query views", "flip", "one support: the query's flips averaged")
        return Decision("query views", "none", f"{n_supports} supports")


def view_images(image: np.ndarray, views: str) -> list[np.ndarray]:
    """The query's extra views (contiguous arrays), in the order :func:`merge_views` expects. The copies
    are made by ``torch.flip`` (the same pixels as ``op``; 2-3x faster than numpy's copy of a reversed
    H x W x 3 view, 25 vs 63 ms for a left-right flip of 13.5 MP)."""
    if not QUERY_VIEWS[views]:
        return []
    t = torch.from_numpy(np.ascontiguousarray(image))
    # a grid dim (-1: columns, -2: rows) is the image's dim before it when the image has channels last
    shift = 1 if image.ndim == 3 else 0
    return [t.flip([d - shift for d in dims]).numpy() for _, dims in QUERY_VIEWS[views]]


def merge_views(margin: torch.Tensor, view_margins: list[torch.Tensor], views: str) -> torch.Tensor:
    """The mean of the query's margins and its views' margins, each flipped back onto the query's grid."""
    if not view_margins:
        return margin
    total = margin.float()
    for m, (_, dims) in zip(view_margins, QUERY_VIEWS[views]):
        m = m.float()
        if m.shape != margin.shape:      # a view whose grid rounds differently: back onto the query's grid
            m = F.interpolate(m[None, None], size=tuple(margin.shape), mode="bilinear", align_corners=False)[0, 0]
        total = total + torch.flip(m, dims)
    return (total / (1 + len(view_margins))).to(margin.dtype)
