"""What a matching method sees and returns.

A method is fitted once on the supports and then scores many queries. It gets
the images, masks and (for methods that use a backbone) the feature grids, and
returns a *margin* map: > 0 where it believes the defect is, at any resolution
(the segmenter resizes it to the query). Empty predictions are valid answers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Support:
    image: np.ndarray                 # H x W x 3 uint8
    mask: np.ndarray                  # H x W bool
    features: torch.Tensor | None     # C x gh x gw unit-norm, or None
    coverage: torch.Tensor | None     # gh x gw fraction of each cell inside the mask


@dataclass
class Query:
    image: np.ndarray
    features: torch.Tensor | None


class Method:
    """Base class; subclasses are registered with :func:`register_method`."""

    name: str = "method"
    uses_features: bool = True
    #: margins are divided by this before the sigmoid that gives the 0..1 score map
    temperature: float = 0.05
    #: whether ``fit`` uses defect-free images (``normals``: their feature grids); the segmenter
    #: refuses normals for a method without it
    takes_normals: bool = False

    def fit(self, supports: list[Support], normals: list[torch.Tensor] | None = None) -> None:  # pragma: no cover
        """Learn from the supports; ``normals``: C x h x w feature grids of defect-free images of the
        same product (only when :attr:`takes_normals`)."""
        raise NotImplementedError

    def score(self, query: Query) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        return {"method": self.name}


def support_cells(coverage: torch.Tensor, fg_min: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background cells of one support.

    Foreground: cells whose mask coverage exceeds ``fg_min`` (default 0: every cell
    the mask touches, so that a defect of a few pixels still gives a cell); if
    none does, the cells covering at least half as much as the best-covered one.
    Background: cells the mask does not touch at all (if it touches every cell,
    the cells less than half covered).
    """
    cov = coverage.flatten()
    fg = cov > fg_min
    if not bool(fg.any()):
        top = float(cov.max())
        fg = cov >= 0.5 * top if top > 0 else torch.zeros_like(cov, dtype=torch.bool)
    bg = cov <= 0
    if not bool(bg.any()):
        bg = cov < 0.5
    return fg, bg
