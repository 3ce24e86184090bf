"""Benchmark: episodes x methods -> per-dataset metrics, tables and an HTML report.

Every finished episode is appended to ``OUT/runs/<method>_<K>shot.jsonl`` (flushed
at once), so an interrupted run resumes where it stopped; the run's settings are
stored in that file's first line and a resume with other settings is refused.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import write_jpeg, write_text
from .data.episodes import Episode, load_episodes, make_episodes, save_episodes
from .data.images import load_image, load_mask
from .data.layouts import Catalog, scan
from .data.preprocess import resize_mask
from .errors import FdsegError, InputError
from .metrics import benchmark_mean, dataset_scores, episode_counts
from .normals import bench_pools, ok_episodes
from .report.html import card, esc, table, write_page
from .report.overlay import GREEN, RED, overlay, panel
from .segmenter import FewShotSegmenter


@dataclass
class BenchConfig:
    data: Path
    out: Path
    methods: list[str] = field(default_factory=lambda: ["fm"])
    shots: list[int] = field(default_factory=lambda: [1, 5])
    seed: int = 2
    eval_size: int = 256                 # 0 = evaluate at each image's own resolution
    datasets: list[str] | None = None
    classes: list[str] | None = None
    max_per_class: int | None = None
    episodes_file: Path | None = None    # re-use exported episodes instead of drawing them
    gallery: int = 3                     # gallery panels per (method, shots, dataset)
    segmenter: dict = field(default_factory=dict)   # FewShotSegmenter keyword arguments
    progress: bool = True
    cache_size: int = 192                # feature grids kept per run, support views included (exact; 0 = the paper's loop)
    per_method: dict = field(default_factory=dict)  # method -> extra method_options (e.g. SAM2 checkpoint)
    normals: Path | None = None          # defect-free images per class (fdseg.normals layouts) passed to fit
    normal_count: int | None = 50        # normals per class (evenly spread; None = all)
    ok_queries: Path | None = None       # defect-free images per class added as OK queries
    ok_count: int = 5                    # OK queries per class


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run_key(cfg: BenchConfig, seg: FewShotSegmenter, method: str, shots: int) -> dict:
    """What a run's results depend on: the protocol and the segmenter's resolved settings and rule
    constants (a preset resolved to its values, ``"auto"`` rules with their thresholds, the method's
    defaults, the colour model), so a changed rule never resumes an older run's results. Each episode
    record stores the plan its fit resolved to."""
    return {"method": method, "shots": shots, "seed": cfg.seed, "eval_size": cfg.eval_size,
            "segmenter": seg.model.rules()}


def _seg_kwargs(cfg: BenchConfig, method: str) -> dict:
    extra = cfg.per_method.get(method)
    if not extra:
        return dict(cfg.segmenter)
    return {**cfg.segmenter, "method_options": {**extra, **cfg.segmenter.get("method_options", {})}}


def _hash(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


class RunLog:
    """Append-only JSONL of finished episodes, with the run's settings on line 1."""

    def __init__(self, path: Path, key: dict):
        self.path, self.key = path, key
        self.done: dict[str, dict] = {}
        h = _hash(key)
        if path.exists():
            lines = path.read_text().splitlines()
            head = json.loads(lines[0]) if lines else {}
            if head.get("hash") != h:
                raise InputError(path, "holds results made with other settings; use another --out "
                                       "or delete this file to start over")
            for ln in lines[1:]:
                try:
                    rec = json.loads(ln)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: redo that episode
                self.done[rec["id"]] = rec
            # rewrite without a possibly truncated tail
            write_text(path, "\n".join([lines[0]] + [json.dumps(r) for r in self.done.values()]) + "\n")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, json.dumps({"hash": h, "key": key}) + "\n")
        self._f = open(path, "a", encoding="utf-8")

    def add(self, rec: dict) -> None:
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done[rec["id"]] = rec

    def close(self) -> None:
        self._f.close()


def _gallery_ids(episodes: list[Episode], n: int) -> set[str]:
    out: set[str] = set()
    by_ds: dict[str, list[Episode]] = {}
    for e in episodes:
        by_ds.setdefault(e.dataset, []).append(e)
    for ds, eps in by_ds.items():
        if n <= 0:
            continue
        idx = np.linspace(0, len(eps) - 1, min(n, len(eps))).round().astype(int)
        out.update(eps[i].id for i in idx)
    return out


def _gallery_panel(root: Path, ep: Episode, gt: np.ndarray, pred: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from .data.preprocess import resize_image, to_tensor
    def small(p):
        rgb = load_image(root / p)
        return rgb, resize_image(to_tensor(rgb), size).round().clamp(0, 255)[0].permute(1, 2, 0).byte().numpy()
    s_rgb, s_small = small(ep.supports[0])
    s_mask = resize_mask(load_mask(root / ep.support_masks[0], size=s_rgb.shape[:2]), size)
    _, q_small = small(ep.query)
    return panel([overlay(s_small, s_mask, GREEN), q_small, overlay(q_small, gt, GREEN), overlay(q_small, pred, RED)],
                 ["support", "query", "ground truth", "prediction"])


def run_episode(seg: FewShotSegmenter, root: Path, ep: Episode, eval_size: int, normals=None):
    """Fit on the episode's supports (and ``normals``, defect-free images), predict its query (the
    segmenter's own finish path, at ``eval_size`` squared or native); returns (gt, pred, fit_s, predict_s)."""
    t0 = time.perf_counter()
    seg.fit([root / p for p in ep.supports], [root / p for p in ep.support_masks], normals=normals)
    t1 = time.perf_counter()
    res = seg.predict(root / ep.query, size=(eval_size, eval_size) if eval_size else None)
    t2 = time.perf_counter()
    size, (h, w) = res.mask.shape, res.query_size
    if ep.query_mask is None:
        gt = np.zeros(size, dtype=bool)
    else:
        gt_full = load_mask(root / ep.query_mask, size=(h, w))
        gt = resize_mask(gt_full, size) if eval_size else gt_full
    return gt, res.mask, t1 - t0, t2 - t1


def run_bench(cfg: BenchConfig) -> dict:
    cat = scan(cfg.data)
    if cfg.datasets or cfg.classes or cfg.max_per_class:
        cat = cat.subset(cfg.datasets, cfg.classes, cfg.max_per_class)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    episodes_by_k: dict[int, list[Episode]] = {}
    root = cat.root
    normals_by, ok_by = bench_pools(cat, cfg.normals, cfg.normal_count, cfg.ok_queries, cfg.ok_count,
                                    out / "normals_cache") if (cfg.normals or cfg.ok_queries) else ({}, {})
    for k in cfg.shots:
        if cfg.episodes_file:
            eps, root = load_episodes(cfg.episodes_file)
            eps = [e for e in eps if e.shots == k]
            if not eps:
                raise InputError(cfg.episodes_file, f"holds no {k}-shot episodes")
        else:
            eps = make_episodes(cat, k, cfg.seed)
        if cfg.ok_queries:
            eps = eps + ok_episodes(cat, k, cfg.seed, ok_by)
        episodes_by_k[k] = eps
        save_episodes(out / f"episodes_{k}shot.json", eps, root, cfg.seed)

    from .hardware import describe_cpu
    results = {"data": str(Path(cfg.data).resolve()), "seed": cfg.seed, "eval_size": cfg.eval_size,
               "segmenter": cfg.segmenter, "cpu": describe_cpu(), "runs": []}
    classes = {ds: sorted(c) for ds, c in cat.classes.items()}
    for method in cfg.methods:
        # the normals' features are cached as well, so each goes through the backbone once per run (the
        # segmenter keeps the grids of the class's normals between its episodes' fits)
        extra = max((len(v) for v in normals_by.values()), default=0) if cfg.cache_size else 0
        seg = FewShotSegmenter(method=method, cache_size=cfg.cache_size + extra, **_seg_kwargs(cfg, method))
        for k in cfg.shots:
            results["runs"].append(_bench_one(cfg, seg, method, k, episodes_by_k[k], root, classes, out,
                                              normals_by))
    _write_outputs(results, out, cat)
    return results


class _KeepLast:
    """The segmenter as :func:`run_episode` uses it, keeping its last prediction (the image-level verdict)."""

    def __init__(self, seg: FewShotSegmenter):
        self.seg, self.last = seg, None

    def fit(self, *a, **kw):
        self.seg.fit(*a, **kw)
        return self

    def predict(self, *a, **kw):
        self.last = self.seg.predict(*a, **kw)
        return self.last

    def __getattr__(self, name):
        return getattr(self.seg, name)


def _normals_key(cfg: BenchConfig) -> dict:
    """The normals / OK-query settings a run's results depend on (none: the key of a plain run)."""
    out = {}
    if cfg.normals:
        out["normals"] = {"dir": str(Path(cfg.normals).resolve()), "count": cfg.normal_count}
    if cfg.ok_queries:
        out["ok_queries"] = {"dir": str(Path(cfg.ok_queries).resolve()), "count": cfg.ok_count}
    return out


def _bench_one(cfg, seg, method, k, episodes, root, classes, out, normals_by: dict | None = None) -> dict:
    normals_by = normals_by or {}
    log = RunLog(out / "runs" / f"{method}_{k}shot.jsonl", {**_run_key(cfg, seg, method, k), **_normals_key(cfg)})
    gallery = _gallery_ids(episodes, cfg.gallery)
    todo = [e for e in episodes if e.id not in log.done]
    it = todo
    if cfg.progress and todo:
        from tqdm import tqdm
        it = tqdm(todo, desc=f"{method} {k}-shot", unit="ep", initial=len(episodes) - len(todo),
                  total=len(episodes), dynamic_ncols=True)
    try:
        for ep in it:
            keep = _KeepLast(seg)
            normals = normals_by.get((ep.dataset, ep.cls))
            try:
                gt, pred, fit_s, pred_s = run_episode(keep, root, ep, cfg.eval_size, normals=normals)
            except FdsegError as e:
                log.add({"id": ep.id, "dataset": ep.dataset, "cls": ep.cls, "error": str(e)})
                continue
            tp, fp, fn, tn = episode_counts(gt, pred)
            rec = {"id": ep.id, "dataset": ep.dataset, "cls": ep.cls, "defect_free": ep.defect_free,
                   "tp": tp, "fp": fp, "fn": fn, "tn": tn, "fit_ms": fit_s * 1e3, "predict_ms": pred_s * 1e3,
                   "plan": seg.plan.summary(), "normals": len(normals or [])}
            if keep.last is not None:
                rec.update(defect_score=keep.last.defect_score, is_defective=keep.last.is_defective,
                           largest_cells=keep.last.largest_cells, ok_gated=keep.last.ok_gated,
                           support_min_cells=getattr(seg.method, "min_defect_cells", None))
            if ep.id in gallery:
                rel = f"gallery/{method}_{k}shot_{ep.dataset}_{ep.cls}_{Path(ep.query).stem}.jpg"
                write_jpeg(out / rel, _gallery_panel(root, ep, gt, pred, gt.shape))
                rec["gallery"] = rel
            log.add(rec)
    finally:
        log.close()
    recs = [log.done[e.id] for e in episodes if e.id in log.done]
    ok = [r for r in recs if "error" not in r]
    by_ds: dict[str, list[dict]] = {}
    for r in ok:
        by_ds.setdefault(r["dataset"], []).append(r)
    scores = [dataset_scores(ds, classes.get(ds, sorted({r["cls"] for r in rs})), rs) for ds, rs in sorted(by_ds.items())]
    per_ep = [r["fit_ms"] + r["predict_ms"] for r in ok]
    return {"method": method, "shots": k, "episodes": len(recs), "precision": seg.settings.get("precision"),
            "errors": [{"id": r["id"], "error": r["error"]} for r in recs if "error" in r],
            "datasets": [s.as_dict() for s in scores], **benchmark_mean(scores),
            "ms_per_query_median": statistics.median(per_ep) if per_ep else None,
            "ms_predict_median": statistics.median([r["predict_ms"] for r in ok]) if ok else None,
            "ms_per_query_by_dataset": {ds: statistics.median([r["fit_ms"] + r["predict_ms"] for r in rs])
                                        for ds, rs in by_ds.items()},
            "peak_rss_mb": _peak_rss_mb(),
            "gallery": [{"id": r["id"], "path": r["gallery"]} for r in ok if "gallery" in r]}


def _rows(results: dict) -> list[dict]:
    rows = []
    for run in results["runs"]:
        for d in run["datasets"]:
            rows.append({"method": run["method"], "shots": run["shots"], "dataset": d["dataset"],
                         "miou": d["miou"], "fbiou": d["fbiou"], "precision": d["precision"],
                         "recall": d["recall"], "episodes": d["episodes"],
                         "fp_rate_defect_free": d["fp_rate"], "defect_free": d.get("defect_free", 0),
                         "auroc": d.get("auroc"), "ok_flagged": d.get("ok_flagged"),
                         "defect_flagged": d.get("defect_flagged"),
                         "ms_per_query": run["ms_per_query_by_dataset"].get(d["dataset"])})
        rows.append({"method": run["method"], "shots": run["shots"], "dataset": "class mean",
                     "miou": run["class_mean_miou"], "fbiou": run["dataset_mean_fbiou"], "precision": None,
                     "recall": None, "episodes": run["episodes"], "fp_rate_defect_free": None, "defect_free": None,
                     "auroc": None, "ok_flagged": None, "defect_flagged": None,
                     "ms_per_query": run["ms_per_query_median"]})
    return rows


def markdown_table(results: dict) -> str:
    """Rows = method x shots, columns = datasets (mIoU / FB-IoU x 100) + class mean + ms/query."""
    datasets = sorted({d["dataset"] for r in results["runs"] for d in r["datasets"]})
    head = "| method | shots | " + " | ".join(datasets) + " | class mean mIoU | ms/query | peak RSS MB |"
    sep = "|" + "---|" * (len(datasets) + 5)
    lines = [head, sep]
    for r in results["runs"]:
        by = {d["dataset"]: d for d in r["datasets"]}
        cells = [f"{100 * by[ds]['miou']:.1f} / {100 * by[ds]['fbiou']:.1f}" if ds in by else "-" for ds in datasets]
        ms = r["ms_per_query_median"]
        lines.append(f"| {r['method']} | {r['shots']} | " + " | ".join(cells) +
                     f" | **{100 * r['class_mean_miou']:.1f}** | {ms:.0f} | {r['peak_rss_mb']:.0f} |"
                     if ms is not None else f"| {r['method']} | {r['shots']} | " + " | ".join(cells) + " | - | - | - |")
    lines.append("")
    lines.append("Cells: mIoU / FB-IoU x 100 per dataset (the paper's confusion-matrix metric); "
                 "class mean = mean IoU over all classes; ms/query = median fit + predict per episode.")
    paths = sorted({r.get("precision") or "?" for r in results["runs"]})
    lines.append(f"Numeric path: {' / '.join(paths)} (backbone and matching; `--precision`, docs/precision.md)"
                 + (f" on {results['cpu']}" if results.get("cpu") else "") + ".")
    img = _image_level_table(results)
    return "\n".join(lines) + "\n" + (f"\n{img}" if img else "")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _image_level_table(results: dict) -> str:
    """Per run and dataset with defect-free queries: image-level AUROC, the share of OK queries judged
    defective (false alarms), of defective ones judged defective, and false-alarm pixels (empty: none)."""
    rows = [(r, d) for r in results["runs"] for d in r["datasets"] if d.get("defect_free")]
    if not rows:
        return ""
    lines = ["| method | shots | dataset | image AUROC | OK judged defective % | defects judged defective % | "
             "false-alarm px % (OK queries) | OK queries |", "|---|---|---|---|---|---|---|---|"]
    for r, d in rows:
        lines.append(f"| {r['method']} | {r['shots']} | {d['dataset']} | {_pct(d.get('auroc'))} | "
                     f"{_pct(d.get('ok_flagged'))} | {_pct(d.get('defect_flagged'))} | "
                     f"{'-' if d['fp_rate'] is None else format(100 * d['fp_rate'], '.3f')} | {d['defect_free']} |")
    lines.append("")
    lines.append("Image level (defect-free queries: the dataset's own, or --ok-queries): AUROC of the defect score "
                 "(defective vs defect-free queries) x 100; verdicts by the rule of fdseg.pipeline.finish.")
    return "\n".join(lines) + "\n"


def _write_outputs(results: dict, out: Path, cat: Catalog) -> None:
    write_text(out / "results.json", json.dumps(results, indent=1))
    rows = _rows(results)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else ["method"])
    w.writeheader()
    w.writerows(rows)
    write_text(out / "results.csv", buf.getvalue())
    md = markdown_table(results)
    write_text(out / "results.md", md)
    write_report(results, out)


def write_report(results: dict, out: Path) -> Path:
    secs = [f"<p class='muted'>data: {esc(results['data'])} &middot; seed {results['seed']} &middot; "
            f"evaluated at {results['eval_size'] or 'native'} px &middot; settings: "
            f"{esc(json.dumps(results['segmenter']))}</p>"]
    hdr = ["method", "shots", "precision", "class-mean mIoU", "ms/query (median)", "peak RSS MB", "episodes", "errors"]
    if results.get("cpu"):
        secs.append(f"<p class='muted'>CPU: {esc(results['cpu'])}</p>")
    secs.append("<h2>Summary</h2>" + table(hdr, [[r["method"], r["shots"], r.get("precision") or "-",
                                                   f"{100 * r['class_mean_miou']:.1f}",
                                                   f"{r['ms_per_query_median']:.0f}" if r["ms_per_query_median"] else "-",
                                                   f"{r['peak_rss_mb']:.0f}", r["episodes"], len(r["errors"])]
                                                  for r in results["runs"]]))
    for r in results["runs"]:
        rows = []
        for d in r["datasets"]:
            rows.append([d["dataset"], f"{100 * d['miou']:.1f}", f"{100 * d['fbiou']:.1f}",
                         f"{100 * d['precision']:.1f}", f"{100 * d['recall']:.1f}", d["episodes"],
                         "-" if d["fp_rate"] is None else f"{100 * d['fp_rate']:.2f}%",
                         _pct(d.get("auroc")), _pct(d.get("ok_flagged")),
                         ", ".join(f"{c} {100 * v:.1f}" for c, v in d["class_iou"].items())])
        sec = f"<h2>{esc(r['method'])}, {r['shots']}-shot</h2>"
        sec += table(["dataset", "mIoU", "FB-IoU", "precision", "recall", "episodes", "FP px on defect-free",
                      "image AUROC", "OK judged defective %", "per-class IoU"], rows)
        if r["errors"]:
            sec += "<p class='bad'>Skipped episodes:</p><ul>" + "".join(
                f"<li>{esc(e['id'])}: {esc(e['error'])}</li>" for e in r["errors"]) + "</ul>"
        if r["gallery"]:
            sec += "<h3>Gallery (support / query / ground truth / prediction)</h3><div class='grid'>" + "".join(
                card(g["path"], g["id"]) for g in r["gallery"]) + "</div>"
        secs.append(sec)
    return write_page(out / "report.html", "fdseg benchmark", secs)
