"""FewShotSegmenter: build once, ``fit`` on the supports once, ``predict`` many queries.

    seg = FewShotSegmenter()                          # or FewShotSegmenter(preset="fast")
    seg.fit([support_image], [support_mask])          # arrays or paths
    print(seg.plan)                                   # what each step decided, and why
    pred = seg.predict(query_image)                   # -> Prediction
    pred.mask, pred.score, pred.boxes

A segmenter is a built :class:`Model` (networks and settings: read-only, shared) plus the small
:class:`FittedState` of its last fit (the plan, the fitted matcher, the fitted post steps). ``spawn()``
gives another segmenter on the same model (a server's sessions, threads); ``state`` pickles on its own.
The steps themselves live in :mod:`fdseg.pipeline`.
"""
from __future__ import annotations

import copy
import dataclasses
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from .backbones import create_backbone
from .data.images import DEFAULT_MAX_PIXELS, ImageLike, check_support_mask, load_image, load_mask
from .data.preprocess import Preprocess, mask_coverage
from .errors import FdsegError, InputError
from .feature_cache import FeatureCache, file_key
from .features import FeatureConfig, FeatureExtractor, as_grid
from .hardware import resolve_precision
from .methods import Method, Query, Support, create_method
from .pipeline import (AUGMENTATIONS, QUERY_VIEWS, ColourStep, Decision, Plan, Post, Prediction, QueryViews, SupportViews,
                       ThresholdStep, ZoomStep, choose_zoom, connected_boxes, finish, merge_views, view_images)
from .pipeline.post import OkGate
from .pipeline.zoom import ZOOM_BELOW_CELLS
from .presets import DEFAULTS, resolve

COLOUR_TAU = DEFAULTS["colour_refine"]   # default of the support colour rule (fdseg.refine.colour); 0 = off

__all__ = ["AUGMENTATIONS", "COLOUR_TAU", "FewShotSegmenter", "FittedState", "Model", "Prediction", "QUERY_VIEWS",
           "ZOOM_BELOW_CELLS", "choose_zoom", "connected_boxes"]


def _name(x: ImageLike, i: int, what: str) -> str:
    return str(x) if isinstance(x, (str, Path)) else f"{what} {i + 1}"


def support_lists(images, masks) -> tuple[list, list]:
    """``fit``'s supports as two equally long, non-empty lists (one image and mask may come bare)."""
    if not isinstance(images, (list, tuple)):
        images, masks = [images], [masks]
    if not isinstance(masks, (list, tuple)) or len(images) != len(masks):
        raise InputError("supports", f"need one mask per support image, got {len(images)} images "
                                     f"and {len(masks) if isinstance(masks, (list, tuple)) else 1} masks")
    if not images:
        raise InputError("supports", "need at least one support image with its mask")
    return list(images), list(masks)


def method_to(meth, dev: torch.device) -> None:
    """A fitted matcher onto ``dev``: its own ``to``, else every tensor / module attribute moved."""
    if hasattr(meth, "to"):
        meth.to(dev)
        return
    for k, v in vars(meth).items():
        if isinstance(v, (torch.Tensor, torch.nn.Module)):
            setattr(meth, k, v.to(dev))


def prefetch_batches(images: Iterable[ImageLike], load, batch_size: int,
                     threads: int) -> Iterator[list[tuple[str, ImageLike, Any]]]:
    """The queries decoded by ``load(image, name)`` on ``threads`` threads, two batches ahead of the one
    being computed, in batches of ``batch_size``: ``(name, image, loaded item or the FdsegError it
    raised)`` in input order (every predict_stream's loop: the segmenter's, the cascade's, the types')."""
    src = iter(enumerate(images))
    with ThreadPoolExecutor(threads, thread_name_prefix="fdseg-load") as pool:
        pending: deque = deque()

        def refill() -> None:
            while len(pending) < 2 * batch_size:
                try:
                    i, im = next(src)
                except StopIteration:
                    return
                name = _name(im, i, "query image")
                pending.append((name, im, pool.submit(load, im, name)))

        refill()
        while pending:
            batch = []
            while pending and len(batch) < batch_size:
                name, im, fut = pending.popleft()
                try:
                    batch.append((name, im, fut.result()))
                except FdsegError as e:
                    batch.append((name, im, e))
            refill()
            yield batch



@dataclass
class Model:
    """What building a segmenter makes once: the settings, the backbone's feature extractor, the
    matcher as built (unfitted), the proposer, the pipeline's steps and the feature cache. Segmenters
    spawned from one another share it; nothing in it changes when they fit or predict."""

    settings: dict
    device: torch.device
    preprocess: Preprocess              # zoom 1; a fit's plan holds the preprocessing in use
    extractor: FeatureExtractor | None
    method: Method                      # unfitted: each fit fits a shallow copy (networks shared)
    zoom: ZoomStep
    support_views: SupportViews
    query_views: QueryViews
    colour: ColourStep
    threshold: ThresholdStep
    refiner: Any
    cache: FeatureCache
    max_pixels: int
    batch_size: int
    loader_threads: int
    ok_gate: OkGate = OkGate("auto")
    precision: Decision = Decision("precision", "fp32", "precision=fp32")   # the numeric path and why

    def rules(self) -> dict:
        """The settings and rule constants a fit's plan depends on (what a bench run key stores)."""
        from .methods.registry import method_entry
        out = {**self.settings}
        for step in (self.zoom, self.support_views, self.query_views, self.colour, self.threshold):
            out.update(step.config())
        out["method_defaults"] = _method_defaults(self.settings["method"], method_entry)
        return out


def _method_defaults(method: str, method_entry) -> dict:
    import inspect
    try:
        sig = inspect.signature(method_entry(method).factory.__init__)
    except Exception:  # an unknown method fails later with its own message
        return {}
    return {n: p.default for n, p in sig.parameters.items()
            if p.default is not inspect.Parameter.empty and isinstance(p.default, (int, float, str, bool, type(None)))}


@dataclass
class FittedState:
    """What one fit leaves: the plan, the fitted matcher (the support bank) and the fitted post steps.
    Small and picklable; ``FewShotSegmenter.spawn(state)`` predicts with it on a shared model."""

    plan: Plan
    method: Method
    post: Post
    extractor: FeatureExtractor | None   # the model's, seen with the plan's preprocessing
    feature_tag: str
    colour: Any = None                   # the fitted colour rule, in effect or not (None when off)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["extractor"] = None            # networks stay with the model; restored by spawn()
        return d


class FewShotSegmenter:
    """Few-shot defect segmenter.

    Parameters
    ----------
    backbone, method:
        registry names (``fdseg.list_backbones()``, ``fdseg.list_methods()``).
    preset:
        ``"accurate"`` (default), ``"fast"`` or ``"paper"`` (:mod:`fdseg.presets`): the settings below
        marked *(preset)*; any of them given explicitly (not None) overrides the preset's.
    input_size, resize (preset), tile_scale, tile_overlap, antialias:
        preprocessing (:class:`fdseg.data.preprocess.Preprocess`). ``resize="auto"``: an image whose
        long side is at least 2 x ``input_size`` is seen aspect-kept at 2 x ``input_size`` with a 2 x
        coarser grid cell; smaller ones are squeezed to ``input_size`` squared, as the paper does for all
        (``resize="resize"`` = the paper).
    feature_stride, local_avg:
        feature grid (:class:`fdseg.features.FeatureConfig`); stride 4 = 64 x 64 cells at 256.
    threshold (preset):
        margin above which a pixel is defect (0 = the paper's argmax).
    weights:
        backbone weights path (None = the backbone's shipped or default weights).
    cache_size:
        feature grids of up to this many image files kept (LRU) so a file seen again
        is not decoded or run through the backbone again (0 = off).
    batch_size, loader_threads:
        queries run through the backbone together in batches; images are decoded by a
        small thread pool ahead of the compute.
    support_augment (preset):
        ``"auto"``: ``"dihedral"`` for a single support, ``"flip"`` for more; ``"flip"``: each support
        also seen flipped left-right and up-down (3x the bank); ``"dihedral"``: all 8 rotated / flipped
        views; ``"none"``: the paper's bank.
    query_augment (preset):
        ``"auto"``: ``"flip"`` after fitting a single support, ``"none"`` after more; ``"flip"``: each
        query is also matched flipped left-right and up-down and the three margin grids (flipped back)
        averaged (3x the matching); ``"none"``: the query as it is.
    zoom (preset):
        ``"auto"`` (with ``resize="auto"``): when the supports' defects are under 2 grid cells across
        (median connected component) and the images have a long side of at least 4 x ``input_size``, the
        supports and queries are seen at 4 x ``input_size`` with the same cell; ``1``: never; ``2``: always.
    refine, refine_options:
        region proposer (``fdseg.refine.list_proposers()``: superpixel, fastsam, sam2_auto) whose
        candidates refine each predicted mask with the paper's fusion rules (:mod:`fdseg.refine.fusion`).
    colour_refine (preset), colour_options (preset):
        ``tau`` of the support colour rule (:mod:`fdseg.refine.colour`; 0 = off) and its other
        :class:`fdseg.refine.colour.ColourModel` settings (e.g. ``{"slack": 0}``).
    method_options (preset):
        the matcher's options (e.g. ``{"head": 0}`` for fm).
    precision:
        the numeric path of the backbone and the matching: ``"fp32"``, ``"bf16"`` or ``"auto"`` (bf16
        where the hardware runs it fast: AVX-512 BF16 / AMX CPUs, GPUs); None: ``$FDSEG_PRECISION``,
        else auto. The two paths' masks differ slightly (BENCHMARKS.md, *Precision*); the plan names
        the one in use. A matcher's own ``precision`` option (fm) overrides it for the matching.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", method: str = "fm", *,
                 preset: str | None = None, input_size: int = 256, resize: str | None = None,
                 tile_scale: float = 1.0, tile_overlap: int = 64, antialias: bool = False,
                 feature_stride: int = 4, local_avg: int = 1, threshold: float | None = None,
                 device: str = "cpu", weights: str | Path | None = None, backbone_options: dict | None = None,
                 method_options: dict | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 cache_size: int = 0, batch_size: int = 4, loader_threads: int = 2,
                 support_augment: str | None = None, refine: str | None = None, refine_options: dict | None = None,
                 zoom: str | int | None = None, colour_refine: float | None = None,
                 colour_options: dict | None = None, query_augment: str | None = None, ok_gate: str = "auto",
                 precision: str | None = None):
        p = resolve(preset, dict(resize=resize, zoom=zoom, support_augment=support_augment,
                                 query_augment=query_augment, colour_refine=colour_refine,
                                 colour_options=colour_options, method_options=method_options, threshold=threshold))
        zoom_setting = p["zoom"]
        if zoom_setting not in ("auto", 1, 2, "1", "2"):
            raise InputError("zoom", f"choose auto, 1 or 2, got {zoom_setting!r}")
        zoom_setting = zoom_setting if zoom_setting == "auto" else int(zoom_setting)
        settings = dict(preset=preset or "accurate", backbone=backbone, method=method, input_size=input_size,
                        resize=p["resize"], tile_scale=tile_scale, tile_overlap=tile_overlap, antialias=antialias,
                        feature_stride=feature_stride, local_avg=local_avg, threshold=float(p["threshold"]),
                        weights=None if weights is None else str(weights),
                        backbone_options=dict(backbone_options or {}),
                        method_options=dict(p["method_options"] or {}),
                        support_augment=p["support_augment"], query_augment=p["query_augment"],
                        zoom=zoom_setting, colour_refine=float(p["colour_refine"] or 0))
        if p["colour_options"]:
            settings["colour_options"] = dict(p["colour_options"])
        gate = OkGate(ok_gate)
        if gate.mode != "off":         # (a bench run's key holds the settings; "off", the default before
            #                            the gate, is not written, so runs without a gate keep their keys)
            settings["ok_gate"] = gate.mode
        dev = torch.device(_pick_device(device))
        path, path_why = resolve_precision(precision, dev)
        settings["precision"] = path
        pre = Preprocess(mode=p["resize"], size=input_size, scale=tile_scale, overlap=tile_overlap,
                         antialias=antialias, zoom=1 if zoom_setting == "auto" else zoom_setting)
        meth = create_method(method, **_with_precision(method, settings["method_options"], path))
        extractor = None
        if getattr(meth, "uses_features", True):
            bb = create_backbone(backbone, weights=weights, **(backbone_options or {}))
            extractor = FeatureExtractor(bb, pre, FeatureConfig(feature_stride, local_avg), dev,
                                         amp=path == "bf16")
        if hasattr(meth, "to"):
            meth.to(dev)
        refiner = None
        if refine and refine != "none":
            from .refine import Refiner
            refiner = Refiner(refine, refine_options, device=str(dev))
            settings.update(refine=refine, refine_options=dict(refine_options or {}))
        self.model = Model(
            settings=settings, device=dev, preprocess=pre, extractor=extractor, method=meth,
            zoom=ZoomStep(zoom_setting), support_views=SupportViews(p["support_augment"]),
            query_views=QueryViews(p["query_augment"]),
            colour=ColourStep(settings["colour_refine"], tuple(sorted((p["colour_options"] or {}).items()))),
            threshold=ThresholdStep(settings["threshold"]), refiner=refiner, cache=FeatureCache(cache_size),
            max_pixels=max_pixels, batch_size=max(1, int(batch_size)), loader_threads=max(1, int(loader_threads)),
            ok_gate=gate, precision=Decision("precision", path, path_why))
        self.state: FittedState | None = None

    def __new__(cls, *args, **kw):
        # preset="line": the cascade (the accurate path behind a first pass, fdseg.cascade), built wherever a
        # FewShotSegmenter is (API, CLI, app, REST, Ray, fdseg.load)
        if cls is FewShotSegmenter and kw.get("preset") == "line":
            from .cascade import CascadeSegmenter
            cls = CascadeSegmenter
        return super().__new__(cls)

    def __setstate__(self, d: dict) -> None:      # unpickled: the state's view of the (new) model's extractor
        self.__dict__.update(d)
        if self.state is not None and self.state.extractor is None:
            self.state.extractor = self._extractor_for(self.state.plan.preprocess)

    # -- model and state ----------------------------------------------------------
    def spawn(self, state: FittedState | None = None) -> "FewShotSegmenter":
        """Another segmenter on this one's model (networks, cache: shared, not copied), unfitted or
        with ``state`` (e.g. an unpickled :attr:`state`)."""
        out = object.__new__(type(self))
        out.model = self.model
        out.state = None
        if state is not None:
            out.state = dataclasses.replace(state, extractor=self._extractor_for(state.plan.preprocess))
        return out

    def _extractor_for(self, pre: Preprocess) -> FeatureExtractor | None:
        ex = self.model.extractor
        if ex is None or ex.preprocess == pre:
            return ex
        view = copy.copy(ex)               # the same backbone, seen with another preprocessing
        view.preprocess = pre
        return view

    def _tag(self, pre: Preprocess) -> str:
        s = self.model.settings
        # what the cached features depend on: segmenters with equal tags may share one cache
        return repr((s["backbone"], s["weights"], sorted(s["backbone_options"].items()), s["feature_stride"],
                     s["local_avg"], pre))

    # compatibility views of the model and the fitted state
    @property
    def settings(self) -> dict:
        return self.model.settings

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def extractor(self) -> FeatureExtractor | None:
        return self.state.extractor if self.state else self.model.extractor

    @property
    def preprocess(self) -> Preprocess:
        return self.state.plan.preprocess if self.state else self.model.preprocess

    @property
    def method(self) -> Method:
        return self.state.method if self.state else self.model.method

    @property
    def cache(self) -> FeatureCache:
        return self.model.cache

    @property
    def threshold(self) -> float:
        return self.model.threshold.threshold

    @property
    def colour(self):
        """The colour rule (fitted once fitted; ``.active``: in effect for these supports); None when off."""
        if self.state:
            return self.state.colour
        return self.model.colour.model() if self.model.colour.tau else None

    @property
    def refiner(self):
        return self.model.refiner

    @property
    def plan(self) -> Plan:
        self._check_fitted()
        return self.state.plan

    @property
    def n_supports(self) -> int:
        return self.state.plan.supports if self.state else 0

    @property
    def batch_size(self) -> int:
        return self.model.batch_size

    @property
    def max_pixels(self) -> int:
        return self.model.max_pixels

    @property
    def decision_threshold(self) -> float:
        """The margin above which a pixel is proposed as defect (the plan's threshold step)."""
        return self.state.plan.threshold if self.state else self.threshold

    @property
    def refines(self) -> bool:
        """Whether predicted masks go through a refinement (a proposer or the colour rule in effect)."""
        return self.state.post.refines if self.state else (self.refiner is not None or bool(self.settings["colour_refine"]))

    @property
    def query_views(self) -> str:
        return self.state.plan["query views"] if self.state else self.model.query_views.setting

    def support_views(self, n_supports: int) -> str:
        """The support views for ``n_supports`` supports."""
        return self.model.support_views.fit(n_supports, getattr(self.method, "stacks_supports", False)).value

    # -- inputs -----------------------------------------------------------------
    @property
    def min_size(self) -> int:
        return self.model.extractor.backbone.min_input_size if self.model.extractor else 1

    def load(self, image: ImageLike, name: str | None = None) -> np.ndarray:
        return load_image(image, max_pixels=self.max_pixels, min_size=self.min_size, name=name)

    # -- fit --------------------------------------------------------------------
    def fit(self, images: ImageLike | Sequence[ImageLike], masks: ImageLike | Sequence[ImageLike], *,
            normals: Sequence[ImageLike] | None = None) -> "FewShotSegmenter":
        """Learn the defect from K support images and their masks (K >= 1); resolves the :attr:`plan`.

        ``normals``: defect-free images of the same product (files or arrays); their cells join the
        matcher's background evidence (the method must take them: fm does). From 25 normals on (5 with
        ``ok_gate="median"``; none with ``ok_gate="off"``) every fifth (at most 10) is held out instead and
        predicted to calibrate the OK gate (:class:`fdseg.pipeline.post.OkGate`)."""
        images, masks = support_lists(images, masks)
        m = self.model
        names = [_name(im, i, "support image") for i, im in enumerate(images)]
        # 1. preprocess: load at zoom 1 (cached features need no decode), then the zoom rule on the masks
        pre = m.preprocess
        ex, tag = self._extractor_for(pre), self._tag(pre)
        loaded = [self._load(im, n, ex, tag, fitting=True) for im, n in zip(images, names)]
        loaded_masks = []
        for i, (mk, it) in enumerate(zip(masks, loaded)):
            mask = load_mask(mk, size=it[2], max_pixels=self.max_pixels, name=_name(mk, i, "support mask"))
            check_support_mask(mask, _name(mk, i, "support mask"))
            loaded_masks.append(mask)
        # the inputs are readable: the previous fit's banks go now, not when this fit ends (a refit
        # would otherwise hold both: +0.4 GB at a zoomed 5-shot fit's peak)
        self.state = None
        decisions = [m.precision] if ex is not None else []
        if ex is not None:
            zoom = m.zoom.fit(loaded_masks, pre, ex.config.stride)
            decisions.append(zoom)
            if zoom.value != pre.zoom:
                pre = dataclasses.replace(pre, zoom=zoom.value)
                ex, tag = self._extractor_for(pre), self._tag(pre)
                loaded = [self._rekey(it, im, n, ex, tag) for it, im, n in zip(loaded, images, names)]
        self._ensure_features(loaded, ex)
        supports = []
        for mask, (rgb, feats, size, key) in zip(loaded_masks, loaded):
            cov = mask_coverage(mask, tuple(feats.shape[-2:])).to(feats.device) if feats is not None else None
            supports.append(Support(rgb, mask, feats, cov))
        n = len(supports)
        # 2. support views
        method = copy.copy(m.method)
        sv = m.support_views.fit(n, getattr(method, "stacks_supports", False))
        if ex is not None:
            decisions.append(sv)
            if sv.value != "none":
                supports += self._augmented(supports, images, [it[3] for it in loaded], sv.value, ex)
        # 3. query views, 4. the matcher on the bank
        qv = m.query_views.fit(n)
        decisions.append(qv if ex is not None else dataclasses.replace(qv, value="none", reason="no feature grid"))
        if normals:
            if isinstance(normals, (str, Path, np.ndarray)):
                raise InputError("normals", "expected a list of images (files or arrays), got a single one")
            normals = list(normals)
            fit_idx, held = m.ok_gate.split(len(normals))
            nd = self._normal_features([normals[i] for i in fit_idx], ex, tag)
            method.fit(supports, normals=nd)
        else:
            method.fit(supports)
        decisions.append(_matcher_decision(method))
        # 5. post steps: colour rule, threshold, proposer
        grids = [tuple(s.features.shape[-2:]) for s in supports[:n]] if ex is not None else None
        colour, cd = m.colour.fit([s.image for s in supports[:n]], [s.mask for s in supports[:n]], grids) \
            if m.colour.tau else (None, m.colour.fit([], [])[1])
        decisions.append(cd)
        th = m.threshold.fit(n, colour)
        decisions.append(th)
        if m.refiner is not None:
            from .pipeline import Decision
            decisions.append(Decision("refine", m.settings["refine"], "set"))
        post = Post(th.value, m.refiner, colour if colour is not None and colour.active else None)
        self.state = FittedState(Plan(n, pre, tuple(decisions)), method, post, ex, tag, colour)
        # 6. the OK gate: the held-out defect-free images predicted like queries (the gate still open)
        if normals and m.ok_gate.mode != "off":
            scores = []
            for i, (_, res) in zip(held, self.predict_stream([normals[i] for i in held])):
                if isinstance(res, BaseException):
                    self.state = None
                    raise InputError(_name(normals[i], i, "normal image"),
                                     f"defect-free image held out for the OK gate: {getattr(res, 'problem', res)}")
                scores.append(res.defect_score)
            post.ok_level, gd = m.ok_gate.fit(scores, len(normals))
            post.ok_components, post.ok_soft = m.ok_gate.per_component, m.ok_gate.soft
            self.state = dataclasses.replace(self.state, plan=Plan(n, pre, tuple(decisions) + (gd,)))
        return self

    def _normal_features(self, normals: Sequence[ImageLike], ex: FeatureExtractor | None, tag: str) -> list[torch.Tensor]:
        """Feature grids of the defect-free images, seen with the plan's preprocessing (cached per file)."""
        if ex is None or not getattr(self.model.method, "takes_normals", False):
            raise InputError("normals", f"method {self.settings['method']!r} does not use defect-free images")
        # with a feature cache: the same files seen the same way as at the last fit give the same grids
        # (the cache keeps compact features, so a rebuilt grid would be a new tensor, and the method's
        # reduction of the normals, remembered per set of grids, would be redone at every fit of a bench)
        keys = [(file_key(im), tag) if isinstance(im, (str, Path)) else None for im in normals]
        memo = getattr(self, "_normals_memo", None)
        if memo is not None and None not in keys and memo[0] == keys:
            return memo[1]
        out = []
        for i in range(0, len(normals), self.batch_size):
            chunk = [self._load(im, _name(im, i + j, "normal image"), ex, tag, fitting=True)
                     for j, im in enumerate(normals[i:i + self.batch_size])]
            self._ensure_features(chunk, ex)
            out.extend(it[1] for it in chunk)
        self._normals_memo = (keys, out) if None not in keys and self.cache.max_items > 0 else None
        return out

    def _augmented(self, supports: list[Support], images, keys: list, views: str,
                   ex: FeatureExtractor) -> list[Support]:
        """Flipped / rotated copies of the supports (their own backbone passes, cached per file and view)."""
        ops = SupportViews.ops(views)
        out = []
        for i, s in enumerate(supports):
            vkeys = [None if keys[i] is None else (*keys[i], "view", j) for j in range(len(ops))]
            hits = [self.cache.get(k) for k in vkeys]
            if all(h is not None for h in hits):
                feats = [as_grid(h[0]) for h in hits]
            else:
                rgb = s.image if s.image is not None else self.load(images[i], _name(images[i], i, "support image"))
                compact = ex.batch_maps([np.ascontiguousarray(op(rgb)) for op in ops])
                feats = [as_grid(c) for c in compact]
                for k, c, f in zip(vkeys, compact, feats):
                    self.cache.put(k, c, tuple(f.shape[-2:]))
            for op, f in zip(ops, feats):
                mk = np.ascontiguousarray(op(s.mask))
                out.append(Support(None, mk, f, mask_coverage(mk, tuple(f.shape[-2:])).to(f.device)))
        return out

    # -- loading + features (shared by fit and predict) ------------------------
    def _needs_image(self, fitting: bool = False) -> bool:
        """Whether a query (or, ``fitting``, a support) must be decoded even when its features are cached."""
        if self.model.extractor is None or getattr(self.model.method, "needs_image", False):
            return True
        if fitting:                  # the colour rule fits on the support images
            return self.model.refiner is not None or bool(self.model.colour.tau)
        return self.state.post.refines or self.query_views != "none"

    def _load(self, image: ImageLike, name: str, ex: FeatureExtractor | None = None, tag: str | None = None,
              fitting: bool = False):
        """-> [rgb or None, features or None, (H, W), cache key]; a cached file is not decoded."""
        ex = ex if ex is not None else self.extractor
        key = None
        if isinstance(image, (str, Path)) and ex is not None:
            fk = file_key(image)
            key = None if fk is None else (fk, tag or self.state.feature_tag)
        hit = self.cache.get(key)
        if hit is not None and not self._needs_image(fitting):
            return [None, as_grid(hit[0]), hit[1], key]
        rgb = self.load(image, name)
        return [rgb, as_grid(hit[0]) if hit else None, rgb.shape[:2], key]

    def _rekey(self, item: list, image: ImageLike, name: str, ex: FeatureExtractor, tag: str) -> list:
        """``item`` under another feature tag (after a zoom change), keeping its decoded image."""
        if item[0] is None:                       # features came from the cache: look up the new tag
            return self._load(image, name, ex, tag, fitting=True)
        key = None if item[3] is None else (item[3][0], tag)
        hit = self.cache.get(key)
        return [item[0], as_grid(hit[0]) if hit else None, item[2], key]

    def _ensure_features(self, loaded: list[list], ex: FeatureExtractor | None = None) -> None:
        """Run the backbone (batched) on the loaded items that have no features yet."""
        ex = ex if ex is not None else self.extractor
        if ex is None:
            return
        todo = [it for it in loaded if it[1] is None]
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            for it, c in zip(chunk, ex.batch_maps([it[0] for it in chunk])):
                it[1] = as_grid(c)
                self.cache.put(it[3], c, it[2])        # the compact form: ~1/18 of the grid's bytes

    # -- predict ----------------------------------------------------------------
    def _check_fitted(self) -> None:
        if self.state is None:
            raise RuntimeError("call fit(support_images, support_masks) before predict()")

    @torch.inference_mode()
    def margins(self, image: ImageLike, name: str | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Raw margin grid of one query (on the CPU) and the query's (H, W)."""
        self._check_fitted()
        item = self._load(image, name or _name(image, 0, "query image"))
        self._ensure_features([item])
        return self._score(item).float().cpu(), item[2]

    def _score(self, item: list, exact: bool = True) -> torch.Tensor:
        """The matcher's margin grid for one loaded query, merged with the plan's query views.

        ``exact=False`` (predict): a method with ``score_views`` matches exactly only the cells that
        can change the mask at this fit's threshold, and the grid's maximum (see
        :meth:`fdseg.methods.fm.FeatureMatching.score_views`); the mask and the defect score are the
        exact ones, the other cells' margins upper bounds below the threshold."""
        method = self.state.method
        views = self.query_views if self.extractor is not None else "none"
        imgs = view_images(item[0], views) if views != "none" else []
        feats = self.extractor.batch(imgs) if imgs else []       # no extractor: no views (e.g. SAM2 tracking)
        queries = [Query(item[0], item[1])] + [Query(im, f) for im, f in zip(imgs, feats)]
        if not exact and hasattr(method, "score_views"):
            flips = [[]] + [list(dims) for _, dims in QUERY_VIEWS[views]]
            return method.score_views(queries, flips, exact_above=float(self.state.post.threshold))
        margin = method.score(queries[0])
        return merge_views(margin, [method.score(q) for q in queries[1:]], views) if imgs else margin

    def predict(self, images: ImageLike | Sequence[ImageLike], *,
                size: tuple[int, int] | None = None) -> Prediction | list[Prediction]:
        """One query -> :class:`Prediction`; a list of queries -> a list. ``size`` (H, W): masks at that
        size instead of each query's own (the bench evaluates at 256 x 256)."""
        if isinstance(images, (list, tuple)):
            return list(self.predict_iter(images, size=size))
        return next(self.predict_iter([images], size=size))

    def predict_iter(self, images: Iterable[ImageLike], *, size: tuple[int, int] | None = None) -> Iterator[Prediction]:
        """Stream predictions for any iterable of queries, in order (raises on a bad query)."""
        for _, res in self.predict_stream(images, size=size):
            if isinstance(res, BaseException):
                raise res
            yield res

    @torch.inference_mode()
    def predict_stream(self, images: Iterable[ImageLike], *,
                       size: tuple[int, int] | None = None) -> Iterator[tuple[str, Prediction | FdsegError]]:
        """Like :meth:`predict_iter`, but a bad query yields ``(name, error)`` and the stream goes on.

        Queries are decoded by ``loader_threads`` threads while earlier ones are being
        computed, and run through the backbone ``batch_size`` at a time."""
        self._check_fitted()
        for batch in prefetch_batches(images, self._load, self.batch_size, self.model.loader_threads):
            self._ensure_features([it for _, _, it in batch if not isinstance(it, BaseException)])
            for name, _, it in batch:
                if isinstance(it, BaseException):
                    yield name, it
                    continue
                yield name, self.finish(self._score(it, exact=False), size or it[2], it[0], name, query_size=it[2])

    def finish(self, margin: torch.Tensor, size: tuple[int, int], image: np.ndarray | None = None,
               source: str = "", query_size: tuple[int, int] | None = None) -> Prediction:
        """Margins -> :class:`Prediction` with this fit's post steps (:func:`fdseg.pipeline.finish`)."""
        self._check_fitted()
        if image is None and self.state.post.refines:
            raise InputError(source or "query", "refinement needs the decoded query image")
        return finish(margin, size, self.state.post, self.state.method.temperature, image=image, source=source,
                      query_size=query_size)

    def refine_mask(self, image: ImageLike | np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``mask`` through this fit's post steps after the threshold (proposer, then colour rule)."""
        self._check_fitted()
        if not self.state.post.refines:
            return mask
        rgb = image if isinstance(image, np.ndarray) else self.load(image)
        return self.state.post.refine(rgb, mask)

    def describe(self) -> dict:
        """Settings, device and, once fitted, the plan (every step's resolved value and reason)."""
        out = {**self.settings, "device": str(self.device), "supports": self.n_supports}
        if self.state:
            out.update(support_views=self.state.plan.get("support views", "none"), query_views=self.query_views,
                       zoom_in_use=self.preprocess.zoom, plan=self.state.plan.as_dict(),
                       explain=str(self.state.plan), matching=self.state.method.describe())
        else:
            out["zoom_in_use"] = self.preprocess.zoom
        return out

    def save(self, path: str | Path, include_supports: bool = False, *,
             supports: Sequence[tuple[ImageLike, ImageLike]] | None = None) -> Path:
        """Write this fitted segmenter to one inspector file (:mod:`fdseg.inspector`; ``fdseg.load(path)``
        gives it back, predicting the same masks). ``include_supports``: also the support images and masks
        (``supports``: the (image, mask) pairs given to fit) as PNGs, so that a later fdseg can refit."""
        from .inspector import save
        return save(self, path, include_supports, supports=supports)

    def to(self, device: str) -> "FewShotSegmenter":
        """Move the model's networks and the fitted support state to ``device`` (cpu, cuda, auto); returns self.

        A segmenter fitted on one device (or unpickled on another machine) predicts on another."""
        dev = torch.device(_pick_device(device))
        self.model.device = dev
        if self.model.extractor is not None:
            self.model.extractor.device = dev
            self.model.extractor.backbone.to(dev)
        for meth in ([self.model.method] + ([self.state.method] if self.state else [])):
            method_to(meth, dev)
        if self.state is not None and self.state.extractor is not None:
            self.state.extractor.device = dev
        return self


def _matcher_decision(method: Method):
    from .pipeline import Decision
    d = method.describe()
    name = d.get("method", getattr(method, "name", type(method).__name__))
    detail = ", ".join(f"{k} {v}" for k, v in d.items() if k != "method")
    return Decision("matcher", name, detail or "fitted")


def _with_precision(method: str, options: dict, path: str) -> dict:
    """The matcher's options with the segmenter's numeric path, where the method takes a ``precision``
    and the options do not set it."""
    from .methods.registry import method_entry
    import inspect
    if "precision" in options:
        return dict(options)
    try:
        takes = "precision" in inspect.signature(method_entry(method).factory.__init__).parameters
    except Exception:       # an unknown method fails in create_method with its own message
        takes = False
    return {**options, "precision": path} if takes else dict(options)


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device", "CUDA was asked for but torch sees no GPU")
    return device
