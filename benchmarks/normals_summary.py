"""Summarise `fdseg bench --normal ... --ok-queries ...` runs: per run (normals count x shots) and
dataset the mIoU, the false-alarm pixels and verdicts on the OK queries, the image AUROC; and the
image-level verdict rules compared on the same records (docs/normals.md).

    python benchmarks/normals_summary.py RUN_DIR [RUN_DIR ...]      # each an `fdseg bench --out` folder
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fdseg.metrics import auroc, dataset_scores

RULES = {
    "any pixel": lambda r: r["largest_cells"] > 0,
    ">= 1 cell (shipped)": lambda r: r["largest_cells"] >= 1,
    ">= half the smallest support defect": lambda r: r["largest_cells"] >= 0.5 * r["support_min_cells"],
    ">= the smallest support defect": lambda r: r["largest_cells"] >= r["support_min_cells"],
    "score > 0.05": lambda r: r["defect_score"] > 0.05,
}


def records(run: Path, pattern: str = "*.jsonl") -> list[dict]:
    out = []
    for f in sorted((run / "runs").glob(pattern)):
        for ln in f.read_text().splitlines()[1:]:
            r = json.loads(ln)
            if "error" not in r:
                out.append(r)
    return out


def main(runs: list[str]) -> None:
    print("| run | dataset | mIoU | FA px % on OK | OK judged defective % | image AUROC | episodes (OK) |")
    print("|---|---|---|---|---|---|---|")
    allrecs = []
    parts = [(run, f, f"{run.name} {f.stem.rsplit('_', 1)[-1]}") for run in map(Path, runs)
             for f in sorted((run / "runs").glob("*.jsonl"))]
    for run, f, label in parts:                 # one row group per run and shot count
        recs = records(run, f.name)
        allrecs += [dict(r, run=label) for r in recs]
        by: dict[str, list[dict]] = {}
        for r in recs:
            by.setdefault(r["dataset"], []).append(r)
        for ds, rs in sorted(by.items()):
            s = dataset_scores(ds, sorted({r["cls"] for r in rs if not r.get("defect_free")}), rs)
            fa = "-" if s.fp_rate is None else f"{100 * s.fp_rate:.3f}"
            pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
            print(f"| {label} | {ds} | {100 * s.miou:.1f} | {fa} | {pct(s.ok_flagged)} | {pct(s.auroc)} | "
                  f"{len(rs)} ({s.defect_free}) |")
        # pooled over the datasets that have OK queries: class-mean IoU, false-alarm pixels, verdicts
        with_ok = {r["dataset"] for r in recs if r.get("defect_free")}
        rs = [r for r in recs if r["dataset"] in with_ok]
        ious = [v for ds in sorted(with_ok) for v in dataset_scores(
            ds, sorted({r["cls"] for r in rs if r["dataset"] == ds and not r.get("defect_free")}),
            [r for r in rs if r["dataset"] == ds]).class_iou.values()]
        ok = [r for r in rs if r.get("defect_free")]
        fa = sum(r["fp"] for r in ok) / max(1, sum(r["fp"] + r["tn"] for r in ok))
        flagged = np.mean([r["is_defective"] for r in ok]) if ok else float("nan")
        print(f"| {label} | **pooled** | {100 * np.mean(ious):.1f} (class mean) | {100 * fa:.4f} | "
              f"{100 * flagged:.1f} | - | {len(rs)} ({len(ok)}) |")
    img = [r for r in allrecs if r.get("defect_score") is not None]
    print("\nVerdict rules on the same records (all runs pooled; OK = defect-free queries):\n")
    print("| rule | OK judged defective % | defects judged defective % |")
    print("|---|---|---|")
    ok = [r for r in img if r.get("defect_free")]
    bad = [r for r in img if not r.get("defect_free") and r["dataset"] in {x["dataset"] for x in ok}]
    for name, rule in RULES.items():
        print(f"| {name} | {100 * np.mean([rule(r) for r in ok]):.1f} | {100 * np.mean([rule(r) for r in bad]):.1f} |")
    print("\nImage AUROC of candidate scores (datasets with OK queries, per run then averaged):\n")
    for key in ("defect_score", "largest_cells"):
        vals = []
        for run in sorted({r["run"] for r in img}):
            for ds in sorted({r["dataset"] for r in ok}):
                rs = [r for r in img if r["run"] == run and r["dataset"] == ds]
                a = auroc([r[key] for r in rs], [not r.get("defect_free") for r in rs])
                if a is not None:
                    vals.append(a)
        print(f"- {key}: mean AUROC {100 * np.mean(vals):.1f} over {len(vals)} (run, dataset) pairs")


if __name__ == "__main__":
    main(sys.argv[1:])
