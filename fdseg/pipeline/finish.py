"""The one finish path from a margin grid to a :class:`Prediction`: upsample, threshold, the post
steps, the score map kept consistent with the refined mask, component boxes, the image-level verdict.
``predict``, the bench, the server and the Ray actors all end here.

Image-level verdict (:func:`verdict`): ``defect_score`` = the largest margin of the query's grid
above the decision threshold (> 0: some cell is matched as defect; the bench's AUROC ranks images by
it); ``is_defective`` = the final mask has an 8-connected component of at least ``min_cells`` grid
cells (default 1: a region as large as one cell of the grid the matching sees; smaller specks are
upsampling slivers of a cell whose margin is just above the threshold). A fit given defect-free
images has an OK gate (:class:`fdseg.pipeline.post.OkGate`) calibrated on the ones held out of the fit:
by default a mask pixel stays only where its margin plus its component's peak margin exceeds the lower
quartile of their defect scores (a component above it stays whole, one under half of it goes); with ``ok_gate="median"`` a query whose ``defect_score`` is not above their median has its
whole mask emptied. ``ok_gated``: the gate left no mask. See docs/normals.md for the rules measured.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.preprocess import upsample_scores
from .post import Post


MIN_CELLS = 1.0     # is_defective: the mask has a component of at least this many grid cells


def largest_component(mask: np.ndarray) -> int:
    """Pixels of the largest 8-connected component of ``mask`` (0 when empty)."""
    return components(mask)[0]


def verdict(margin_grid: np.ndarray, mask: np.ndarray, threshold: float,
            min_cells: float = MIN_CELLS, largest: int | None = None) -> tuple[float, bool, float]:
    """-> (defect_score, is_defective, largest component in grid cells) of one prediction (rule above).
    ``largest``: the mask's largest component in pixels, where the caller has it (else computed)."""
    score = float(margin_grid.max()) - threshold if margin_grid.size else float("-inf")
    if largest is None:
        largest = largest_component(mask)
    cells = largest * margin_grid.size / mask.size if mask.size else 0.0
    return score, bool(cells >= min_cells and cells > 0), float(cells)


def components(mask: np.ndarray, peak: np.ndarray | None = None, level: float | None = None,
               soft: bool = False) -> tuple[int, list[tuple[int, int, int, int]], np.ndarray]:
    """One labelling of the 8-connected components -> (largest component's pixels, every component's
    bounding box (x0, y0, x1, y1; x1/y1 exclusive), the mask). With ``peak`` (a map of ``mask``'s shape)
    and ``level``, first: the components whose largest ``peak`` is not above ``level`` are removed, or,
    ``soft``, a pixel stays where its own ``peak`` plus its component's largest exceeds ``level`` (a
    component above the level stays whole, one under half of it goes, one between keeps its core)."""
    from scipy import ndimage
    if not mask.any():
        return 0, [], mask
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if peak is not None and level is not None:
        peaks = np.asarray(ndimage.maximum(peak, lab, np.arange(1, n + 1)))
        if soft:
            if not (peaks > level).all():
                kept = mask & (peak + np.concatenate([[-np.inf], peaks])[lab] > level)
                if not np.array_equal(kept, mask):
                    mask = kept
                    if not mask.any():
                        return 0, [], mask
                    lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        else:
            keep = np.concatenate([[False], peaks > level])
            if not keep[1:].all():
                lab = np.where(keep[lab], lab, 0)
                mask = lab > 0
                if not mask.any():
                    return 0, [], mask
    boxes = [(int(sl[1].start), int(sl[0].start), int(sl[1].stop), int(sl[0].stop))
             for sl in ndimage.find_objects(lab) if sl is not None]
    return int(np.bincount(lab.ravel())[1:].max()), boxes, mask


def connected_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x0, y0, x1, y1; x1/y1 exclusive) of the 8-connected components."""
    return components(mask)[1]


@dataclass(frozen=True)
class ScoreRule:
    """How a prediction's score map follows from its margin grid and final mask (kept, so that the
    H x W float map is made only when asked for: at 12 MP it costs more than the whole matching)."""

    size: tuple[int, int]            # (H, W) of the map
    threshold: float
    temperature: float
    refined: bool                    # a post step (colour rule, SAM) decided the mask: the map follows it
    changed: bool                    # the OK gate removed components: the map follows the mask there


def score_map(grid: np.ndarray, rule: ScoreRule, mask: np.ndarray) -> np.ndarray:
    """``sigmoid((upsampled margin - threshold) / temperature)``, kept consistent with ``mask`` (0.5 is the
    decision boundary) where a post step or the OK gate decided it."""
    full = upsample_scores(torch.from_numpy(np.ascontiguousarray(grid, np.float32)), rule.size)
    score = torch.sigmoid((full - rule.threshold) / rule.temperature).cpu().numpy()
    if rule.refined:
        score = np.where(mask, np.maximum(score, 0.5 + 1e-3), np.minimum(score, 0.5 - 1e-3))
    elif rule.changed:
        score = np.where(mask, score, np.minimum(score, 0.5 - 1e-3))
    return score.astype(np.float32, copy=False)


@dataclass
class Prediction:
    """One query's result at the query's original resolution (or the size asked for). ``score``, the
    H x W map, is made from the margin grid on first use (``ScoreRule``) unless given."""

    mask: np.ndarray                 # H x W bool
    margin_grid: np.ndarray          # the method's raw margins on its own grid (> threshold = defect)
    source: str = ""
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    image: np.ndarray | None = field(default=None, repr=False)   # the query as loaded (RGB), if decoded
    query_size: tuple[int, int] | None = None                     # the query's own (H, W)
    defect_score: float = 0.0        # image-level: largest grid margin above the threshold (> 0: a defect cell)
    is_defective: bool = False       # image-level verdict: a mask component of >= min_cells grid cells
    largest_cells: float = 0.0       # the largest mask component, in grid cells
    ok_gated: bool = False           # judged OK by the OK gate (nothing stronger than good surface): mask empty
    score_rule: ScoreRule | None = field(default=None, repr=False)
    _score: np.ndarray | None = field(default=None, repr=False)

    @property
    def score(self) -> np.ndarray:
        """H x W float32 in [0, 1]; 0.5 is the decision boundary (made on first use, then kept)."""
        if self._score is None:
            if self.score_rule is None:
                raise ValueError("this prediction has neither a score map nor the rule to make one")
            self._score = score_map(self.margin_grid, self.score_rule, self.mask)
        return self._score

    @property
    def verdict(self) -> str:
        """``"defective"`` or ``"ok"`` (:attr:`is_defective`)."""
        return "defective" if self.is_defective else "ok"

    @property
    def defect_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def max_score(self) -> float:
        return float(self.score.max()) if self.score.size else 0.0


def mask_box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The rows and columns of ``mask``'s bounding box (None when empty)."""
    rows = np.flatnonzero(mask.any(1))
    if not rows.size:
        return None
    cols = np.flatnonzero(mask[rows[0]:rows[-1] + 1].any(0))
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def finish(margin: torch.Tensor, size: tuple[int, int], post: Post, temperature: float, *,
           image: np.ndarray | None = None, source: str = "", query_size: tuple[int, int] | None = None,
           min_cells: float = MIN_CELLS) -> Prediction:
    """``margin`` (gh x gw) -> :class:`Prediction` of ``size`` (H, W). ``image`` (the query, RGB at any
    size) is needed when ``post.refines``. ``min_cells``: the verdict's smallest defect (grid cells)."""
    full = upsample_scores(margin.float(), size)
    t = post.threshold
    mask = (full > t).cpu().numpy()
    if post.refines:
        if image is None:
            raise ValueError("refinement needs the query image")
        mask = post.refine(image, mask)
    grid = margin.float().cpu().numpy()
    level = post.ok_level
    # the components, and the gate's peaks, only inside the mask's bounding box (nothing outside it)
    box = mask_box(mask)
    kept, largest, boxes = mask, 0, []
    if box is not None:
        ys, xs = box
        peak = (full[ys, xs] - t).cpu().numpy() if level is not None and post.ok_components else None
        sub = mask[ys, xs]
        largest, boxes, kept_sub = components(sub, peak, level, post.ok_soft)   # the auto gate
        boxes = [(x0 + xs.start, y0 + ys.start, x1 + xs.start, y1 + ys.start) for x0, y0, x1, y1 in boxes]
        if kept_sub is not sub:
            kept = np.zeros_like(mask)
            kept[ys, xs] = kept_sub
    if level is None:
        gated = False
    elif post.ok_components:         # every component no stronger than good surface: judged OK
        gated = box is not None and not kept.any()
    else:                            # median gate: no more defective than a typical OK image: judged OK
        gated = float(grid.max()) - t <= level if grid.size else True
    if gated:
        kept, largest, boxes = np.zeros_like(mask), 0, []
    rule = ScoreRule(tuple(size), t, temperature, post.refines, kept is not mask)
    d_score, defective, cells = verdict(grid, kept, t, min_cells, largest)
    return Prediction(kept, grid, source, boxes, image, tuple(query_size or size), d_score, defective, cells, gated,
                      score_rule=rule)
