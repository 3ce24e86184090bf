"""The accurate verdict at line speed: a cheap first pass answers the queries it can prove OK, the accurate
path answers every other one.

    seg = fdseg.FewShotSegmenter(preset="line")      # = CascadeSegmenter(): the accurate path + a first pass
    seg.fit(supports, masks, normals=good_images)    # fits both, then the bound (the plan's "cascade" step)
    pred = seg.predict(query)                        # the accurate path's Prediction (unchanged), or a
    getattr(pred, "stage", "accurate")               # FirstPassPrediction (stage "first pass"): OK, empty mask

**The two passes.** The accurate path is the default (``accurate``) segmenter, unchanged. The first pass
is the default's single-view rules (``fast``: one view of each support and of the query, no zoom) on the
same backbone: one network in memory, and where the accurate plan does not zoom the query's features
from the first pass are the accurate path's own (its first view), so an escalated query pays one
backbone pass less than the first pass and the accurate path apart.

**What the first pass may answer.** A query is answered OK by the first pass (empty mask, verdict OK)
only where its first-pass defect score ``s_f`` (the largest margin minus its threshold) proves that the
accurate path's mask would be empty::

    s_f + delta <= level          level = max(0, L / 2) with the OK gate at level L (``auto``, soft), max(0, L)
                                  with ``ok_gate="median"``, 0 without a gate

The accurate mask is ``upsampled margin > threshold`` (bilinear: no pixel above the grid's largest
margin), the colour rule and the gate only remove pixels, and the soft gate removes every component
whose peak is at most ``L / 2``: a query whose accurate defect score ``s_a`` is at most ``level`` has an
empty mask, so verdict OK. ``delta`` bounds ``s_a - s_f`` and is fitted per fit (:func:`fit_delta`):

* from the defect-free images held out of the fit for the OK gate (>= 25 normals: every fifth, at most
  10): both passes predict them at fit time anyway; their pairs ``s_a - s_f``;
* else, from 2 supports on, from the supports themselves: each support left out of a fit of both passes
  on the others and predicted by both, two pairs per support (the whole image, and the cells away from
  its defect: good surface of the product);
* else (one support, fewer than 25 normals): no bound; every query goes through the accurate path.

``delta`` is the larger of the largest pair and the one-sided 99.9 % upper prediction bound of a new
pair (Student t: ``mean + t(0.999, n - 1) * sd * sqrt(1 + 1 / n)``): the stated safety margin. It
holds for a new query to the extent that the pairs are like it (the plan says how many there were).
With ``cascade="auto"`` (the default) the first pass runs only where the share of the fit's good references
(the held-out normals, or the left-out supports' good surface) that the bound answers is at least twice
the first pass's cost (its time per image as a share of the accurate path's, timed on those images at the
fit); ``"on"``: wherever a bound is fitted; ``"off"``: never.

An escalated query's prediction is the accurate path's, unchanged (the same code on the same features:
masks byte-identical to the accurate path alone, ``tests/test_cascade.py``). docs/cascade.md has the
measurements (how tight the bound is, the stream benchmark).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from .data.images import ImageLike
from .errors import FdsegError, InputError
from .feature_cache import FeatureCache, file_key
from .pipeline import Decision, Plan, Prediction
from .pipeline.finish import ScoreRule
from .pipeline.post import OkGate
from .segmenter import FewShotSegmenter, FittedState, prefetch_batches

__all__ = ["CASCADE_MODES", "CascadeBound", "CascadeSegmenter", "CascadeState", "FirstPassPrediction",
           "PREDICTION_LEVEL", "fit_delta", "provable_level"]

CASCADE_MODES = ("auto", "on", "off")
PREDICTION_LEVEL = 0.999     # the one-sided level of delta's prediction bound (the stated safety margin)
MIN_PAIRS = 3                # fewer pairs: no bound
EPS = 1e-5                   # float rounding of the upsampling (a convex combination may exceed its inputs by an ulp)
AWAY_CELLS = 2               # "away from the defect": cells at least this far from a support's mask


# ------------------------------------------------------------------------------------------------ the bound

def fit_delta(diffs: Sequence[float], level: float | None = None) -> float:
    """The bound on ``s_a - s_f``: the larger of the largest observed pair and the one-sided ``level``
    upper prediction bound of a new pair (Student t on the pairs' mean and sd)."""
    from scipy.stats import t
    level = PREDICTION_LEVEL if level is None else level
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    if n < MIN_PAIRS:
        raise ValueError(f"{n} pairs: at least {MIN_PAIRS} are needed")
    pred = d.mean() + t.ppf(level, n - 1) * d.std(ddof=1) * math.sqrt(1 + 1 / n)
    return float(max(d.max(), pred))


def provable_level(post) -> float:
    """The accurate defect score at or under which the accurate path's mask is empty (module doc)."""
    lvl = post.ok_level
    if lvl is None:
        return 0.0
    if post.ok_components:
        return max(0.0, lvl / 2) if post.ok_soft else 0.0      # all-or-nothing at L: a peak <= L goes, > 0
    return max(0.0, float(lvl))                                 # median gate: a query's score <= L is emptied


@dataclass(frozen=True)
class CascadeBound:
    """A fit's bound: the first pass answers OK where ``s_f + delta <= level`` (and ``active``)."""

    active: bool
    delta: float | None = None
    level: float = 0.0
    source: str = "none"             # "normals" | "supports" | "none"
    pairs: int = 0
    max_pair: float | None = None
    answered: tuple[int, int] = (0, 0)    # of the fit's held-out good images: answered by the bound, all
    reason: str = ""
    diffs: tuple[float, ...] = ()         # the pairs s_a - s_f the bound was fitted on
    held_first: tuple[float, ...] = ()    # the held-out good images' first-pass scores (normals bound)
    cost: float | None = None             # the first pass's time per image / the accurate path's, at the fit

    @property
    def threshold(self) -> float | None:
        """The first-pass score at or under which a query is answered OK."""
        return None if self.delta is None else self.level - self.delta - EPS

    def answers(self, s_first: float) -> bool:
        return self.active and self.delta is not None and s_first <= self.threshold

    def decision(self) -> Decision:
        if not self.active:
            return Decision("cascade", "off", self.reason)
        return Decision("cascade", f"first pass <= {self.threshold:+.3f}", self.reason)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["answered"] = list(self.answered)
        d["diffs"], d["held_first"] = list(self.diffs), list(self.held_first)
        d["threshold"] = self.threshold
        return d


# ------------------------------------------------------------------------------------------- the fitted state

@dataclass
class CascadeState(FittedState):
    """The accurate path's fit (this state's own fields; its plan ends with the ``cascade`` decision),
    the first pass's fit (``first``) and the bound."""

    first: FittedState | None = None
    bound: CascadeBound = field(default_factory=lambda: CascadeBound(False, reason="not fitted"))


def _cascade_state(acc: FittedState, first: FittedState | None, bound: CascadeBound) -> CascadeState:
    fields_ = {f.name: getattr(acc, f.name) for f in dataclasses.fields(FittedState)}
    plan = fields_["plan"]
    decisions = tuple(d for d in plan.decisions if d.step != "cascade") + (bound.decision(),)
    fields_["plan"] = Plan(plan.supports, plan.preprocess, decisions)
    return CascadeState(**fields_, first=first, bound=bound)


@dataclass
class FirstPassPrediction(Prediction):
    """A query the first pass answered OK: empty mask, verdict OK. ``margin_grid`` and ``defect_score``
    are the first pass's; ``accurate_bound``: the bound on the accurate path's defect score (at most the
    level that empties its mask)."""

    stage: str = "first pass"
    accurate_bound: float = 0.0


class _FitCache(FeatureCache):
    """The fit's feature cache (the supports and normals read once by both passes), never holding the
    ``skip`` files (the held-out images whose predictions time the passes)."""

    def __init__(self, max_items: int, skip=()):
        super().__init__(max_items)
        self.skip = {k for k in (file_key(p) for p in skip if isinstance(p, (str, Path))) if k is not None}

    def get(self, key):
        return None if key is not None and key[0] in self.skip else super().get(key)

    def put(self, key, features, size) -> None:
        if key is None or key[0] not in self.skip:
            super().put(key, features, size)


@dataclass(frozen=True)
class _RecordingGate(OkGate):
    """The OK gate, also keeping the held-out images' defect scores it is fitted on."""

    log: list = field(default_factory=list, compare=False, hash=False, repr=False)

    def fit(self, scores, n_normals):
        self.log.append([float(s) for s in scores])
        return super().fit(scores, n_normals)


# ------------------------------------------------------------------------------------------------ the segmenter

def first_pass_settings(settings: dict) -> dict:
    """The first pass's settings: the accurate path's, with the ``fast`` preset's single-view rules."""
    from .presets import preset_settings
    fast = preset_settings("fast")
    colour = {**(fast["colour_options"] or {}), **(settings.get("colour_options") or {})}
    out = {**settings, "preset": "fast", "zoom": fast["zoom"], "support_augment": fast["support_augment"],
           "query_augment": fast["query_augment"]}
    if colour:
        out["colour_options"] = colour
    return out


def _first_model(model):
    """The first pass's model: the accurate model's networks, extractor, matcher and cache, with the
    single-view rules."""
    from .pipeline import ColourStep, QueryViews, SupportViews, ZoomStep
    s = first_pass_settings(model.settings)
    return dataclasses.replace(
        model, settings=s, zoom=ZoomStep(int(s["zoom"])), support_views=SupportViews(s["support_augment"]),
        query_views=QueryViews(s["query_augment"]),
        colour=ColourStep(s["colour_refine"], tuple(sorted((s.get("colour_options") or {}).items()))))


def _view(model, state: FittedState | None = None, timed: bool = False) -> FewShotSegmenter:
    out = object.__new__(_Timed if timed else FewShotSegmenter)
    out.model, out.state = model, state
    return out


def _timing(gen, log: list):
    """``gen``'s items, each one's seconds appended to ``log``."""
    t = time.perf_counter()
    for item in gen:
        log.append(time.perf_counter() - t)
        yield item
        t = time.perf_counter()


class _Timed(FewShotSegmenter):
    """A segmenter view that times its predictions (the fit's held-out images: the passes' costs here)."""

    def predict_stream(self, images, *, size=None):
        return _timing(FewShotSegmenter.predict_stream(self, images, size=size), self.__dict__.setdefault("times", []))


class CascadeSegmenter(FewShotSegmenter):
    """:class:`~fdseg.segmenter.FewShotSegmenter` (the accurate path: its settings, plan, masks) with a
    first pass that answers the queries it proves OK (module doc). ``FewShotSegmenter(preset="line")``
    builds one. ``cascade``: ``"auto"`` (the first pass where it saves more than it costs, module doc),
    ``"on"`` (wherever a bound is fitted) or ``"off"`` (the accurate path alone). ``confidence``: the
    one-sided level of the bound's prediction interval (the stated safety margin; 0.999)."""

    def __init__(self, *args, cascade: str = "auto", confidence: float = PREDICTION_LEVEL, **kw):
        if cascade not in CASCADE_MODES:
            raise InputError("cascade", f"choose {', '.join(CASCADE_MODES)}, got {cascade!r}")
        if not 0.5 <= float(confidence) < 1:
            raise InputError("confidence", f"a one-sided level in [0.5, 1), got {confidence!r}")
        preset = kw.pop("preset", None) or "line"
        if preset not in ("line", "accurate"):
            raise InputError("preset", f"a cascade's second pass is the accurate path: preset line, got {preset!r}")
        super().__init__(*args, preset="line", **kw)
        self.cascade, self.confidence = cascade, float(confidence)
        self.first_model = _first_model(self.model)

    # the state: a plain FittedState set by the loader after an inspector's ``cascade`` section was read
    # becomes the accurate part of the CascadeState that section describes
    @property
    def state(self):
        return self.__dict__.get("_state")

    @state.setter
    def state(self, value) -> None:
        pending = self.__dict__.pop("_cascade_pending", None)
        if pending is not None and value is not None and not isinstance(value, CascadeState):
            value = _cascade_state(value, *pending)
        self.__dict__["_state"] = value

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        st = self.state
        if st is not None and st.extractor is None:
            st.extractor = self._extractor_for(st.plan.preprocess)
        if isinstance(st, CascadeState) and st.first is not None and st.first.extractor is None:
            st.first.extractor = self._extractor_for(st.first.plan.preprocess)

    def spawn(self, state: FittedState | None = None) -> "CascadeSegmenter":
        out = object.__new__(type(self))
        out.model, out.first_model, out.cascade, out.confidence = self.model, self.first_model, self.cascade, \
            self.confidence
        out.state = None
        if state is not None:
            st = dataclasses.replace(state, extractor=self._extractor_for(state.plan.preprocess))
            if isinstance(st, CascadeState) and st.first is not None:
                st = dataclasses.replace(st, first=dataclasses.replace(
                    st.first, extractor=self._extractor_for(st.first.plan.preprocess)))
            out.state = st
        return out

    # -- views ------------------------------------------------------------------------------------------------
    def accurate(self) -> FewShotSegmenter:
        """The accurate path alone (this model and fit; a plain FewShotSegmenter)."""
        st = self.state
        if isinstance(st, CascadeState):
            st = FittedState(*(getattr(st, f.name) for f in dataclasses.fields(FittedState)))
            st.plan = Plan(st.plan.supports, st.plan.preprocess,
                           tuple(d for d in st.plan.decisions if d.step != "cascade"))
        return _view(self.model, st)

    def first_pass(self) -> FewShotSegmenter:
        """The first pass alone (its fit; a plain FewShotSegmenter on the shared backbone)."""
        self._check_fitted()
        return _view(self.first_model, self.state.first)

    @property
    def bound(self) -> CascadeBound | None:
        return self.state.bound if isinstance(self.state, CascadeState) else None

    def _cascading(self) -> bool:
        st = self.state
        return isinstance(st, CascadeState) and st.first is not None and st.bound.active

    # -- fit ----------------------------------------------------------------------------------------------------
    def fit(self, images, masks, *, normals: Sequence[ImageLike] | None = None) -> "CascadeSegmenter":
        """Fit the accurate path (exactly :meth:`FewShotSegmenter.fit`), the first pass on the same supports
        and normals, then the bound (module doc); the plan's last step, ``cascade``, names it."""
        if not isinstance(images, (list, tuple)):
            images, masks = [images], [masks]
        normals = list(normals) if normals is not None and not isinstance(normals, (str, Path, np.ndarray)) \
            else normals
        # the fits of both passes (and the leave-one-out ones) read the supports' and normals' files once: a
        # feature cache for the fit where the model has none (features from it are bit-identical)
        model, first_model = self.model, self.first_model
        held = model.ok_gate.split(len(normals))[1] if normals else []
        cache = _FitCache(len(images) * 9 + len(normals or []) + 8,
                          skip=[normals[i] for i in held])     # the held-out images: timed, never from a cache
        rec_a = _RecordingGate(model.ok_gate.mode)
        self.model = dataclasses.replace(model, ok_gate=rec_a, cache=cache)
        self.__dict__["_fit_times"] = times_a = []        # the held-out images' predictions, timed
        try:
            FewShotSegmenter.fit(self, images, masks, normals=normals)
        finally:
            self.model = model
            self.__dict__.pop("_normals_memo", None)
            self.__dict__.pop("_fit_times", None)
        acc = self.state
        level = provable_level(acc.post)
        off = ("cascade=off" if self.cascade == "off" else
               "no feature grid (the method matches without the backbone)" if model.extractor is None else
               f"the {model.settings.get('refine')} proposer refines the masks (it may add pixels the margins "
               f"do not bound)" if model.refiner is not None else None)
        if off:
            self.state = _cascade_state(acc, None, CascadeBound(False, level=level, reason=f"{off}: every query "
                                                                f"goes through the accurate path"))
            return self
        rec_f = _RecordingGate(first_model.ok_gate.mode)
        fp = _view(dataclasses.replace(first_model, ok_gate=rec_f, cache=cache), timed=True)
        fp.fit(images, masks, normals=normals)
        first = fp.state
        cost = _cost(fp.__dict__.get("times", []), times_a)
        s_a = rec_a.log[-1] if rec_a.log else []
        s_f = rec_f.log[-1] if rec_f.log else []
        if s_a and len(s_a) == len(s_f) and len(s_a) >= MIN_PAIRS:
            bound = self._normals_bound(s_a, s_f, level, len(normals), cost)
        elif len(images) >= 2:
            self.model, self.first_model = dataclasses.replace(model, cache=cache), \
                dataclasses.replace(first_model, cache=cache)
            try:
                bound = self._supports_bound(images, masks, normals, level)
            finally:
                self.model, self.first_model = model, first_model
        else:
            bound = CascadeBound(False, level=level, reason=(
                f"one support and {len(normals or [])} defect-free image(s) (< 25, none held out): nothing to fit "
                f"the bound on; every query goes through the accurate path (give >= 25 defect-free images or "
                f">= 2 supports)"))
        self.state = _cascade_state(acc, first, bound)
        return self

    def _normals_bound(self, s_a, s_f, level: float, n_normals: int, cost: float | None) -> CascadeBound:
        d = np.asarray(s_a) - np.asarray(s_f)
        delta = fit_delta(d, self.confidence)
        answered = int(sum(f + delta <= level - EPS for f in s_f))
        why = (f"{100 * self.confidence:g} % upper prediction bound (Student t; at least the largest) of the "
               f"accurate defect score minus the first pass's on the {len(d)} defect-free images held out of "
               f"{n_normals}: delta {delta:+.3f} (pairs max {d.max():+.3f}, mean {d.mean():+.3f}, sd "
               f"{d.std(ddof=1):.3f}); a query whose first-pass score + delta <= {level:+.3f} (the accurate "
               f"mask is empty at or under it: {_level_why(self.state.post)}) is answered OK by the first "
               f"pass; it answers {answered} of the {len(d)} held-out images")
        active, why = self._worth(answered, len(d), cost, why)
        return CascadeBound(active, delta, level, "normals", len(d), float(d.max()), (answered, len(d)), why,
                            tuple(map(float, d)), tuple(map(float, s_f)), cost)

    def _supports_bound(self, images, masks, normals, level: float) -> CascadeBound:
        """Leave-one-out on the supports: both passes fitted on the others (with the same normals), the
        left-out support predicted by both: its whole image and its cells away from the defect."""
        from .data.images import load_mask
        diffs, away_first = [], []
        acc_v, fp_v = _view(self.model, timed=True), _view(self.first_model, timed=True)
        for i in range(len(images)):
            rest_i = [x for j, x in enumerate(images) if j != i]
            rest_m = [x for j, x in enumerate(masks) if j != i]
            acc_v.fit(rest_i, rest_m, normals=normals)
            fp_v.fit(rest_i, rest_m, normals=normals)
            pa, pf = acc_v.predict(images[i]), fp_v.predict(images[i])
            diffs.append(pa.defect_score - pf.defect_score)
            mk = load_mask(masks[i], size=pa.mask.shape, max_pixels=self.max_pixels)
            aa = _away(pa.margin_grid, mk) - acc_v.decision_threshold
            af = _away(pf.margin_grid, mk) - fp_v.decision_threshold
            if np.isfinite(aa) and np.isfinite(af):
                diffs.append(aa - af)
                away_first.append(af)
        d = np.asarray(diffs)
        if len(d) < MIN_PAIRS:
            return CascadeBound(False, level=level, reason=f"{len(d)} leave-one-out pairs < {MIN_PAIRS}: no bound")
        delta = fit_delta(d, self.confidence)
        answered = int(sum(f + delta <= level - EPS for f in away_first))
        why = (f"{100 * self.confidence:g} % upper prediction bound (Student t; at least the largest) of the "
               f"accurate defect score minus the first pass's on the {len(images)} supports, each left out of "
               f"both fits and predicted ({len(d)} pairs: whole image, and cells >= {AWAY_CELLS} from its "
               f"defect): delta {delta:+.3f} (pairs max {d.max():+.3f}, mean {d.mean():+.3f}, sd "
               f"{d.std(ddof=1):.3f}); a query whose first-pass score + delta <= {level:+.3f} (the accurate "
               f"mask is empty at or under it: {_level_why(self.state.post)}) is answered OK by the first pass; "
               f"it answers the good surface (cells away from the defect) of {answered} of the "
               f"{len(away_first)} left-out supports")
        cost = _cost(fp_v.__dict__.get("times", []), acc_v.__dict__.get("times", []))
        active, why = self._worth(answered, len(away_first), cost, why)
        return CascadeBound(active, delta, level, "supports", len(d), float(d.max()), (answered, len(away_first)),
                            why, tuple(map(float, d)), tuple(map(float, away_first)), cost)

    def _worth(self, answered: int, n: int, cost: float | None, why: str) -> tuple[bool, str]:
        """``cascade="auto"``: run the first pass where the share of the fit's good references it answers is at
        least twice its cost (per image, as a share of the accurate path's, timed at this fit): on a stream of
        good parts like them it then saves at least as much again as it costs (an answered image saves the
        accurate path, every image pays the first pass; the references are few, hence the factor)."""
        share = answered / n if n else 0.0
        if cost is None:
            on = answered > 0
            why += "" if on else ": cascade=auto skips the first pass (it would answer none)"
        else:
            on = share >= 2 * cost
            why += (f" ({share:.0%}; the first pass costs {cost:.0%} of the accurate path per image here, "
                    f"{'at least' if on else 'under'} twice that is answered)"
                    + ("" if on else ": cascade=auto skips the first pass (it would cost more than it saves)"))
        if self.cascade == "on" and not on:
            why += "; cascade=on runs it anyway"
        return self.cascade == "on" or on, why

    # -- predict ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_stream(self, images: Iterable[ImageLike], *,
                       size: tuple[int, int] | None = None) -> Iterator[tuple[str, Prediction | FdsegError]]:
        """As :meth:`FewShotSegmenter.predict_stream`: each query through the first pass, then the ones it
        does not answer through the accurate path (their predictions the accurate path's own)."""
        self._check_fitted()
        if not self._cascading():
            gen = FewShotSegmenter.predict_stream(self, images, size=size)
            log = self.__dict__.get("_fit_times")
            yield from gen if log is None else _timing(gen, log)
            return
        st = self.state
        fp = _view(self.first_model, st.first)
        shared = st.first.plan.preprocess == st.plan.preprocess and st.first.feature_tag == st.feature_tag
        # one image per backbone pass (the CPU): an escalated query's features do not depend on its batch; else
        # (a GPU) the accurate path's batches are those of the accurate path alone, so its features are too
        per_image = st.extractor is None or st.extractor.images_per_pass(2) == 1
        for batch in prefetch_batches(images, fp._load, self.batch_size, self.model.loader_threads):
            fp._ensure_features([it for _, _, it in batch if not isinstance(it, BaseException)])
            out, up = [], []
            for name, im, it in batch:
                if isinstance(it, BaseException):
                    out.append((name, it))
                    continue
                margin = fp._score(it, exact=False)
                s_f = float(margin.max()) - float(st.first.post.threshold) if margin.numel() else float("-inf")
                if st.bound.answers(s_f):
                    out.append((name, self._answer(margin, s_f, size or it[2], it, name, st)))
                    if not per_image and not shared:       # the accurate batch as the accurate path has it
                        up.append(self._accurate_item(it, im, name, st, shared))
                else:
                    item = self._accurate_item(it, im, name, st, shared)
                    up.append(item)
                    out.append((name, item))
            self._ensure_features(up)
            for name, res in out:
                if isinstance(res, list):      # escalated: the accurate path, as predict_stream does it
                    res = self.finish(self._score(res, exact=False), size or res[2], res[0], name,
                                      query_size=res[2])
                yield name, res

    def _accurate_item(self, it: list, image, name: str, st: CascadeState, shared: bool) -> list:
        """The loaded query as the accurate path loads it: the first pass's item where the two see the query
        alike (its decoded image and features), else the decoded image under the accurate path's features."""
        if it[0] is None and self._needs_image():          # features from the cache, not decoded: load it
            return self._load(image, name, st.extractor, st.feature_tag)
        if shared:
            return it
        return self._rekey(it, image, name, st.extractor, st.feature_tag)

    def _answer(self, margin: torch.Tensor, s_f: float, size, it, name: str, st: CascadeState) -> FirstPassPrediction:
        grid = margin.float().cpu().numpy()
        t = float(st.first.post.threshold)
        rule = ScoreRule(tuple(size), t, st.first.method.temperature, False, True)
        return FirstPassPrediction(np.zeros(tuple(size), dtype=bool), grid, name, [], it[0], tuple(it[2]), s_f,
                                   False, 0.0, False, score_rule=rule, accurate_bound=s_f + st.bound.delta)

    # -- the rest ------------------------------------------------------------------------------------------------
    def describe(self) -> dict:
        out = super().describe()
        b = self.bound
        out["cascade"] = b.as_dict() if b is not None else {"active": False, "reason": "not fitted"}
        out["cascade_mode"] = self.cascade
        return out

    def to(self, device: str) -> "CascadeSegmenter":
        super().to(device)
        self.first_model.device = self.model.device
        st = self.state
        firsts = [self.first_model.method] + ([st.first.method] if isinstance(st, CascadeState) and st.first else [])
        for meth in firsts:
            if hasattr(meth, "to"):
                meth.to(self.model.device)
        if isinstance(st, CascadeState) and st.first is not None and st.first.extractor is not None:
            st.first.extractor.device = self.model.device
        return self


def _cost(first_times: list[float], accurate_times: list[float]) -> float | None:
    """The first pass's time per image as a share of the accurate path's (medians; None: not timed)."""
    if not first_times or not accurate_times:
        return None
    return float(np.median(first_times) / max(np.median(accurate_times), 1e-9))


def _level_why(post) -> str:
    if post.ok_level is None:
        return "no OK gate: no pixel above the threshold"
    if post.ok_components and post.ok_soft:
        return f"the OK gate at {post.ok_level:+.3f} removes every component with a peak <= half of it"
    return f"the OK gate at {post.ok_level:+.3f}"


def _away(grid: np.ndarray, mask: np.ndarray) -> float:
    """The largest margin of ``grid`` over its cells at least ``AWAY_CELLS`` cells from ``mask`` (-inf: none)."""
    from scipy import ndimage
    gh, gw = grid.shape
    H, W = mask.shape
    ys = (np.arange(H) * gh // H)
    xs = (np.arange(W) * gw // W)
    cov = np.zeros((gh, gw), dtype=bool)
    yy, xx = np.nonzero(mask)
    cov[ys[yy], xs[xx]] = True
    near = ndimage.binary_dilation(cov, iterations=AWAY_CELLS, structure=np.ones((3, 3), bool)) if cov.any() else cov
    far = ~near
    return float(grid[far].max()) if far.any() else float("-inf")


# --------------------------------------------------------------------------------------- the inspector section

class _Prefixed:
    def __init__(self, tensors, prefix: str):
        self.tensors, self.prefix = tensors, prefix

    def add(self, name: str, value) -> dict:
        return self.tensors.add(self.prefix + name, value)


FIRST_SECTIONS = ("plan", "method", "colour", "post")


def cascade_record(seg, tensors, ctx) -> dict | None:
    """The inspector's ``cascade`` section (None for a segmenter without a cascade): the mode, the bound
    and the first pass's fit (by the plan / method / colour / post sections' own encoders, tensors under
    ``cascade.``)."""
    from .inspector import SECTIONS
    st = getattr(seg, "state", None)
    if not isinstance(st, CascadeState):
        return None
    first = None
    if st.first is not None:
        view = _view(seg.first_model, st.first)
        first = {}
        for name in FIRST_SECTIONS:
            r = SECTIONS[name].to_record(view, _Prefixed(tensors, "cascade."), ctx)
            if r is not None:
                first[name] = r
    b = st.bound
    return {"mode": seg.cascade, "confidence": seg.confidence, "first": first,
            "bound": {"active": b.active, "delta": b.delta, "level": b.level, "source": b.source, "pairs": b.pairs,
                      "max_pair": b.max_pair, "answered": list(b.answered), "reason": b.reason,
                      "diffs": list(b.diffs), "held_first": list(b.held_first), "cost": b.cost}}


def cascade_from_record(rec: dict, ctx) -> None:
    """Read the ``cascade`` section: the segmenter being loaded becomes a :class:`CascadeSegmenter` whose
    state, once the loader sets the accurate fit, is the :class:`CascadeState` the section describes."""
    from .inspector import SECTIONS, _Ctx
    mode, b, first = rec.get("mode"), rec.get("bound"), rec.get("first")
    if mode not in CASCADE_MODES:
        raise ValueError(f"the cascade mode must be one of {', '.join(CASCADE_MODES)}")
    if not isinstance(b, dict):
        raise ValueError("the cascade's bound is missing")
    num = lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))  # noqa: E731
    if not isinstance(b.get("active"), bool) or not num(b.get("delta")) or not num(b.get("max_pair")) \
            or not num(b.get("level")) or b.get("level") is None \
            or b.get("source") not in ("normals", "supports", "none") \
            or type(b.get("pairs")) is not int or not isinstance(b.get("reason"), str) \
            or not (isinstance(b.get("answered"), list) and len(b["answered"]) == 2
                    and all(type(x) is int for x in b["answered"])):
        raise ValueError("the cascade's bound is malformed")
    if b["active"] and (b["delta"] is None or first is None):
        raise ValueError("an active cascade needs its bound and the first pass's fit")
    if not num(b.get("cost")):
        raise ValueError("the cascade's cost must be a number or null")
    for k in ("diffs", "held_first"):
        if not isinstance(b.get(k, []), list) or not all(num(x) and x is not None for x in b.get(k, [])):
            raise ValueError(f"the cascade's bound's {k} must be numbers")
    bound = CascadeBound(b["active"], None if b["delta"] is None else float(b["delta"]), float(b["level"]),
                         b["source"], b["pairs"], None if b["max_pair"] is None else float(b["max_pair"]),
                         tuple(b["answered"]), b["reason"], tuple(map(float, b.get("diffs", []))),
                         tuple(map(float, b.get("held_first", []))),
                         None if b.get("cost") is None else float(b["cost"]))
    seg = ctx.seg
    if not isinstance(seg, CascadeSegmenter):
        seg.__class__ = CascadeSegmenter
        d = seg.__dict__
        d["_state"] = d.pop("state", None)
        seg.first_model = _first_model(seg.model)
    conf = rec.get("confidence", PREDICTION_LEVEL)
    if not isinstance(conf, (int, float)) or isinstance(conf, bool) or not 0.5 <= conf < 1:
        raise ValueError("the cascade's confidence must be a level in [0.5, 1)")
    seg.cascade, seg.confidence = mode, float(conf)
    first_state = None
    if first is not None:
        if not isinstance(first, dict) or not {"plan", "method", "post"} <= set(first) \
                or not set(first) <= set(FIRST_SECTIONS):
            raise ValueError("the first pass's fit must hold plan, method and post sections")
        view = _view(seg.first_model)
        sub = _Ctx(seg=view, settings=seg.first_model.settings, tensors=ctx.tensors, path=ctx.path)
        for name in FIRST_SECTIONS:
            if name in first:
                if not isinstance(first[name], dict):
                    raise ValueError(f"the first pass's {name} section is not a record")
                SECTIONS[name].from_record(first[name], sub)
        plan = sub.plan
        recorded = ctx.settings.get("precision")
        if recorded is not None and recorded != seg.settings["precision"]:
            mp = seg.model.precision
            plan = dataclasses.replace(plan, decisions=tuple(
                Decision(d.step, mp.value, f"{mp.reason}; the inspector was fitted on {recorded}")
                if d.step == "precision" else d for d in plan.decisions))
        if plan.preprocess.size != seg.model.preprocess.size or plan.preprocess.mode != seg.model.preprocess.mode:
            raise ValueError("the first pass's preprocessing does not match the settings")
        first_state = FittedState(plan, sub.method, sub.post, view._extractor_for(plan.preprocess),
                                  view._tag(plan.preprocess), getattr(sub, "colour", None))
    seg.__dict__["_cascade_pending"] = (first_state, bound)
