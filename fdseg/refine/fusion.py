"""Fusing a coarse prediction with region candidates (the paper's FM-SAM rules), as a pure function.

    refined = refine(prediction, candidate_masks)

``candidate_masks`` is a stack ``N x H x W`` (bool), a list of ``H x W`` masks, or a label map
``H x W`` of ints (0 = no candidate, k > 0 = candidate k; disjoint by construction).

1. **De-overlap**, smallest first: a pixel belongs to the smallest candidate that holds it.
2. **Select**: a candidate ``m`` joins the prediction when ``|pred & m| / |m| > min_overlap``
   and (``area(m) < max_area * H * W`` or that overlap ``> strong_overlap``).
3. **Boundary**: each selected candidate is dilated with a ``k x k`` square (``k = dilation``
   at ``reference_size`` pixels, scaled with the image's shorter side); the connected component
   of the (fused) prediction that overlaps the dilated candidate most is found, and if more than
   ``boundary_fraction`` of that component lies inside the dilated candidate, the ring
   (dilated - candidate) is removed from the prediction (selected candidates are kept).

No candidates (or none selected) -> the prediction is returned unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
from scipy import ndimage

from ..errors import InputError

CandidateMasks = Union[np.ndarray, Sequence[np.ndarray]]
EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class FusionRules:
    """The thresholds of :func:`refine` (defaults: the paper's)."""

    min_overlap: float = 0.2
    max_area: float = 0.4
    strong_overlap: float = 0.6
    dilation: int = 21
    reference_size: int = 256
    boundary_fraction: float = 0.9
    boundary: bool = True

    def kernel(self, shape: tuple[int, int]) -> int:
        """Odd dilation size for an image of ``shape`` (``dilation`` at ``reference_size``)."""
        k = int(round(self.dilation * min(shape) / float(self.reference_size)))
        return max(1, k | 1)


def deoverlap(candidates: CandidateMasks, shape: tuple[int, int]) -> np.ndarray:
    """Disjoint label map (int32, 0 = none): every pixel goes to the smallest candidate holding it."""
    if isinstance(candidates, np.ndarray) and candidates.ndim == 2 and candidates.dtype != bool:
        if candidates.shape != shape:
            raise InputError("candidates", f"label map is {candidates.shape}, prediction is {shape}")
        return candidates.astype(np.int32, copy=False)
    masks = [np.asarray(m, dtype=bool) for m in candidates]
    for m in masks:
        if m.shape != shape:
            raise InputError("candidates", f"candidate mask is {m.shape}, prediction is {shape}")
    labels = np.zeros(shape, np.int32)
    if not masks:
        return labels
    areas = np.array([int(m.sum()) for m in masks])
    for new, i in enumerate(np.argsort(areas, kind="stable"), start=1):
        if areas[i]:
            labels[masks[i] & (labels == 0)] = new
    return labels


def select(prediction: np.ndarray, labels: np.ndarray, rules: FusionRules = FusionRules()) -> np.ndarray:
    """Label ids (> 0) of the candidates that join the prediction."""
    n = int(labels.max()) + 1 if labels.size else 1
    area = np.bincount(labels.ravel(), minlength=n)
    inter = np.bincount(labels.ravel(), weights=prediction.ravel().astype(np.float64), minlength=n)
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(area > 0, inter / np.maximum(area, 1), 0.0)
    ok = (frac > rules.min_overlap) & ((area < rules.max_area * labels.size) | (frac > rules.strong_overlap))
    ok[0] = False
    ok &= area > 0
    return np.flatnonzero(ok)


def refine(prediction: np.ndarray, candidate_masks: CandidateMasks, rules: FusionRules | None = None,
           **overrides) -> np.ndarray:
    """The refined H x W bool mask (see the module docstring); ``overrides`` set single rules."""
    rules = FusionRules(**{**(rules or FusionRules()).__dict__, **overrides})
    pred = np.asarray(prediction, dtype=bool)
    if pred.ndim != 2:
        raise InputError("prediction", f"expected an H x W mask, got shape {pred.shape}")
    labels = deoverlap(candidate_masks, pred.shape)
    chosen = select(pred, labels, rules)
    if not len(chosen):
        return pred.copy()
    keep = np.zeros(int(labels.max()) + 1, bool)
    keep[chosen] = True
    selected = keep[labels]
    fused = pred | selected
    if not rules.boundary:
        return fused
    comp, _ = ndimage.label(fused, structure=EIGHT)
    comp_area = np.bincount(comp.ravel())
    k = rules.kernel(pred.shape)
    r = k // 2
    out = fused.copy()
    boxes = ndimage.find_objects(labels, max_label=int(labels.max()))
    h, w = pred.shape
    for lab in chosen:
        sl = boxes[lab - 1]
        y0, y1 = max(0, sl[0].start - r), min(h, sl[0].stop + r)
        x0, x1 = max(0, sl[1].start - r), min(w, sl[1].stop + r)
        cand = labels[y0:y1, x0:x1] == lab
        dil = ndimage.maximum_filter(cand, size=k, mode="constant", cval=False) if k > 1 else cand
        inside = np.bincount(comp[y0:y1, x0:x1][dil].ravel(), minlength=len(comp_area))
        inside[0] = 0
        best = int(inside.argmax())
        if best == 0 or inside[best] <= rules.boundary_fraction * comp_area[best]:
            continue
        ring = dil & ~cand & ~selected[y0:y1, x0:x1]
        out[y0:y1, x0:x1] &= ~ring
    return out
