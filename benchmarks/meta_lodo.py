"""The paper's comparison: a trained few-shot network (``meta``) vs training-free ``proto`` and ``fm``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/meta_lodo.py --data ../shared/data/defects \
        --out meta-lodo/ --max-per-class 20 --max-per-class-5shot 10 --in-domain

Runs (each resumable: rerun the same command after a kill):

1. ``fdseg bench --method fm proto`` on every dataset  -> OUT/baselines/
2. ``fdseg train-meta --lodo``: for each dataset, meta trained on the four others and evaluated
   on it                                                 -> OUT/lodo/DATASET/{meta.pt,eval/}
3. (``--in-domain``) meta trained on every dataset but never on the evaluated images (the
   first ``--max-per-class`` of each class are skipped)  -> OUT/indomain/
4. writes OUT/comparison.md (rows = methods x shots, columns = datasets: mIoU / FB-IoU, class-mean
   mIoU, median ms per query) and OUT/comparison.json, from the run logs, on the episodes that
   every method finished (``--table-only`` rebuilds it from partial runs).

All methods see the same episodes: they are drawn per dataset from the seed alone.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fdseg.atomic import write_text
from fdseg.cli import main as fdseg


def _jsonl(path: Path) -> dict[str, dict]:
    """Finished episodes of one bench run log (fdseg/bench.py RunLog), by episode id."""
    if not path.is_file():
        return {}
    out = {}
    for ln in path.read_text().splitlines()[1:]:
        try:
            r = json.loads(ln)
        except ValueError:
            continue
        if "error" not in r:
            out[r["id"]] = r
    return out


def collect(out: Path, data: str, datasets: list[str], shots: list[int], max_per_class: int | None,
            in_domain: bool, max_per_class_5: int | None = None) -> dict[int, list[dict]]:
    """Per shot count: rows {label, cells: {dataset: scores}} computed from the run logs on the
    episodes that *every* row has finished (so partial runs still compare like with like)."""
    from fdseg.data.episodes import make_episodes
    from fdseg.data.layouts import scan
    from fdseg.metrics import dataset_scores
    res = {}
    for k in shots:
        sep = k == 5 and _separate_5shot(max_per_class, max_per_class_5)
        n = max_per_class_5 if sep else max_per_class
        cat = scan(data).subset(datasets, None, n)
        eps = make_episodes(cat, k, 2)
        suffix = "-5shot" if sep else ""
        base, ev = out / f"baselines{suffix}" / "runs", f"eval{suffix}"
        logs = {"fm (training-free)": _jsonl(base / f"fm_{k}shot.jsonl"),
                "proto (training-free)": _jsonl(base / f"proto_{k}shot.jsonl")}
        lodo: dict[str, dict] = {}
        for ds in datasets:
            lodo.update(_jsonl(out / "lodo" / ds / ev / "runs" / f"meta_{k}shot.jsonl"))
        logs["meta, held-out dataset (LODO)"] = lodo
        if in_domain:
            logs["meta, in-domain (other images, all 5)"] = _jsonl(out / "indomain" / ev / "runs" / f"meta_{k}shot.jsonl")
        common = set.intersection(*(set(v) for v in logs.values()))
        rows = []
        for label, recs in logs.items():
            cells = {}
            for ds in datasets:
                ids = [e.id for e in eps if e.dataset == ds]
                got = [recs[i] for i in ids if i in common]
                if not got:
                    continue
                sc = dataset_scores(ds, sorted(cat.classes[ds]), got).as_dict()
                sc["ms"] = statistics.median(r["fit_ms"] + r["predict_ms"] for r in got)
                sc["complete"] = len(got) == len(ids)
                sc["n"], sc["of"] = len(got), len(ids)
                cells[ds] = sc
            rows.append({"label": label, "shots": k, "max_per_class": n, "cells": cells})
        res[k] = rows
    return res


def _separate_5shot(n: int | None, n5: int | None) -> bool:
    return n5 is not None and n5 != n


def table(rows: list[dict], datasets: list[str]) -> str:
    head = "| method | shots | " + " | ".join(datasets) + " | class-mean mIoU | ms/query |"
    lines = [head, "|" + "---|" * (len(datasets) + 4)]
    partial = False
    for r in rows:
        c = r["cells"]
        cells = []
        for d in datasets:
            if d not in c:
                cells.append("-")
                continue
            star = "" if c[d]["complete"] else f" ({c[d]['n']}/{c[d]['of']} eps)"
            partial |= bool(star)
            cells.append(f"{100 * c[d]['miou']:.1f} / {100 * c[d]['fbiou']:.1f}{star}")
        ious = [v for d in datasets if d in c for v in c[d]["class_iou"].values()]
        done = all(d in c and c[d]["complete"] for d in datasets)
        cm = f"**{100 * statistics.mean(ious):.1f}**" if ious and done else "-"
        ms = [c[d]["ms"] for d in datasets if d in c]
        ms_cell = f"{statistics.median(ms):.0f}" if ms else "-"
        lines.append(f"| {r['label']} | {r['shots']} | " + " | ".join(cells) + f" | {cm} | {ms_cell} |")
    lines.append("")
    lines.append("Cells: mIoU / FB-IoU x 100 on the episodes every row finished. class-mean = mean IoU over every "
                 "class of every dataset (only when all are complete). ms/query = median over datasets of the "
                 "median fit + predict time per episode." +
                 (" (n/N eps): only n of the N episodes were finished by every method." if partial else ""))
    return "\n".join(lines) + "\n"


def timing(data: str, checkpoint: Path, per_dataset: int, shots: list[int], threads: int) -> str:
    """Paired speed: fm, proto and meta on the same episodes, interleaved episode by episode
    (so background load hits them alike); every episode re-extracts its supports and query
    (no cache: the paper's loop). -> markdown table of median ms."""
    import time
    import torch
    from fdseg import FewShotSegmenter
    from fdseg.data.episodes import make_episodes
    from fdseg.data.layouts import scan
    torch.set_num_threads(threads)
    cat = scan(data)
    segs = {"fm": FewShotSegmenter(method="fm"), "proto": FewShotSegmenter(method="proto"),
            "meta": FewShotSegmenter(method="meta", method_options={"checkpoint": str(checkpoint)})}
    lines = ["| shots | method | fit ms (median) | predict ms (median) | fit + predict ms | episodes |",
             "|---|---|---|---|---|---|"]
    for k in shots:
        eps = [e for ds in cat.datasets for e in make_episodes(cat.subset([ds], None, 10), k, 2)[:per_dataset]]
        t = {m: ([], []) for m in segs}
        for e in eps:
            for m, seg in segs.items():
                t0 = time.perf_counter()
                seg.fit([cat.root / p for p in e.supports], [cat.root / p for p in e.support_masks])
                t1 = time.perf_counter()
                seg.margins(cat.root / e.query)
                t[m][0].append(1e3 * (t1 - t0))
                t[m][1].append(1e3 * (time.perf_counter() - t1))
        for m, (f, q) in t.items():
            lines.append(f"| {k} | {m} | {statistics.median(f):.0f} | {statistics.median(q):.0f} | "
                         f"{statistics.median([a + b for a, b in zip(f, q)]):.0f} | {len(f)} |")
    return "\n".join(lines) + "\n"


def run(a: argparse.Namespace) -> None:
    out = Path(a.out)
    sep5 = 5 in a.shots and _separate_5shot(a.max_per_class, a.max_per_class_5shot)
    main_shots = [k for k in a.shots if not (sep5 and k == 5)]
    common = ["--data", a.data, "--shots", *map(str, main_shots), "--threads", str(a.threads)]
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
    if sep5:
        if a.in_domain and a.max_per_class_5shot > a.max_per_class:
            raise SystemExit("--max-per-class-5shot must not exceed --max-per-class with --in-domain")
        c5 = ["--data", a.data, "--shots", "5", "--threads", str(a.threads), "--max-per-class",
              str(a.max_per_class_5shot)] + (["--no-progress"] if a.no_progress else [])
        jobs.append(["bench", "--method", "fm", "proto", "--datasets", *datasets,
                     "--out", str(out / "baselines-5shot"), *c5])
        runs = [(out / "lodo" / ds, [ds]) for ds in datasets] + ([(out / "indomain", datasets)] if a.in_domain else [])
        for d, dss in runs:
            jobs.append(["bench", "--method", "meta", "--method-option", f"checkpoint={(d / 'meta.pt').resolve()}",
                         "--datasets", *dss, "--out", str(d / "eval-5shot"), *c5])
    if a.timing:
        ck = out / "lodo" / datasets[0] / "meta.pt"
        md = timing(a.data, ck, a.timing, a.shots, a.threads)
        write_text(out / "timing.md", md)
        print(md)
        return
    if not a.table_only:
        for j in jobs:
            print("fdseg " + " ".join(j), flush=True)
            rc = fdseg(j)
            if rc:
                raise SystemExit(rc)
    by_k = collect(out, a.data, datasets, a.shots, a.max_per_class, a.in_domain, a.max_per_class_5shot)
    md = "\n".join(table(rows, datasets) for rows in by_k.values())
    write_text(out / "comparison.md", md)
    write_text(out / "comparison.json", json.dumps({str(k): v for k, v in by_k.items()}, indent=1))
    print(md)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="meta-lodo")
    p.add_argument("--datasets", nargs="+", default=None, help="default: every dataset under --data")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--max-per-class", type=int, default=None, help="evaluate on the first N images of each class")
    p.add_argument("--max-per-class-5shot", type=int, default=None,
                   help="evaluate 5-shot on the first N images per class instead (fm 5-shot is ~5x slower)")
    p.add_argument("--steps", type=int, default=600, help="train-meta steps per fold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--in-domain", action="store_true", help="also the in-domain meta row (needs --max-per-class)")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--timing", type=int, default=0, metavar="N",
                   help="only the paired speed check: N episodes per dataset, fm / proto / meta interleaved")
    run(p.parse_args())
