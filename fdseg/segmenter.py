"""FewShotSegmenter: build once, ``fit`` on the supports once, ``predict`` many queries.

    seg = FewShotSegmenter(backbone="efficientnet_lite0", method="fm")
    seg.fit([support_image], [support_mask])        # arrays or paths
    pred = seg.predict(query_image)                  # -> Prediction
    pred.mask, pred.score, pred.boxes
"""
from __future__ import annotations

import dataclasses
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import create_backbone
from .data.images import DEFAULT_MAX_PIXELS, ImageLike, check_support_mask, load_image, load_mask
from .data.preprocess import Preprocess, mask_coverage, upsample_scores
from .errors import FdsegError, InputError
from .feature_cache import FeatureCache, file_key
from .features import FeatureConfig, FeatureExtractor
from .methods import Query, Support, create_method

COLOUR_TAU = 0.3          # default of the support colour rule (fdseg.refine.colour); 0 = off


def _name(x: ImageLike, i: int, what: str) -> str:
    return str(x) if isinstance(x, (str, Path)) else f"{what} {i + 1}"


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
    """One query's result at the query's original resolution."""

    mask: np.ndarray                 # H x W bool
    score: np.ndarray                # H x W float32 in [0, 1]; 0.5 is the decision boundary
    margin_grid: np.ndarray          # the method's raw margins on its own grid (> threshold = defect)
    source: str = ""
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    image: np.ndarray | None = field(default=None, repr=False)   # the query as loaded (RGB), if decoded

    @property
    def defect_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def max_score(self) -> float:
        return float(self.score.max()) if self.score.size else 0.0


class FewShotSegmenter:
    """Few-shot defect segmenter.

    Parameters
    ----------
    backbone, method:
        registry names (``fdseg.list_backbones()``, ``fdseg.list_methods()``).
    input_size, resize, tile_scale, tile_overlap, antialias:
        preprocessing (:class:`fdseg.data.preprocess.Preprocess`). Default ``"auto"``: an
        image whose long side is at least 2 x ``input_size`` is seen aspect-kept at 2 x
        ``input_size`` with a 2 x coarser grid cell; smaller ones are squeezed to
        ``input_size`` squared, as the paper does for all (``resize="resize"`` = the paper).
    feature_stride, local_avg:
        feature grid (:class:`fdseg.features.FeatureConfig`); stride 4 = 64 x 64 cells at 256.
    threshold:
        margin above which a pixel is defect (0 = the paper's argmax).
    weights:
        backbone weights path (None = the backbone's shipped or default weights).
    cache_size:
        feature grids of up to this many image files kept (LRU) so a file seen again
        is not decoded or run through the backbone again (0 = off).
    batch_size, loader_threads:
        queries run through the backbone together in batches; images are decoded by a
        small thread pool ahead of the compute.
    support_augment:
        ``"auto"`` (default): ``"dihedral"`` for a single support, ``"flip"`` for more;
        ``"flip"``: each support also seen flipped left-right and up-down (3x the bank);
        ``"dihedral"``: all 8 rotated / flipped views; ``"none"``: the paper's bank.
    query_augment:
        ``"auto"`` (default): ``"flip"`` after fitting a single support, ``"none"`` after more;
        ``"flip"``: each query is also matched flipped left-right and up-down and the three
        margin grids (flipped back) averaged (3x the matching); ``"none"``: the query as it is.
    zoom:
        ``"auto"`` (default, with ``resize="auto"``): when the supports' defects are under 2
        grid cells across (median connected component) and the images have a long side of
        at least 4 x ``input_size``, the supports and queries are seen at 4 x ``input_size``
        with the same cell (twice the grid on each side; 16x the matching); ``1``: never; ``2``: always.
    refine, refine_options:
        region proposer (``fdseg.refine.list_proposers()``: superpixel, fastsam, sam2_auto) whose
        candidates refine each predicted mask with the paper's fusion rules
        (:mod:`fdseg.refine.fusion`); options go to the proposer and the fusion rules.
    colour_refine:
        ``tau`` of the support colour rule (:mod:`fdseg.refine.colour`): a predicted pixel
        stays defect only where its colour is at least ``tau`` times as likely among the
        supports' defect pixels as in the background around them (0 or None = off). It is used
        only if it keeps at least ``min_kept`` (half) of the supports' own defect pixels. While it
        is in effect and a single support was fitted, the margin threshold is lowered by its
        ``slack`` (0.04).
    colour_options:
        other :class:`fdseg.refine.colour.ColourModel` settings, e.g. ``{"slack": 0}`` or
        ``{"grey": "rgb"}``.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", method: str = "fm", *,
                 input_size: int = 256, resize: str = "auto", tile_scale: float = 1.0,
                 tile_overlap: int = 64, antialias: bool = False, feature_stride: int = 4,
                 local_avg: int = 1, threshold: float = 0.0, device: str = "cpu",
                 weights: str | Path | None = None, backbone_options: dict | None = None,
                 method_options: dict | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 cache_size: int = 0, batch_size: int = 4, loader_threads: int = 2,
                 support_augment: str = "auto", refine: str | None = None, refine_options: dict | None = None,
                 zoom: str | int = "auto", colour_refine: float | None = COLOUR_TAU,
                 colour_options: dict | None = None, query_augment: str = "auto"):
        self.settings = dict(backbone=backbone, method=method, input_size=input_size, resize=resize,
                             tile_scale=tile_scale, tile_overlap=tile_overlap, antialias=antialias,
                             feature_stride=feature_stride, local_avg=local_avg, threshold=threshold,
                             weights=None if weights is None else str(weights),
                             backbone_options=dict(backbone_options or {}),
                             method_options=dict(method_options or {}))
        self.device = torch.device(_pick_device(device))
        self.preprocess = Preprocess(mode=resize, size=input_size, scale=tile_scale,
                                     overlap=tile_overlap, antialias=antialias)
        self.method = create_method(method, **(method_options or {}))
        self.threshold = float(threshold)
        self.max_pixels = max_pixels
        self.extractor: FeatureExtractor | None = None
        if getattr(self.method, "uses_features", True):
            bb = create_backbone(backbone, weights=weights, **(backbone_options or {}))
            self.extractor = FeatureExtractor(bb, self.preprocess, FeatureConfig(feature_stride, local_avg),
                                              self.device)
        if hasattr(self.method, "to"):
            self.method.to(self.device)
        self.n_supports = 0
        if support_augment not in (*AUGMENTATIONS, "auto"):
            raise InputError("support_augment", f"choose from auto, {', '.join(AUGMENTATIONS)}, got {support_augment!r}")
        self.support_augment = support_augment
        self.settings["support_augment"] = support_augment
        if query_augment not in (*QUERY_VIEWS, "auto"):
            raise InputError("query_augment", f"choose from auto, {', '.join(QUERY_VIEWS)}, got {query_augment!r}")
        self.query_augment = query_augment
        self.settings["query_augment"] = query_augment
        if zoom not in ("auto", 1, 2, "1", "2"):
            raise InputError("zoom", f"choose auto, 1 or 2, got {zoom!r}")
        self.zoom = zoom if zoom == "auto" else int(zoom)
        self.settings["zoom"] = self.zoom
        self.cache = FeatureCache(cache_size)
        self._tag_base = (backbone, self.settings["weights"], sorted((backbone_options or {}).items()),
                          feature_stride, local_avg)
        self._set_zoom(1 if self.zoom == "auto" else self.zoom)
        self.batch_size = max(1, int(batch_size))
        self.loader_threads = max(1, int(loader_threads))
        self.refiner = None
        if refine and refine != "none":
            from .refine import Refiner
            self.refiner = Refiner(refine, refine_options, device=str(self.device))
            self.settings.update(refine=refine, refine_options=dict(refine_options or {}))
        self.colour = None
        if colour_refine:
            from .refine.colour import ColourModel
            known = {f.name for f in dataclasses.fields(ColourModel) if f.init and f.name not in ("tau", "table")}
            bad = sorted(set(colour_options or {}) - known)
            if bad:
                raise InputError("colour_options", f"unknown {', '.join(bad)}; known: {', '.join(sorted(known))}")
            self.colour = ColourModel(tau=float(colour_refine), **(colour_options or {}))
        self.settings["colour_refine"] = float(colour_refine or 0)
        if colour_options:
            self.settings["colour_options"] = dict(colour_options)

    def _set_zoom(self, z: int) -> None:
        """Use preprocessing zoom ``z`` (1 or 2) from now on (fit decides it in ``zoom="auto"``)."""
        self.preprocess = dataclasses.replace(self.preprocess, zoom=z)
        if self.extractor is not None:
            self.extractor.preprocess = self.preprocess
        # what the cached features depend on: segmenters with equal tags may share one cache
        self._feature_tag = repr((*self._tag_base, self.preprocess))

    # -- inputs -----------------------------------------------------------------
    @property
    def min_size(self) -> int:
        return self.extractor.backbone.min_input_size if self.extractor else 1

    def load(self, image: ImageLike, name: str | None = None) -> np.ndarray:
        return load_image(image, max_pixels=self.max_pixels, min_size=self.min_size, name=name)

    # -- fit --------------------------------------------------------------------
    def fit(self, images: ImageLike | Sequence[ImageLike], masks: ImageLike | Sequence[ImageLike]) -> "FewShotSegmenter":
        """Learn the defect from K support images and their masks (K >= 1)."""
        if not isinstance(images, (list, tuple)):
            images, masks = [images], [masks]
        if not isinstance(masks, (list, tuple)) or len(images) != len(masks):
            raise InputError("supports", f"need one mask per support image, got {len(images)} images "
                                         f"and {len(masks) if isinstance(masks, (list, tuple)) else 1} masks")
        if not images:
            raise InputError("supports", "need at least one support image with its mask")
        names = [_name(im, i, "support image") for i, im in enumerate(images)]
        loaded = [self._load(im, n) for im, n in zip(images, names)]
        loaded_masks = []
        for i, (m, it) in enumerate(zip(masks, loaded)):
            mask = load_mask(m, size=it[2], max_pixels=self.max_pixels, name=_name(m, i, "support mask"))
            check_support_mask(mask, _name(m, i, "support mask"))
            loaded_masks.append(mask)
        if self.zoom == "auto" and self.preprocess.mode == "auto" and self.extractor is not None:
            z = choose_zoom(loaded_masks, self.preprocess, self.extractor.config.stride)
            if z != self.preprocess.zoom:
                self._set_zoom(z)
                loaded = [self._rekey(it, im, n) for it, im, n in zip(loaded, images, names)]
        self._ensure_features(loaded)
        supports = []
        for i, (mask, (rgb, feats, size, key)) in enumerate(zip(loaded_masks, loaded)):
            cov = mask_coverage(mask, tuple(feats.shape[-2:])).to(feats.device) if feats is not None else None
            supports.append(Support(rgb, mask, feats, cov))
        n = len(supports)
        if self.support_views(n) != "none" and self.extractor is not None:
            supports += self._augmented(supports, images, [it[3] for it in loaded], self.support_views(n))
        self.method.fit(supports)
        if self.colour is not None:
            self.colour.fit([s.image for s in supports[:n]], [s.mask for s in supports[:n]])
        self.n_supports = n
        return self

    def support_views(self, n_supports: int) -> str:
        """The support views in use for ``n_supports`` supports: ``support_augment``, where ``"auto"``
        is ``"dihedral"`` for a single support (one defect's bank gets the orientations it lacks) and
        ``"flip"`` for more (their defects already vary; 8 views would cost 8x the matching)."""
        if self.support_augment == "auto":   # (a method that stacks support grids gets flips: rotations transpose them)
            return "dihedral" if n_supports == 1 and not getattr(self.method, "stacks_supports", False) else "flip"
        return self.support_augment

    @property
    def query_views(self) -> str:
        """The query views in use: ``query_augment``, where ``"auto"`` is ``"flip"`` after fitting a
        single support (a one-support bank gives noisy best matches, which averaging the query's flipped
        views steadies) and ``"none"`` otherwise."""
        if self.query_augment == "auto":
            return "flip" if self.n_supports == 1 else "none"
        return self.query_augment

    def _augmented(self, supports: list[Support], images, keys: list, views: str) -> list[Support]:
        """Flipped / rotated copies of the supports (their own backbone passes, cached per file and view)."""
        ops = AUGMENTATIONS[views]
        out = []
        for i, s in enumerate(supports):
            vkeys = [None if keys[i] is None else (*keys[i], "view", j) for j in range(len(ops))]
            hits = [self.cache.get(k) for k in vkeys]
            if all(h is not None for h in hits):
                feats = [h[0] for h in hits]
            else:
                rgb = s.image if s.image is not None else self.load(images[i], _name(images[i], i, "support image"))
                feats = self.extractor.batch([np.ascontiguousarray(op(rgb)) for op in ops])
                for k, f in zip(vkeys, feats):
                    self.cache.put(k, f, tuple(f.shape[-2:]))
            for op, f in zip(ops, feats):
                m = np.ascontiguousarray(op(s.mask))
                out.append(Support(None, m, f, mask_coverage(m, tuple(f.shape[-2:])).to(f.device)))
        return out

    # -- loading + features (shared by fit and predict) ------------------------
    def _needs_image(self) -> bool:
        return (self.extractor is None or getattr(self.method, "needs_image", False) or self.refiner is not None
                or self.colour is not None or self.query_views != "none")

    @property
    def decision_threshold(self) -> float:
        """The margin above which a pixel is proposed as defect: ``threshold``, lowered by the colour
        rule's slack when a single support was fitted and the rule is in effect (it trims what the
        looser matching adds; with one support the matching misses most, with five it does not)."""
        if self.colour is not None and self.colour.active and self.n_supports == 1:
            return self.threshold - self.colour.slack
        return self.threshold

    @property
    def refines(self) -> bool:
        """Whether predicted masks go through a refinement (a proposer or the colour rule)."""
        return self.refiner is not None or self.colour is not None

    def _load(self, image: ImageLike, name: str):
        """-> [rgb or None, features or None, (H, W), cache key]; a cached file is not decoded."""
        key = None
        if isinstance(image, (str, Path)) and self.extractor is not None:
            fk = file_key(image)
            key = None if fk is None else (fk, self._feature_tag)
        hit = self.cache.get(key)
        if hit is not None and not self._needs_image():
            return [None, hit[0], hit[1], key]
        rgb = self.load(image, name)
        return [rgb, hit[0] if hit else None, rgb.shape[:2], key]

    def _rekey(self, item: list, image: ImageLike, name: str) -> list:
        """``item`` under the current feature tag (after a zoom change), keeping its decoded image."""
        if item[0] is None:                       # features came from the cache: look up the new tag
            return self._load(image, name)
        key = None if item[3] is None else (item[3][0], self._feature_tag)
        hit = self.cache.get(key)
        return [item[0], hit[0] if hit else None, item[2], key]

    def _ensure_features(self, loaded: list[list]) -> None:
        """Run the backbone (batched) on the loaded items that have no features yet."""
        if self.extractor is None:
            return
        todo = [it for it in loaded if it[1] is None]
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            for it, f in zip(chunk, self.extractor.batch([it[0] for it in chunk])):
                it[1] = f
                self.cache.put(it[3], f, it[2])

    # -- predict ----------------------------------------------------------------
    def _check_fitted(self) -> None:
        if self.n_supports == 0:
            raise RuntimeError("call fit(support_images, support_masks) before predict()")

    @torch.inference_mode()
    def margins(self, image: ImageLike, name: str | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Raw margin grid of one query (on the CPU) and the query's (H, W)."""
        margin, size, _ = self._margins(image, name)
        return margin, size

    def _margins(self, image: ImageLike, name: str | None = None):
        """:meth:`margins` plus the decoded query (None when it was not needed, e.g. cached features)."""
        self._check_fitted()
        item = self._load(image, name or _name(image, 0, "query image"))
        self._ensure_features([item])
        return self._score(item).float().cpu(), item[2], item[0]

    def _score(self, item: list) -> torch.Tensor:
        """The method's margin grid for one loaded query; with ``query_augment`` the mean of the
        margins of the query and its flipped views, each flipped back onto the query's grid."""
        margin = self.method.score(Query(item[0], item[1]))
        views = QUERY_VIEWS[self.query_views]
        if not views or self.extractor is None:
            return margin
        imgs = [np.ascontiguousarray(op(item[0])) for op, _ in views]
        total = margin.float()
        for im, f, (_, dims) in zip(imgs, self.extractor.batch(imgs), views):
            m = self.method.score(Query(im, f)).float()
            if m.shape != margin.shape:      # a view whose grid rounds differently: back onto the query's grid
                m = F.interpolate(m[None, None], size=tuple(margin.shape), mode="bilinear", align_corners=False)[0, 0]
            total = total + torch.flip(m, dims)
        return (total / (1 + len(views))).to(margin.dtype)

    def _finish(self, margin: torch.Tensor, size: tuple[int, int], source: str,
                image: np.ndarray | None = None) -> Prediction:
        full = upsample_scores(margin.float(), size)
        t = self.decision_threshold
        mask_t = full > t
        score = torch.sigmoid((full - t) / self.method.temperature)
        mask = mask_t.cpu().numpy()
        if self.refines:
            mask = self.refine_mask(image, mask)
            # keep the score map consistent with the refined mask (0.5 = decision boundary)
            s = score.cpu().numpy()
            score = torch.from_numpy(np.where(mask, np.maximum(s, 0.5 + 1e-3), np.minimum(s, 0.5 - 1e-3)))
        return Prediction(mask, score.cpu().numpy().astype(np.float32, copy=False), margin.float().cpu().numpy(),
                          source, connected_boxes(mask), image)

    def predict(self, images: ImageLike | Sequence[ImageLike]) -> Prediction | list[Prediction]:
        """One query -> :class:`Prediction`; a list of queries -> a list."""
        if isinstance(images, (list, tuple)):
            return list(self.predict_iter(images))
        return next(self.predict_iter([images]))

    def predict_iter(self, images: Iterable[ImageLike]) -> Iterator[Prediction]:
        """Stream predictions for any iterable of queries, in order (raises on a bad query)."""
        for _, res in self.predict_stream(images):
            if isinstance(res, BaseException):
                raise res
            yield res

    @torch.inference_mode()
    def predict_stream(self, images: Iterable[ImageLike]) -> Iterator[tuple[str, Prediction | FdsegError]]:
        """Like :meth:`predict_iter`, but a bad query yields ``(name, error)`` and the stream goes on.

        Queries are decoded by ``loader_threads`` threads while earlier ones are being
        computed, and run through the backbone ``batch_size`` at a time."""
        self._check_fitted()
        ahead = 2 * self.batch_size
        src = iter(enumerate(images))
        with ThreadPoolExecutor(self.loader_threads, thread_name_prefix="fdseg-load") as pool:
            pending: deque = deque()

            def refill() -> None:
                while len(pending) < ahead:
                    try:
                        i, im = next(src)
                    except StopIteration:
                        return
                    name = _name(im, i, "query image")
                    pending.append((name, pool.submit(self._load, im, name)))

            refill()
            while pending:
                batch = []
                while pending and len(batch) < self.batch_size:
                    name, fut = pending.popleft()
                    try:
                        batch.append((name, fut.result()))
                    except FdsegError as e:
                        batch.append((name, e))
                refill()
                ok = [it for _, it in batch if not isinstance(it, BaseException)]
                self._ensure_features(ok)
                for name, it in batch:
                    if isinstance(it, BaseException):
                        yield name, it
                        continue
                    margin = self._score(it)
                    yield name, self._finish(margin, it[2], name, it[0])

    def refine_mask(self, image: ImageLike | np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``mask`` refined with this segmenter's proposer, then trimmed by the support colour
        rule (unchanged without either)."""
        if not self.refines:
            return mask
        rgb = image if isinstance(image, np.ndarray) else self.load(image)
        if self.refiner is not None:
            mask = self.refiner(rgb, mask)
        if self.colour is not None:
            mask = self.colour(rgb, mask)
        return mask

    def describe(self) -> dict:
        return {**self.settings, "device": str(self.device), "supports": self.n_supports,
                **({"support_views": self.support_views(self.n_supports), "query_views": self.query_views}
                   if self.n_supports else {}),
                "zoom_in_use": self.preprocess.zoom,
                **({"matching": self.method.describe()} if self.n_supports else {})}

    def to(self, device: str) -> "FewShotSegmenter":
        """Move the backbone and the fitted support state to ``device`` (cpu, cuda, auto); returns self.

        A segmenter fitted on one device (or unpickled on another machine) predicts on another."""
        self.device = torch.device(_pick_device(device))
        if self.extractor is not None:
            self.extractor.device = self.device
            self.extractor.backbone.to(self.device)
        if hasattr(self.method, "to"):
            self.method.to(self.device)
        else:
            for k, v in vars(self.method).items():
                if isinstance(v, (torch.Tensor, torch.nn.Module)):
                    setattr(self.method, k, v.to(self.device))
        return self


ZOOM_BELOW_CELLS = 2.0


def choose_zoom(masks: list[np.ndarray], pre: Preprocess, stride: int) -> int:
    """The ``auto`` zoom rule: 2 when the supports' defects are small for the grid (the median
    connected component, as a square, is less than ``ZOOM_BELOW_CELLS`` grid cells on a side at
    zoom 1) and some support image has the pixels for it (long side >= 4 x the input size);
    else 1. Small defects then cover 4x the cells, at 4x the cells per image (16x the matching)."""
    from scipy import ndimage
    base = dataclasses.replace(pre, zoom=1)
    sides, room = [], False
    for m in masks:
        h, w = m.shape
        room |= max(h, w) >= 4 * pre.size
        H, W = base.input_size(h, w)
        px = base.cell(H, W, stride) * max(h, w) / max(H, W)     # image pixels per grid cell
        lab, n = ndimage.label(m, structure=np.ones((3, 3), bool))
        if n:
            sides.extend(np.sqrt(np.bincount(lab.ravel())[1:]) / px)
    return 2 if room and sides and float(np.median(sides)) < ZOOM_BELOW_CELLS else 1


# test-time views of a query: (image op, grid dims that flip its margins back)
QUERY_VIEWS = {
    "none": [],
    "flip": [(lambda a: a[:, ::-1], [-1]), (lambda a: a[::-1], [-2])],
}

AUGMENTATIONS = {
    "none": [],
    "flip": [lambda a: a[:, ::-1], lambda a: a[::-1]],
    "dihedral": [lambda a: a[:, ::-1], lambda a: a[::-1], lambda a: a[::-1, ::-1], lambda a: np.rot90(a, 1),
                 lambda a: np.rot90(a, 3), lambda a: np.rot90(a, 1)[::-1], lambda a: np.rot90(a, 1)[:, ::-1]],
}


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device", "CUDA was asked for but torch sees no GPU")
    return device
