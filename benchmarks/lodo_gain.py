"""Leave-one-dataset-out gain of bench run B over bench run A (`fdseg bench --out` folders), one shot count:
for each held-out dataset, the class-mean gain on the other datasets (what a fold decides on) and both runs'
scores on the held-out one. Folders split by dataset are given comma-separated.

    python benchmarks/lodo_gain.py 1 A_DIR[,A_DIR...] B_DIR[,B_DIR...]
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def bench_runs(dirs: list[str]) -> dict:
    """Episode records of `fdseg bench --out DIR` runs (runs/METHOD_Kshot.jsonl) -> summaries per shot count.
    A later folder's record of an episode replaces an earlier one's (some episodes rerun with
    `fdseg bench --episodes`, laid over a full run)."""
    from fdseg.metrics import dataset_scores
    recs: dict[str, dict] = defaultdict(dict)
    for d in dirs:
        for f in sorted(Path(d, "runs").glob("*shot.jsonl")):
            k = f.stem.rsplit("_", 1)[1].removesuffix("shot")
            for r in (json.loads(ln) for ln in f.read_text().splitlines()[1:] if ln.strip()):
                recs[k][r["id"]] = r
    out = {}
    for k, by_id in recs.items():
        rs = list(by_id.values())
        by = defaultdict(list)
        for r in rs:
            by[r["dataset"]].append(r)
        sc = {ds: dataset_scores(ds, sorted({r["cls"] for r in v}), v).as_dict() for ds, v in by.items()}
        ms = float(np.median([r["fit_ms"] + r["predict_ms"] for r in rs]))
        out[k] = {"datasets": sc, "class_mean": float(np.mean([x for d in sc.values() for x in d["class_iou"].values()])),
                  "ms_per_episode": ms}
    return out




def class_ious(dirs: str, k: str) -> dict:
    return {ds: d["class_iou"] for ds, d in bench_runs(dirs.split(","))[k]["datasets"].items()}


k = sys.argv[1]
a, b = class_ious(sys.argv[2], k), class_ious(sys.argv[3], k)
dss = sorted(a)
cm = lambda sc, keep: 100 * sum(x for ds in keep for x in sc[ds].values()) / sum(len(sc[ds]) for ds in keep)
print(k, 'all', round(cm(a, dss), 2), round(cm(b, dss), 2), {ds: (round(cm(a, [ds]), 1), round(cm(b, [ds]), 1)) for ds in dss})
for held in dss:
    o = [d for d in dss if d != held]
    print(f"  held out {held}: B - A on the others {cm(b, o) - cm(a, o):+.2f}; held-out A {cm(a, [held]):.1f} B {cm(b, [held]):.1f}")
