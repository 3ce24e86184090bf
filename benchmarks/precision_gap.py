"""The fp32 and bf16 numeric paths on the same episodes: masks' pixel agreement, verdict agreement and
mIoU per dataset per path, and the time ratio (both paths run back to back on each episode).

``precision="auto"`` runs the backbone under bf16 autocast and the matching in bf16 where the CPU has
AVX-512 BF16 / AMX, and fp32 elsewhere: this measures what that costs a user who fits on one machine and
inspects on another. bf16 can be forced on any CPU (slowly where it is emulated).

    python benchmarks/precision_gap.py --shots 1 5 --out gap.pkl                  # resumable
    python benchmarks/precision_gap.py --shots 1 5 --normal ../shared/data/distill \\
        --ok-queries ../shared/data/distill --datasets magnetic_tile visa bsdata --out gap_normals.pkl
    python benchmarks/precision_gap.py --report gap.pkl [gap_normals.pkl]
"""
from __future__ import annotations

import argparse
import pickle
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PATHS = ("fp32", "bf16")


def collect(a) -> None:
    import torch

    from fdseg import FewShotSegmenter
    from fdseg.atomic import write_bytes
    from fdseg.bench import _KeepLast, run_episode
    from fdseg.data import make_episodes, scan
    from fdseg.metrics import episode_counts
    from fdseg.normals import bench_pools, ok_episodes
    torch.set_num_threads(a.threads)
    cat = scan(a.data).subset(a.datasets, a.classes, None)
    out = Path(a.out)
    normals_by, ok_by = ({}, {})
    if a.normal:
        normals_by, ok_by = bench_pools(cat, Path(a.normal), a.normal_count,
                                        Path(a.ok_queries) if a.ok_queries else None, a.ok_count,
                                        out.parent / (out.stem + "_pool"))
    done = pickle.loads(out.read_bytes()) if out.exists() else {"episodes": {}, "args": vars(a)}
    extra = max((len(v) for v in normals_by.values()), default=0)
    for k in a.shots:
        eps = make_episodes(cat, k, 2) + (ok_episodes(cat, k, 2, ok_by) if ok_by else [])
        if a.per_class:                      # the first N episodes of each class (and of its OK queries)
            seen: dict = defaultdict(int)
            keep = []
            for e in eps:
                g = (e.dataset, e.cls, e.query_mask is None)
                seen[g] += 1
                if seen[g] <= a.per_class:
                    keep.append(e)
            eps = keep
        if a.normal:
            eps = [e for e in eps if (e.dataset, e.cls) in normals_by]
        segs = {p: FewShotSegmenter(cache_size=192 + extra, precision=p, **({"preset": a.preset} if a.preset else {}))
                for p in PATHS}
        todo = [e for e in eps if (k, e.id) not in done["episodes"]]
        t0 = last = time.time()
        for i, ep in enumerate(todo):
            rec = {"dataset": ep.dataset, "cls": ep.cls, "shots": k, "defect_free": ep.query_mask is None}
            for p in PATHS:
                keep = _KeepLast(segs[p])
                gt, mask, fit_s, pred_s = run_episode(keep, cat.root, ep, 256, normals=normals_by.get((ep.dataset, ep.cls)))
                tp, fp, fn, tn = episode_counts(gt, mask)
                rec[p] = dict(mask=np.packbits(mask), tp=tp, fp=fp, fn=fn, tn=tn, s=fit_s + pred_s,
                              verdict=bool(keep.last.is_defective), score=float(keep.last.defect_score),
                              plan=segs[p].plan.summary())
            rec["shape"] = mask.shape
            done["episodes"][(k, ep.id)] = rec
            if time.time() - last > 60 or i == len(todo) - 1:
                write_bytes(out, pickle.dumps(done))
                last = time.time()
                print(f"{k}-shot: {i + 1}/{len(todo)} episodes, {time.time() - t0:.0f} s", flush=True)


def report(files: list[str]) -> None:
    from fdseg.metrics import dataset_scores
    for f in files:
        recs = pickle.loads(Path(f).read_bytes())["episodes"]
        print(f"\n## {f}\n")
        print("| shots | dataset | episodes | mIoU fp32 | mIoU bf16 | pixels equal % | masks' IoU fp32 vs bf16 % | "
              "verdicts agree % | OK judged defective fp32 / bf16 | time bf16 / fp32 |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for k in sorted({key[0] for key in recs}):
            rs = [r for key, r in recs.items() if key[0] == k]
            by = defaultdict(list)
            for r in rs:
                by[r["dataset"]].append(r)
            rows, cls_iou = [], {p: [] for p in PATHS}
            for ds in sorted(by) + ["all"]:
                group = rs if ds == "all" else by[ds]
                eq = inter = union = 0
                agree = 0
                for r in group:
                    a, b = (np.unpackbits(r[p]["mask"]).astype(bool) for p in PATHS)
                    eq += int((a == b).sum())
                    inter += int((a & b).sum())
                    union += int((a | b).sum())
                    agree += r["fp32"]["verdict"] == r["bf16"]["verdict"]
                n_px = sum(int(np.prod(r["shape"])) for r in group)
                ok = [r for r in group if r["defect_free"]]
                okd = " / ".join(f"{sum(r[p]['verdict'] for r in ok)}" for p in PATHS) + f" of {len(ok)}" if ok else "-"
                t = sum(r["bf16"]["s"] for r in group) / max(sum(r["fp32"]["s"] for r in group), 1e-9)
                if ds == "all":
                    m = {p: f"**{100 * np.mean(cls_iou[p]):.2f}**" for p in PATHS}
                else:
                    m = {}
                    for p in PATHS:
                        recs_p = [{"cls": r["cls"], "defect_free": r["defect_free"], **{x: r[p][x] for x in ("tp", "fp", "fn", "tn")}}
                                  for r in group]
                        s = dataset_scores(ds, sorted({r["cls"] for r in group if not r["defect_free"]}), recs_p)
                        cls_iou[p] += list(s.class_iou.values())
                        m[p] = f"{100 * s.miou:.2f}"
                print(f"| {k} | {ds if ds != 'all' else 'class mean / all'} | {len(group)} | {m['fp32']} | {m['bf16']} | "
                      f"{100 * eq / n_px:.3f} | {100 * inter / max(union, 1):.1f} | {100 * agree / len(group):.1f} | "
                      f"{okd} | x{t:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "defects"))
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--datasets", nargs="*")
    ap.add_argument("--classes", nargs="*")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--per-class", type=int, default=None, help="only the first N episodes of each class")
    ap.add_argument("--normal", default=None, help="defect-free images per class passed to each fit (bench layout)")
    ap.add_argument("--normal-count", type=int, default=50)
    ap.add_argument("--ok-queries", default=None, help="defect-free OK queries per class")
    ap.add_argument("--ok-count", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--report", nargs="+", help="print the tables of these collected files")
    a = ap.parse_args(argv)
    if a.report:
        report(a.report)
    elif a.out:
        collect(a)
    else:
        ap.error("give --out (collect) or --report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
