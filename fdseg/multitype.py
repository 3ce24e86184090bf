"""Several defect types in one inspector: typed supports in, one label per pixel out.

    seg = MultiTypeSegmenter()                                       # the settings of FewShotSegmenter
    seg.fit(images, masks, types=["crack", "blowhole", "crack"])     # one type per support ...
    seg.fit(images, label_masks, types={1: "crack", 2: "blowhole"})  # ... or label masks (0 = good)
    pred = seg.predict(query)                                        # -> TypedPrediction
    pred.labels        # H x W uint8: 0 = good, k = pred.types[k - 1]
    pred.type          # the type of the strongest defect (None: no defect); pred.largest_type
    pred.defects       # [{"type", "box", "area", "score"}, ...], largest first
    pred.areas, pred.verdicts                                        # per type
    pred.mask          # every type's defect pixels (the union); boxes, score, verdict as FewShotSegmenter's

How the types compete (``competition``; docs/defect-types.md has the measurements):

* One single-type fit per type, all on this segmenter's model (one backbone, one feature cache: a
  query goes through the backbone once per preprocessing the types' plans use). Each type's fit is
  today's fit on the supports that show it (its own plan: zoom, views, colour rule, threshold, OK gate),
  its matcher then fitted again with the other types' supports as background (seen with this type's
  preprocessing and support views):
* ``"shared"`` (the default): every cell of the other types' supports (their defects and their good
  surface; beyond ``OTHER_BANK_CELLS``, a uniform sample of them) joins this type's background bank, and its linear head's background gets their defects' cells
  and a sample of ``OTHER_CELLS`` of all their cells. A cell is this type's only where it is closer to
  this type's defects than to any good surface shown *and* to every other type's defects.
* ``"head"``: the bank gets only their defects' cells and the sample (cheaper matching, fewer cells).
* ``"others"``: their defects' cells only.
* ``"independent"``: no competition in the banks (K segmenters side by side).

Then per pixel, among the types whose (finished) mask holds it, the label is the type with the highest
margin above its own threshold (``labelling="pixel"``, the default); ``"component"``: each connected
region of the union takes the type that labels most of its pixels; ``"image"``: the whole union takes
the type with the highest peak. The binary mask is the union of the types' masks, so a fit with one type
is exactly :class:`~fdseg.segmenter.FewShotSegmenter`'s (same masks, margins, verdicts).

The fitted state is a :class:`TypedState` (a :class:`~fdseg.segmenter.FittedState`: the first type's
fit, plus the others): it pickles, ``spawn(state)`` predicts with it, and ``save`` / ``fdseg.load``
round-trip it (the inspector's ``types`` section).
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from .data.images import ImageLike, check_support_mask, image_size, load_mask
from .data.preprocess import mask_coverage, upsample_scores
from .errors import FdsegError, InputError
from .methods import Query, Support
from .pipeline import QUERY_VIEWS, Decision, Prediction, SupportViews, merge_views, view_images
from .pipeline.finish import MIN_CELLS, ScoreRule, mask_box
from .segmenter import FewShotSegmenter, FittedState, _matcher_decision, _name, method_to, prefetch_batches, support_lists

__all__ = ["COMPETITIONS", "DEFAULT_COMPETITION", "DEFAULT_LABELLING", "DEFAULT_TYPE", "LABELLINGS",
           "MultiTypeSegmenter", "TypedPrediction", "TypedState", "combine", "label_png", "legend",
           "load_label_mask", "read_support_dir", "type_colours", "typed_overlay"]

DEFAULT_TYPE = "defect"             # the type name of a fit given no types
COMPETITIONS = ("others", "head", "shared", "independent")
LABELLINGS = ("pixel", "component", "image")
DEFAULT_COMPETITION = "shared"
OTHER_CELLS = 16384                 # "head" / "shared": cells sampled from the other types' supports (all
#                                     their cells, good surface too) for the bank and the linear head
OTHER_BANK_CELLS = 262144           # "shared": the other types' supports' cells in the bank, at most (a
#                                     uniform sample beyond: 5-shot x 5 types at 64 x 64 cells is 245,760;
#                                     zoomed VisA, 6 types, ~824,000: ~0.4 GB more per type without it)
DEFAULT_LABELLING = "pixel"
DEFAULT_GATE = 0.0                  # several types: a region whose peak is below gate x the strongest one's goes

# colours of types 1, 2, ... in overlays and label PNGs (0 = good: black); distinct, colour-blind aware
_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (255, 225, 25),
            (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128)]


# ------------------------------------------------------------------------------------------- the state

@dataclass
class TypedState(FittedState):
    """A multi-type fit: this state's own fields are the first type's fit; ``others`` the fits of the
    types after it (one :class:`FittedState` each, same model). ``rule``: competition and labelling;
    ``support_types``: per support, the names of the types it shows."""

    types: tuple[str, ...] = ()
    others: tuple[FittedState, ...] = ()
    rule: dict = field(default_factory=dict)
    support_types: tuple[tuple[str, ...], ...] = ()

    def type_states(self) -> list[FittedState]:
        """One :class:`FittedState` per type, in :attr:`types` order."""
        first = FittedState(self.plan, self.method, self.post, self.extractor, self.feature_tag, self.colour)
        return [first, *self.others]


def _typed_state(first: FittedState, **kw) -> TypedState:
    return TypedState(**{f.name: getattr(first, f.name) for f in dataclasses.fields(FittedState)}, **kw)


# ------------------------------------------------------------------------------------------ the result

@dataclass
class TypedPrediction(Prediction):
    """A :class:`~fdseg.pipeline.finish.Prediction` (``mask``: the union of the types' defects) with the
    label map and what each type found."""

    labels: np.ndarray | None = field(default=None, repr=False)   # H x W uint8: 0 good, k = types[k - 1]
    types: tuple[str, ...] = ()
    defects: list[dict] = field(default_factory=list)             # {type, box, area, score}, largest first
    areas: dict[str, int] = field(default_factory=dict)           # type -> labelled pixels
    verdicts: dict[str, str] = field(default_factory=dict)        # type -> "defective" / "ok"
    per_type: tuple[Prediction, ...] = field(default=(), repr=False)  # each type's own prediction

    @property
    def type(self) -> str | None:
        """The image's type: that of its strongest defect (the highest margin above its type's threshold;
        None where nothing is labelled). :attr:`largest_type` is the one with the largest area."""
        return self.defects and max(self.defects, key=lambda d: d["score"])["type"] or None

    @property
    def largest_type(self) -> str | None:
        """The type with the largest labelled area (None where nothing is labelled)."""
        best = max(self.areas.items(), key=lambda kv: kv[1], default=(None, 0))
        return best[0] if best[1] > 0 else None

    @property
    def fractions(self) -> dict[str, float]:
        """type -> share of the image's pixels it labels (types with pixels only)."""
        n = self.labels.size if self.labels is not None else 0
        return {t: a / n for t, a in self.areas.items() if a and n}


def _relative_full(p: Prediction, threshold: float, size: tuple[int, int]) -> np.ndarray:
    """A type's margin above its threshold, upsampled to ``size`` as its mask was."""
    grid = torch.from_numpy(np.ascontiguousarray(p.margin_grid, np.float32))
    return upsample_scores(grid, size).cpu().numpy() - threshold


def combine(preds: Sequence[Prediction], thresholds: Sequence[float], types: Sequence[str], *,
            labelling: str = DEFAULT_LABELLING, relative: bool = True, temperature: float = 0.05,
            min_cells: float = MIN_CELLS, gate: float = 0.0) -> TypedPrediction:
    """The types' own predictions (one per type, same size) -> one :class:`TypedPrediction`.

    A pixel in one type's mask is that type's; a pixel in several is the type whose margin there is
    highest above its own threshold (``relative=False``: the highest raw margin); ``labelling="component"``
    then gives each connected region of the union the type that labels most of its pixels. ``gate``
    (several types): a labelled region whose peak margin above its type's threshold is below ``gate`` x
    the image's strongest region's is removed. One type: its prediction as it is (labels = its mask)."""
    from scipy import ndimage
    if labelling not in LABELLINGS:
        raise InputError("labelling", f"choose {' or '.join(LABELLINGS)}, got {labelling!r}")
    if len(preds) != len(types) or len(preds) != len(thresholds) or not preds:
        raise ValueError("one prediction and one threshold per type")
    masks = [p.mask for p in preds]
    size = masks[0].shape
    dtype = np.uint8 if len(types) < 256 else np.uint16
    st8 = np.ones((3, 3), bool)
    if len(preds) == 1:
        p = preds[0]
        labels = p.mask.astype(dtype)
        base = {f.name: getattr(p, f.name) for f in dataclasses.fields(Prediction)}
    else:
        count = np.zeros(size, np.uint8)
        for m in masks:
            count += m
        union = count > 0
        labels = np.zeros(size, dtype)
        single = count == 1
        for k, m in enumerate(masks, 1):
            labels[m & single] = k
        over = count > 1
        if over.any():
            ys, xs = mask_box(over)
            sub = over[ys, xs]
            best = np.full(sub.shape, -np.inf, np.float32)
            arg = np.zeros(sub.shape, dtype)
            for k, (p, t) in enumerate(zip(preds, thresholds), 1):
                mk = p.mask[ys, xs] & sub
                if not mk.any():
                    continue
                s = _relative_full(p, t if relative else 0.0, size)[ys, xs]
                better = mk & (s > best)
                best[better] = s[better]
                arg[better] = k
            view = labels[ys, xs]
            view[sub] = arg[sub]
        if labelling == "image" and union.any():
            peaks = [float(p.margin_grid.max()) - t if p.mask.any() else -np.inf for p, t in zip(preds, thresholds)]
            labels = union.astype(dtype) * dtype(int(np.argmax(peaks)) + 1)
        if labelling == "component" and union.any():
            lab, n = ndimage.label(union, structure=st8)
            votes = np.bincount(lab.ravel().astype(np.int64) * (len(types) + 1) + labels.ravel(),
                                minlength=(n + 1) * (len(types) + 1)).reshape(n + 1, len(types) + 1)
            winner = votes[:, 1:].argmax(1).astype(dtype) + 1
            winner[0] = 0
            labels = winner[lab]
        # the combined margin grid: each type's margin above its threshold, the largest (threshold 0)
        grids = [torch.from_numpy(np.ascontiguousarray(p.margin_grid, np.float32)) - t
                 for p, t in zip(preds, thresholds)]
        shape = max((tuple(g.shape) for g in grids), key=lambda s: s[0] * s[1])
        grid = torch.stack([g if tuple(g.shape) == shape else upsample_scores(g, shape) for g in grids]).amax(0)
        grid = grid.numpy()
        _, boxes = _components(union)
        largest = int(np.bincount(ndimage.label(union, structure=st8)[0].ravel())[1:].max()) if union.any() else 0
        cells = largest * grid.size / union.size if union.size else 0.0
        p0 = preds[0]
        base = dict(mask=union, margin_grid=grid, source=p0.source, boxes=boxes, image=p0.image,
                    query_size=p0.query_size, defect_score=max(p.defect_score for p in preds),
                    is_defective=bool(cells >= min_cells and cells > 0), largest_cells=float(cells),
                    ok_gated=bool(not union.any() and any(p.ok_gated for p in preds)),
                    score_rule=ScoreRule(tuple(size), 0.0, temperature, True, False), _score=None)
    defects, areas, verdicts, comps = _defects(labels, preds, thresholds, types, min_cells)
    if gate and len(preds) > 1 and defects:
        # the image's weak regions: a region whose peak is below ``gate`` x the strongest one's goes
        best = max(d["score"] for d in defects)
        weak = [c for c in comps if c[2] < gate * best] if best > 0 else []
        if weak:
            for k, lab, _, c in weak:
                labels[(labels == k) & (lab == c)] = 0
            union = labels > 0
            _, boxes = _components(union)
            largest = int(np.bincount(ndimage.label(union, structure=st8)[0].ravel())[1:].max()) if union.any() else 0
            cells = largest * base["margin_grid"].size / union.size if union.size else 0.0
            base.update(mask=union, boxes=boxes, is_defective=bool(cells >= min_cells and cells > 0),
                        largest_cells=float(cells))
            defects, areas, verdicts, _ = _defects(labels, preds, thresholds, types, min_cells)
    defects.sort(key=lambda d: -d["area"])
    return TypedPrediction(**base, labels=labels, types=tuple(types), defects=defects, areas=areas,
                           verdicts=verdicts, per_type=tuple(preds))


def _defects(labels, preds, thresholds, types, min_cells):
    """-> (defects, areas, verdicts, [(type number, its component map, peak score, component)])."""
    from scipy import ndimage
    st8 = np.ones((3, 3), bool)
    size = labels.shape
    defects, areas, verdicts, comps = [], {}, {}, []
    for k, (name, p, t) in enumerate(zip(types, preds, thresholds), 1):
        mk = labels == k
        areas[name] = int(mk.sum())
        verdicts[name] = "ok"
        if not areas[name]:
            continue
        lab, n = ndimage.label(mk, structure=st8)
        px = np.bincount(lab.ravel())[1:]
        g = p.margin_grid
        gh, gw = g.shape[-2:]
        h, w = size
        for c, (sl, area) in enumerate(zip(ndimage.find_objects(lab), px), 1):
            y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            gy0, gx0 = min(gh - 1, y0 * gh // h), min(gw - 1, x0 * gw // w)
            gy1, gx1 = max(gy0 + 1, -(-y1 * gh // h)), max(gx0 + 1, -(-x1 * gw // w))
            score = round(float(g[gy0:gy1, gx0:gx1].max()) - t, 4)
            defects.append({"type": name, "box": [int(x0), int(y0), int(x1), int(y1)], "area": int(area),
                            "score": score})
            comps.append((k, lab, score, c))
        if px.max() * g.size / labels.size >= min_cells:
            verdicts[name] = "defective"
    return defects, areas, verdicts, comps


def _components(mask: np.ndarray):
    from .pipeline.finish import components
    largest, boxes, _ = components(mask)
    return largest, boxes


# ------------------------------------------------------------------------------------- typed supports

def load_label_mask(mask: ImageLike, *, size: tuple[int, int] | None = None, max_pixels: int | None = None,
                    name: str | None = None) -> np.ndarray:
    """A label mask (0 = good, k = label value k) -> H x W int32. Palette (P) PNGs give their indices,
    grey ones their values; a colour image only where it is grey (all channels equal)."""
    from PIL import Image
    from .data.images import DEFAULT_MAX_PIXELS, _open, _open_file
    lim = max_pixels or DEFAULT_MAX_PIXELS
    if isinstance(mask, (str, Path)):
        src = name or str(mask)
        arr = _pil_labels(_open(Path(mask), lim), src)
    elif isinstance(mask, (bytes, bytearray, memoryview)):
        src = name or "label mask bytes"
        arr = _pil_labels(_open_file(io.BytesIO(bytes(mask)), src, lim), src)
    elif isinstance(mask, Image.Image):
        src = name or "PIL label mask"
        arr = _pil_labels(mask, src)
    elif isinstance(mask, np.ndarray):
        src = name or "label mask array"
        arr = mask
        if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
            arr = _grey_channels(arr[..., :3], src)
        elif arr.ndim != 2:
            raise InputError(src, f"expected an HxW label mask, got shape {mask.shape}")
        if arr.dtype == bool:
            arr = arr.astype(np.int32)
        elif not np.issubdtype(arr.dtype, np.integer):
            if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)) or \
                    not np.array_equal(arr, np.round(arr)):
                raise InputError(src, f"a label mask holds whole numbers (the type of each pixel), got {arr.dtype}")
    else:
        raise InputError(name, f"expected a label mask path, PIL image or numpy array, got {type(mask).__name__}")
    arr = np.asarray(arr)
    if size is not None and tuple(arr.shape[:2]) != tuple(size):
        raise InputError(src, f"label mask is {arr.shape[1]}x{arr.shape[0]} but its image is {size[1]}x{size[0]}")
    if arr.size and arr.min() < 0:
        raise InputError(src, f"label mask holds the negative value {int(arr.min())}")
    return arr.astype(np.int32)


def _grey_channels(a: np.ndarray, src: str) -> np.ndarray:
    if a.shape[2] == 1 or (np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2])):
        return a[..., 0]
    raise InputError(src, "a colour label mask: save it as a palette (P) or grey PNG whose values are the "
                          "label numbers")


def _pil_labels(im, src: str) -> np.ndarray:
    if im.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "I;16N"):
        return np.array(im)
    if im.mode == "1":
        return np.array(im).astype(np.int32)
    if im.mode in ("LA", "PA"):
        return np.array(im.getchannel(0))
    return _grey_channels(np.array(im.convert("RGB")), src)


def _type_spec(spec: Any, where: str) -> str | dict[int, str]:
    """One support's types: a name (its mask's defect pixels are that type) or {label value: name}."""
    if isinstance(spec, str):
        if not spec.strip():
            raise InputError(where, "a support's type name is empty")
        return spec.strip()
    if isinstance(spec, (list, tuple)):
        spec = {k + 1: n for k, n in enumerate(spec)}
    if isinstance(spec, dict):
        out: dict[int, str] = {}
        for v, n in spec.items():
            if isinstance(v, str) and v.strip().isdigit():
                v = int(v)
            if type(v) is not int or v < 1:
                raise InputError(where, f"label values are whole numbers from 1 (0 = good), got {v!r}")
            if not isinstance(n, str) or not n.strip():
                raise InputError(where, f"label value {v}: the type name must be non-empty text, got {n!r}")
            out[v] = n.strip()
        if not out:
            raise InputError(where, "a label mask's types name no label value")
        return out
    raise InputError(where, f"expected a type name or {{label value: type name}}, got {type(spec).__name__}")


# ---------------------------------------------------------------------------------------- the segmenter

class MultiTypeSegmenter(FewShotSegmenter):
    """Few-shot segmenter of several defect types: :class:`~fdseg.segmenter.FewShotSegmenter`'s settings,
    plus ``competition`` (``"others"``, ``"shared"``, ``"independent"``) and ``labelling`` (``"pixel"``,
    ``"component"``): the module doc has the rule. ``fit(images, masks, types=...)``; ``predict`` gives
    :class:`TypedPrediction`. Without ``types`` (or with one type) it is a FewShotSegmenter."""

    def __init__(self, *args, competition: str = DEFAULT_COMPETITION, labelling: str = DEFAULT_LABELLING,
                 gate: float = DEFAULT_GATE, **kw):
        if competition not in COMPETITIONS:
            raise InputError("competition", f"choose {', '.join(COMPETITIONS)}, got {competition!r}")
        if labelling not in LABELLINGS:
            raise InputError("labelling", f"choose {', '.join(LABELLINGS)}, got {labelling!r}")
        if not isinstance(gate, (int, float)) or isinstance(gate, bool) or not 0 <= gate <= 1:
            raise InputError("gate", f"a fraction of the strongest region's peak in [0, 1], got {gate!r}")
        self.competition, self.labelling, self.gate = competition, labelling, float(gate)
        super().__init__(*args, **kw)

    # the state: assigning a plain FittedState after an inspector's ``types`` section was read (fdseg.load)
    # makes it the first type's fit of the TypedState the section describes
    @property
    def state(self):
        return self.__dict__.get("_state")

    @state.setter
    def state(self, value) -> None:
        pending = self.__dict__.pop("_types_pending", None)
        if pending is not None and value is not None and not isinstance(value, TypedState):
            value = _typed_state(value, **pending)
        self.__dict__["_state"] = value
        self.__dict__.pop("_subs", None)

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        st = self.state
        for s in [st, *st.others] if isinstance(st, TypedState) else [st]:
            if s is not None and s.extractor is None:
                s.extractor = self._extractor_for(s.plan.preprocess)

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d.pop("_subs", None)
        return d

    def spawn(self, state: FittedState | None = None) -> "MultiTypeSegmenter":
        out = super().spawn(state)
        out.competition, out.labelling, out.gate = self.competition, self.labelling, self.gate
        if isinstance(out.state, TypedState):
            out.state = dataclasses.replace(out.state, others=tuple(
                dataclasses.replace(o, extractor=self._extractor_for(o.plan.preprocess)) for o in out.state.others))
        return out

    @classmethod
    def on_model_of(cls, template: FewShotSegmenter, competition: str = DEFAULT_COMPETITION,
                    labelling: str = DEFAULT_LABELLING, gate: float = DEFAULT_GATE) -> "MultiTypeSegmenter":
        """An unfitted multi-type segmenter on ``template``'s model (networks and cache shared, as
        :meth:`spawn` shares them): the server's typed sessions on its per-setting templates."""
        out = object.__new__(cls)
        out.model = template.model
        out.competition, out.labelling, out.gate = competition, labelling, float(gate)
        out.state = None
        return out

    def _plain(self, state: FittedState | None = None) -> FewShotSegmenter:
        """A single-type FewShotSegmenter on this model (with ``state``)."""
        out = object.__new__(FewShotSegmenter)
        out.model = self.model
        out.state = None
        if state is not None:
            out.state = state if state.extractor is not None else \
                dataclasses.replace(state, extractor=self._extractor_for(state.plan.preprocess))
        return out

    def type_segmenters(self) -> list[FewShotSegmenter]:
        """One single-type segmenter per type (this model, each type's fit), in :attr:`types` order."""
        self._check_fitted()
        subs = self.__dict__.get("_subs")
        if subs is None or subs[0] is not self.state:
            st = self.state
            states = st.type_states() if isinstance(st, TypedState) else [st]
            subs = (st, [self._plain(s) for s in states])
            self.__dict__["_subs"] = subs
        return subs[1]

    # -- what the fit holds ---------------------------------------------------------------------------
    @property
    def types(self) -> tuple[str, ...]:
        """The type names, in label order (label k = ``types[k - 1]``)."""
        st = self.state
        if st is None:
            return ()
        return st.types if isinstance(st, TypedState) and st.types else (DEFAULT_TYPE,)

    @property
    def plans(self) -> dict:
        """type -> that type's :class:`~fdseg.pipeline.plan.Plan`."""
        return {t: s.plan for t, s in zip(self.types, self.type_segmenters())}

    @property
    def n_supports(self) -> int:
        st = self.state
        if isinstance(st, TypedState) and st.support_types:
            return len(st.support_types)
        return super().n_supports

    def describe(self) -> dict:
        out = super().describe()
        if self.state is not None:
            out.update(types=list(self.types), competition=self.state.rule.get("competition", self.competition)
                       if isinstance(self.state, TypedState) else self.competition,
                       labelling=self._labelling(), gate=self._gate(),
                       type_plans={t: p.as_dict() for t, p in self.plans.items()})
        return out

    def explain(self) -> str:
        """Every type's plan, one block per type."""
        return "\n".join(f"type {k} {t} ({p.supports} support{'s' * (p.supports != 1)}):\n"
                         + "\n".join(f"  {line}" for line in str(p).splitlines())
                         for k, (t, p) in enumerate(self.plans.items(), 1))

    def _labelling(self) -> str:
        st = self.state
        return st.rule.get("labelling", self.labelling) if isinstance(st, TypedState) else self.labelling

    def _gate(self) -> float:
        st = self.state
        return float(st.rule.get("gate", self.gate)) if isinstance(st, TypedState) else self.gate

    # -- fit ------------------------------------------------------------------------------------------
    def fit(self, images: ImageLike | Sequence[ImageLike], masks: ImageLike | Sequence[ImageLike], *,
            types: Any = None, normals: Sequence[ImageLike] | None = None) -> "MultiTypeSegmenter":
        """Fit on typed supports. ``types``: one entry per support, a type name (the mask's defect
        pixels are that type) or ``{label value: type name}`` (the mask is a label mask: 0 = good,
        palette or grey values; a list of names = values 1, 2, ...); one name or one mapping for all
        supports; None: one type, ``"defect"``. Type k (labels) is the k-th name met. ``normals``:
        defect-free images, given to every type's fit (FewShotSegmenter.fit)."""
        images, masks = support_lists(images, masks)
        n = len(images)
        if types is None:
            specs = [DEFAULT_TYPE] * n
        elif isinstance(types, (str, dict)):
            specs = [types] * n
        elif isinstance(types, (list, tuple)):
            specs = list(types)
            if len(specs) != n:
                raise InputError("types", f"need one type per support, got {len(specs)} types for {n} supports")
        else:
            raise InputError("types", f"expected a list with one type per support, got {type(types).__name__}")
        if normals is not None and isinstance(normals, (str, Path, np.ndarray)):
            raise InputError("normals", "expected a list of images (files or arrays), got a single one")
        names = [_name(im, i, "support image") for i, im in enumerate(images)]
        mnames = [_name(mk, i, "support mask") for i, mk in enumerate(masks)]
        labels, type_names = self._read_supports(images, masks, specs, names, mnames)
        self.state = None
        fits: list[FittedState] = []
        memo: dict = {}
        compete = len(type_names) > 1 and self.competition != "independent"
        for k, t in enumerate(type_names, 1):
            own = [i for i in range(n) if (labels[i] == k).any()]
            others = [i for i in range(n) if i not in own]
            sub = self._plain()
            if compete and others and getattr(self.model.method, "head", 0) and hasattr(self.model.method, "bg"):
                # the matcher is fitted again with the other types' cells (_compete): its linear head, the
                # cost of an fm fit, only then
                headless = copy.copy(self.model.method)
                headless.head = 0.0
                sub.model = dataclasses.replace(self.model, method=headless)
            try:
                sub.fit([images[i] for i in own], [labels[i] == k for i in own],
                        normals=list(normals) if normals else None)
            except InputError as e:
                raise _renamed(e, own, names, mnames) from None
            finally:
                sub.model = self.model
            if compete:
                self._compete(sub, k, own, others, images, names, labels, list(normals) if normals else None, memo)
            fits.append(sub.state)
        memo.clear()
        support_types = tuple(tuple(type_names[v - 1] for v in np.unique(lab) if v) for lab in labels)
        self.state = _typed_state(fits[0], types=tuple(type_names), others=tuple(fits[1:]),
                                  rule={"competition": self.competition, "labelling": self.labelling,
                                        "gate": self.gate},
                                  support_types=support_types)
        return self

    def _image_hw(self, image: ImageLike, name: str) -> tuple[int, int]:
        if isinstance(image, (str, Path)):
            p = Path(image)
            if not p.exists():
                raise InputError(p, "file does not exist")
            if p.is_dir():
                raise InputError(p, "is a folder, expected an image file")
            return image_size(p, self.max_pixels)
        return self.load(image, name).shape[:2]

    def _read_supports(self, images, masks, specs, names, mnames) -> tuple[list[np.ndarray], list[str]]:
        """-> (one label map per support, values = type numbers 1..T; the type names). Errors name the file."""
        type_names: list[str] = []
        declared: dict[str, str] = {}          # type -> the first mask file that names it
        labels = []
        for i, (im, mk, spec) in enumerate(zip(images, masks, specs)):
            spec = _type_spec(spec, mnames[i] if not isinstance(spec, str) else f"types[{i}]")
            hw = self._image_hw(im, names[i])
            if isinstance(spec, str):
                m = load_mask(mk, size=hw, max_pixels=self.max_pixels, name=mnames[i])
                check_support_mask(m, mnames[i])
                if spec not in type_names:
                    type_names.append(spec)
                declared.setdefault(spec, mnames[i])
                labels.append(m.astype(np.uint16) * (type_names.index(spec) + 1))
                continue
            raw = load_label_mask(mk, size=hw, max_pixels=self.max_pixels, name=mnames[i])
            present = [int(v) for v in np.unique(raw) if v]
            unnamed = [v for v in present if v not in spec]
            if unnamed:
                raise InputError(mnames[i], f"label value{'s' * (len(unnamed) > 1)} {', '.join(map(str, unnamed))} "
                                            f"{'have' if len(unnamed) > 1 else 'has'} no type name (this support's "
                                            f"types name {', '.join(f'{v}={n}' for v, n in sorted(spec.items()))})")
            check_support_mask(raw > 0, mnames[i])
            lut = np.zeros(max(spec) + 1 if spec else 1, np.uint16)
            for v, t in sorted(spec.items()):
                if t not in type_names:
                    type_names.append(t)
                declared.setdefault(t, mnames[i])
                lut[v] = type_names.index(t) + 1
            labels.append(lut[np.minimum(raw, len(lut) - 1)])
        for k, t in enumerate(type_names, 1):
            if not any((lab == k).any() for lab in labels):
                raise InputError(declared[t], f"type {t!r} has no mask pixels in any support (a label value named "
                                              f"{t!r} here, but no pixel of any support's mask has it)")
        return labels, type_names

    def _compete(self, sub: FewShotSegmenter, k: int, own: list[int], others: list[int], images, names,
                 labels, normals, memo: dict) -> None:
        """Refit type ``k``'s matcher with the other types' cells in its background (``competition``)."""
        st = sub.state
        m = self.model
        if st.extractor is None or not hasattr(st.method, "fg") or not hasattr(st.method, "bg"):
            decision = Decision("competition", "independent", f"method {self.settings['method']} has no "
                                                              f"background bank: the types are fitted apart")
            sub.state = dataclasses.replace(st, plan=dataclasses.replace(
                st.plan, decisions=st.plan.decisions + (decision,)))
            return
        if not others:
            decision = Decision("competition", self.competition, "every support shows this type: the other "
                                                                 "types' pixels are in their backgrounds already")
            sub.state = dataclasses.replace(st, plan=dataclasses.replace(
                st.plan, decisions=st.plan.decisions + (decision,)))
            return
        ex, tag = st.extractor, st.feature_tag
        views = st.plan.get("support views", "none")
        ops = SupportViews.ops(views) if views != "none" else []

        def grids(i: int) -> list[torch.Tensor]:
            key = (i, tag, views)
            if key not in memo:
                item = sub._load(images[i], names[i], ex, tag, fitting=True)
                sub._ensure_features([item], ex)
                feats = [item[1]]
                if ops:
                    s = Support(item[0], np.zeros(item[2], bool), item[1], None)
                    feats += [a.features for a in sub._augmented([s], [images[i]], [item[3]], views, ex)]
                memo[key] = feats
            return memo[key]

        def cov(mask: np.ndarray, f: torch.Tensor) -> torch.Tensor:
            return mask_coverage(mask, tuple(f.shape[-2:])).to(f.device)

        base, extra_views = [], []
        for i in own:                           # this type's own supports, as fit() builds them
            fs, mk = grids(i), labels[i] == k
            base.append(Support(None, mk, fs[0], cov(mk, fs[0])))
            for op, f in zip(ops, fs[1:]):
                mo = np.ascontiguousarray(op(mk))
                extra_views.append(Support(None, mo, f, cov(mo, f)))
        rows, whole = [], []
        for j in others:                        # the other types' supports: background evidence
            fs, other = grids(j), labels[j] > 0
            for f, mo in zip(fs, [other] + [np.ascontiguousarray(op(other)) for op in ops]):
                rows.append(f.flatten(1)[:, cov(mo, f).flatten() > 0])        # their defects' cells
                whole.append(f)
        if self.competition in ("head", "shared") and whole:
            # a sample of all their cells (their good surface too; at most OTHER_CELLS: the head's cost)
            from .methods.normal_bank import normal_sample
            rows.append(normal_sample(whole, OTHER_CELLS, getattr(m.method, "seed", 0)).T)
        bank = torch.cat(rows, 1) if rows else None
        supports = base + extra_views
        n_extra = 0 if bank is None else int(bank.shape[1])
        if n_extra:
            supports.append(Support(None, None, bank[:, None, :].contiguous(),
                                    torch.zeros((1, n_extra), device=bank.device)))
        method = copy.copy(m.method)                     # as fit() does: a shallow copy of the built matcher
        nd = None
        if normals:
            fit_idx, _ = m.ok_gate.split(len(normals))
            nd = sub._normal_features([normals[i] for i in fit_idx], ex, tag)
        method.fit(supports, normals=nd)
        if self.competition == "shared" and whole and getattr(method, "bg", None) is not None:
            # the matching's bank: every cell of the other types' supports, up to OTHER_BANK_CELLS (a
            # uniform sample beyond; the head stays as fitted)
            from .methods.normal_bank import normal_sample
            everything = normal_sample(whole, OTHER_BANK_CELLS, getattr(m.method, "seed", 0)).to(method.bg.dtype)
            method.bg = torch.cat([method.bg, everything]).contiguous()
            method.__dict__.pop("_banks_cache", None)
            n_extra += len(everything)
            del everything
        for a in ("fg_fraction", "min_defect_cells"):     # the type's own defects, not the background's
            if hasattr(st.method, a):
                setattr(method, a, getattr(st.method, a))
        what = {"others": "cells their defects touch", "head": "cells (their defects', a sample of all)",
                "shared": "cells (their defects', all of them)"}[self.competition]
        decision = Decision("competition", self.competition,
                            f"{n_extra} {what} of {len(others)} other-type support{'s' * (len(others) != 1)} "
                            f"({views} views) in the background")
        decisions = tuple(_matcher_decision(method) if d.step == "matcher" else d for d in st.plan.decisions)
        gate = [d for d in decisions if d.step == "ok gate"]
        decisions = tuple(d for d in decisions if d.step != "ok gate") + (decision,)
        post = dataclasses.replace(st.post, ok_level=None) if st.post.ok_level is not None else st.post
        sub.state = dataclasses.replace(st, method=method, post=post,
                                        plan=dataclasses.replace(st.plan, decisions=decisions + tuple(gate)))
        if st.post.ok_level is not None:         # the OK gate again, on this matcher's margins
            _, held = m.ok_gate.split(len(normals))
            scores = []
            for i, (_, res) in zip(held, sub.predict_stream([normals[i] for i in held])):
                if isinstance(res, BaseException):
                    raise InputError(_name(normals[i], i, "normal image"),
                                     f"defect-free image held out for the OK gate: {getattr(res, 'problem', res)}")
                scores.append(res.defect_score)
            post = dataclasses.replace(post)
            post.ok_level, gd = m.ok_gate.fit(scores, len(normals))
            post.ok_components, post.ok_soft = st.post.ok_components, st.post.ok_soft
            sub.state = dataclasses.replace(sub.state, post=post, plan=dataclasses.replace(
                sub.state.plan, decisions=decisions + (gd,)))

    # -- predict --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def type_margins(self, image: ImageLike, name: str | None = None) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
        """Each type's raw margin grid of one query (on the CPU) and the query's (H, W)."""
        self._check_fitted()
        subs = self.type_segmenters()
        item = None
        out = {}
        for t, s in zip(self.types, subs):
            it = s._load(image, name or _name(image, 0, "query image")) if item is None else \
                s._rekey(item, image, name or "query image", s.extractor, s.state.feature_tag)
            s._ensure_features([it])
            item = it
            out[t] = s._score(it).float().cpu()
        return out, item[2]

    @torch.inference_mode()
    def margins(self, image: ImageLike, name: str | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """One type: its raw margin grid (FewShotSegmenter.margins). Several: the largest of the types'
        margins above their thresholds (threshold 0), on the finest type grid."""
        if len(self.types) <= 1:
            return super().margins(image, name)
        grids, hw = self.type_margins(image, name)
        subs = self.type_segmenters()
        rel = [g - s.decision_threshold for g, s in zip(grids.values(), subs)]
        shape = max((tuple(g.shape) for g in rel), key=lambda s: s[0] * s[1])
        return torch.stack([g if tuple(g.shape) == shape else upsample_scores(g, shape) for g in rel]).amax(0), hw

    def finish(self, margin, size, image=None, source: str = "", query_size=None) -> Prediction:
        if len(self.types) > 1:
            raise InputError("finish", "a multi-type segmenter finishes each type's margins apart: use predict()")
        return super().finish(margin, size, image, source, query_size)

    def _typed(self, pred: Prediction) -> TypedPrediction:
        subs = self.type_segmenters()
        return combine([pred], [subs[0].state.post.threshold], self.types[:1], labelling=self._labelling())

    @torch.inference_mode()
    def predict_stream(self, images: Iterable[ImageLike], *,
                       size: tuple[int, int] | None = None) -> Iterator[tuple[str, TypedPrediction | FdsegError]]:
        """As :meth:`FewShotSegmenter.predict_stream`, yielding :class:`TypedPrediction`. Each query is
        decoded once and goes through the backbone once per preprocessing the types' plans use (and its
        query views once per group of types that share them)."""
        self._check_fitted()
        if len(self.types) <= 1:
            for name, res in super().predict_stream(images, size=size):
                yield name, res if isinstance(res, BaseException) else self._typed(res)
            return
        subs = self.type_segmenters()
        groups: dict[tuple, list[int]] = {}
        for k, s in enumerate(subs):
            groups.setdefault((s.state.feature_tag, s.query_views if s.extractor is not None else "none"), []).append(k)
        order = list(groups)
        lead = subs[groups[order[0]][0]]
        need_image = any(s._needs_image() for s in subs)
        temperature = subs[0].state.method.temperature
        thresholds = [float(s.state.post.threshold) for s in subs]

        def load(im: ImageLike, name: str) -> list:
            it = lead._load(im, name)
            if need_image and it[0] is None:
                it[0] = self.load(im, name)
            return it

        for raw in prefetch_batches(images, load, self.batch_size, self.model.loader_threads):
            batch = [[name, im, it if isinstance(it, BaseException) else {order[0]: it}] for name, im, it in raw]
            for g in order:
                s = subs[groups[g][0]]
                todo = []
                for entry in batch:
                    if isinstance(entry[2], BaseException):
                        continue
                    if g not in entry[2]:
                        try:
                            entry[2][g] = s._rekey(entry[2][order[0]], entry[1], entry[0], s.extractor,
                                                   s.state.feature_tag)
                        except FdsegError as e:
                            entry[2] = e
                            continue
                    todo.append(entry[2][g])
                s._ensure_features(todo)
            for name, im, items in batch:
                if isinstance(items, BaseException):
                    yield name, items
                    continue
                first = items[order[0]]
                rgb, hw = first[0], first[2]
                preds: list[Prediction | None] = [None] * len(subs)
                for g in order:
                    item = items[g]
                    ks = groups[g]
                    s0 = subs[ks[0]]
                    views = g[1]
                    imgs = view_images(item[0], views) if views != "none" else []
                    feats = s0.extractor.batch(imgs) if imgs else []
                    queries = [Query(item[0], item[1])] + [Query(a, f) for a, f in zip(imgs, feats)]
                    flips = [[]] + [list(dims) for _, dims in QUERY_VIEWS[views]]
                    for k in ks:
                        method = subs[k].state.method
                        if hasattr(method, "score_views"):
                            margin = method.score_views(queries, flips, exact_above=thresholds[k])
                        else:
                            margin = method.score(queries[0])
                            if imgs:
                                margin = merge_views(margin, [method.score(q) for q in queries[1:]], views)
                        preds[k] = subs[k].finish(margin, size or hw, rgb, name, query_size=hw)
                yield name, combine(preds, thresholds, self.types, labelling=self._labelling(),
                                    temperature=temperature, gate=self._gate())

    def to(self, device: str) -> "MultiTypeSegmenter":
        super().to(device)
        st = self.state
        if isinstance(st, TypedState):
            dev = self.model.device
            for o in st.others:
                method_to(o.method, dev)
                if o.extractor is not None:
                    o.extractor.device = dev
        self.__dict__.pop("_subs", None)
        return self


def _renamed(e: InputError, own: list[int], names: list[str], mnames: list[str]) -> InputError:
    """A type's fit names its supports 'support image N' among its own: name them as given to fit."""
    src = str(e.source or "")
    for what, given in (("support image", names), ("support mask", mnames)):
        if src.startswith(what + " "):
            try:
                j = int(src[len(what) + 1:]) - 1
            except ValueError:
                continue
            if 0 <= j < len(own):
                return InputError(given[own[j]], e.problem)
    return e


# ----------------------------------------------------------------------------------- pictures, legend

def type_colours(n: int) -> list[tuple[int, int, int]]:
    """RGB colour of types 1..n (overlays, label PNG palettes)."""
    out = []
    for k in range(n):
        if k < len(_PALETTE):
            out.append(_PALETTE[k])
        else:                          # beyond the table: spread hues
            import colorsys
            r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.85, 0.95)
            out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def legend(types: Sequence[str]) -> list[dict]:
    """[{"value": k, "type": name, "colour": "#rrggbb"}] for label values 1..T (0 = good)."""
    return [{"value": k, "type": t, "colour": "#%02x%02x%02x" % c}
            for k, (t, c) in enumerate(zip(types, type_colours(len(types))), 1)]


def label_png(labels: np.ndarray, types: Sequence[str]) -> bytes:
    """A label map as a palette PNG (value k = type k, coloured as in overlays; 0 = good, black) with the
    legend in its ``fdseg-legend`` text chunk (JSON)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    if len(types) > 255:
        raise InputError("labels", f"{len(types)} types do not fit a palette PNG (255 at most)")
    im = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
    pal = [0, 0, 0] + [v for c in type_colours(len(types)) for v in c]
    im.putpalette(pal + [0] * (768 - len(pal)))
    info = PngInfo()
    info.add_text("fdseg-legend", json.dumps(legend(types)))
    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def typed_overlay(rgb: np.ndarray, labels: np.ndarray, types: Sequence[str], alpha: float = 0.45) -> np.ndarray:
    """Each type's pixels tinted and outlined in its colour (``type_colours``)."""
    from .report.overlay import overlay
    out = rgb
    for k, c in enumerate(type_colours(len(types)), 1):
        m = labels == k
        if m.any():
            out = overlay(out, m, c, alpha)
    return out if out is not rgb else rgb.copy()


# ------------------------------------------------------------------------------------- a support folder

def read_support_dir(root: str | Path) -> tuple[list[Path], list[Path], list[str]]:
    """``DIR/TYPE/images/STEM.*`` + ``DIR/TYPE/masks/STEM.png`` (the dataset layout fdseg reads) ->
    (images, masks, types): every image of every type folder, types sorted by folder name. An image
    without a mask, a mask without an image, a type folder without images: an error naming the file."""
    from .data.layouts import scan
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "support folder does not exist" if not root.exists() else "expected a folder")
    typed = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not typed:
        raise InputError(root, "no type folders: expected DIR/TYPE/images + DIR/TYPE/masks")
    images, masks, types = [], [], []
    for d in typed:
        if not ((d / "images").is_dir() and (d / "masks").is_dir()):
            raise InputError(d, "a type folder holds images/ and masks/ (the support's images and their masks)")
        cat = scan(d, "fdseg")
        if cat.problems:
            raise InputError(cat.problems[0].path, cat.problems[0].problem)
        samples = [s for by in cat.classes.values() for s in by.get(d.name, [])]
        if not samples:
            raise InputError(d / "images", f"type {d.name!r} has no support images")
        for s in samples:
            images.append(s.image)
            masks.append(s.mask)
            types.append(d.name)
    return images, masks, types


# ---------------------------------------------------------------------------- the inspector's section

#: the sections that write one type's fit (their encoders, each type's tensors under ``types.N.``)
PER_TYPE_SECTIONS = ("plan", "method", "colour", "post")


class _Prefixed:
    """The tensors of a document being written, each name prefixed (one type's fit)."""

    def __init__(self, tensors, prefix: str):
        self.tensors, self.prefix = tensors, prefix

    def add(self, name: str, value) -> dict:
        return self.tensors.add(self.prefix + name, value)


def types_record(seg, tensors, ctx) -> dict | None:
    """The inspector's ``types`` section of a multi-type segmenter (None for any other): the type names,
    the rule, the types each support shows, and the fits of types 2.. (type 1's fit is the file's plan /
    method / colour / post sections), each by those sections' own encoders."""
    from .inspector import SECTIONS
    st = getattr(seg, "state", None)
    if not isinstance(st, TypedState):
        return None
    fits = []
    for k, o in enumerate(st.others, 2):
        view = object.__new__(FewShotSegmenter)
        view.model, view.state = seg.model, o
        rec = {}
        for name in PER_TYPE_SECTIONS:
            r = SECTIONS[name].to_record(view, _Prefixed(tensors, f"types.{k}."), ctx)
            if r is not None:
                rec[name] = r
        fits.append(rec)
    return {"names": list(st.types), "rule": dict(st.rule), "support_types": [list(t) for t in st.support_types],
            "fits": fits}


def types_from_record(rec: dict, ctx) -> None:
    """Read the ``types`` section: the other types' fits rebuilt by the plan / method / colour / post
    readers; the segmenter being loaded becomes a :class:`MultiTypeSegmenter` whose state, once the
    loader sets the first type's, is the :class:`TypedState`."""
    from .inspector import SECTIONS, _Ctx
    from .pipeline import Decision
    names, rule, fits = rec.get("names"), rec.get("rule"), rec.get("fits")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names) \
            or len(set(names)) != len(names):
        raise ValueError("the type names must be a list of distinct, non-empty names")
    if not isinstance(fits, list) or len(fits) != len(names) - 1:
        raise ValueError(f"{len(names)} types named, {len(fits) if isinstance(fits, list) else 'no'} further fits")
    gate = rule.get("gate", 0.0) if isinstance(rule, dict) else None
    if not isinstance(rule, dict) or rule.get("competition") not in COMPETITIONS or \
            rule.get("labelling") not in LABELLINGS or not set(rule) <= {"competition", "labelling", "gate"} or \
            not isinstance(gate, (int, float)) or isinstance(gate, bool) or not 0 <= gate <= 1:
        raise ValueError(f"the type rule must name a competition ({', '.join(COMPETITIONS)}), a labelling "
                         f"({', '.join(LABELLINGS)}) and a gate in [0, 1]")
    sup = rec.get("support_types", [])
    if not isinstance(sup, list) or not all(isinstance(t, list) and all(x in names for x in t) for t in sup):
        raise ValueError("the supports' types must be lists of the type names")
    seg = ctx.seg
    recorded = ctx.settings.get("precision")
    others = []
    for k, fit in enumerate(fits, 2):
        if not isinstance(fit, dict) or not {"plan", "method", "post"} <= set(fit) or \
                not set(fit) <= set(PER_TYPE_SECTIONS):
            raise ValueError(f"type {k}'s fit must hold plan, method and post sections")
        sub = _Ctx(seg=seg, settings=ctx.settings, tensors=ctx.tensors, path=ctx.path)
        for name in PER_TYPE_SECTIONS:
            if name in fit:
                if not isinstance(fit[name], dict):
                    raise ValueError(f"type {k}'s {name} section is not a record")
                SECTIONS[name].from_record(fit[name], sub)
        plan = sub.plan
        if recorded is not None and recorded != seg.settings["precision"]:
            mp = seg.model.precision
            plan = dataclasses.replace(plan, decisions=tuple(
                Decision(d.step, mp.value, f"{mp.reason}; the inspector was fitted on {recorded}")
                if d.step == "precision" else d for d in plan.decisions))
        if plan.preprocess.size != seg.model.preprocess.size or plan.preprocess.mode != seg.model.preprocess.mode:
            raise ValueError(f"type {k}'s preprocessing does not match the settings")
        others.append(FittedState(plan, sub.method, sub.post, seg._extractor_for(plan.preprocess),
                                  seg._tag(plan.preprocess), getattr(sub, "colour", None)))
    if not isinstance(seg, MultiTypeSegmenter):
        d = seg.__dict__
        state = d.pop("state", None)
        seg.__class__ = MultiTypeSegmenter
        d["_state"] = state
    seg.competition, seg.labelling, seg.gate = rule["competition"], rule["labelling"], float(gate)
    seg.__dict__["_types_pending"] = dict(types=tuple(names), others=tuple(others), rule=dict(rule),
                                          support_types=tuple(tuple(t) for t in sup))
