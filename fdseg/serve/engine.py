"""The server's model side: settings, one shared backbone per setting, sessions, the bounded pool.

* A :class:`Settings` (method, backbone, refinement, threshold, input size, resize mode)
  is validated against what is registered right now, so methods, backbones and
  refinements that other packages register appear without a change here.
* Per setting one *template* :class:`fdseg.FewShotSegmenter` is built and kept (a few at
  most); a session is ``template.spawn()``: the template's model (networks, read-only) with
  its own fitted state.
* Supports may be typed (field ``type``, one name per support): two or more type names fit a
  :class:`fdseg.multitype.MultiTypeSegmenter` on the same template's model; its results add the
  label map, the types and the legend (docs/web-app.md, "Defect types").
* Every fit / predict runs in a worker thread that holds one of ``workers`` slots
  (default 1: CPU inference already uses all cores); at most ``max_queue`` more wait,
  further requests get 503 instead of piling up.
"""
from __future__ import annotations

import copy
import inspect
import io
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from .. import __version__
from ..atomic import write_bytes, write_text
from ..errors import FdsegError, InputError
from ..pipeline.finish import MIN_CELLS, mask_box
from ..report.html import card, esc, page, table
from ..report.overlay import GREEN, RED, overlay
from ..segment_folder import _row, _typed, _write_summary
from .uploads import (Upload, UploadError, archive_stem, b64, decode_image, decode_mask, display_name,
                      image_format, jpeg_bytes, png_bytes, rle_encode)

RESIZE_MODES = ("resize", "aspect", "tile", "auto")
SESSION_ID = re.compile(r"^[0-9a-f]{16}$")
MASK_FORMATS = ("png", "rle", "none")
MAX_TYPE_NAME = 60                  # characters of one defect type name (field 'type')


class NotFound(FdsegError):
    pass


class Busy(FdsegError):
    pass


# -- what is installed ---------------------------------------------------------------------------

def _segmenter_cls():
    import fdseg
    return fdseg.FewShotSegmenter


def _refine_lister() -> Callable[[], list[str]]:
    """The refinement (proposer) registry's lister."""
    from ..refine import list_proposers
    return list_proposers


def _entry_info(registry, name: str) -> dict:
    try:
        e = registry.entry(name)
    except Exception:
        return {"name": name, "summary": "", "extra": None}
    return {"name": name, "summary": e.summary, "extra": e.extra, **{k: v for k, v in e.info.items()
                                                                       if isinstance(v, (str, int, float, bool))}}


def _proposer_registry():
    from ..refine.proposers import PROPOSERS
    return PROPOSERS


def _extra_missing(extra: str | None) -> list[str]:
    """The packages of ``fdseg[extra]`` that are not installed (by fdseg's own metadata; [] when the
    extra is unknown there, e.g. one another package registers, or fdseg is not installed as a package)."""
    if not extra:
        return []
    return list(_extras_missing().get(extra, []))


_EXTRAS_MISSING: dict[str, list[str]] | None = None


def _extras_missing() -> dict[str, list[str]]:
    global _EXTRAS_MISSING
    if _EXTRAS_MISSING is None:
        import importlib.metadata as md
        out: dict[str, list[str]] = {}
        try:
            reqs = md.requires("fdseg") or []
        except md.PackageNotFoundError:
            reqs = []
        for r in reqs:
            m = re.match(r"""^\s*([A-Za-z0-9][A-Za-z0-9._-]*).*;.*extra\s*==\s*["']([^"']+)["']""", r)
            if not m:
                continue
            pkg, extra = m.groups()
            missing = out.setdefault(extra, [])
            try:
                md.version(pkg)
            except md.PackageNotFoundError:
                missing.append(pkg)
        _EXTRAS_MISSING = out
    return _EXTRAS_MISSING


def _mark(info: dict, needs: str | None, note: str | None) -> dict:
    """``available`` / ``needs`` (weights | checkpoint | extra | null) / ``note`` of one entry."""
    info["available"] = needs is None
    info["needs"] = needs
    if note:
        info["note"] = note
    return info


def _needs_extra(info: dict) -> tuple[str | None, str | None]:
    missing = _extra_missing(info.get("extra"))
    if missing:
        return "extra", f"needs pip install 'fdseg[{info['extra']}]' (missing: {', '.join(missing)})"
    return None, None


def options(weights: dict[str, str]) -> dict:
    """Methods, backbones and refinements registered now, with what each needs: ``available`` (false:
    this server cannot run it as started), ``needs`` (what is missing: ``weights``, ``checkpoint``,
    ``extra``, or null) and ``note`` (how to get it)."""
    from ..backbones.registry import BACKBONES
    from ..methods.registry import METHODS
    backbones = []
    for n in BACKBONES.names():
        info = _entry_info(BACKBONES, n)
        if info.get("needs_weights") and n not in weights:
            _mark(info, "weights", f"needs weights: start the server with --weights {n}=PATH")
        else:
            _mark(info, *_needs_extra(info))
        backbones.append(info)
    methods = []
    for n in METHODS.names():
        m = _entry_info(METHODS, n)
        if m.get("needs_checkpoint"):     # e.g. meta: trained with `fdseg train-meta`, not choosable here
            _mark(m, "checkpoint", "needs a trained checkpoint: use fdseg segment --method-option checkpoint=PATH")
        else:
            _mark(m, *_needs_extra(m))
        methods.append(m)
    refine = [{"name": "none", "summary": "no refinement", "extra": None, "available": True, "needs": None}]
    reg = _proposer_registry()
    for n in _refine_lister()():
        info = _entry_info(reg, n)
        refine.append(_mark(info, *_needs_extra(info)))
    from ..presets import PRESETS
    return {"methods": methods, "backbones": backbones, "refine": refine, "resize": list(RESIZE_MODES),
            "presets": list(PRESETS)}


# -- settings ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    method: str = "fm"
    backbone: str = "efficientnet_lite0"
    refine: str = "none"
    threshold: float = 0.0
    size: int = 256
    resize: str = ""              # "" = the preset's (auto for accurate / fast, resize for paper)
    preset: str = "accurate"

    @classmethod
    def parse(cls, form: dict[str, str], defaults: "Settings") -> "Settings":
        """Form fields (strings) -> checked settings; missing fields take ``defaults``."""
        from ..backbones.registry import BACKBONES
        from ..methods.registry import METHODS
        d = asdict(defaults)
        for f in fields(cls):
            if f.name in form and str(form[f.name]).strip() != "":
                d[f.name] = str(form[f.name]).strip()
        try:
            d["threshold"] = float(d["threshold"])
            if not np.isfinite(d["threshold"]) or abs(d["threshold"]) > 2:
                raise ValueError
        except ValueError:
            raise UploadError("threshold", f"must be a number between -2 and 2, got {d['threshold']!r}") from None
        try:
            d["size"] = int(d["size"])
            if not 32 <= d["size"] <= 2048:
                raise ValueError
        except ValueError:
            raise UploadError("size", f"must be a whole number from 32 to 2048, got {d['size']!r}") from None
        if d["resize"] not in (*RESIZE_MODES, ""):
            raise UploadError("resize", f"must be one of {', '.join(RESIZE_MODES)}, got {d['resize']!r}")
        from ..presets import PRESETS
        if d["preset"] not in PRESETS:
            raise UploadError("preset", f"unknown preset {d['preset']!r} (available: {', '.join(PRESETS)})")
        for key, names in (("method", METHODS.names()), ("backbone", BACKBONES.names())):
            if d[key] not in names:
                raise UploadError(key, f"unknown {key} {d[key]!r} (available: {', '.join(names)})")
        refine_names = ["none"] + list(_refine_lister()())
        if d["refine"] not in refine_names:
            raise UploadError("refine", f"unknown refinement {d['refine']!r} (available: {', '.join(refine_names)})")
        return cls(**d)


@dataclass
class ServeConfig:
    """Limits and defaults of one server (``fdseg serve -h`` sets them)."""

    max_request_bytes: int = 64 << 20       # whole request body
    max_file_bytes: int = 32 << 20          # one uploaded file
    max_pixels: int = 40_000_000            # one image (checked from the header, before decoding)
    max_supports: int = 5
    max_normals: int = 200                  # defect-free ("OK") images per fit
    max_queries: int = 32                   # per request
    max_sessions: int = 16                  # live sessions kept (least recently used dropped)
    max_results: int = 1000                 # per session, for the results ZIP
    workers: int = 1                        # fits / predictions at once
    max_queue: int = 64                     # requests waiting for a worker before 503
    device: str = "cpu"
    weights: dict[str, str] = field(default_factory=dict)   # backbone name -> weights file
    sessions_dir: Path | None = None        # where "save session" writes
    defaults: Settings = field(default_factory=Settings)
    max_templates: int = 3                  # models kept in memory (one per distinct setting)
    token: str | None = field(default=None, repr=False)   # access token every request needs (None: no auth)
    # inspector files ready at start (``fdseg serve --inspector``): paths (loaded by the Engine) or the
    # Sessions :func:`open_inspector` made of them (``fdseg serve`` loads them before the server starts);
    # kept for the server's life (never dropped for newer sessions, not deletable)
    inspectors: list = field(default_factory=list, repr=False)


# -- sessions ------------------------------------------------------------------------------------

@dataclass
class StoredResult:
    row: dict
    mask_png: bytes
    score_png: bytes
    overlay_jpg: bytes
    labels_png: bytes = b""       # a typed session's label map (fdseg.multitype.label_png); b"": untyped


@dataclass
class Session:
    id: str
    settings: Settings
    seg: Any
    supports: list[dict]          # {"name", "image": bytes, "ext", "mask_png": bytes, "width", "height"[, "type"]}
    created: float = field(default_factory=time.time)
    normals: int = 0              # defect-free images the fit used (their bytes are not kept)
    results: "OrderedDict[str, StoredResult]" = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    title: str = ""               # a name to show and to download the inspector file under
    inspector: dict | None = None  # loaded from an inspector file: what it holds (see open_inspector)
    precision_note: str | None = None   # the file was fitted on another numeric path than this server's
    pinned: bool = False          # loaded at start (--inspector): kept for the server's life

    @property
    def inspector_filename(self) -> str:
        """``<title or id>.fdseg``, in ``[A-Za-z0-9._-]`` only (the download's name)."""
        stem = _SAFE_NAME.sub("_", self.title).strip("._")[:80]
        return f"{stem or self.id}.fdseg"

    @property
    def types(self) -> tuple[str, ...]:
        """The defect type names of a typed session (label k = ``types[k - 1]``); () for an untyped one."""
        return session_types(self.seg)

    def type_info(self) -> dict:
        """``{"types": [...], "legend": [...]}`` for a typed session, {} for an untyped one."""
        if not self.types:
            return {}
        from ..multitype import legend
        return {"types": list(self.types), "legend": legend(self.types)}

    def info(self) -> dict:
        return {"id": self.id, "title": self.title, "settings": asdict(self.settings), "created": self.created,
                "supports": [{"index": i + 1, "name": s["name"], "width": s["width"], "height": s["height"],
                              "mask_fraction": s["mask_fraction"], **({"type": s["type"]} if "type" in s else {})}
                             for i, s in enumerate(self.supports)],
                **self.type_info(),
                "results": len(self.results), "normals": self.normals,
                "source": "inspector" if self.inspector is not None else "fit", "inspector": self.inspector,
                "precision_note": self.precision_note, "pinned": self.pinned,
                "inspector_filename": self.inspector_filename,
                "plan": [{"step": d.step, "value": d.value, "reason": d.reason}
                         for d in getattr(self.seg, "plan", None).decisions] if getattr(self.seg, "state", None) else []}


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def session_types(seg) -> tuple[str, ...]:
    """The type names of a multi-type segmenter (fitted here on 2+ types, or loaded from an inspector file
    with a ``types`` section); () for any other segmenter."""
    from ..multitype import MultiTypeSegmenter
    if not isinstance(seg, MultiTypeSegmenter) or getattr(seg, "state", None) is None:
        return ()
    return tuple(seg.types)


def check_types(types: list[str] | None, n_supports: int) -> list[str] | None:
    """The field ``type`` (one defect type name per support, in the supports' order) -> the stripped
    names; None when no type was sent. A wrong count, an empty or overlong name: 400 naming 'type'."""
    if not types:
        return None
    if len(types) != n_supports:
        raise UploadError("type", f"need one type per support image (or none), got {len(types)} types for "
                                  f"{n_supports} supports")
    out = []
    for i, t in enumerate(types, 1):
        name = " ".join("".join(c if c.isprintable() else " " for c in str(t)).split())
        if not name:
            raise UploadError("type", f"support {i}'s type is empty: name every support's defect type, or none "
                                      f"(one type)")
        if len(name) > MAX_TYPE_NAME:
            raise UploadError("type", f"support {i}'s type is {len(name)} characters long, at most "
                                      f"{MAX_TYPE_NAME}")
        out.append(name)
    return out


class Engine:
    def __init__(self, config: ServeConfig | None = None):
        self.config = config or ServeConfig()
        self._templates: "OrderedDict[Settings, Any]" = OrderedDict()
        self._template_lock = threading.Lock()
        self._sessions: "OrderedDict[str, Session]" = OrderedDict()
        self._sessions_lock = threading.Lock()
        self._slots = threading.Semaphore(max(1, self.config.workers))
        self._pending = 0
        self._pending_lock = threading.Lock()
        for item in self.config.inspectors:     # ready at start; paths are loaded now (bad file: InputError)
            session = item if isinstance(item, Session) else open_inspector(Path(item), self.config, pinned=True)
            session.pinned = True
            self.add(session)

    # -- the bounded pool ----------------------------------------------------------------------
    async def run(self, fn: Callable, *args, **kwargs):
        """Run ``fn`` in a worker thread once a slot is free; 503 (:class:`Busy`) when the queue is full."""
        import functools

        import anyio
        with self._pending_lock:
            if self._pending >= self.config.workers + self.config.max_queue:
                raise Busy(f"server busy: {self._pending} requests running or waiting; retry later")
            self._pending += 1

        def job():
            with self._slots:
                return fn(*args, **kwargs)
        try:
            return await anyio.to_thread.run_sync(functools.partial(job))
        finally:
            with self._pending_lock:
                self._pending -= 1

    @property
    def pending(self) -> int:
        return self._pending

    # -- models --------------------------------------------------------------------------------
    def _template(self, s: Settings):
        with self._template_lock:
            if s in self._templates:
                self._templates.move_to_end(s)
                return self._templates[s]
            kw: dict[str, Any] = dict(backbone=s.backbone, method=s.method, input_size=s.size,
                                      resize=s.resize or None, preset=s.preset, threshold=s.threshold, device=self.config.device,
                                      weights=self.config.weights.get(s.backbone),
                                      max_pixels=self.config.max_pixels)
            if s.refine != "none":
                kw["refine"] = s.refine
            try:
                tpl = _segmenter_cls()(**kw)
            except (FdsegError, ImportError, FileNotFoundError) as e:
                raise UploadError("settings", f"cannot build {s.method} on {s.backbone}: {e}") from None
            self._templates[s] = tpl
            while len(self._templates) > self.config.max_templates:
                self._templates.popitem(last=False)
            return tpl

    def new_segmenter(self, s: Settings, typed: bool = False):
        """A fresh, unfitted segmenter for ``s`` on the template's model (networks shared, not copied);
        ``typed``: a :class:`fdseg.multitype.MultiTypeSegmenter` (its default rule) on that model."""
        tpl = self._template(s)
        if not typed:
            return tpl.spawn()
        from ..multitype import MultiTypeSegmenter
        return MultiTypeSegmenter.on_model_of(tpl)

    # -- fit -----------------------------------------------------------------------------------
    def fit(self, settings: Settings, pairs: list[tuple[Upload, Upload]], normals: list[Upload] | None = None,
            types: list[str] | None = None) -> Session:
        """Decode and check the supports (and the defect-free ``normals``: field 'normal'), fit a new
        segmenter on them (runs in a worker). ``types`` (field 'type'): one defect type name per support;
        two or more distinct names fit a multi-type segmenter, one name (or none) today's segmenter."""
        normals = list(normals or [])
        if len(normals) > self.config.max_normals:
            raise UploadError("normal", f"{len(normals)} defect-free images sent, this server takes at most "
                                        f"{self.config.max_normals}")
        if not pairs:
            raise UploadError("support", "send at least one support image (field 'support') with its mask "
                                         "(field 'mask')")
        if len(pairs) > self.config.max_supports:
            raise UploadError("support", f"{len(pairs)} supports sent, this server takes at most "
                                         f"{self.config.max_supports}")
        types = check_types(types, len(pairs))
        typed = types is not None and len(set(types)) > 1
        seg = self.new_segmenter(settings, typed=typed)
        rgbs, masks, kept = [], [], []
        with tempfile.TemporaryDirectory(prefix="fdseg-serve-") as tmp:
            for i, (im, m) in enumerate(pairs):
                rgb = decode_image(im, Path(tmp), 2 * i, max_pixels=self.config.max_pixels, min_size=seg.min_size)
                mask = decode_mask(m, Path(tmp), 2 * i + 1, size=rgb.shape[:2], max_pixels=self.config.max_pixels)
                if not mask.any():
                    raise UploadError(m.label, "support mask is empty: paint at least one defect pixel")
                if mask.all():
                    raise UploadError(m.label, "support mask covers the whole image: leave some background")
                rgbs.append(rgb)
                masks.append(mask)
                kept.append({"name": im.name, "image": im.data, "ext": image_format(im.data),
                             "mask_png": png_bytes(mask), "width": rgb.shape[1], "height": rgb.shape[0],
                             "mask_fraction": round(float(mask.mean()), 6), **({"type": types[i]} if types else {})})
            base = 2 * len(pairs)
            oks = [decode_image(n, Path(tmp), base + i, max_pixels=self.config.max_pixels, min_size=seg.min_size)
                   for i, n in enumerate(normals)]
        try:
            if typed:
                seg.fit(rgbs, masks, types=types, normals=oks or None)
            else:
                seg.fit(rgbs, masks, normals=oks or None)
        except InputError as e:
            raise UploadError(_upload_source(e.source, normals), e.problem) from None
        return Session(secrets.token_hex(8), settings, seg, kept, normals=len(oks))

    # -- sessions ------------------------------------------------------------------------------
    def add(self, session: Session) -> Session:
        """Keep ``session``; beyond ``max_sessions`` the least recently used unpinned ones are dropped."""
        with self._sessions_lock:
            self._sessions[session.id] = session
            unpinned = [sid for sid, s in self._sessions.items() if not s.pinned]
            for sid in unpinned[:max(0, len(unpinned) - self.config.max_sessions)]:
                del self._sessions[sid]
        return session

    def pinned(self) -> list[Session]:
        """The sessions loaded at start (``--inspector``), in the order given."""
        with self._sessions_lock:
            out = [s for s in self._sessions.values() if s.pinned]
        return sorted(out, key=lambda s: s.created)

    def get(self, sid: str) -> Session:
        with self._sessions_lock:
            s = self._sessions.get(sid) if SESSION_ID.match(sid or "") else None
            if s is None:
                raise NotFound(f"no live session {sid!r} (it may have expired: this server keeps the "
                               f"{self.config.max_sessions} most recently used)")
            self._sessions.move_to_end(sid)
            return s

    def drop(self, sid: str) -> None:
        if self.get(sid).pinned:
            raise UploadError(f"session {sid}", "loaded at start (fdseg serve --inspector): it stays for the "
                                                "server's life", status=409)
        with self._sessions_lock:
            self._sessions.pop(sid, None)

    @property
    def n_sessions(self) -> int:
        return len(self._sessions)

    # -- predict -------------------------------------------------------------------------------
    def segment(self, session: Session, queries: list[Upload], *, mask_format: str = "png",
                want_overlay: bool = False, store: bool = False) -> list[dict]:
        """Decode all queries first (any bad one -> 4xx, nothing computed), then predict each."""
        if not queries:
            raise UploadError("query", "send at least one query image (field 'query')")
        if len(queries) > self.config.max_queries:
            raise UploadError("query", f"{len(queries)} queries sent, this server takes at most "
                                       f"{self.config.max_queries} per request")
        seg = session.seg
        typed = bool(session.types)
        with tempfile.TemporaryDirectory(prefix="fdseg-serve-") as tmp:
            rgbs = [decode_image(q, Path(tmp), i, max_pixels=self.config.max_pixels, min_size=seg.min_size)
                    for i, q in enumerate(queries)]
        out = []
        for i, (q, rgb) in enumerate(zip(queries, rgbs)):
            pred = seg.predict(rgb)
            row = _row(q.name, Path(q.name), pred)
            res = {"index": i, "name": q.name, **{k: row[k] for k in ("width", "height", "defect_fraction",
                                                                       "components", "boxes", "max_score",
                                                                       "verdict", "defect_score")}}
            cells, specks = component_cells(pred)
            n_regions = sum(c >= MIN_CELLS and c > 0 for c in cells)
            res.update(component_cells=[round(c, 3) for c in cells], regions=n_regions,
                       specks=len(cells) - n_regions, min_region_cells=MIN_CELLS,
                       largest_cells=round(pred.largest_cells, 3), ok_gated=bool(pred.ok_gated))
            mask_png = png_bytes(pred.mask) if (mask_format == "png" or store) else b""
            if mask_format == "png":
                res["mask"] = {"format": "png", "data": b64(mask_png)}
            elif mask_format == "rle":
                res["mask"] = {"format": "rle", **rle_encode(pred.mask)}
            labels_png = b""
            typed_pred = typed and _typed(pred)
            if typed_pred:
                labels_png = _typed_result(res, pred, mask_format, store)
            ov = jpeg_bytes(draw_result(rgb, pred.mask, specks, *((pred.labels, pred.types) if typed_pred else ())))\
                if (want_overlay or store) else b""
            if want_overlay:
                res["overlay_jpeg"] = b64(ov)
            if store:
                score_png = png_bytes(np.round(pred.score * 255).astype(np.uint8), level=1)
                with session.lock:
                    session.results.pop(q.name, None)
                    session.results[q.name] = StoredResult(row, mask_png, score_png, ov, labels_png)
                    while len(session.results) > self.config.max_results:
                        session.results.popitem(last=False)
            out.append(res)
        return out

    def to_png(self, upload: Upload) -> bytes:
        with tempfile.TemporaryDirectory(prefix="fdseg-serve-") as tmp:
            return png_bytes(decode_image(upload, Path(tmp), 0, max_pixels=self.config.max_pixels, min_size=1))

    # -- results ZIP ---------------------------------------------------------------------------
    def results_zip(self, session: Session) -> bytes:
        with session.lock:
            items = list(session.results.values())
        taken: set[str] = set()
        rows, buf = [], io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for r in items:
                stem = archive_stem(r.row["file"], taken)
                rows.append({**r.row, "query": stem})
                z.writestr(f"masks/{stem}.png", r.mask_png)
                z.writestr(f"scores/{stem}.png", r.score_png)
                z.writestr(f"overlays/{stem}.jpg", r.overlay_jpg)
                if r.labels_png:
                    z.writestr(f"labels/{stem}.png", r.labels_png)
            if session.types:
                z.writestr("labels/legend.json", json.dumps({"good": 0, "types": session.type_info()["legend"]},
                                                            indent=1))
            colours = {e["type"]: tuple(int(e["colour"][k:k + 2], 16) for k in (1, 3, 5))
                       for e in session.type_info().get("legend", [])}
            sup_cards = []
            for i, s in enumerate(session.supports):
                rgb, mask = _support_arrays(s)
                kind = s.get("type")
                z.writestr(f"supports/support_{i + 1}.jpg", jpeg_bytes(overlay(rgb, mask, colours.get(kind, GREEN))))
                sup_cards.append(card(f"supports/support_{i + 1}.jpg", f"support {i + 1}: {s['name']}"
                                      + (f" ({kind})" if kind else "")))
            with tempfile.TemporaryDirectory(prefix="fdseg-serve-") as tmp:
                _write_summary(Path(tmp), rows)
                for f in ("summary.csv", "summary.json"):
                    z.write(Path(tmp) / f, f)
            z.writestr("settings.json", json.dumps({"settings": asdict(session.settings), "session": session.id,
                                                    "fdseg": __version__}, indent=1))
            z.writestr("report.html", _report(rows, session, sup_cards))
        return buf.getvalue()

    # -- inspector files -----------------------------------------------------------------------
    def inspector_file(self, session: Session) -> tuple[BinaryIO, int]:
        """The session's fit as an inspector file (``seg.save``; with the support images when the session
        has them): an open file, already removed from disk (read it, then close it), and its size."""
        seg = session.seg
        tmp = Path(tempfile.mkdtemp(prefix="fdseg-serve-"))
        try:
            sups = None     # the supports as files named as they were uploaded (the file keeps the names)
            if session.supports and len(session.supports) == getattr(seg, "n_supports", -1):
                sups = []
                for i, s in enumerate(session.supports):
                    d = tmp / str(i + 1)
                    (d / "image").mkdir(parents=True)
                    img = d / "image" / s["name"]       # a display name: no path in it
                    try:
                        img.write_bytes(s["image"])
                    except OSError:                     # a name this file system refuses (too long ...)
                        img = d / "image" / f"support_{i + 1}.{s['ext']}"
                        img.write_bytes(s["image"])
                    (d / "mask.png").write_bytes(s["mask_png"])
                    sups.append((img, d / "mask.png"))
            path = tmp / "session.fdseg"
            seg.save(path, include_supports=sups is not None, supports=sups)
            f = open(path, "rb")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)     # POSIX: the open file stays readable until closed
        size = os.fstat(f.fileno()).st_size
        if tmp.exists():            # (a system that cannot remove an open file): read it, then remove it
            data = f.read()
            f.close()
            shutil.rmtree(tmp, ignore_errors=True)
            f = io.BytesIO(data)
        return f, size

    def open_upload(self, upload: Upload) -> Session:
        """A new session from an uploaded inspector file (written to a temporary file the server names,
        loaded, removed). Every problem -> 400 naming the upload (never the temporary path)."""
        with tempfile.TemporaryDirectory(prefix="fdseg-serve-") as tmp:
            path = Path(tmp) / "upload.fdseg"
            path.write_bytes(upload.data)
            scrub = lambda text: str(text).replace(str(path), upload.name).replace(tmp, "(upload)")  # noqa: E731
            try:
                return open_inspector(path, self.config, name=upload.name)
            except InputError as e:
                src = scrub(e.source) if e.source is not None else upload.name
                if src != upload.name and not src.startswith(upload.name):
                    src = f"{upload.name}: {src}"
                raise UploadError(src, _one_line(scrub(e.problem))) from None
            except FdsegError as e:
                raise UploadError(upload.name, _one_line(scrub(e))) from None
            except Exception as e:      # never a 500 for a file's content: one line, no traceback
                raise UploadError(upload.name, f"cannot load it as an inspector file: {type(e).__name__}: "
                                               f"{_one_line(scrub(e))}") from None

    # -- saved sessions ------------------------------------------------------------------------
    def _saved_root(self) -> Path:
        if self.config.sessions_dir is None:
            raise UploadError("save", "this server was started without a sessions folder (--sessions-dir)")
        return Path(self.config.sessions_dir)

    def save(self, session: Session, title: str = "") -> dict:
        """Write the supports, their masks and the settings to ``sessions_dir/ID/`` (server-chosen names)."""
        root = self._saved_root()
        if not session.supports:
            raise UploadError("save", "this session was loaded from an inspector file that holds no support "
                                      "images: download the inspector file instead (GET /v1/sessions/ID/inspector)")
        if session.types and not all(s.get("type") for s in session.supports):
            raise UploadError("save", "a support of this session shows several defect types (a label mask): "
                                      "download the inspector file instead (GET /v1/sessions/ID/inspector)")
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{session.id}-", dir=root))
        try:
            sups = []
            for i, s in enumerate(session.supports):
                img_rel, mask_rel = f"supports/{i + 1}.{s['ext']}", f"masks/{i + 1}.png"
                write_bytes(tmp / img_rel, s["image"])
                write_bytes(tmp / mask_rel, s["mask_png"])
                sups.append({"image": img_rel, "mask": mask_rel, "name": s["name"],
                             **({"type": s["type"]} if "type" in s else {})})
            meta = {"format": "fdseg-session/1", "id": session.id, "title": title, "saved_at": time.time(),
                    "fdseg": __version__, "settings": asdict(session.settings), "supports": sups}
            write_text(tmp / "session.json", json.dumps(meta, indent=1))
            final = root / session.id
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _saved_summary(meta)

    def list_saved(self) -> list[dict]:
        if self.config.sessions_dir is None or not Path(self.config.sessions_dir).is_dir():
            return []
        out = []
        for d in Path(self.config.sessions_dir).iterdir():
            if SESSION_ID.match(d.name) and (d / "session.json").is_file():
                try:
                    out.append(_saved_summary(json.loads((d / "session.json").read_text())))
                except (ValueError, KeyError, TypeError):
                    continue
        return sorted(out, key=lambda m: -m["saved_at"])

    def load_saved(self, sid: str) -> tuple[Settings, list[tuple[Upload, Upload]], list[str] | None]:
        """A saved session's settings, its supports (image, mask uploads) and their types (None: untyped)."""
        if not SESSION_ID.match(sid or ""):
            raise NotFound(f"no saved session {sid!r}")
        d = self._saved_root() / sid
        try:
            meta = json.loads((d / "session.json").read_text())
        except (OSError, ValueError):
            raise NotFound(f"no saved session {sid!r}") from None
        settings = Settings.parse({k: str(v) for k, v in meta.get("settings", {}).items()}, self.config.defaults)
        rel = re.compile(r"^(supports|masks)/[0-9]+\.[a-z]{2,4}$")
        pairs = []
        for i, s in enumerate(meta.get("supports", [])):
            if not (rel.match(str(s.get("image", ""))) and rel.match(str(s.get("mask", "")))):
                raise UploadError(f"saved session {sid}", "session.json names files outside its folder")
            pairs.append((Upload((d / s["image"]).read_bytes(), display_name(s.get("name"), f"support {i + 1}"),
                                 f"support {i + 1}"),
                          Upload((d / s["mask"]).read_bytes(), f"mask {i + 1}", f"mask {i + 1}")))
        types = [str(s.get("type", "")) for s in meta.get("supports", [])]
        return settings, pairs, types if any(types) else None


_LOAD_LOCK = threading.Lock()


def open_inspector(path: Path, config: ServeConfig, *, name: str | None = None, pinned: bool = False) -> Session:
    """An inspector file -> a ready session (fitted: no supports needed) titled after the file.

    ``name``: the file's name to show (default: ``path``'s). Loaded on ``config.device`` with the
    server's pixel limit; a backbone the server has ``--weights`` for takes that file (its sha256 must be
    the recorded one). A file fitted on another numeric path than this server's loads all the same; the
    session's ``precision_note`` says so. Problems raise :class:`InputError` (``path: reason``)."""
    import warnings

    from ..inspector import InspectorPrecisionWarning, load, read
    name = name or path.name
    insp = read(path)
    file_settings = None
    try:
        file_settings = insp.settings
        backbone = file_settings.get("backbone") if isinstance(file_settings, dict) else None
    except (ValueError, TypeError, RecursionError):
        backbone = None     # load() says what is wrong
    weights = config.weights.get(backbone) if isinstance(backbone, str) and isinstance(file_settings, dict) \
        and file_settings.get("weights") is not None else None
    with _LOAD_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InspectorPrecisionWarning)
        seg = load(path, device=config.device, weights=weights, max_pixels=config.max_pixels)
    note = None
    for w in caught:
        if issubclass(w.category, InspectorPrecisionWarning):
            msg = str(w.message)
            note = msg[len(f"{path}: "):] if msg.startswith(f"{path}: ") else msg.replace(str(path), name)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    supports = []
    if insp.has_supports:
        shows = list(getattr(seg.state, "support_types", ()) or ()) if session_types(seg) else []
        for sname, rgb, mask in insp.supports(max_pixels=config.max_pixels):
            k = len(supports)
            kind = shows[k] if k < len(shows) else ()
            supports.append({"name": display_name(sname, f"support {k + 1}"), "image": png_bytes(rgb),
                             "ext": "png", "mask_png": png_bytes(mask), "width": rgb.shape[1],
                             "height": rgb.shape[0], "mask_fraction": round(float(mask.mean()), 6),
                             **({"type": kind[0]} if len(kind) == 1 else {})})
    s = seg.settings
    settings = Settings(method=s["method"], backbone=s["backbone"], refine=s.get("refine") or "none",
                        threshold=float(s.get("threshold") or 0.0), size=int(s["input_size"]),
                        resize=s.get("resize") or "", preset=s.get("preset") or "accurate")
    doc = insp.doc
    info = {"file": name, "preset": settings.preset, "supports": seg.n_supports,
            "precision": doc.get("precision"), "precision_here": s.get("precision"),
            "fdseg_version": doc.get("fdseg_version"), "created": doc.get("created"),
            "supports_included": bool(supports), "bytes": insp.size}
    title = name[:-len(".fdseg")] if name.lower().endswith(".fdseg") and len(name) > 6 else name
    return Session(secrets.token_hex(8), settings, seg, supports, title=title, inspector=info,
                   precision_note=note, pinned=pinned)


def _one_line(text) -> str:
    return " ".join(str(text).split("\n")[0].split()) or "unreadable"


SPECK = (255, 176, 0)       # amber: a mask speck below the smallest defect size (not what makes the verdict)


def component_cells(pred) -> tuple[list[float], np.ndarray | None]:
    """Each 8-connected component of ``pred.mask`` in grid cells, in the order of ``pred.boxes`` (the
    verdict's measure: pixels x grid cells / pixels), and the mask of the *specks*: the components below
    ``MIN_CELLS`` grid cells, which stay in the mask but do not make the image defective (None: none)."""
    from scipy import ndimage
    mask = pred.mask
    box = mask_box(mask)
    if box is None:
        return [], None
    ys, xs = box
    lab, n = ndimage.label(mask[ys, xs], structure=np.ones((3, 3), dtype=bool))
    px = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    cells = px * pred.margin_grid.size / mask.size
    small = ~((cells >= MIN_CELLS) & (cells > 0))
    specks = None
    if small.any():
        specks = np.zeros_like(mask)
        specks[ys, xs] = np.concatenate([[False], small])[lab]
    return [float(c) for c in cells], specks


def draw_result(rgb: np.ndarray, mask: np.ndarray, specks: np.ndarray | None, labels: np.ndarray | None = None,
                types: tuple[str, ...] = ()) -> np.ndarray:
    """The result picture: the regions that make the verdict filled red and outlined (with ``labels`` of a
    typed session: each in its type's colour, ``typed_overlay``); specks (below the smallest defect size)
    only ringed in amber, so that a filled region always means "defective"."""
    if labels is not None:
        from ..multitype import typed_overlay
        out = typed_overlay(rgb, labels if specks is None else np.where(specks, 0, labels), types)
        if specks is None:
            return out
    elif specks is None:
        return overlay(rgb, mask, RED)
    else:
        out = overlay(rgb, mask & ~specks, RED)
    from scipy import ndimage
    w = max(1, round(max(rgb.shape[:2]) / 300))
    ys, xs = mask_box(specks)
    pad = w + 2
    ys = slice(max(0, ys.start - pad), min(mask.shape[0], ys.stop + pad))
    xs = slice(max(0, xs.start - pad), min(mask.shape[1], xs.stop + pad))
    sp = specks[ys, xs]
    sq = np.ones((3, 3), dtype=bool)        # a square ring one pixel off the speck, ``w`` wide
    ring = ndimage.binary_dilation(sp, sq, iterations=w + 1) & ~ndimage.binary_dilation(sp, sq, iterations=1)
    ring &= ~mask[ys, xs]
    sub = out[ys, xs]
    sub[ring] = SPECK
    sub[sp] = (0.7 * sub[sp] + 0.3 * np.array(SPECK, np.float32)).astype(np.uint8)
    return out


def _typed_result(res: dict, pred, mask_format: str, store: bool) -> bytes:
    """Add a typed prediction's keys to the result ``res`` (types, type, defects, verdicts, areas, fractions,
    labels as ``mask_format`` says); returns the label PNG when it was encoded (always when ``store``)."""
    from ..multitype import label_png
    res.update(types=list(pred.types), type=pred.type, defects=[dict(d) for d in pred.defects],
               verdicts=dict(pred.verdicts), areas=dict(pred.areas),
               fractions={t: round(f, 6) for t, f in pred.fractions.items()})
    data = label_png(pred.labels, pred.types) if (mask_format == "png" or store) else b""
    if mask_format == "png":
        res["labels"] = {"format": "png", "data": b64(data)}
    elif mask_format == "rle":
        h, w = pred.labels.shape
        res["labels"] = {"format": "rle", "size": [h, w],
                         "by_type": {t: rle_encode(pred.labels == k) for k, t in enumerate(pred.types, 1)}}
    return data


def _upload_source(source, normals: list[Upload]):
    """An error's source, with ``normal image N`` (the library's name for the N-th array) -> that upload's label."""
    m = re.fullmatch(r"normal image (\d+)", str(source or ""))
    if m and 1 <= int(m.group(1)) <= len(normals):
        return normals[int(m.group(1)) - 1].label
    return source


def _saved_summary(meta: dict) -> dict:
    return {"id": meta["id"], "title": meta.get("title", ""), "saved_at": meta["saved_at"],
            "settings": meta["settings"], "supports": len(meta["supports"])}


def _support_arrays(s: dict) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    from ..data.images import pil_to_rgb
    rgb = pil_to_rgb(Image.open(io.BytesIO(s["image"])))
    mask = np.array(Image.open(io.BytesIO(s["mask_png"]))) > 0
    return rgb, mask


def _report(rows: list[dict], session: Session, sup_cards: list[str]) -> str:
    ok = sorted(rows, key=lambda r: (-r["defect_fraction"], r["query"]))
    typed = bool(session.types)
    secs = [f"<p class='muted'>settings: {esc(json.dumps(asdict(session.settings)))}</p>",
            "<p class='muted'>plan: " + esc("; ".join(f"{d['step']}={d['value']} ({d['reason']})"
                                                      for d in session.info()["plan"])) + "</p>",
            *([_legend_html(session, rows)] if typed else []),
            "<h2>Supports</h2><div class='grid'>" + "".join(sup_cards) + "</div>",
            "<h2>Queries</h2>" + table(["query", "file", "verdict", *(["type"] if typed else []), "defect score",
                                        "defect area", "components", "max score"],
                                       [[r["query"], r["file"], r.get("verdict", "-"),
                                         *([r.get("type") or "-"] if typed else []), r.get("defect_score", "-"),
                                         f"{100 * r['defect_fraction']:.3f}%", r["components"], r["max_score"]]
                                        for r in ok]),
            "<h2>Overlays (most defective first)</h2><div class='grid'>" + "".join(
                card(f"overlays/{r['query']}.jpg", f"{r['file']}: {100 * r['defect_fraction']:.3f}% defect, "
                                                   f"max score {r['max_score']}") for r in ok) + "</div>"]
    return page("fdseg inspection", secs)


def _legend_html(session: Session, rows: list[dict]) -> str:
    """The report's legend of a typed session: value, type, colour, how many queries have that type."""
    entries = session.type_info()["legend"]
    count = {e["type"]: sum(1 for r in rows if r.get("type") == e["type"]) for e in entries}
    return ("<h2>Defect types</h2><p class='muted'>labels/STEM.png: value k = type k (0 = good); overlays "
            "coloured by type; labels/legend.json</p><table><tr><th>value</th><th>type</th><th>colour</th>"
            "<th>queries of this type (strongest defect)</th></tr>" + "".join(
                f"<tr><td>{e['value']}</td><td>{esc(e['type'])}</td><td><span style='display:inline-block;"
                f"width:1.2em;height:1em;background:{e['colour']}'></span> {e['colour']}</td>"
                f"<td>{count[e['type']]}</td></tr>" for e in entries) + "</table>")
