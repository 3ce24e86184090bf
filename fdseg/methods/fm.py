"""``fm``: the paper's feature matching rule (GFDS MatchingNet).

Every query cell takes its highest cosine similarity to all support foreground
cells and to all support background cells (the K supports' cells pooled); the
margin ``max_fg - max_bg`` is > 0 where foreground wins (argmax). The similarity
is computed in chunks of query cells, so memory stays bounded for any K and grid.
"""
from __future__ import annotations

import torch

from .base import Method, Query, Support, support_cells
from .registry import register_method
from ..errors import InputError


def max_similarity(q: torch.Tensor, bank: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """q: M x C, bank: N x C (unit norm) -> M, the max cosine of each row of q.

    Computed ``chunk`` similarities at a time (16 MB in fp32 by default)."""
    out = torch.empty(q.shape[0], dtype=torch.float32, device=q.device)
    step = max(1, chunk // max(1, bank.shape[0]))
    for i in range(0, q.shape[0], step):
        out[i:i + step] = (q[i:i + step] @ bank.T).amax(dim=1)
    return out


@register_method("fm", summary="feature matching: max cosine to support foreground vs background cells (paper)")
class FeatureMatching(Method):
    temperature = 0.05

    def __init__(self, fg_min: float = 0.0, chunk: int = 1 << 22):
        self.fg_min, self.chunk = fg_min, chunk
        self.fg: torch.Tensor | None = None
        self.bg: torch.Tensor | None = None

    def fit(self, supports: list[Support]) -> None:
        fgs, bgs = [], []
        for s in supports:
            f = s.features.flatten(1).T          # cells x C
            fg, bg = support_cells(s.coverage, self.fg_min)
            fgs.append(f[fg])
            bgs.append(f[bg])
        self.fg, self.bg = torch.cat(fgs), torch.cat(bgs)
        if not len(self.fg) or not len(self.bg):
            raise InputError("supports", "supports give no foreground or no background feature cells")

    def score(self, query: Query) -> torch.Tensor:
        if self.fg is None:
            raise RuntimeError("fit() the method before scoring")
        c, h, w = query.features.shape
        q = query.features.flatten(1).T
        margin = max_similarity(q, self.fg, self.chunk) - max_similarity(q, self.bg, self.chunk)
        return margin.view(h, w)

    def describe(self) -> dict:
        return {"method": self.name, "fg_cells": int(len(self.fg)) if self.fg is not None else 0,
                "bg_cells": int(len(self.bg)) if self.bg is not None else 0}
