"""The paper's comparison: a trained few-shot network (``meta``) vs training-free ``proto`` and ``fm``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/meta_lodo.py --data ../shared/data/defects \
        --out meta-lodo/ --max-per-class 20 --steps 800

Runs (each resumable: rerun the same command after a kill):

1. ``fdseg bench --method fm proto`` on every dataset  -> OUT/baselines/
2. ``fdseg train-meta --lodo``: for each dataset, meta trained on the four others and evaluated
   on it                                                 -> OUT/lodo/DATASET/{meta.pt,eval/}
3. (``--in-domain``) meta trained on every dataset but never on the evaluated images (the
   first ``--max-per-class`` of each class are skipped)  -> OUT/indomain/
4. writes OUT/comparison.md (rows = methods x shots, columns = datasets: mIoU / FB-IoU, class-mean
   mIoU, median ms per query) and OUT/comparison.json.

All methods see the same episodes: they are drawn per dataset from the seed alone.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fdseg.atomic import write_text
from fdseg.cli import main as fdseg


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def collect(out: Path, datasets: list[str], in_domain: bool) -> list[dict]:
    """-> rows {label, shots, per dataset {miou, fbiou, ms, class_iou}} from the finished runs."""
    rows = []
    base = _load(out / "baselines" / "results.json")
    for r in base["runs"]:
        rows.append({"label": f"{r['method']} (training-free)", "shots": r["shots"],
                     "cells": {d["dataset"]: {**d, "ms": r["ms_per_query_by_dataset"][d["dataset"]]}
                               for d in r["datasets"]}})
    for shots in sorted({r["shots"] for r in base["runs"]}):
        cells = {}
        for ds in datasets:
            p = out / "lodo" / ds / "eval" / "results.json"
            if not p.is_file():
                continue
            for r in _load(p)["runs"]:
                if r["shots"] == shots:
                    for d in r["datasets"]:
                        cells[d["dataset"]] = {**d, "ms": r["ms_per_query_by_dataset"][d["dataset"]]}
        rows.append({"label": "meta, dataset held out (LODO)", "shots": shots, "cells": cells})
        p = out / "indomain" / "eval" / "results.json"
        if in_domain and p.is_file():
            for r in _load(p)["runs"]:
                if r["shots"] == shots:
                    rows.append({"label": "meta, in-domain (trained on other images of all 5)", "shots": shots,
                                 "cells": {d["dataset"]: {**d, "ms": r["ms_per_query_by_dataset"][d["dataset"]]}
                                           for d in r["datasets"]}})
    return sorted(rows, key=lambda r: (r["shots"], r["label"]))


def table(rows: list[dict], datasets: list[str]) -> str:
    head = "| method | shots | " + " | ".join(datasets) + " | class-mean mIoU | ms/query |"
    lines = [head, "|" + "---|" * (len(datasets) + 4)]
    for r in rows:
        c = r["cells"]
        cells = [f"{100 * c[d]['miou']:.1f} / {100 * c[d]['fbiou']:.1f}" if d in c else "-" for d in datasets]
        ious = [v for d in datasets if d in c for v in c[d]["class_iou"].values()]
        cm = f"**{100 * statistics.mean(ious):.1f}**" if ious and all(d in c for d in datasets) else "-"
        ms = [c[d]["ms"] for d in datasets if d in c]
        ms_cell = f"{statistics.median(ms):.0f}" if ms else "-"
        lines.append(f"| {r['label']} | {r['shots']} | " + " | ".join(cells) + f" | {cm} | {ms_cell} |")
    lines.append("")
    lines.append("Cells: mIoU / FB-IoU x 100. class-mean = mean IoU over every class of every dataset. "
                 "ms/query = median over datasets of the median fit + predict time per episode.")
    return "\n".join(lines) + "\n"


def run(a: argparse.Namespace) -> None:
    out = Path(a.out)
    common = ["--data", a.data, "--shots", *map(str, a.shots), "--threads", str(a.threads)]
    if a.max_per_class:
        common += ["--max-per-class", str(a.max_per_class)]
    if a.no_progress:
        common += ["--no-progress"]
    steps = ["--steps", str(a.steps), "--seed", str(a.seed), "--cache", str(out / "feature-cache")]
    from fdseg.data.layouts import scan
    datasets = a.datasets or scan(a.data).datasets
    jobs = [["bench", "--method", "fm", "proto", "--datasets", *datasets, "--out", str(out / "baselines"), *common],
            ["train-meta", "--lodo", "--test-datasets", *datasets, "--out", str(out / "lodo"), *common, *steps]]
    if a.in_domain:
        if not a.max_per_class:
            raise SystemExit("--in-domain needs --max-per-class N (training skips those first N images per class)")
        jobs.append(["train-meta", "--train-datasets", *datasets, "--test-datasets", *datasets,
                     "--skip-first-per-class", str(a.max_per_class), "--out", str(out / "indomain"), *common, *steps])
    if not a.table_only:
        for j in jobs:
            print("fdseg " + " ".join(j), flush=True)
            rc = fdseg(j)
            if rc:
                raise SystemExit(rc)
    rows = collect(out, datasets, a.in_domain)
    md = table(rows, datasets)
    write_text(out / "comparison.md", md)
    write_text(out / "comparison.json", json.dumps(rows, indent=1))
    print(md)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="meta-lodo")
    p.add_argument("--datasets", nargs="+", default=None, help="default: every dataset under --data")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--max-per-class", type=int, default=None, help="evaluate on the first N images of each class")
    p.add_argument("--steps", type=int, default=800, help="train-meta steps per fold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--in-domain", action="store_true", help="also the in-domain meta row (needs --max-per-class)")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    p.add_argument("--no-progress", action="store_true")
    run(p.parse_args())
