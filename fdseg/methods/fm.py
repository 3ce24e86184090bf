"""``fm``: the paper's feature matching rule (GFDS MatchingNet).

Every query cell takes its highest cosine similarity to all support foreground
cells and to all support background cells (the K supports' cells pooled); the
margin ``max_fg - max_bg`` is > 0 where foreground wins (argmax).

Speed options (see BENCHMARKS.md for what they cost and save):

* ``precision``: 'auto' (bf16 matmul only where the hardware makes it fast), 'fp32', 'bf16'.
* ``bg_coreset``: keep only part of the background bank, chosen by greedy k-center
  (PatchCore). A float in (0, 1] keeps that fraction, an int that many cells,
  None keeps all (exact).

Beyond the paper (``query_bg``): the query's own cells join the background evidence.
A cell's background score becomes the larger of its best support-background cosine and
its k-th best cosine to the query's other cells (more than ``query_bg_radius`` cells
away), with k = ``query_bg`` x (the supports' defect fraction) x (cells): a cell whose
appearance is common in the query is unlikely to be the (rare) defect.
"""
from __future__ import annotations

import torch

from .base import Method, Query, Support, support_cells
from .registry import register_method
from .similarity import DEFAULT_CHUNK, greedy_coreset, kth_self_similarity, max_similarity
from ..errors import InputError
from ..hardware import matmul_dtype


def coreset_size(n: int, spec: float | int | None) -> int:
    if spec is None:
        return n
    if isinstance(spec, float) and 0 < spec <= 1:
        return max(1, min(n, int(round(n * spec))))
    if isinstance(spec, int) and spec > 0:
        return min(n, spec)
    raise InputError("bg_coreset", f"expected a fraction in (0, 1] or a positive count, got {spec!r}")


@register_method("fm", summary="feature matching: max cosine to support foreground vs background cells (paper)")
class FeatureMatching(Method):
    temperature = 0.05

    def __init__(self, fg_min: float = 0.0, chunk: int = DEFAULT_CHUNK, precision: str = "auto",
                 bg_coreset: float | int | None = None, seed: int = 0,
                 query_bg: float | None = None, query_bg_radius: int = 1, query_bg_min_k: int = 3):
        self.fg_min, self.chunk, self.precision = fg_min, chunk, precision
        self.bg_coreset, self.seed = bg_coreset, seed
        self.query_bg, self.query_bg_radius, self.query_bg_min_k = query_bg, query_bg_radius, query_bg_min_k
        matmul_dtype(precision)   # validate early
        self.fg: torch.Tensor | None = None
        self.bg: torch.Tensor | None = None

    def fit(self, supports: list[Support]) -> None:
        fgs, bgs, fracs = [], [], []
        for s in supports:
            f = s.features.flatten(1).T          # cells x C
            fg, bg = support_cells(s.coverage, self.fg_min)
            fgs.append(f[fg])
            bgs.append(f[bg])
            fracs.append(float(fg.float().mean()))
        fg, bg = torch.cat(fgs), torch.cat(bgs)
        if not len(fg) or not len(bg):
            raise InputError("supports", "supports give no foreground or no background feature cells")
        k = coreset_size(len(bg), self.bg_coreset)
        if k < len(bg):
            bg = bg[greedy_coreset(bg, k, self.seed)]
        self.fg, self.bg = fg.contiguous(), bg.contiguous()
        self.fg_fraction = sum(fracs) / len(fracs)
        self.dtype = matmul_dtype(self.precision, fg.device)

    def score(self, query: Query) -> torch.Tensor:
        if self.fg is None:
            raise RuntimeError("fit() the method before scoring")
        c, h, w = query.features.shape
        q = query.features.flatten(1).T
        bg = max_similarity(q, self.bg, self.chunk, self.dtype)
        if self.query_bg:
            k = max(self.query_bg_min_k, int(round(self.query_bg * self.fg_fraction * h * w)))
            bg = torch.maximum(bg, kth_self_similarity(q, h, w, k, self.query_bg_radius, self.chunk))
        return (max_similarity(q, self.fg, self.chunk, self.dtype) - bg).view(h, w)

    def describe(self) -> dict:
        return {"method": self.name, "fg_cells": int(len(self.fg)) if self.fg is not None else 0,
                "bg_cells": int(len(self.bg)) if self.bg is not None else 0,
                "matmul": str(getattr(self, "dtype", "")).replace("torch.", "")}
