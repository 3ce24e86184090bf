"""Leave-one-dataset-out gain of bench run B over bench run A (`fdseg bench --out` folders), one shot count:
for each held-out dataset, the class-mean gain on the other datasets (what a fold decides on) and both runs'
scores on the held-out one. Folders split by dataset are given comma-separated.

    python benchmarks/lodo_gain.py 1 A_DIR[,A_DIR...] B_DIR[,B_DIR...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from levers import bench_runs  # noqa: E402  (the same reader of `fdseg bench` records)


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
