"""Strip benchmark: the default (resize auto) vs --resize resize on line-scan strips, same episodes.

Runs ``fdseg bench`` once per (mode, shots, dataset group), each bounded (a group of datasets per run;
``--max-per-class``), evaluated at native resolution (``--eval-size 0``: squeezing a 16:1 mask to 256 x 256
for the score would itself lose thread-wide defects). The first mode draws the episodes (the paper's
protocol; one ``random.Random(seed)`` per dataset, so drawing a group alone gives the same episodes);
the other modes reuse its episode files. Reruns resume. Then prints per-class IoU, the class mean
(mean IoU over all classes) and the median ms per query (fit + predict) of each (mode, shots).

    python benchmarks/make_strips.py --out /tmp/strips
    python benchmarks/strips.py --strips /tmp/strips --out /tmp/strips-bench [--shots 1 5]
        [--max-per-class 6] [--groups magnetic_tile sd_saliency_900,crackforest] [--modes resize auto]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(strips: Path, out: Path, mode: str, k: int, group: list[str], episodes: Path | None,
        max_per_class: int, threads: int) -> Path:
    dest = out / f"{mode}_{k}shot_{'+'.join(group)}"
    cmd = [sys.executable, "-m", "fdseg", "bench", "--data", str(strips), "--shots", str(k), "--threads",
           str(threads), "--eval-size", "0", "--resize", mode, "--out", str(dest), "--no-progress"]
    cmd += ["--episodes", str(episodes)] if episodes else ["--datasets", *group, "--max-per-class", str(max_per_class)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return dest


def summary(dirs: list[Path], k: int) -> dict:
    """Per-class IoU (one confusion matrix per dataset, as ``fdseg bench``), class mean and median ms per
    query (fit + predict) over the ``k``-shot episode records of some bench folders."""
    from fdseg.metrics import dataset_scores
    recs = []
    for d in dirs:
        for line in (d / "runs" / f"fm_{k}shot.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "tp" in rec:
                recs.append(rec)
    by_ds: dict[str, list[dict]] = {}
    for r in recs:
        by_ds.setdefault(r["dataset"], []).append(r)
    ious = {}
    for ds, rs in sorted(by_ds.items()):
        for cls, v in dataset_scores(ds, sorted({r["cls"] for r in rs}), rs).as_dict()["class_iou"].items():
            ious[f"{ds}/{cls}"] = v
    ms = [r["fit_ms"] + r["predict_ms"] for r in recs]
    return {"class_iou": ious, "class_mean": 100 * sum(ious.values()) / len(ious),
            "ms_per_query_median": statistics.median(ms), "episodes": len(recs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strips", required=True, help="output of benchmarks/make_strips.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    ap.add_argument("--max-per-class", type=int, default=6)
    ap.add_argument("--groups", nargs="+", default=["magnetic_tile", "sd_saliency_900,crackforest"],
                    help="datasets run together (comma-separated), one bench run per group")
    ap.add_argument("--modes", nargs="+", default=["resize", "auto"], help="the first draws the episodes")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    strips, out = Path(a.strips), Path(a.out)
    groups = [g.split(",") for g in a.groups]
    table = {}
    for k in a.shots:
        for i, mode in enumerate(a.modes):
            dirs = []
            for g in groups:
                first = out / f"{a.modes[0]}_{k}shot_{'+'.join(g)}"
                eps = None if i == 0 else first / f"episodes_{k}shot.json"
                dirs.append(run(strips, out, mode, k, g, eps, a.max_per_class, a.threads))
            table[(mode, k)] = s = summary(dirs, k)
            print(f"{mode} {k}-shot: class mean {s['class_mean']:.1f} over {len(s['class_iou'])} classes, "
                  f"{s['episodes']} episodes, {s['ms_per_query_median']:.0f} ms/query", flush=True)
    classes = sorted({c for s in table.values() for c in s["class_iou"]})
    print("\n| mode | shots | " + " | ".join(classes) + " | class mean | ms/query |")
    print("|---|---|" + "---|" * len(classes) + "---|---|")
    for (mode, k), s in table.items():
        cells = " | ".join(f"{100 * s['class_iou'].get(c, float('nan')):.1f}" for c in classes)
        print(f"| {mode} | {k} | {cells} | **{s['class_mean']:.1f}** | {s['ms_per_query_median']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
