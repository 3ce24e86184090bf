"""Dataset layouts -> one catalog of samples grouped by dataset and class.

Supported layouts (detected automatically under a root folder):

* ``fdseg`` (the layout of ``shared/data/defects``)::

      ROOT/DATASET/CLASS/images/STEM.*   ROOT/DATASET/CLASS/masks/STEM.png
      ROOT/DATASET/CLASS/good/*.*        (optional defect-free images)

* ``gfds`` (the paper's release)::

      ROOT/SUBSET/images/CLASS/STEM.*    ROOT/SUBSET/ground_truth/CLASS/STEM[_mask].png

* ``mvtec`` (MVTec AD; one dataset per category, defect types are classes)::

      ROOT/CATEGORY/test/DEFECT/STEM.png  ROOT/CATEGORY/ground_truth/DEFECT/STEM_mask.png
      ROOT/CATEGORY/test/good/*.png       (defect-free queries)

* ``visa`` (VisA; one dataset per category, all defects of a category are one class)::

      ROOT/split_csv/1cls.csv  (object,split,label,image,mask)   or
      ROOT/CATEGORY/image_anno.csv (image,label,mask)

A root may also be a single dataset or class folder of the fdseg layout.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .images import IMAGE_SUFFIXES, image_size, is_image_file
from ..errors import InputError


@dataclass(frozen=True)
class Sample:
    """One image; ``mask`` is None for a defect-free image."""

    image: Path
    mask: Path | None
    dataset: str
    cls: str

    @property
    def stem(self) -> str:
        return self.image.stem

    @property
    def defect_free(self) -> bool:
        return self.mask is None


@dataclass(frozen=True)
class Problem:
    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass
class Catalog:
    """Samples of a root folder: ``classes[dataset][cls]`` -> defective samples
    (sorted by file name), ``good[dataset]`` -> defect-free samples."""

    root: Path
    layout: str
    classes: dict[str, dict[str, list[Sample]]] = field(default_factory=dict)
    good: dict[str, list[Sample]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def datasets(self) -> list[str]:
        return sorted(set(self.classes) | set(self.good))

    def samples(self, dataset: str | None = None) -> list[Sample]:
        out = []
        for ds in sorted(self.classes):
            if dataset is not None and ds != dataset:
                continue
            for cls in sorted(self.classes[ds]):
                out.extend(self.classes[ds][cls])
        return out

    def subset(self, datasets: list[str] | None = None, classes: list[str] | None = None,
               max_per_class: int | None = None) -> "Catalog":
        """A smaller catalog: only some datasets / classes ("DATASET/CLASS" or "CLASS"),
        and at most ``max_per_class`` images of each class (the first by name)."""
        if datasets:
            unknown = sorted(set(datasets) - set(self.datasets))
            if unknown:
                raise InputError(self.root, f"no dataset named {', '.join(unknown)} (have: {', '.join(self.datasets)})")
        out = Catalog(self.root, self.layout, problems=list(self.problems))
        for ds, by_cls in self.classes.items():
            if datasets and ds not in datasets:
                continue
            for cls, samples in by_cls.items():
                if classes and cls not in classes and f"{ds}/{cls}" not in classes:
                    continue
                out.classes.setdefault(ds, {})[cls] = samples[:max_per_class] if max_per_class else list(samples)
            if ds in self.good and ds in out.classes:
                out.good[ds] = list(self.good[ds])
        if classes and not out.classes:
            raise InputError(self.root, f"no class named {', '.join(classes)}")
        return out

    def counts(self) -> list[tuple[str, str, int]]:
        rows = []
        for ds in self.datasets:
            for cls in sorted(self.classes.get(ds, {})):
                rows.append((ds, cls, len(self.classes[ds][cls])))
            if self.good.get(ds):
                rows.append((ds, "(defect-free)", len(self.good[ds])))
        return rows


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def _mask_for(mask_dir: Path, stem: str, suffixes=("", "_mask", "_gt")) -> Path | None:
    for suf in suffixes:
        for ext in IMAGE_SUFFIXES:
            p = mask_dir / f"{stem}{suf}{ext}"
            if p.is_file():
                return p
    return None


def _pair(images: list[Path], mask_dir: Path, dataset: str, cls: str, cat: Catalog,
          mask_suffixes=("", "_mask", "_gt")) -> list[Sample]:
    samples, used = [], set()
    for img in images:
        m = _mask_for(mask_dir, img.stem, mask_suffixes)
        if m is None:
            cat.problems.append(Problem(img, "image has no mask (looked in " f"{mask_dir})"))
            continue
        used.add(m.resolve())
        samples.append(Sample(img, m, dataset, cls))
    if mask_dir.is_dir():
        for m in _images_in(mask_dir):
            if m.resolve() not in used:
                cat.problems.append(Problem(m, "mask has no image"))
    return samples


def _read_fdseg_class(cls_dir: Path, dataset: str, cat: Catalog) -> None:
    imgs = _images_in(cls_dir / "images")
    samples = _pair(imgs, cls_dir / "masks", dataset, cls_dir.name, cat)
    if samples:
        cat.classes.setdefault(dataset, {})[cls_dir.name] = samples
    good = _images_in(cls_dir / "good")
    if good:
        cat.good.setdefault(dataset, []).extend(Sample(p, None, dataset, cls_dir.name) for p in good)


def _is_fdseg_class(d: Path) -> bool:
    return (d / "images").is_dir() and (d / "masks").is_dir()


def _read_fdseg(root: Path, cat: Catalog) -> None:
    if _is_fdseg_class(root):
        _read_fdseg_class(root, root.parent.name or "dataset", cat)
        return
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if _is_fdseg_class(d):  # root is a dataset folder
            _read_fdseg_class(d, root.name, cat)
            continue
        for c in sorted(p for p in d.iterdir() if p.is_dir()):
            if _is_fdseg_class(c):
                _read_fdseg_class(c, d.name, cat)


def _read_gfds(root: Path, cat: Catalog) -> None:
    subsets = [root] if (root / "images").is_dir() and (root / "ground_truth").is_dir() else \
        sorted(p for p in root.iterdir() if p.is_dir() and (p / "images").is_dir() and (p / "ground_truth").is_dir())
    for sub in subsets:
        for c in sorted(p for p in (sub / "images").iterdir() if p.is_dir()):
            samples = _pair(_images_in(c), sub / "ground_truth" / c.name, sub.name, c.name, cat)
            if samples:
                cat.classes.setdefault(sub.name, {})[c.name] = samples


def _read_mvtec(root: Path, cat: Catalog) -> None:
    cats = [root] if (root / "test").is_dir() and (root / "ground_truth").is_dir() else \
        sorted(p for p in root.iterdir() if p.is_dir() and (p / "test").is_dir() and (p / "ground_truth").is_dir())
    for c in cats:
        for d in sorted(p for p in (c / "test").iterdir() if p.is_dir()):
            if d.name == "good":
                cat.good.setdefault(c.name, []).extend(Sample(p, None, c.name, "good") for p in _images_in(d))
                continue
            samples = _pair(_images_in(d), c / "ground_truth" / d.name, c.name, d.name, cat,
                            mask_suffixes=("_mask", ""))
            if samples:
                cat.classes.setdefault(c.name, {})[d.name] = samples


def _visa_rows(root: Path) -> list[dict]:
    split = root / "split_csv" / "1cls.csv"
    rows = []
    if split.is_file():
        with open(split, newline="") as f:
            rows = list(csv.DictReader(f))
        return rows
    for c in sorted(p for p in root.iterdir() if p.is_dir() and (p / "image_anno.csv").is_file()):
        with open(c / "image_anno.csv", newline="") as f:
            for r in csv.DictReader(f):
                r = dict(r)
                r.setdefault("object", c.name)
                rows.append(r)
    return rows


def _read_visa(root: Path, cat: Catalog) -> None:
    for r in _visa_rows(root):
        obj = (r.get("object") or "").strip()
        img_rel, mask_rel = (r.get("image") or "").strip(), (r.get("mask") or "").strip()
        if not obj or not img_rel:
            continue
        img = root / img_rel
        if not img.is_file():
            alt = root / obj / img_rel
            img = alt if alt.is_file() else img
        if not img.is_file():
            cat.problems.append(Problem(img, "listed in the VisA CSV but missing"))
            continue
        label = (r.get("label") or "").strip().lower()
        if label == "normal" or not mask_rel:
            cat.good.setdefault(obj, []).append(Sample(img, None, obj, "good"))
            continue
        m = root / mask_rel
        if not m.is_file():
            alt = root / obj / mask_rel
            m = alt if alt.is_file() else m
        if not m.is_file():
            cat.problems.append(Problem(img, f"image has no mask ({m} missing)"))
            continue
        cat.classes.setdefault(obj, {}).setdefault(obj, []).append(Sample(img, m, obj, obj))
    for by_cls in cat.classes.values():
        for k in by_cls:
            by_cls[k] = sorted(set(by_cls[k]), key=lambda s: s.image.name)


def detect_layout(root: Path) -> str:
    root = Path(root)
    if (root / "split_csv" / "1cls.csv").is_file() or any(
            (p / "image_anno.csv").is_file() for p in root.iterdir() if p.is_dir()):
        return "visa"
    if _is_fdseg_class(root):
        return "fdseg"
    subdirs = [p for p in root.iterdir() if p.is_dir()]
    if ((root / "test").is_dir() and (root / "ground_truth").is_dir()) or any(
            (p / "test").is_dir() and (p / "ground_truth").is_dir() for p in subdirs):
        return "mvtec"
    if ((root / "images").is_dir() and (root / "ground_truth").is_dir()) or any(
            (p / "images").is_dir() and (p / "ground_truth").is_dir() for p in subdirs):
        return "gfds"
    return "fdseg"


READERS = {"fdseg": _read_fdseg, "gfds": _read_gfds, "mvtec": _read_mvtec, "visa": _read_visa}


def scan(root: str | Path, layout: str = "auto") -> Catalog:
    """Read a dataset root into a :class:`Catalog` (file names only; nothing decoded)."""
    root = Path(root)
    if not root.exists():
        raise InputError(root, "dataset folder does not exist")
    if not root.is_dir():
        raise InputError(root, "expected a dataset folder")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout not in READERS:
        raise InputError(root, f"unknown layout {layout!r} (known: {', '.join(READERS)})")
    cat = Catalog(root, layout)
    READERS[layout](root, cat)
    if not cat.classes and not cat.problems:
        raise InputError(root, "found no images with masks (expected DATASET/CLASS/images + masks, "
                               "or the GFDS, MVTec AD or VisA layout)")
    return cat


def validate(cat: Catalog, deep: bool = False, progress: bool = False) -> list[Problem]:
    """Check every pair: readable headers, mask size == image size, non-empty mask.

    ``deep`` also decodes every file (finds truncated data). Returns new problems
    (also appended to ``cat.problems``)."""
    from .images import load_image, load_mask

    found: list[Problem] = []
    samples = [s for ds in cat.classes.values() for ss in ds.values() for s in ss]
    samples += [s for ss in cat.good.values() for s in ss]
    it = samples
    if progress:
        from tqdm import tqdm
        it = tqdm(samples, desc="validating", unit="img")
    bad: set[Sample] = set()
    for s in it:
        try:
            if deep:
                rgb = load_image(s.image)
                hw = rgb.shape[:2]
            else:
                hw = image_size(s.image)
            if s.mask is not None:
                if deep:
                    m = load_mask(s.mask, size=hw)
                    if not m.any():
                        raise InputError(s.mask, "mask is empty (no defect pixel)")
                else:
                    mhw = image_size(s.mask)
                    if mhw != hw:
                        raise InputError(s.mask, f"mask is {mhw[1]}x{mhw[0]} but its image is {hw[1]}x{hw[0]}")
        except InputError as e:
            found.append(Problem(Path(e.source or s.image), e.problem))
            bad.add(s)
    if bad:
        for ds in cat.classes.values():
            for k in ds:
                ds[k] = [s for s in ds[k] if s not in bad]
        for k in cat.good:
            cat.good[k] = [s for s in cat.good[k] if s not in bad]
    cat.problems.extend(found)
    return found
