"""Folders of defect-free ("normal", OK) images: which ones belong to which defect class, and a
disjoint split into the normals a fit uses and the OK queries a bench evaluates.

Layouts read by :meth:`NormalPool.scan`:

* ``ROOT/index.csv`` with ``file`` and ``source`` columns (the distillation pool in
  ``shared/data/distill``: ``images/SOURCE_STEM.jpg``): one group per source;
* ``ROOT/DATASET/CLASS/[images/]*.png``: one group per ``DATASET/CLASS``; ``ROOT/DATASET/*.png``:
  one group per dataset;
* a flat folder of images: one group for every class.

A defect class ``(dataset, cls)`` takes the longest group that names it (:func:`group_matches`):
``magnetic_tile`` -> every ``magnetic_tile`` class, ``visa_capsules`` -> ``visa/capsules``,
``visa_macaroni1`` -> ``visa/macaroni1_*``, ``bsdata`` -> ``bsdata/pitting``.

``index.csv`` may give the source size of each image (``src_w``, ``src_h``) when the pool's
copies were made smaller (the distill pool's long sides are at most 512 px): :meth:`NormalPool.restore`
writes copies at the source size, so that the normals and OK queries are seen at the scale of the
defect images they are matched with (the preprocessing's size rules depend on pixel size).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .data.images import is_image_file
from .errors import InputError


def _images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and is_image_file(p)), key=lambda p: p.name)


def _class_normals(c: Path) -> list[Path]:
    """The defect-free images of a class folder: its ``normals/`` or ``good/`` folder (a dataset class laid
    out as ``images/ + masks/ + normals/``), else its ``images/`` when it has no ``masks/`` beside them
    (then they are defect-free), else the images in the folder itself."""
    for sub in ("normals", "good"):
        if (c / sub).is_dir():
            return _images(c / sub)
    if (c / "images").is_dir():
        return [] if (c / "masks").is_dir() else _images(c / "images")
    return _images(c)


def group_matches(group: str, dataset: str, cls: str) -> bool:
    """Whether normals group ``group`` (``DATASET``, ``DATASET/CLASS`` or ``DATASET_PREFIX``) holds
    defect-free images of class ``cls`` of ``dataset``; the empty group matches every class."""
    g = group.replace("/", "_").lower()
    key = f"{dataset}_{cls}".lower()
    return g == "" or g == dataset.lower() or key == g or key.startswith(g + "_")


@dataclass
class NormalPool:
    root: Path
    groups: dict[str, list[Path]]
    source_size: dict[Path, tuple[int, int]] = field(default_factory=dict)   # file -> (w, h) at the source

    @classmethod
    def scan(cls, root: str | Path) -> "NormalPool":
        root = Path(root)
        if not root.is_dir():
            raise InputError(root, "normals folder does not exist")
        if (root / "index.csv").is_file():
            return cls._from_index(root)
        groups: dict[str, list[Path]] = {}
        flat = _images(root)
        if flat:
            groups[""] = flat
        for ds in sorted(p for p in root.iterdir() if p.is_dir()):
            if _images(ds):
                groups[ds.name] = _images(ds)
            for c in sorted(p for p in ds.iterdir() if p.is_dir()):
                imgs = _class_normals(c)
                if imgs:
                    groups[f"{ds.name}/{c.name}"] = imgs
        if not groups:
            raise InputError(root, "no images found (expected DATASET/CLASS/*.png, DATASET/*.png, image files, "
                                   "or an index.csv with file and source columns)")
        return cls(root, groups)

    @classmethod
    def _from_index(cls, root: Path) -> "NormalPool":
        groups: dict[str, list[Path]] = {}
        sizes: dict[Path, tuple[int, int]] = {}
        with open(root / "index.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or "file" not in rows[0] or "source" not in rows[0]:
            raise InputError(root / "index.csv", "needs 'file' and 'source' columns")
        for r in rows:
            p = root / "images" / r["file"]
            if not p.is_file():
                p = root / r["file"]
            if not p.is_file():
                raise InputError(p, "listed in index.csv but missing")
            groups.setdefault(r["source"], []).append(p)
            try:
                sizes[p] = (int(r["src_w"]), int(r["src_h"]))
            except (KeyError, TypeError, ValueError):
                pass
        return cls(root, {g: sorted(v, key=lambda p: p.name) for g, v in sorted(groups.items())}, sizes)

    def group_for(self, dataset: str, cls: str) -> str | None:
        """The longest group holding normals of ``dataset``/``cls`` (None: none)."""
        hits = [g for g in self.groups if group_matches(g, dataset, cls)]
        return max(hits, key=len) if hits else None

    def files(self, dataset: str, cls: str) -> list[Path]:
        g = self.group_for(dataset, cls)
        return list(self.groups[g]) if g is not None else []

    def restore(self, files: Sequence[Path], cache: Path) -> list[Path]:
        """``files`` at their source size (``index.csv``'s ``src_w`` x ``src_h``): resized copies written
        once under ``cache`` (bicubic, JPEG quality 95); files already at that size are returned as they are."""
        from PIL import Image
        out = []
        for p in files:
            size = self.source_size.get(Path(p))
            if size is None:
                out.append(Path(p))
                continue
            with Image.open(p) as im:
                if im.size == size:
                    out.append(Path(p))
                    continue
                dst = Path(cache) / f"{Path(p).stem}_{size[0]}x{size[1]}.jpg"
                if not dst.is_file():
                    from .atomic import write_bytes
                    import io
                    buf = io.BytesIO()
                    im.convert("RGB").resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=95)
                    write_bytes(dst, buf.getvalue())
            out.append(dst)
        return out


def evenly(items: Sequence, n: int) -> list:
    """``n`` items spread evenly over ``items`` (first and last included; all when fewer)."""
    if n >= len(items):
        return list(items)
    if n <= 0:
        return []
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def collect_normals(items: Iterable[str | Path]) -> list[Path]:
    """Files and folders (their image files, sorted by name) -> normal image paths."""
    out: list[Path] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            imgs = _images(p)
            if not imgs:
                raise InputError(p, "normals folder holds no image files")
            out.extend(imgs)
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(p, "normal image file or folder does not exist")
    return out


def ok_episodes(cat, shots: int, seed: int, ok_by_class: dict[tuple[str, str], list[Path]]) -> list:
    """Defect-free episodes: each OK query of a class with ``shots`` supports drawn from the class
    (a generator per class seeded by ``seed``, apart from the protocol's, so the defect episodes stay
    the paper's)."""
    import random

    from .data.episodes import Episode, _rel
    root = cat.root
    out = []
    for (ds, cls), files in sorted(ok_by_class.items()):
        samples = sorted(cat.classes[ds][cls], key=lambda s: s.image.name)
        if len(samples) < shots:
            raise InputError(root / ds / cls, f"class has {len(samples)} images: {shots} supports cannot be drawn")
        rng = random.Random(f"ok/{seed}/{ds}/{cls}/{shots}")
        for q in files:
            sup = rng.sample(samples, shots)
            out.append(Episode(ds, cls, shots, _rel(Path(q), root), None, tuple(_rel(s.image, root) for s in sup),
                               tuple(_rel(s.mask, root) for s in sup)))
    return out


def bench_pools(cat, normals: Path | None, n_normals: int | None, ok_queries: Path | None, n_ok: int,
                cache: Path) -> tuple[dict, dict]:
    """({(dataset, cls): normal files}, {(dataset, cls): OK query files}) of every class of ``cat`` that
    the folders hold images for. OK queries are never among the normals (the same image file, or a
    copy restored from it), nor any image of the catalog (the evaluated defect queries, its defect-free
    images); both are at their source size (:meth:`NormalPool.restore`)."""
    evaluated = {s.image.resolve() for s in cat.samples()} | {s.image.resolve() for g in cat.good.values() for s in g}
    npool = NormalPool.scan(normals) if normals else None
    opool = NormalPool.scan(ok_queries) if ok_queries else None
    norm_by, ok_by = {}, {}
    for ds in sorted(cat.classes):
        for cls in sorted(cat.classes[ds]):
            oks = evenly([p for p in opool.files(ds, cls) if p.resolve() not in evaluated], n_ok) if opool else []
            if oks:
                ok_by[(ds, cls)] = opool.restore(oks, cache)
            if npool:
                taken = {p.resolve() for p in oks} | evaluated
                files = [p for p in npool.files(ds, cls) if p.resolve() not in taken]
                files = files if n_normals is None else evenly(files, n_normals)
                if files:
                    norm_by[(ds, cls)] = npool.restore(files, cache)
    return norm_by, ok_by
