"""The multi-type benchmark (``fdseg bench --multi-type``): every class of a dataset is a defect type.

Protocol (the paper's seed-2 style, :mod:`fdseg.data.episodes`): per dataset with at least two classes,
one ``random.Random(seed)`` consumed in order; every image of the dataset (classes sorted by name, images
by file name; an image filed under several classes, found by its bytes, is one query) is the query of one
episode, whose supports are K images drawn by ``rng.sample`` from every class's sorted images other than
the query. The query's ground truth is a label map: the union of its masks in every class it is filed
under (a pixel in two classes' masks: the first class). The multi-type segmenter fits all the supports
(types = class names) and labels the query among all the types.

On the same queries, with the same supports, one type per fit (today's bench): for each class the query
is filed under, a FewShotSegmenter fitted on that class's K supports predicts the query, scored against
that class's mask alone (the confusion matrix of :mod:`fdseg.metrics`).

Reported per dataset and shot count: per-type IoU and their mean (mIoU) both ways, the multi-type
pixel confusion matrix (ground truth x prediction, 0 = good), and at image level the type accuracy (the
query's true type = the class with the largest ground-truth area; its predicted type = the type with the
largest labelled area, or the type of its strongest defect: ``TypedPrediction.type``; "none" where
nothing is labelled) with the image confusion matrix.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .atomic import write_text
from .bench import BenchConfig, RunLog
from .data.images import load_mask
from .data.layouts import Catalog, scan
from .data.preprocess import resize_mask
from .errors import FdsegError, InputError
from .multitype import COMPETITIONS, DEFAULT_COMPETITION, DEFAULT_LABELLING, LABELLINGS, MultiTypeSegmenter, combine

PROTOCOL = "multi-type v1"


@dataclass(frozen=True)
class TypedEpisode:
    dataset: str
    shots: int
    query: str                                   # image, relative to the catalog root
    gt: tuple[tuple[str, str], ...]              # (class, mask) of every class the query image is filed under
    supports: tuple[tuple[str, str, str], ...]   # (class, image, mask), K per class, classes sorted

    @property
    def id(self) -> str:
        return f"{self.dataset}/{self.shots}/{self.query}"


def expand_classes(cat: Catalog, patterns: list[str] | None) -> list[str] | None:
    """``--classes`` entries with glob patterns (``visa/macaroni1_*``) -> the DATASET/CLASS names they match."""
    if not patterns:
        return None
    names = [f"{ds}/{c}" for ds in cat.classes for c in cat.classes[ds]]
    out = []
    for p in patterns:
        if any(ch in p for ch in "*?["):
            hits = [n for n in names if fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n.split("/", 1)[1], p)]
            if not hits:
                raise InputError(cat.root, f"no class matches {p!r}")
            out += hits
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def _rel(p: Path, root: Path) -> str:
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(p.resolve())


def make_typed_episodes(cat: Catalog, shots: int, seed: int = 2) -> list[TypedEpisode]:
    """The multi-type episodes of every dataset of ``cat`` with at least two classes (module doc)."""
    if shots < 1:
        raise InputError(None, f"shots must be >= 1, got {shots}")
    digests: dict[Path, str] = {}

    def ident(path: Path) -> str:
        if path not in digests:
            digests[path] = hashlib.sha1(path.read_bytes()).hexdigest()
        return digests[path]

    out = []
    root = cat.root
    for ds in sorted(cat.classes):
        classes = sorted(cat.classes[ds])
        if len(classes) < 2:
            continue
        rng = random.Random(seed)
        by_class = {c: sorted(cat.classes[ds][c], key=lambda s: s.image.name) for c in classes}
        filed: dict[str, list] = {}
        for c in classes:
            for s in by_class[c]:
                filed.setdefault(ident(s.image), []).append((c, s))
        seen = set()
        for c in classes:
            for q in by_class[c]:
                h = ident(q.image)
                if h in seen:
                    continue
                seen.add(h)
                sups = []
                for k in classes:
                    pool = [s for s in by_class[k] if ident(s.image) != h]
                    if len(pool) < shots:
                        raise InputError(root / ds / k, f"class has {len(pool)} images besides the query: {shots}-shot "
                                                        f"multi-type episodes need at least {shots}")
                    sups += [(k, _rel(s.image, root), _rel(s.mask, root)) for s in rng.sample(pool, shots)]
                out.append(TypedEpisode(ds, shots, _rel(q.image, root),
                                        tuple((k, _rel(s.mask, root)) for k, s in filed[h]), tuple(sups)))
    return out


def _gt_labels(root: Path, ep: TypedEpisode, classes: list[str], hw: tuple[int, int], size) -> np.ndarray:
    gt = np.zeros(size if size else hw, np.uint8)
    for c, m in ep.gt:
        mk = load_mask(root / m, size=hw)
        if size:
            mk = resize_mask(mk, size)
        gt[mk & (gt == 0)] = classes.index(c) + 1
    return gt


def _cm(gt: np.ndarray, pred: np.ndarray, n: int) -> list[list[int]]:
    return np.bincount(gt.ravel().astype(np.int64) * n + pred.ravel(), minlength=n * n).reshape(n, n).tolist()


def run_typed_episode(seg: MultiTypeSegmenter, root: Path, ep: TypedEpisode, classes: list[str], eval_size: int,
                      *, variants: list[str] | None = None, labellings: tuple[str, ...] | None = None,
                      relative: tuple[bool, ...] = (True,), single: bool = True, gates: tuple[float, ...] = ()) -> dict:
    """One episode -> its record: per variant (``competition`` x labelling x relative) the pixel
    confusion matrix (classes + 1 labels) and the labelled areas; ``single``: the one-type-per-fit counts
    (tp, fp, fn, tn) of each class the query is filed under."""
    size = (eval_size, eval_size) if eval_size else None
    images = [root / i for _, i, _ in ep.supports]
    masks = [root / m for _, _, m in ep.supports]
    types = [c for c, _, _ in ep.supports]
    n = len(classes) + 1
    rec = {"id": ep.id, "dataset": ep.dataset, "query": ep.query, "classes": classes, "variants": {}}
    gt = None
    labellings = labellings or (seg.labelling,)
    for comp in variants or [seg.competition]:
        seg.competition = comp
        t0 = time.perf_counter()
        seg.fit(images, masks, types=types)
        t1 = time.perf_counter()
        pred = seg.predict(root / ep.query, size=size)
        t2 = time.perf_counter()
        if gt is None:
            gt = _gt_labels(root, ep, classes, pred.query_size, size)
            rec["gt_area"] = {c: int((gt == k).sum()) for k, c in enumerate(classes, 1)}
        lut = np.array([0] + [classes.index(t) + 1 for t in seg.types], np.uint8)
        subs = seg.type_segmenters()
        ths = [float(s.state.post.threshold) for s in subs]
        for lab in labellings:
            for rel in relative:
                p = pred if (lab == seg.labelling and rel) else combine(
                    pred.per_type, ths, seg.types, labelling=lab, relative=rel)
                pl = lut[p.labels]
                rec["variants"][variant_key(comp, lab, rel)] = {"cm": _cm(gt, pl, n),
                                        "pred_area": {c: int((pl == k).sum()) for k, c in enumerate(classes, 1)},
                                        "pred_type": p.type,
                                        "fit_ms": (t1 - t0) * 1e3, "predict_ms": (t2 - t1) * 1e3}
        for gate in gates:                  # the weak-region gate, on the pixel labels
            p = combine(pred.per_type, ths, seg.types, labelling="pixel", gate=gate)
            pl = lut[p.labels]
            rec["variants"][f"{comp}/pixel/gate{gate:g}"] = {
                "cm": _cm(gt, pl, n), "pred_area": {c: int((pl == k).sum()) for k, c in enumerate(classes, 1)},
                "pred_type": p.type, "fit_ms": (t1 - t0) * 1e3, "predict_ms": (t2 - t1) * 1e3}
        # each type's own prediction: its mask's area and its peak margin above its threshold
        rec["variants"][variant_key(comp, labellings[0], relative[0])]["per_type"] = {
            t: {"area": int(q.mask.sum()), "peak": round(float(q.defect_score), 4)} for t, q in zip(seg.types, pred.per_type)}
    if single:
        plain = seg._plain()
        rec["single"] = {}
        t0 = time.perf_counter()
        for c in sorted({c for c, _ in ep.gt}):
            own = [k for k, t in enumerate(types) if t == c]
            plain.fit([images[k] for k in own], [masks[k] for k in own])
            pm = plain.predict(root / ep.query, size=size).mask
            g = gt == classes.index(c) + 1
            tp = int((g & pm).sum())
            fp, fn = int(pm.sum()) - tp, int(g.sum()) - tp
            rec["single"][c] = [tp, fp, fn, int(g.size) - tp - fp - fn]
        rec["single_ms"] = (time.perf_counter() - t0) * 1e3
    return rec


def variant_key(competition: str, labelling: str, relative: bool = True) -> str:
    return f"{competition}/{labelling}/{'rel' if relative else 'raw'}"


def _iou(cm: np.ndarray) -> np.ndarray:
    d = np.diag(cm).astype(float)
    den = cm.sum(0) + cm.sum(1) - d
    return np.where(den > 0, d / np.maximum(den, 1), np.nan)


def summarize(recs: list[dict], variant: str) -> dict:
    """Records of one dataset -> per-type IoU both ways, mIoU, confusion matrices, image-level type accuracy."""
    classes = recs[0]["classes"]
    n = len(classes) + 1
    cm = np.zeros((n, n), np.int64)
    single = np.zeros((n, n), np.int64)
    img = np.zeros((n - 1, n), np.int64)          # true type x predicted type (column 0: none)
    area_hits = 0
    for r in recs:
        v = r["variants"][variant]
        cm += np.array(v["cm"], np.int64)
        for c, (tp, fp, fn, tn) in r.get("single", {}).items():
            k = classes.index(c) + 1
            single[k, k] += tp
            single[0, k] += fp
            single[k, 0] += fn
            single[0, 0] += tn
        gt_area = [r["gt_area"][c] for c in classes]
        pa = [v["pred_area"][c] for c in classes]
        true = int(np.argmax(gt_area))
        img[true, classes.index(v["pred_type"]) + 1 if v.get("pred_type") else 0] += 1
        area_hits += int(max(pa) > 0 and int(np.argmax(pa)) == true)
    iou_m, iou_s = _iou(cm)[1:], _iou(single)[1:]
    has_single = any("single" in r for r in recs)
    out = {"dataset": recs[0]["dataset"], "classes": classes, "queries": len(recs), "variant": variant,
           "iou_multi": dict(zip(classes, iou_m.tolist())), "miou_multi": float(np.nanmean(iou_m)),
           "cm_pixels": cm.tolist(), "cm_images": img.tolist(),
           "image_type_accuracy": float(np.trace(img[:, 1:]) / max(1, img.sum())),
           "image_type_accuracy_largest": area_hits / max(1, len(recs)),
           "ms_fit_predict_median": statistics.median(r["variants"][variant]["fit_ms"] + r["variants"][variant]["predict_ms"]
                                                      for r in recs)}
    if has_single:
        out.update(iou_single=dict(zip(classes, iou_s.tolist())), miou_single=float(np.nanmean(iou_s)),
                   ratio=float(np.nanmean(iou_m) / np.nanmean(iou_s)) if np.nanmean(iou_s) > 0 else None)
    return out


def run_multi_type_bench(cfg: BenchConfig, *, method: str = "fm", competition: str = DEFAULT_COMPETITION,
                         labelling: str = DEFAULT_LABELLING, single: bool = True) -> dict:
    """``fdseg bench --multi-type``: OUT/multi_type/ holds the episodes, one resumable JSONL per shot count,
    results.json and results.md."""
    if competition not in COMPETITIONS or labelling not in LABELLINGS:
        raise InputError("--multi-type", f"unknown rule {competition}/{labelling}")
    cat = scan(cfg.data)
    classes = expand_classes(cat, cfg.classes)
    if cfg.datasets or classes or cfg.max_per_class:
        cat = cat.subset(cfg.datasets, classes, cfg.max_per_class)
    out = Path(cfg.out) / "multi_type"
    out.mkdir(parents=True, exist_ok=True)
    n_images = sum(len(v) for by in cat.classes.values() for v in by.values())
    # every image is a support of many episodes: its grids (all views) stay cached (the byte cap bounds it)
    seg = MultiTypeSegmenter(method=method, competition=competition, labelling=labelling,
                             cache_size=max(cfg.cache_size, 10 * n_images) if cfg.cache_size else 0, **cfg.segmenter)
    results = {"data": str(Path(cfg.data).resolve()), "seed": cfg.seed, "eval_size": cfg.eval_size,
               "method": method, "segmenter": cfg.segmenter, "competition": competition, "labelling": labelling,
               "gate": seg.gate,
               "protocol": PROTOCOL, "runs": []}
    for k in cfg.shots:
        eps = make_typed_episodes(cat, k, cfg.seed)
        if not eps:
            raise InputError(cfg.data, "no dataset with two or more classes: nothing to tell apart")
        write_text(out / f"episodes_{k}shot.json", json.dumps({"root": str(cat.root.resolve()), "seed": cfg.seed,
                                                                "episodes": [asdict(e) for e in eps]}, indent=1))
        key = {"protocol": PROTOCOL, "shots": k, "seed": cfg.seed, "eval_size": cfg.eval_size, "single": single,
               "competition": competition, "labelling": labelling, "segmenter": seg.model.rules(),
               **({"gate": seg.gate} if seg.gate else {})}
        log = RunLog(out / "runs" / f"multi_type_{k}shot.jsonl", key)
        todo = [e for e in eps if e.id not in log.done]
        it = todo
        if cfg.progress and todo:
            from tqdm import tqdm
            it = tqdm(todo, desc=f"multi-type {k}-shot", unit="ep", initial=len(eps) - len(todo), total=len(eps),
                      dynamic_ncols=True)
        classes_of = {ds: sorted(cat.classes[ds]) for ds in cat.classes}
        try:
            for ep in it:
                try:
                    rec = run_typed_episode(seg, cat.root, ep, classes_of[ep.dataset], cfg.eval_size, single=single)
                except FdsegError as e:
                    rec = {"id": ep.id, "dataset": ep.dataset, "error": str(e)}
                log.add(rec)
        finally:
            log.close()
        recs = [log.done[e.id] for e in eps if e.id in log.done]
        ok = [r for r in recs if "error" not in r]
        by_ds: dict[str, list[dict]] = {}
        for r in ok:
            by_ds.setdefault(r["dataset"], []).append(r)
        results["runs"].append({"shots": k, "episodes": len(recs),
                                "errors": [{"id": r["id"], "error": r["error"]} for r in recs if "error" in r],
                                "datasets": [summarize(rs, variant_key(competition, labelling)) for _, rs in sorted(by_ds.items())]})
    write_text(out / "results.json", json.dumps(results, indent=1))
    write_text(out / "results.md", markdown(results))
    return results


def _p(v) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"


def markdown(results: dict) -> str:
    """The summary table, then per dataset and shot count the per-type IoU and both confusion matrices."""
    lines = ["| dataset | shots | queries | one type per fit mIoU | multi-type mIoU | ratio | image type accuracy "
             "(strongest / largest) |", "|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        for d in run["datasets"]:
            lines.append(f"| {d['dataset']} ({len(d['classes'])} types) | {run['shots']} | {d['queries']} | "
                         f"{_p(d.get('miou_single'))} | {_p(d['miou_multi'])} | "
                         f"{'-' if d.get('ratio') is None else format(100 * d['ratio'], '.0f') + ' %'} | "
                         f"{_p(d['image_type_accuracy'])} / {_p(d.get('image_type_accuracy_largest'))} |")
    lines += ["", f"Rule: competition={results['competition']}, labelling={results['labelling']} "
                  f"(fdseg.multitype); {results['protocol']}, seed {results['seed']}, evaluated at "
                  f"{results['eval_size'] or 'native'} px. mIoU x 100: mean over the dataset's types of the IoU "
                  "of each type's label (one type per fit: each class's fit scored on its own mask); ratio = "
                  "multi / one-per-fit; image type accuracy: the predicted type (strongest: the type of the "
                  "defect with the highest margin above its type's threshold, pred.type; largest: the type with the "
                  "largest labelled area) is the one with the largest ground-truth area (none labelled: wrong). The "
                  "image confusion matrices use the strongest defect's type.", ""]
    for run in results["runs"]:
        for d in run["datasets"]:
            cls = d["classes"]
            lines += [f"### {d['dataset']}, {run['shots']}-shot", "",
                      "| type | one type per fit IoU | multi-type IoU |", "|---|---|---|"]
            lines += [f"| {c} | {_p(d.get('iou_single', {}).get(c))} | {_p(d['iou_multi'][c])} |" for c in cls]
            lines += ["", "Pixels (rows: ground truth, columns: prediction; thousands):", "",
                      "| | " + " | ".join(["good"] + cls) + " |", "|---" * (len(cls) + 2) + "|"]
            for name, row in zip(["good"] + cls, d["cm_pixels"]):
                lines.append(f"| {name} | " + " | ".join(f"{v / 1e3:.1f}" for v in row) + " |")
            lines += ["", "Images (rows: true type, columns: predicted type):", "",
                      "| | " + " | ".join(["none"] + cls) + " |", "|---" * (len(cls) + 2) + "|"]
            for name, row in zip(cls, d["cm_images"]):
                lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"
