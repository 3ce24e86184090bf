"""Support colour refinement: a predicted pixel stays defect only if its colour is not much more
typical of the supports' background around their defects than of the defects themselves.

Matching decides on grid cells (8-16 px of a 256-px frame), so a thin crack or a spot a few pixels
wide comes out as a blob a cell wide. The supports say which colours the defect has: a coarse RGB
histogram of the supports' defect pixels (``p_fg``) and one of the background in a ring around them
(``p_bg``), both with add-one smoothing. A predicted pixel is kept where ``p_fg / p_bg >= tau``; the
rule only removes pixels, never adds them. A colour neither histogram has seen gets the ratio of the
two totals (background pixels / defect pixels, normally > 1): it is kept.

    model = ColourModel().fit(support_images, support_masks)
    refined = model(query_image, predicted_mask)

Grey images (every support's channels equal, as from a grey camera) carry no colour: an RGB histogram
of them is a coarse grey-level histogram, which costs more defect pixels than it trims. For them the
histograms are of local contrast instead: a pixel's grey value minus the mean of a ``window``-px
window around it (a quarter of the frame), in ``contrast`` levels over +-48 grey levels, so "darker
than its surroundings" is what a crack or a hole is made of.

The rule trims well, so the matching need not be strict: with a single support, while the rule is in
effect, the segmenter lowers its margin threshold by ``slack`` (the matching proposes a little more,
the rule trims it). One support covers a defect type poorly and the matching then misses more than it
over-segments (recall below precision in most benchmark classes); with five supports that is no longer
so and a looser threshold costs (measured: BENCHMARKS.md), so there is no slack from two supports on.
The slack relies on the rule trimming what the looser threshold adds, which lies around the defect:
it is given only if the rule removes at least ``min_trimmed`` (half) of the ring of background around
the support's defect that it was fitted on (``trimmed``). Where the defect's colours are also its
surroundings' (a dark crack in dark texture), the rule cannot trim that ring, and the slack would only
add false defect.

The rule checks itself on the supports: it is used only if it keeps at least ``min_kept`` (half) of the
supports' own defect pixels. A defect of a few pixels (a hairline crack on a large image) gives a
histogram of a few counts, which add-one smoothing flattens below the ring's: such a rule would remove
most of the very defect it was fitted on, so it does not describe the defect's colour and is not used
(and with it goes the slack).

From three supports on, ``tau`` is chosen on the supports (``tune_from``): the matching decides per
grid cell, so at best it proposes each defect grown by about one cell; the rule is asked to trim each
support's mask, grown by one cell of the matching's grid, back to the mask, and the candidate
(``tau`` itself or a stricter one of :data:`TUNE_TAUS`) whose trimmed masks have the highest IoU with
the supports' masks, summed over the supports, is used (the smallest on a tie). A thin crack, whose
grown mask is mostly background, gets a stricter rule; a wide blob, whose grown mask is mostly
defect, keeps ``tau``. The choice is judged on the pixels it was fitted on, so it needs several
supports: decided leave-one-dataset-out per shot count (BENCHMARKS.md), it is kept at 3 and 5 shots
(+0.9 / +1.4 class-mean mIoU, no held-out dataset below -0.41) and not at 1 or 2 (sd_saliency_900 -0.8
at 1-shot, VisA -1.1 at 2-shot, and at 2 shots it loses on the other datasets in 4 of 5 folds).

Statistics are taken in a fixed frame (each support squeezed to ``frame`` x ``frame`` with the
paper's mask resize, ``ring`` pixels there), so they do not depend on the images' resolution.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError


def _resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from ..data.preprocess import resize_image, to_tensor
    if rgb.shape[:2] == tuple(size):
        return rgb
    return resize_image(to_tensor(rgb), size).round().clamp(0, 255)[0].permute(1, 2, 0).byte().numpy()


def grey_levels(rgb: np.ndarray) -> np.ndarray:
    """The mean of the first three channels, float32 (``rgb[..., :3].astype(np.float32).mean(-1)``). For
    uint8 images from the integer sum divided by 3 in float32: the same value for every one of the 2^24
    colours (the sum is exact in float32 and numpy's mean divides it once), 10x faster on large images."""
    if rgb.dtype != np.uint8:
        return rgb[..., :3].astype(np.float32).mean(-1)
    total = rgb[..., 0].astype(np.uint16) + rgb[..., 1] + rgb[..., 2]
    return total.astype(np.float32) / np.float32(3)


def is_grey(rgb: np.ndarray) -> bool:
    """Whether an H x W x 3 image is grey: its channels differ by under one level on average."""
    a = rgb[..., :3].astype(np.int16)
    return bool(np.abs(a[..., 0] - a[..., 1]).mean() < 1 and np.abs(a[..., 1] - a[..., 2]).mean() < 1)


TUNE_TAUS = (0.3, 0.5, 1.0, 2.0, 4.0)   # the candidates from three supports on (those >= tau)


@dataclass
class ColourModel:
    """Histogram ratio of the supports' defect pixels to the background ring around them: of their
    RGB colour, or, when every support is grey, of their local contrast."""

    tau: float = 0.3          # keep a predicted pixel when p_fg / p_bg >= tau (0 = keep all)
    bins: int = 8             # histogram levels per RGB channel (bins ** 3 colours)
    ring: int = 8             # background ring width, pixels of the frame (0 = all background)
    frame: int = 256          # supports are squeezed to frame x frame for their statistics
    grey: str = "contrast"    # grey supports: "contrast" (local contrast), "rgb" (as colour), "off"
    contrast: int = 8         # grey supports: levels of local contrast (grey value - window mean, +-48)
    window: int = 63          # local-contrast window, pixels of the frame (scaled to other sizes)
    slack: float = 0.04       # with one support and the rule in effect, the matching's threshold is lowered by this
    min_kept: float = 0.5     # used only if it keeps at least this share of the supports' own defect pixels
    min_trimmed: float = 0.5  # the slack only if the rule removes at least this share of the ring it was fitted on
    tune_from: int = 3        # from this many supports on, tau is chosen on the supports (0 = never)
    table: np.ndarray | None = field(default=None, repr=False)   # histogram ratios once fitted
    mode: str = field(default="rgb", init=False, repr=False)   # what the fitted table indexes: rgb / contrast
    kept: float = field(default=0.0, init=False, repr=False)   # share of the supports' defect pixels it keeps
    trimmed: float = field(default=0.0, init=False, repr=False)  # share of the ring around them it removes
    tuned: tuple | None = field(default=None, init=False, repr=False)   # (candidates, their IoU) when tau was chosen
    base_tau: float = field(default=0.0, init=False, repr=False)       # tau as set (each fit starts from it)

    def __post_init__(self):
        if self.tau < 0:
            raise InputError("colour_refine", f"tau must be >= 0, got {self.tau}")
        self.base_tau = self.tau
        if not 2 <= self.bins <= 64:
            raise InputError("colour_refine", f"bins must be in 2..64, got {self.bins}")
        if self.ring < 0 or self.frame < 8:
            raise InputError("colour_refine", f"need ring >= 0 and frame >= 8, got {self.ring}, {self.frame}")
        if not 0 <= self.min_kept <= 1:
            raise InputError("colour_refine", f"min_kept must be in 0..1, got {self.min_kept}")
        if not 0 <= self.min_trimmed <= 1:
            raise InputError("colour_refine", f"min_trimmed must be in 0..1, got {self.min_trimmed}")
        if self.tune_from < 0:
            raise InputError("colour_refine", f"tune_from must be >= 0, got {self.tune_from}")
        if not 0 <= self.slack <= 1:
            raise InputError("colour_refine", f"slack must be in 0..1, got {self.slack}")
        if self.grey not in ("contrast", "rgb", "off"):
            raise InputError("colour_refine", f"grey must be contrast, rgb or off, got {self.grey!r}")
        if not 2 <= self.contrast <= 64 or self.window < 3:
            raise InputError("colour_refine", f"need contrast in 2..64 and window >= 3, got {self.contrast}, "
                                              f"{self.window}")

    def _index(self, rgb: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
        """Histogram bin of each pixel of an H x W x 3 image (``rgb`` mode: also of a pixel list); with
        ``where`` (H x W bool) only of those pixels (the local contrast still from their surroundings)."""
        if self.mode == "contrast":
            from scipy import ndimage
            g = grey_levels(rgb)
            h, w = g.shape
            size = tuple(max(3, round(self.window * n / self.frame)) | 1 for n in (h, w))
            local = ndimage.uniform_filter(g, size=size, mode="reflect")
            if where is not None:
                g, local = g[where], local[where]
            d = np.clip(g - local, -48, 47.99)
            return ((d + 48) * self.contrast / 96).astype(np.int64)
        if where is not None:
            rgb = rgb[where]
        q = (rgb[..., :3].astype(np.int64) * self.bins) // 256
        return (q[..., 0] * self.bins + q[..., 1]) * self.bins + q[..., 2]

    def fit(self, images: list[np.ndarray], masks: list[np.ndarray],
            grids: list[tuple[int, int]] | None = None) -> "ColourModel":
        """Histograms from support images (H x W x 3 uint8) and their boolean masks. ``grids``: the
        matching's grid (rows, columns) on each support; with them, from ``tune_from`` supports on,
        ``tau`` is chosen on the supports (module docstring)."""
        from scipy import ndimage

        from ..data.preprocess import resize_mask
        self.mode, self.tuned, self.tau = "rgb", None, self.base_tau
        if self.grey != "rgb" and images and all(is_grey(im) for im in images):
            if self.grey == "off":
                self.table = None
                return self
            self.mode = "contrast"
        n = self.contrast if self.mode == "contrast" else self.bins ** 3
        fg, bg = np.ones(n), np.ones(n)
        defect_bins, ring_bins, framed = [], [], []
        for rgb, m in zip(images, masks):
            size = (self.frame, self.frame)
            idx = self._index(_resize_rgb(rgb, size))
            m = resize_mask(m, size)
            near = (ndimage.binary_dilation(m, iterations=self.ring) & ~m) if self.ring else ~m
            fg += np.bincount(idx[m], minlength=n)
            bg += np.bincount(idx[near], minlength=n)
            defect_bins.append(idx[m])
            ring_bins.append(idx[near])
            framed.append((idx, m))
        defect_bins, ring_bins = np.concatenate(defect_bins), np.concatenate(ring_bins)
        # no defect pixel survived the frame: nothing is known about the defect's colour, keep everything
        self.table = (fg / fg.sum()) / (bg / bg.sum()) if len(defect_bins) else None
        if self.table is not None and self.tau > 0 and grids and self.tune_from and len(images) >= self.tune_from:
            cells = [self.frame / float(np.sqrt(gh * gw)) for gh, gw in grids]
            self.tau = self._tune(framed, cells)
        self.kept = float((self.table[defect_bins] >= self.tau).mean()) if self.table is not None else 0.0
        self.trimmed = (float((self.table[ring_bins] < self.tau).mean()) if self.table is not None and len(ring_bins)
                        else 0.0)
        if self.table is not None and self.tau > 0 and self.kept < self.min_kept:
            self.table = None      # it would remove most of the supports' own defect: not a model of it
        return self

    def _tune(self, framed: list[tuple[np.ndarray, np.ndarray]], cells: list[float]) -> float:
        """The candidate tau that best trims the supports' masks grown by one grid cell (``cells``: pixels
        of the frame per cell, per support) back to the masks (IoU of the summed counts; the smallest
        candidate on a tie)."""
        from scipy import ndimage
        taus = [self.tau] + [t for t in TUNE_TAUS if t > self.tau]
        counts = np.zeros((len(taus), 3))
        for (idx, m), cell in zip(framed, cells):
            if not m.any():
                continue
            ratio = self.table[idx]
            grown = ndimage.binary_dilation(m, iterations=max(1, round(cell)))
            for i, t in enumerate(taus):
                keep = grown & (ratio >= t)
                tp = np.count_nonzero(keep & m)
                counts[i] += (tp, np.count_nonzero(keep) - tp, np.count_nonzero(m) - tp)
        iou = counts[:, 0] / np.maximum(1, counts.sum(1))
        self.tuned = (tuple(taus), tuple(float(v) for v in iou))
        return float(taus[int(np.argmax(iou))])

    @property
    def active(self) -> bool:
        """Whether the fitted rule will trim masks (a single support's matching is then loosened by
        ``slack`` where :attr:`loosens`)."""
        return self.table is not None and self.tau > 0

    @property
    def loosens(self) -> bool:
        """Whether a single support's matching may be loosened by ``slack``: the rule is in effect and
        trims at least ``min_trimmed`` of the ring around the support's defect."""
        return self.active and self.slack > 0 and self.trimmed >= self.min_trimmed

    def ratio(self, image: np.ndarray) -> np.ndarray | None:
        """p_fg / p_bg of each pixel's colour (None before fit or without defect pixels)."""
        return None if self.table is None else self.table[self._index(image)]

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``mask`` with the pixels whose colour ratio is below ``tau`` removed; ``image`` is
        resized (bilinear) to the mask's resolution first when they differ."""
        if self.table is None or self.tau <= 0 or not mask.any():
            return mask
        if image is None:
            raise InputError("colour_refine", "colour refinement needs the query image")
        if image.ndim != 3 or image.shape[2] < 3:
            raise InputError("colour_refine", f"expected an H x W x 3 image, got shape {image.shape}")
        rgb = _resize_rgb(np.ascontiguousarray(image[..., :3]), mask.shape)
        out = mask.copy()
        # only the predicted pixels are looked up (the local contrast still from their surroundings)
        idx = self._index(rgb, mask)
        out[mask] = self.table[idx] >= self.tau     # only predicted pixels can change
        return out

    def describe(self) -> dict:
        return {"tau": self.base_tau, "bins": self.bins, "ring": self.ring, "frame": self.frame, "grey": self.grey,
                "contrast": self.contrast, "window": self.window, "slack": self.slack, "min_kept": self.min_kept,
                "min_trimmed": self.min_trimmed, "tune_from": self.tune_from}
