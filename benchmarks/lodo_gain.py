"""Leave-one-dataset-out gain of bench run B over bench run A (`fdseg bench --out` folders), one shot count:
for each held-out dataset, the class-mean gain on the other datasets (what a fold decides on) and both runs'
scores on the held-out one. Folders split by dataset are given comma-separated.

    python benchmarks/lodo_gain.py 1 A_DIR[,A_DIR...] B_DIR[,B_DIR...]
"""
import json, sys
from collections import defaultdict
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from fdseg.metrics import dataset_scores

def load(dirs, k):
    recs = []
    for d in dirs:
        recs += [json.loads(l) for l in open(f'{d}/runs/fm_{k}shot.jsonl').read().splitlines()[1:] if l.strip()]
    by = defaultdict(list)
    for r in recs: by[r['dataset']].append(r)
    return {ds: dataset_scores(ds, sorted({r['cls'] for r in rs}), rs).as_dict()['class_iou'] for ds, rs in by.items()}

k = sys.argv[1]
a, b = load(sys.argv[2].split(','), k), load(sys.argv[3].split(','), k)
dss = sorted(a)
cm = lambda sc, keep: 100 * sum(x for ds in keep for x in sc[ds].values()) / sum(len(sc[ds]) for ds in keep)
print(k, 'all', round(cm(a, dss), 2), round(cm(b, dss), 2), {ds: (round(cm(a, [ds]), 1), round(cm(b, [ds]), 1)) for ds in dss})
for held in dss:
    o = [d for d in dss if d != held]
    print(f"  held out {held}: B - A on the others {cm(b, o) - cm(a, o):+.2f}; held-out A {cm(a, [held]):.1f} B {cm(b, [held]):.1f}")
