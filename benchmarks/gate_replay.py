"""Gates on defect-free references replayed on saved margins: how far the user's OK images (normals)
can cut false alarms on OK queries, and what each rule costs on defective ones, from one run.

``collect`` runs the default with normals and ``ok_gate="median"`` over the paper's episodes plus
defect-free OK queries (the bench's own pools: normals never include an evaluated image) and keeps,
per query, the margin grid, the threshold, the mask before any gate, the ground truth and the defect
scores of the normals held out of the fit (every fifth, at most 10). ``compare`` applies each gate
rule to those records and prints the class-mean mIoU, per-dataset mIoU and false-alarm pixels:

* ``image`` (``ok_gate="median"``): a query whose defect score is not above the level is judged OK, its
  mask emptied;
* ``component`` (the default before the soft rule): every 8-connected component of the mask whose peak
  margin (above the threshold) is not above the level is removed: all or nothing per component;
* ``soft`` (``ok_gate="auto"``, the default, at the Harrell-Davis lower quartile): a pixel stays where its
  margin plus its component's peak exceeds the level: a component above the level stays whole, one under
  half of it goes, one between keeps its core; the kept pixels move little when rounding moves a margin.

Levels: the median, the lower quartile, the minimum or the maximum of the held-out normals' defect
scores, or the Harrell-Davis estimate of the quartile or the median (a weighted mean of all of them).
``compare --held K`` calibrates each episode's level on K of its held-out scores (random subsets,
``--draws`` of them): what a user with fewer normals gets. ``pair A B`` takes the same episodes collected
on the two numeric paths (``collect --precision fp32`` / ``bf16``) and shows how far each rule's kept
pixels and verdicts move between them.

    python benchmarks/gate_replay.py collect --datasets magnetic_tile --shots 5 --out g5.pkl   # resumable
    python benchmarks/gate_replay.py compare g5.pkl [more.pkl ...] [--held 5 --draws 2]
    python benchmarks/gate_replay.py pair g5_fp32.pkl g5_bf16.pkl
"""
from __future__ import annotations

import argparse
import pickle
import sys
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from fdseg import FewShotSegmenter
from fdseg.atomic import write_bytes
from fdseg.data import load_mask, make_episodes, scan
from fdseg.data.preprocess import resize_mask, upsample_scores
from fdseg.metrics import dataset_scores, episode_counts
from fdseg.normals import bench_pools, ok_episodes
from fdseg.pipeline.post import OkGate, harrell_davis

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _save(obj, path: Path) -> None:
    write_bytes(path, pickle.dumps(obj))


def collect(a) -> None:
    torch.set_num_threads(a.threads)
    cat = scan(a.data)
    cat = cat.subset(a.datasets, a.classes, a.max_per_class)
    out = Path(a.out)
    normals_by, ok_by = bench_pools(cat, Path(a.normal), a.normal_count, Path(a.ok_queries), a.ok_count,
                                    out.parent / (out.stem + "_pool"))
    eps = make_episodes(cat, a.shots, 2) + ok_episodes(cat, a.shots, 2, ok_by)
    eps = [e for e in eps if (e.dataset, e.cls) in normals_by]
    done = pickle.loads(out.read_bytes()) if out.exists() else {"episodes": {}}
    seg = FewShotSegmenter(ok_gate="median", cache_size=256, precision=a.precision)
    held: list = []
    fit = OkGate.fit

    def recording(self, scores, n):
        held.append(list(scores))
        return fit(self, scores, n)

    root, t0, last = cat.root, time.time(), time.time()
    todo = [e for e in eps if e.id not in done["episodes"]]
    with mock.patch.object(OkGate, "fit", recording):
        for i, ep in enumerate(todo):
            held.clear()
            seg.fit([root / p for p in ep.supports], [root / p for p in ep.support_masks],
                    normals=normals_by[(ep.dataset, ep.cls)])
            post = seg.state.post
            level, post.ok_level = post.ok_level, None          # predict without the gate
            res = seg.predict(root / ep.query, size=(a.eval_size, a.eval_size))
            if ep.query_mask is None:
                gt = np.zeros(res.mask.shape, dtype=bool)
            else:
                gt = resize_mask(load_mask(root / ep.query_mask, size=res.query_size), res.mask.shape)
            done["episodes"][ep.id] = dict(
                dataset=ep.dataset, cls=ep.cls, defect_free=ep.query_mask is None, t=post.threshold,
                grid=res.margin_grid.astype(np.float32), mask=np.packbits(res.mask), gt=np.packbits(gt),
                shape=res.mask.shape, level=level, held=held[0] if held else [], episode=ep, root=str(root),
                normals=[str(n) for n in normals_by[(ep.dataset, ep.cls)]])
            if time.time() - last > 60 or i == len(todo) - 1:
                _save(done, out)
                last = time.time()
                print(f"{len(done['episodes'])}/{len(eps)} episodes, {time.time() - t0:.0f} s", flush=True)
    _save(done, out)


LEVELS = {"median": np.median, "quartile": lambda h: np.quantile(h, 0.25), "min": np.min, "max": np.max,
          "hd-quartile": lambda h: harrell_davis(h, 0.25), "hd-median": lambda h: harrell_davis(h, 0.5)}


def gated(r: dict, rule: str, level_of) -> np.ndarray:
    """The mask of record ``r`` after ``rule`` at the level ``level_of(held-out scores)``."""
    mask = np.unpackbits(r["mask"])[:int(np.prod(r["shape"]))].reshape(r["shape"]).astype(bool)
    if rule == "none" or not r["held"] or not mask.any():
        return mask
    level = float(level_of(r["held"]))
    grid = r["grid"].astype(np.float32)
    if rule == "image":
        return mask if float(grid.max()) - r["t"] > level else np.zeros_like(mask)
    from scipy import ndimage
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    full = upsample_scores(torch.from_numpy(grid), tuple(r["shape"])).numpy() - r["t"]
    peaks = ndimage.maximum(full, lab, index=np.arange(1, n + 1))
    if rule == "soft":       # a pixel stays where its margin plus its component's peak exceeds the level
        peak = np.concatenate([[-np.inf], np.asarray(peaks)])[lab]
        return mask & (full + peak > level)
    keep = np.concatenate([[False], np.asarray(peaks) > level])
    return keep[lab]


def is_defective(m: np.ndarray, grid_shape: tuple[int, int]) -> bool:
    """The verdict of :func:`fdseg.pipeline.finish.verdict`: a component of at least one grid cell."""
    from fdseg.pipeline.finish import largest_component
    return largest_component(m) * grid_shape[0] * grid_shape[1] >= m.size and bool(m.any())


def pair(a) -> None:
    """The same episodes collected on two numeric paths (``--precision fp32`` / ``bf16``): how far each
    gate rule's masks and verdicts move between them."""
    ra, rb = (pickle.loads(Path(p).read_bytes())["episodes"] for p in a.pair)
    keys = sorted(set(ra) & set(rb))
    print(f"{len(keys)} episodes in both; kept defect pixels summed over the defect queries, per path")
    print("| rule | level | kept defect px A | kept defect px B | differ % | masks' IoU A vs B % (defect / OK) | "
          "verdicts agree % (defect / OK) |")
    print("|---|---|---|---|---|---|---|")
    rows = [("none", "median")] + [(rule, lv) for rule in ("component", "soft") for lv in ("median", "hd-median", "quartile", "hd-quartile")]
    for rule, lv in rows:
        kept = [0, 0]
        inter = {False: 0, True: 0}
        union = {False: 0, True: 0}
        agree = {False: [], True: []}
        for k in keys:
            ma, mb = gated(ra[k], rule, LEVELS[lv]), gated(rb[k], rule, LEVELS[lv])
            free = bool(ra[k]["defect_free"])
            if not free:
                kept[0] += int(ma.sum())
                kept[1] += int(mb.sum())
            inter[free] += int((ma & mb).sum())
            union[free] += int((ma | mb).sum())
            agree[free].append(is_defective(ma, ra[k]["grid"].shape) == is_defective(mb, rb[k]["grid"].shape))
        diff = 100 * abs(kept[0] - kept[1]) / max(kept[0], kept[1], 1)
        print(f"| {rule} | {lv if rule != 'none' else '-'} | {kept[0]} | {kept[1]} | {diff:.2f} | "
              f"{100 * inter[False] / max(union[False], 1):.1f} / {100 * inter[True] / max(union[True], 1):.1f} | "
              f"{100 * np.mean(agree[False]):.1f} / {100 * np.mean(agree[True]) if agree[True] else float('nan'):.1f} |")


def compare(a) -> None:
    recs: dict = {}
    for p in a.runs:
        recs.update(pickle.loads(Path(p).read_bytes())["episodes"])
    rows = [("none", "median")] + [(rule, lv) for rule in ("image", "component", "soft") for lv in LEVELS]
    for draw in range(a.draws if a.held else 1):
        if a.held:
            rng = np.random.default_rng(draw)
            print(f"\nlevels from {a.held} held-out image(s), draw {draw}")
            held = {k: [float(x) for x in rng.choice(r["held"], size=min(a.held, len(r["held"])), replace=False)]
                    for k, r in recs.items() if r["held"]}
            table({k: dict(r, held=held.get(k, [])) for k, r in recs.items()}, rows)
        else:
            table(recs, rows)


def table(recs: dict, rows: list) -> None:
    print("| rule | level | class mean | " + " | ".join(
        f"{ds} mIoU / FA px %" for ds in sorted({r['dataset'] for r in recs.values()})) + " | FA px % pooled |"
          " OK with a mask % | defective emptied |")
    print("|---" * (6 + len({r['dataset'] for r in recs.values()})) + "|")
    for rule, lv in rows:
        by = defaultdict(list)
        emptied = 0
        for r in recs.values():
            m = gated(r, rule, LEVELS[lv])
            gt = np.unpackbits(r["gt"])[:m.size].reshape(m.shape).astype(bool)
            tp, fp, fn, tn = episode_counts(gt, m)
            by[r["dataset"]].append({"cls": r["cls"], "defect_free": r["defect_free"], "tp": tp, "fp": fp,
                                     "fn": fn, "tn": tn, "masked": bool(m.any())})
            emptied += (not r["defect_free"]) and gt.any() and not m.any() and \
                bool(np.unpackbits(r["mask"]).any())
        cells, ious = [], []
        fa_num = fa_den = ok_n = ok_masked = 0
        for ds in sorted(by):
            rs = by[ds]
            s = dataset_scores(ds, sorted({x["cls"] for x in rs if not x["defect_free"]}), rs)
            ious += list(s.class_iou.values())
            ok = [x for x in rs if x["defect_free"]]
            fa_num += sum(x["fp"] for x in ok)
            fa_den += sum(x["fp"] + x["tn"] for x in ok)
            ok_n += len(ok)
            ok_masked += sum(x["masked"] for x in ok)
            fa = "-" if not ok else f"{100 * sum(x['fp'] for x in ok) / sum(x['fp'] + x['tn'] for x in ok):.3f}"
            cells.append(f"{100 * s.miou:.2f} / {fa}")
        print(f"| {rule} | {lv if rule != 'none' else '-'} | {100 * np.mean(ious):.2f} | " + " | ".join(cells) +
              f" | {100 * fa_num / max(fa_den, 1):.3f} | {100 * ok_masked / max(ok_n, 1):.1f} | {emptied} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--data", default=str(SHARED / "defects"))
    c.add_argument("--normal", default=str(SHARED / "distill"))
    c.add_argument("--ok-queries", default=str(SHARED / "distill"))
    c.add_argument("--normal-count", type=int, default=50)
    c.add_argument("--ok-count", type=int, default=20)
    c.add_argument("--shots", type=int, required=True)
    c.add_argument("--datasets", nargs="*")
    c.add_argument("--classes", nargs="*")
    c.add_argument("--max-per-class", type=int, default=None)
    c.add_argument("--eval-size", type=int, default=256)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"])
    c.add_argument("--out", required=True)
    r = sub.add_parser("compare")
    r.add_argument("runs", nargs="+")
    r.add_argument("--held", type=int, default=0, help="levels from this many of each episode's held-out scores")
    r.add_argument("--draws", type=int, default=2)
    q = sub.add_parser("pair", help="the same episodes on two numeric paths: how far each rule moves")
    q.add_argument("pair", nargs=2)
    a = p.parse_args(argv)
    {"collect": collect, "compare": compare, "pair": pair}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
