"""``fm``: the paper's feature matching rule (GFDS MatchingNet).

Every query cell takes its highest cosine similarity to all support foreground
cells and to all support background cells (the K supports' cells pooled); the
margin ``max_fg - max_bg`` is > 0 where foreground wins (argmax).

Speed options (see BENCHMARKS.md for what they cost and save):

* ``precision``: 'auto' (bf16 matmul only where the hardware makes it fast), 'fp32', 'bf16'.
* ``bg_coreset``: keep only part of the background bank, chosen by greedy k-center
  (PatchCore). A float in (0, 1] keeps that fraction, an int that many cells,
  None keeps all (exact).
* ``bg_cover``: drop near-duplicate background cells (``fdseg.methods.similarity.cover_subset``):
  every dropped cell has a kept one with cosine >= ``bg_cover`` (e.g. 0.97), so a margin rises by
  at most ``sqrt(2 - 2 bg_cover)``. Built from the fitted bank at the first query. None = exact.

Several views of a query: ``score_many`` scores them, ``score_views`` also merges them (mean of
the margins flipped back) and, given the decision threshold (``exact_above``), matches exactly
only the cells whose mask can depend on it: every other cell keeps an upper bound of its margin
from strided subsets of the background bank (1/512, then 1/32 near the threshold), which is below
the threshold, so the thresholded mask is the exact one (see ``score_views``).

Beyond the paper (``head``): a linear head fitted on the supports' own cells (class-balanced
logistic regression on the cosine features, L2-regularised, a few L-BFGS steps at ``fit``) adds a
bounded vote to the margin: ``margin + head * 0.1 * tanh(logit / 4)``. It learns which channels
separate this defect from this background, which plain cosine weighs equally; ``head=0`` is the
paper's rule. See BENCHMARKS.md (accuracy section) for what it adds.

Beyond the paper (``normals``, :mod:`fdseg.methods.normal_bank`): defect-free images of the product
given to ``fit`` are background for the linear head: ``normal_head="sample"`` (default) adds
``normal_head_cells`` (65,536: sixteen 64 x 64 grids, about a 5-shot support background) cells drawn
uniformly from all the normals (typical background) to the head's background, ``"bank"`` the
k-center cells below, ``"off"`` none. ``normal_bank=True`` also puts them in
the matching's background bank, reduced to at most ``normal_cells`` cells by greedy k-center (the cost
per query stays fixed however many are given): fewer false alarms, but it costs recall where OK
texture looks like the defect (docs/normals.md has both measured; the default is the one that does
not lower mIoU).
docs/normals.md has what they change.

Beyond the paper (``query_bg``): the query's own cells join the background evidence.
A cell's background score becomes the larger of its best support-background cosine and
its k-th best cosine to the query's other cells (more than ``query_bg_radius`` cells
away), with k = ``query_bg`` x (the supports' defect fraction) x (cells): a cell whose
appearance is common in the query is unlikely to be the (rare) defect.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, Query, Support, support_cells
from .normal_bank import DEFAULT_BUDGET as DEFAULT_NORMAL_CELLS, check_size_class, normal_bank, normal_sample
from .registry import register_method
from .similarity import (DEFAULT_CHUNK, cover_subset, greedy_coreset, kth_self_similarity, max_similarity,
                         strided_subset)
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


PRUNE_STRIDE = 32       # score_views: every 32nd background cell bounds the margins of the pruned search
PRUNE_FIRST = 16        # ... after every (16 x 32)th has bounded all cells once (only those it leaves near
                        # the threshold are bounded again with every 32nd)
PRUNE_BAND = 0.02       # score_views: cells whose bound is this close below the threshold are matched exactly
MAX_ROUND = 32          # score_views: cells matched exactly per round while the grid's maximum is not yet exact


def merge_flipped(margins: list[torch.Tensor], flips: list[list[int]]) -> torch.Tensor:
    """The mean of ``margins[i]`` flipped along ``flips[i]`` (in fp32; the order of the segmenter's
    ``merge_views``: the first grid, then each view added, then divided)."""
    total = torch.flip(margins[0].float(), flips[0]) if flips[0] else margins[0].float()
    if len(margins) == 1:
        return total
    for m, dims in zip(margins[1:], flips[1:]):
        total = total + (torch.flip(m.float(), dims) if dims else m.float())
    return total / len(margins)


def smallest_defect_cells(supports: list[Support], fg_min: float = 0.0) -> int:
    """Cells of the smallest 8-connected component of the supports' foreground cells (at least 1)."""
    import numpy as np
    from scipy import ndimage
    sizes = []
    for s in supports:
        fg, _ = support_cells(s.coverage, fg_min)
        lab, n = ndimage.label(fg.view(s.coverage.shape).cpu().numpy(), structure=np.ones((3, 3), bool))
        if n:
            sizes.append(int(np.bincount(lab.ravel())[1:].min()))
    return max(1, min(sizes)) if sizes else 1


HEAD_SCALE = 0.1        # the head's vote is at most +-head * 0.1 in cosine-margin units
FEATURE_GAIN = 10.0     # cosine features are scaled by this before the logistic regression


def fit_linear_head(fg: torch.Tensor, bg: torch.Tensor, l2: float = 1e-3, steps: int = 60) -> torch.Tensor:
    """Class-balanced, L2-regularised logistic regression fg-vs-bg on unit feature rows.
    Returns [w (C), b] as one C+1 vector (fitted on the CPU in fp32, L-BFGS)."""
    with torch.inference_mode(False), torch.enable_grad():
        # a new tensor (cat outside inference mode: autograd cannot save inference tensors), scaled in place
        x = torch.cat([fg.float().cpu(), bg.float().cpu()]).mul_(FEATURE_GAIN)
        y = torch.cat([torch.ones(len(fg)), torch.zeros(len(bg))])
        wts = torch.where(y > 0, 0.5 / len(fg), 0.5 / len(bg))
        w = torch.zeros(x.shape[1] + 1, requires_grad=True)
        opt = torch.optim.LBFGS([w], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            logit = x @ w[:-1] + w[-1]
            loss = (wts * F.binary_cross_entropy_with_logits(logit, y, reduction="none")).sum() + l2 * (w[:-1] @ w[:-1])
            loss.backward()
            return loss
        opt.step(closure)
    return w.detach().to(fg.device)


#: normal cells the head's background gets without the bank (docs/normals.md: 4096 -> 65,536 took the
#: 1-shot false alarms from 2.2x to 4.0x fewer and lost mIoU on no dataset; the one other value tried)
DEFAULT_NORMAL_HEAD_CELLS = 65536


def _normal_head_mode(value: bool | str) -> str:
    """``normal_head`` as one of "sample" (True), "bank", "off" (False)."""
    mode = {True: "sample", False: "off", "true": "sample", "false": "off", "none": "off"}.get(
        value.lower() if isinstance(value, str) else value, value)
    if mode not in ("sample", "bank", "off"):
        raise InputError("normal_head", f"expected sample, bank or off (true / false), got {value!r}")
    return mode


def _flag(name: str, value: bool | str) -> bool:
    """A boolean option given as a bool or as true / false text (CLI ``--method-option``)."""
    flag = {"true": True, "false": False, "1": True, "0": False}.get(
        value.lower() if isinstance(value, str) else value, value)
    if type(flag) is int and flag in (0, 1):
        flag = bool(flag)
    if not isinstance(flag, bool):
        raise InputError(name, f"expected true or false, got {value!r}")
    return flag


def head_logits(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (q.float() * FEATURE_GAIN) @ w[:-1] + w[-1]


@register_method("fm", summary="feature matching: max cosine to support foreground vs background cells (paper)")
class FeatureMatching(Method):
    temperature = 0.05
    takes_normals = True

    def __init__(self, fg_min: float = 0.0, chunk: int = DEFAULT_CHUNK, precision: str = "auto",
                 bg_coreset: float | int | None = None, seed: int = 0,
                 query_bg: float | None = None, query_bg_radius: int = 1, query_bg_min_k: int = 3,
                 head: float = 1.0, head_l2: float = 1e-3, head_steps: int = 60,
                 bg_cover: float | None = None, normal_cells: int = DEFAULT_NORMAL_CELLS,
                 normal_head: bool | str = "sample", normal_bank: bool = False,
                 normal_head_cells: int = DEFAULT_NORMAL_HEAD_CELLS):
        self.fg_min, self.chunk, self.precision = fg_min, chunk, precision
        if int(normal_cells) < 1 or int(normal_head_cells) < 1:
            raise InputError("normal_cells", f"need positive numbers of normal cells, got {normal_cells!r}, "
                                             f"normal_head_cells={normal_head_cells!r}")
        self.normal_head_cells = int(normal_head_cells)
        self.normal_cells, self.normal_head = int(normal_cells), _normal_head_mode(normal_head)
        self.normal_bank = _flag("normal_bank", normal_bank)
        self.n_normals = self.n_normal_cells = self.n_head_normal_cells = 0
        if head < 0 or head_l2 < 0 or head_steps < 1:
            raise InputError("fm head", f"need head >= 0, head_l2 >= 0, head_steps >= 1; got {head}, {head_l2}, {head_steps}")
        self.head, self.head_l2, self.head_steps = float(head), float(head_l2), int(head_steps)
        self.head_w: torch.Tensor | None = None
        self.bg_coreset, self.seed = bg_coreset, seed
        self.query_bg, self.query_bg_radius, self.query_bg_min_k = query_bg, query_bg_radius, query_bg_min_k
        if bg_cover is not None and not 0 < bg_cover < 1:
            raise InputError("bg_cover", f"expected a cosine in (0, 1), got {bg_cover!r}")
        self.bg_cover = bg_cover
        matmul_dtype(precision)   # validate early
        self.fg: torch.Tensor | None = None
        self.bg: torch.Tensor | None = None

    def fit(self, supports: list[Support], normals: list[torch.Tensor] | None = None) -> None:
        """The supports' fg / bg banks (and the head). ``normals``: feature grids of defect-free
        images; their cells, reduced to at most ``normal_cells`` rows (:func:`normal_bank`), join
        the background bank (and, by ``normal_head``, the head's background)."""
        fgs, bgs, fracs = [], [], []
        for s in supports:
            f = s.features.flatten(1).T          # cells x C
            fg, bg = support_cells(s.coverage, self.fg_min)
            fgs.append(f[fg])
            bgs.append(f[bg])
            fracs.append(float(fg.float().mean()))
        fg, bg = torch.cat(fgs), torch.cat(bgs)
        del fgs, bgs          # per-support copies: a zoomed 5-shot bank's are ~150 MB
        if not len(fg) or not len(bg):
            raise InputError("supports", "supports give no foreground or no background feature cells")
        k = coreset_size(len(bg), self.bg_coreset)
        if k < len(bg):
            bg = bg[greedy_coreset(bg, k, self.seed)]
        extra = None
        if normals:
            check_size_class([tuple(s.features.shape[-2:]) for s in supports], [tuple(n.shape[-2:]) for n in normals])
            if self.normal_bank or (self.head and self.normal_head == "bank"):
                extra = normal_bank(normals, self.normal_cells, self.seed).to(bg.device, bg.dtype)
        self.n_head_normal_cells = 0
        if self.head:
            head_bg = bg
            if normals and self.normal_head == "bank":
                head_bg = torch.cat([bg, extra])
            elif normals and self.normal_head == "sample":
                # with the bank: as many as it holds (as measured); without: normal_head_cells
                n = self.normal_head_cells if extra is None else len(extra)
                head_bg = torch.cat([bg, normal_sample(normals, n, self.seed).to(bg.device, bg.dtype)])
            self.n_head_normal_cells = len(head_bg) - len(bg)
            self.head_w = fit_linear_head(fg, head_bg, self.head_l2, self.head_steps)
        if extra is not None and self.normal_bank:
            bg = torch.cat([bg, extra])
        else:
            extra = None
        self.n_normals, self.n_normal_cells = len(normals or []), 0 if extra is None else len(extra)
        self.fg, self.bg = fg.contiguous(), bg.contiguous()
        self.min_defect_cells = smallest_defect_cells(supports, self.fg_min)
        self.fg_fraction = sum(fracs) / len(fracs)
        self.dtype = matmul_dtype(self.precision, fg.device)

    # -- scoring ----------------------------------------------------------------
    def _search_banks(self) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """The fitted banks as the matching reads them (in the matmul dtype; the background bank
        reduced by ``bg_cover``) and the strided background subsets of the pruned search, coarse to
        fine (every 512th cell, every 32nd). Derived
        from ``fg`` / ``bg`` at the first query after a fit (or a move) and kept."""
        key = (id(self.fg), id(self.bg), self.fg.device, self.dtype)
        cached = getattr(self, "_banks_cache", None)
        if cached is None or cached[0] != key:
            bg = self.bg
            if self.bg_cover is not None:
                bg = bg[cover_subset(bg, self.bg_cover)]
            bg = bg.to(self.dtype).contiguous()
            coarse = tuple(bg[strided_subset(len(bg), s)].contiguous()
                           for s in (PRUNE_STRIDE * PRUNE_FIRST, PRUNE_STRIDE))
            cached = (key, (self.fg.to(self.dtype).contiguous(), bg, coarse))
            self._banks_cache = cached
        return cached[1]

    def _flat(self, query: Query) -> torch.Tensor:
        return query.features.flatten(1).T

    def _vote(self, q: torch.Tensor, fg_max: torch.Tensor) -> torch.Tensor:
        """``fg_max`` plus the linear head's vote: the margin before the background is subtracted."""
        if self.head and self.head_w is not None:
            return fg_max + self.head * HEAD_SCALE * torch.tanh(head_logits(q, self.head_w) / 4)
        return fg_max

    def _query_bg(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        k = max(self.query_bg_min_k, int(round(self.query_bg * self.fg_fraction * h * w)))
        return kth_self_similarity(q, h, w, k, self.query_bg_radius, self.chunk)

    def score(self, query: Query) -> torch.Tensor:
        return self.score_many([query])[0]

    def score_many(self, queries: list[Query]) -> list[torch.Tensor]:
        """The margin grids of several queries (e.g. a query and its flipped views), each matched
        exactly against the banks: ``[score(q) for q in queries]``. (One matmul over all their
        cells measured no faster than one per query: BENCHMARKS.md, matching speed.)"""
        if self.fg is None:
            raise RuntimeError("fit() the method before scoring")
        fgb, bgb, _ = self._search_banks()
        out = []
        for query in queries:
            _, h, w = query.features.shape
            q = self._flat(query)
            bg = max_similarity(q, bgb, self.chunk, self.dtype)
            if self.query_bg:
                bg = torch.maximum(bg, self._query_bg(q, h, w))
            out.append((self._vote(q, max_similarity(q, fgb, self.chunk, self.dtype)) - bg).view(h, w))
        return out

    def score_views(self, queries: list[Query], flips: list[list[int]],
                    exact_above: float | None = None) -> torch.Tensor:
        """The mean of the views' margin grids, view ``i`` flipped back along ``flips[i]`` (grid dims,
        ``[]`` for the query as it is): what the segmenter's query views average.

        ``exact_above``: the decision threshold applied to these margins after bilinear upsampling.
        Then only the cells that can matter for the mask are matched against the whole background
        bank: first every cell gets an upper bound of its margin from a strided 1/512 of the bank (a
        subset's best cosine is at most the bank's), the cells it leaves within ``PRUNE_BAND`` of the
        threshold a tighter one from a strided 1/32; the cells whose merged bound is then at least
        ``exact_above - PRUNE_BAND`` (the band covers bf16 rounding) get their exact margins in every
        view, and then the 8 neighbours (a pixel is interpolated from its 2 x 2 nearest cells) of
        every cell whose exact margin stays in the band, until all of them are exact. Every other
        pixel is interpolated from cells whose bounds are below the band, so its exact value is below
        the threshold: the mask is the exact one, and the margins of the cells kept as bounds are
        above their exact values but below the threshold. The grid's maximum is exact as well (the
        image-level defect score): while some bound is above the best exact margin, those bounds are
        tightened with the 1/32 subset, then the highest matched exactly.
        None: every cell exact (= ``merge`` of ``score_many``)."""
        if len(queries) != len(flips):
            raise InputError("score_views", f"need one flip per query view, got {len(queries)} views and {len(flips)}")
        shapes = {tuple(q.features.shape[-2:]) for q in queries}
        if exact_above is None or len(shapes) != 1 or self.fg is None:
            return merge_flipped(self.score_many(queries), flips)
        fgb, bgb, coarse = self._search_banks()
        (h, w), = shapes
        n = h * w
        qs = [self._flat(q) for q in queries]
        allq = torch.cat(qs)
        base = self._vote(allq, max_similarity(allq, fgb, self.chunk, self.dtype))
        low = max_similarity(allq, coarse[0], self.chunk, self.dtype)        # <= the exact bg max
        if self.query_bg:
            low = torch.maximum(low, torch.cat([self._query_bg(q, h, w) for q in qs]))
        flat = (base - low).clone()

        def rows_of(cells: torch.Tensor) -> torch.Tensor:
            """The rows of ``allq`` (every view) of the merged-grid ``cells`` (bool h x w)."""
            return torch.cat([torch.flip(cells, dims).flatten().nonzero().flatten() + i * n
                              for i, dims in enumerate(flips)])

        fine = torch.zeros((h, w), dtype=torch.bool)       # cells bounded by the finest subset

        def tighten(cells: torch.Tensor) -> torch.Tensor:
            """Bound ``cells`` again with the finest subset (it holds the coarser ones) -> the merged grid."""
            cells = cells & ~fine
            if bool(cells.any()):
                rows = rows_of(cells)
                low[rows] = torch.maximum(low[rows], max_similarity(allq[rows], coarse[-1], self.chunk, self.dtype))
                flat[rows] = base[rows] - low[rows]
                fine.logical_or_(cells)
            return merge_flipped(list(flat.view(len(qs), h, w)), flips)

        merged = tighten(merge_flipped(list(flat.view(len(qs), h, w)), flips) >= exact_above - PRUNE_BAND)
        done = torch.zeros((h, w), dtype=torch.bool)

        def exact(cells: torch.Tensor) -> torch.Tensor:
            """Exact margins (every view) for the merged-grid ``cells`` (bool h x w) -> the merged grid."""
            rows = rows_of(cells)
            exact_bg = max_similarity(allq[rows], bgb, self.chunk, self.dtype)
            if self.query_bg:
                exact_bg = torch.maximum(exact_bg, low[rows])
            flat[rows] = base[rows] - exact_bg
            done.logical_or_(cells)
            return merge_flipped(list(flat.view(len(qs), h, w)), flips)

        # exact: every cell within the band of the threshold and its 8 neighbours. The cells in the band
        # first (a bound above the band often falls below it once exact), then the neighbours of those
        # that stay in it, until every neighbour of a cell in the band is exact
        while True:
            hot = merged >= exact_above - PRUNE_BAND
            todo = hot & ~done
            if not bool(todo.any()):
                todo = (F.max_pool2d(hot.float()[None, None], 3, 1, 1)[0, 0] > 0) & ~done
                if not bool(todo.any()):
                    break
            merged = exact(todo)
        # the grid's maximum (the image-level defect score) exact too: while a bound left is above the
        # best exact margin, match the highest bounds exactly (best-first; usually one round)
        while not bool(done.all()):
            best = float(merged[done].max()) if bool(done.any()) else float("-inf")
            left = torch.where(done, torch.full_like(merged, float("-inf")), merged)
            if float(left.max()) <= best:
                break
            loose = (left > best) & ~fine
            if bool(done.any()) and bool(loose.any()):     # coarse bounds above the best: tighten them first
                merged = tighten(loose)
                continue
            top = torch.zeros_like(done).flatten()
            top[left.flatten().topk(min(MAX_ROUND, int((~done).sum()))).indices] = True
            merged = exact(top.view(h, w))
        return merged

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d.pop("_banks_cache", None)       # derived from fg / bg; rebuilt at the first query
        return d

    def describe(self) -> dict:
        return {"method": self.name, "fg_cells": int(len(self.fg)) if self.fg is not None else 0,
                "bg_cells": int(len(self.bg)) if self.bg is not None else 0,
                "matmul": str(getattr(self, "dtype", "")).replace("torch.", ""), "head": self.head,
                **({"bg_cover": self.bg_cover} if self.bg_cover is not None else {}),
                **({"normals": self.n_normals, "normal_cells": self.n_normal_cells,
                    "normal_head_cells": getattr(self, "n_head_normal_cells", 0)}
                   if getattr(self, "n_normals", 0) else {})}
