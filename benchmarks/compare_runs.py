"""Per-dataset mIoU of two `fdseg bench` runs made on the same episodes, and the difference.

    python benchmarks/compare_runs.py bench-out/fm bench-out/fm_superpixel [--names fm fm+superpixel]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(d: Path) -> dict:
    res = json.loads((d / "results.json").read_text())
    return {r["shots"]: r for r in res["runs"]}


def same_episodes(a: Path, b: Path, k: int) -> bool:
    fa, fb = a / f"episodes_{k}shot.json", b / f"episodes_{k}shot.json"
    ja, jb = json.loads(fa.read_text()), json.loads(fb.read_text())
    return ja.get("episodes") == jb.get("episodes")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--names", nargs=2, default=None)
    x = ap.parse_args()
    na, nb = x.names or (x.a.name, x.b.name)
    ra, rb = load(x.a), load(x.b)
    for k in sorted(set(ra) & set(rb)):
        same = same_episodes(x.a, x.b, k)
        da = {d["dataset"]: d for d in ra[k]["datasets"]}
        db = {d["dataset"]: d for d in rb[k]["datasets"]}
        print(f"\n{k}-shot ({ra[k]['episodes']} episodes; identical episodes: {'yes' if same else 'NO'})\n")
        print(f"| dataset | {na} mIoU | {nb} mIoU | diff | {na} FB-IoU | {nb} FB-IoU |")
        print("|---|---|---|---|---|---|")
        for ds in sorted(set(da) & set(db)):
            a, b = 100 * da[ds]["miou"], 100 * db[ds]["miou"]
            print(f"| {ds} | {a:.1f} | {b:.1f} | {b - a:+.1f} | {100 * da[ds]['fbiou']:.1f} | "
                  f"{100 * db[ds]['fbiou']:.1f} |")
        a, b = 100 * ra[k]["class_mean_miou"], 100 * rb[k]["class_mean_miou"]
        print(f"| **class mean** | **{a:.1f}** | **{b:.1f}** | **{b - a:+.1f}** | | |")
        print(f"\nms/query (median fit + predict, wall): {na} {ra[k]['ms_per_query_median']:.0f}, "
              f"{nb} {rb[k]['ms_per_query_median']:.0f}; predict only: {ra[k]['ms_predict_median']:.0f}, "
              f"{rb[k]['ms_predict_median']:.0f}")


if __name__ == "__main__":
    main()
