"""Defect-free images ("normals") as background evidence for the matcher, at a fixed cost.

Users have hundreds of OK images and a handful of defective ones. Every cell of the normals is
background, but a bank that grows with the normals makes each query's matching grow with it, so
the normals' cells are reduced to at most ``budget`` rows (:func:`normal_bank`):

1. candidates: each image's own greedy k-center coreset, of its share of ``POOL x budget`` cells
   (so a rare appearance in one image, the kind that gives false alarms, is a candidate: greedy
   k-center takes the farthest cells first); ``share x cells x C`` per image, a fixed total however
   many normals there are;
2. greedy k-center (:func:`fdseg.methods.similarity.greedy_coreset`, PatchCore's coreset) of the
   candidates to ``budget`` rows: every candidate ends close to a kept row.

The reduction of one set of normals is remembered (by the identity of its feature tensors, held
weakly), so fitting many support sets against the same normals (a bench, a server session)
reduces them once.

A normal must be seen at the supports' scale (:func:`check_size_class`): an image that the
preprocessing sees as a strip among non-strips, or at another grid scale (e.g. at zoom 1 while
the supports were zoomed to twice the grid), would put cells of another scale into the bank.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Sequence

import torch

from ..errors import InputError
from .similarity import greedy_coreset

DEFAULT_BUDGET = 4096     # normal cells kept in the background bank (see docs/normals.md)
POOL = 4                  # greedy k-center picks among about POOL x budget candidate cells
STRIP_ASPECT = 4          # a grid whose long side is >= 4 x its short side is a strip
SCALE_TOLERANCE = 1.5     # a normal's grid long side within 1/1.5 .. 1.5 x a support's = same scale
_MEMO_SIZE = 4

_memo: "OrderedDict[tuple, tuple[list, torch.Tensor]]" = OrderedDict()


def _is_strip(h: int, w: int) -> bool:
    return max(h, w) >= STRIP_ASPECT * min(h, w)


def check_size_class(support_grids: Sequence[tuple[int, int]], normal_grids: Sequence[tuple[int, int]]) -> None:
    """Raise :class:`InputError` naming ``normal image N`` when a normal's grid is not in the size
    class of some support's grid: both strips or both not, and a long side (cells) within
    ``SCALE_TOLERANCE`` of each other (the grid's long side is the scale an image is seen at)."""
    sup = [(int(h), int(w)) for h, w in support_grids]
    for i, (h, w) in enumerate(normal_grids):
        h, w = int(h), int(w)
        if any(_is_strip(h, w) == _is_strip(H, W) and
               1 / SCALE_TOLERANCE <= max(h, w) / max(H, W) <= SCALE_TOLERANCE for H, W in sup):
            continue
        kind = "a strip" if _is_strip(h, w) else "not a strip"
        shown = ", ".join(sorted({f"{H}x{W}" for H, W in sup}))
        raise InputError(f"normal image {i + 1}",
                         f"another size class than the supports: seen as a {h}x{w} cell grid ({kind}), the "
                         f"supports as {shown}; a defect-free image must show the product as the supports do, "
                         f"at about their pixel size")


def candidate_cells(normals: Sequence[torch.Tensor], n_max: int, seed: int = 0) -> torch.Tensor:
    """About ``n_max`` rows (cells x C) from the C x h x w grids (all cells when fewer): each grid
    gives a share proportional to its cells, its own greedy k-center coreset of that size."""
    sizes = [int(t.shape[-2] * t.shape[-1]) for t in normals]
    total = sum(sizes)
    rows = []
    for t, n in zip(normals, sizes):
        flat = t.flatten(1).T
        q = n if total <= n_max else max(1, min(n, round(n_max * n / total)))
        rows.append(flat if q >= n else flat[greedy_coreset(flat, q, seed)])
    return torch.cat(rows).contiguous()


def normal_sample(normals: Sequence[torch.Tensor], n_max: int, seed: int = 0) -> torch.Tensor:
    """``n_max`` rows (cells x C) drawn uniformly at random, without replacement, from all the cells
    of the C x h x w grids (all cells when fewer), in the draw's order: typical background, where
    :func:`normal_bank`'s k-center takes the rarest cells first. The draw is over cell indices, so
    the grids' cells are never concatenated (200 zoomed normals hold ~1 GB of them)."""
    sizes = [int(t.shape[-2] * t.shape[-1]) for t in normals]
    total = sum(sizes)
    if total <= n_max:
        return torch.cat([t.flatten(1).T for t in normals]).contiguous()
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(total, generator=g)[:n_max]
    first = normals[0]
    out = first.new_empty((n_max, first.shape[0]))
    start = 0
    for t, n in zip(normals, sizes):
        here = ((idx >= start) & (idx < start + n)).nonzero().squeeze(1)
        if len(here):
            out[here.to(out.device)] = t.flatten(1).T[(idx[here] - start).to(t.device)]
        start += n
    return out


def normal_bank(normals: Sequence[torch.Tensor], budget: int = DEFAULT_BUDGET, seed: int = 0) -> torch.Tensor:
    """The normals' cells reduced to at most ``budget`` rows (unit norm, cells x C): candidates
    (:func:`candidate_cells`, ``POOL x budget``), then greedy k-center. Remembered per set of normals."""
    if budget < 1:
        raise InputError("normal_cells", f"need a positive number of normal cells, got {budget}")
    key = (tuple(id(t) for t in normals), budget, seed)
    hit = _memo.get(key)
    if hit is not None and all(r() is t for r, t in zip(hit[0], normals)):
        _memo.move_to_end(key)
        return hit[1]
    cand = candidate_cells(normals, POOL * budget, seed)
    bank = cand[greedy_coreset(cand, budget, seed)] if len(cand) > budget else cand
    bank = bank.contiguous()
    try:
        refs = [weakref.ref(t) for t in normals]
    except TypeError:             # not weak-referenceable: not remembered
        return bank
    _memo[key] = (refs, bank)
    while len(_memo) > _MEMO_SIZE:
        _memo.popitem(last=False)
    return bank
