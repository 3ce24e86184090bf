"""Measure the multi-type rules (fdseg.multitype) on the multi-type episodes (fdseg.multitype_bench).

    python benchmarks/multi_type.py --datasets magnetic_tile --max-per-class 8 --shots 1 5 --out /tmp/mt
    python benchmarks/multi_type.py --report /tmp/mt        # the tables again, from the JSONL

Every episode is fitted once per competition rule (``--competitions``; default: independent, others,
shared); each fit's per-type predictions are labelled with every labelling rule (pixel / component) and
score (margin above the type's threshold, ``rel``, or the raw margin, ``raw``); the one-type-per-fit
figures come from the same supports. One JSONL per shot count under OUT (resumable: finished episodes
are skipped). Prints, per dataset and shot count, each variant's mIoU, its ratio to one type per fit,
and the image-level type accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "defects"))
    ap.add_argument("--datasets", nargs="+", default=["magnetic_tile", "sd_saliency_900", "visa"])
    ap.add_argument("--classes", nargs="+", default=["magnetic_tile/*", "sd_saliency_900/*", "visa/macaroni1_*"])
    ap.add_argument("--max-per-class", type=int, default=None)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--competitions", nargs="+", default=["independent", "others", "head", "shared"])
    ap.add_argument("--gates", type=float, nargs="*", default=[], help="weak-region gates to measure (combine)")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--eval-size", type=int, default=256)
    ap.add_argument("--out", default="/tmp/multi_type_dev")
    ap.add_argument("--report", default=None, help="only print the tables of an earlier --out")
    a = ap.parse_args()
    if a.report:
        report(Path(a.report))
        return 0
    import torch
    torch.set_num_threads(1)
    from fdseg.data.layouts import scan
    from fdseg.multitype import LABELLINGS, MultiTypeSegmenter
    from fdseg.multitype_bench import expand_classes, make_typed_episodes, run_typed_episode
    cat = scan(a.data)
    cat = cat.subset(a.datasets, expand_classes(cat, a.classes), a.max_per_class)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    n_images = sum(len(v) for by in cat.classes.values() for v in by.values())
    seg = MultiTypeSegmenter(cache_size=10 * n_images, preset=a.preset)
    for k in a.shots:
        path = out / f"{k}shot.jsonl"
        done = {json.loads(l)["id"] for l in path.read_text().splitlines() if l.strip()} if path.exists() else set()
        eps = [e for e in make_typed_episodes(cat, k, a.seed) if e.id not in done]
        with open(path, "a") as f:
            for i, ep in enumerate(eps):
                t = time.perf_counter()
                rec = run_typed_episode(seg, cat.root, ep, sorted(cat.classes[ep.dataset]), a.eval_size,
                                        variants=a.competitions, labellings=LABELLINGS, relative=(True, False),
                                        gates=tuple(a.gates))
                f.write(json.dumps(rec) + "\n")
                f.flush()
                print(f"{k}-shot {i + 1}/{len(eps)} {ep.id}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    report(out)
    return 0


def report(out: Path) -> None:
    from fdseg.multitype_bench import summarize
    for path in sorted(out.glob("*shot.jsonl")):
        recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
        by_ds: dict[str, list[dict]] = {}
        for r in recs:
            if "error" not in r:
                by_ds.setdefault(r["dataset"], []).append(r)
        for ds, rs in sorted(by_ds.items()):
            print(f"\n{ds}, {path.stem}: {len(rs)} queries")
            print("| variant | one type per fit mIoU | multi mIoU | ratio | image type acc (strongest / largest) "
                  "| ms fit+predict |")
            print("|---|---|---|---|---|---|")
            for v in rs[0]["variants"]:
                s = summarize(rs, v)
                strongest = f"{100 * s['image_type_accuracy']:.1f}" if "pred_type" in rs[0]["variants"][v] else "-"
                print(f"| {v} | {100 * s['miou_single']:.1f} | {100 * s['miou_multi']:.1f} | "
                      f"{100 * s['ratio']:.0f} % | {strongest} / {100 * s['image_type_accuracy_largest']:.1f} | "
                      f"{s['ms_fit_predict_median']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
