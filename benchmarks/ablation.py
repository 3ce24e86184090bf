"""Many segmenter settings on the same episodes in one pass, and a leave-one-dataset-out check.

    .venv/bin/python benchmarks/ablation.py --variants benchmarks/variants_accuracy.json \
        --shots 1 5 --out ablation/

``--variants`` is a JSON object {name: FewShotSegmenter keyword arguments}. Variants with the
same feature settings share one feature cache, so each image goes through the backbone once
per feature setting. Writes ``ablation.json`` (per variant, shot count, dataset and class
IoUs) and ``ablation.md``: the class-mean / per-dataset table, and the leave-one-dataset-out
table: for each dataset, the variant with the best class mean on the *other* datasets, and
what it scores on the held-out one.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fdseg import FewShotSegmenter
from fdseg.bench import run_episode
from fdseg.data import make_episodes, scan
from fdseg.metrics import dataset_scores, episode_counts


def evaluate(data: Path, variants: dict, shots: list[int], datasets=None, max_per_class=None,
             eval_size: int = 256, progress: bool = True) -> dict:
    cat = scan(data)
    if datasets or max_per_class:
        cat = cat.subset(datasets, None, max_per_class)
    segs = {name: FewShotSegmenter(**kw) for name, kw in variants.items()}
    shared: dict[str, object] = {}
    for s in segs.values():                       # one cache per feature setting
        s.cache = shared.setdefault(s._feature_tag, s.cache)
        s.cache.max_items = 80
    out = {"variants": variants, "runs": {}}
    for k in shots:
        eps = make_episodes(cat, k, seed=2)
        recs = defaultdict(list)
        secs = defaultdict(float)
        it = tqdm(eps, desc=f"{k}-shot", unit="ep", disable=not progress, dynamic_ncols=True)
        for ep in it:
            for name, seg in segs.items():
                t = time.perf_counter()
                gt, pred, _, _ = run_episode(seg, cat.root, ep, eval_size)
                secs[name] += time.perf_counter() - t
                tp, fp, fn, tn = episode_counts(gt, pred)
                recs[name].append({"dataset": ep.dataset, "cls": ep.cls, "tp": tp, "fp": fp, "fn": fn, "tn": tn})
        for name, rs in recs.items():
            out["runs"].setdefault(name, {})[str(k)] = summarise(rs, cat, 1e3 * secs[name] / len(eps))
    return out


def summarise(records: list[dict], cat, ms_per_episode: float) -> dict:
    """Episode confusion counts -> per-dataset scores (the paper's metric) and the class mean."""
    by = defaultdict(list)
    for r in records:
        by[r["dataset"]].append(r)
    sc = {ds: dataset_scores(ds, sorted(cat.classes[ds]), r).as_dict() for ds, r in by.items()}
    return {"datasets": sc, "class_mean": float(np.mean([v for d in sc.values() for v in d["class_iou"].values()])),
            "ms_per_episode": ms_per_episode}


def class_mean(run: dict, keep=lambda ds: True) -> float:
    ious = [v for ds, d in run["datasets"].items() if keep(ds) for v in d["class_iou"].values()]
    return float(np.mean(ious)) if ious else float("nan")


def markdown(res: dict) -> str:
    names = list(res["runs"])
    shots = sorted({k for r in res["runs"].values() for k in r}, key=int)
    datasets = sorted({ds for r in res["runs"].values() for s in r.values() for ds in s["datasets"]})
    lines = []
    for k in shots:
        # variants that have this shot count on every dataset
        names_k = [n for n in names if k in res["runs"][n] and set(res["runs"][n][k]["datasets"]) >= set(datasets)]
        if not names_k:
            continue
        lines += [f"### {k}-shot", "", "| variant | " + " | ".join(datasets) + " | class mean | ms/episode |",
                  "|---|" + "---|" * (len(datasets) + 2)]
        for n in names_k:
            r = res["runs"][n][k]
            cells = [f"{100 * r['datasets'][d]['miou']:.1f}" if d in r["datasets"] else "-" for d in datasets]
            lines.append(f"| {n} | " + " | ".join(cells) + f" | **{100 * r['class_mean']:.1f}** | {r['ms_per_episode']:.0f} |")
        lines += ["", f"Leave-one-dataset-out ({k}-shot): the variant chosen on the other datasets, scored on the held-out one", "",
                  "| held out | chosen on the others | its mIoU there | best possible there |", "|---|---|---|---|"]
        for d in datasets:
            pick = max(names_k, key=lambda n: class_mean(res["runs"][n][k], lambda ds: ds != d))
            best = max(names_k, key=lambda n: res["runs"][n][k]["datasets"][d]["miou"])
            lines.append(f"| {d} | {pick} | {100 * res['runs'][pick][k]['datasets'][d]['miou']:.1f} | "
                         f"{100 * res['runs'][best][k]['datasets'][d]['miou']:.1f} ({best}) |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/defects")
    ap.add_argument("--variants", required=True, help="JSON file {name: FewShotSegmenter kwargs}")
    ap.add_argument("--only", nargs="+", default=None, help="only these variant names")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--datasets", nargs="+", default=None)
    ap.add_argument("--max-per-class", type=int, default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    variants = json.loads(Path(a.variants).read_text())
    if a.only:
        variants = {k: v for k, v in variants.items() if k in a.only}
    res = evaluate(Path(a.data), variants, a.shots, a.datasets, a.max_per_class)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / "ablation.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
