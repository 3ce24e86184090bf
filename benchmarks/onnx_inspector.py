"""The ONNX graph of a fitted inspector against fdseg's own predict, on the same real queries, in one run.

For each class: fit a segmenter (``--preset``, ``--shots`` supports, the machine's default numeric path),
save the inspector, export it (``fdseg.export_inspector``), then for each query, interleaved, time

* ``onnx``: the graph in onnxruntime, 1 intra-op thread (decoded image in -> outputs),
* ``fdseg fp32``: ``fdseg.load(path, precision="fp32").predict(image)``, torch on 1 thread,
* ``fdseg <recorded>``: ``fdseg.load(path).predict(image)`` on the numeric path the inspector was fitted on
  (when it is not fp32: bf16 on a CPU with AVX-512 BF16 / AMX),

and count the pixels where the graph's mask equals each one's (no OK gate is fitted: the masks are final).
A second process with onnxruntime and numpy only (no torch, no fdseg) runs the same queries through
the graph and reports its peak RSS and that its masks equal the first process's.

    .venv/bin/python benchmarks/onnx_inspector.py                  # fast preset, 1 support, 20 queries x 5 classes
    .venv/bin/python benchmarks/onnx_inspector.py --preset accurate --queries 10

Results: docs/onnx-inspector.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("FDSEG_DATA", REPO.parent / "shared" / "data")) / "defects"
CLASSES = ("magnetic_tile/blowhole", "sd_saliency_900/inclusion", "crackforest/crack", "visa/capsules",
           "bsdata/pitting")

_ORT_ONLY = textwrap.dedent("""
    import json, resource, sys, time
    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
    sess = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    z = np.load(sys.argv[2])
    masks, times = {}, []
    for k in sorted(z.files, key=int):
        x = np.ascontiguousarray(z[k].transpose(2, 0, 1)[None])
        t = time.perf_counter()
        out = dict(zip(names, sess.run(None, {"image": x})))
        times.append(time.perf_counter() - t)
        masks[k] = out["mask"]
    np.savez_compressed(sys.argv[3], **masks)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]   # this process's image (ru_maxrss
    peak = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": peak,                                  # keeps the forking parent's)
                      "median_ms": 1000 * sorted(times)[len(times) // 2],
                      "torch_imported": "torch" in sys.modules, "fdseg_imported": "fdseg" in sys.modules}))
""")


def class_files(name: str) -> tuple[list[Path], list[Path]]:
    ims = sorted((DATA / name / "images").iterdir())
    return ims, [DATA / name / "masks" / f"{p.stem}.png" for p in ims]


def run_class(name: str, args, tmp: Path) -> dict:
    import torch

    import fdseg
    from fdseg.data.images import load_image
    from fdseg.export_inspector import export_inspector, read_metadata, run, session
    ims, masks = class_files(name)
    sup, qs = slice(0, args.shots), ims[args.shots:args.shots + args.queries]
    seg = fdseg.FewShotSegmenter(preset=args.preset).fit(ims[sup], masks[sup])
    insp = seg.save(tmp / f"{name.replace('/', '_')}.fdseg")
    recorded = seg.settings["precision"]
    del seg
    t = time.perf_counter()
    model = export_inspector(insp, tmp / f"{name.replace('/', '_')}.onnx", prune=not args.exact_margins)
    export_s = time.perf_counter() - t
    sess = session(model, threads=1)
    meta = read_metadata(sess)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refs = {"fp32": fdseg.load(insp, precision="fp32")}
        if recorded != "fp32":
            refs[recorded] = fdseg.load(insp, precision=recorded)
    images = [load_image(p) for p in qs]
    # warm-up (oneDNN kernels, onnxruntime's first run): not timed
    run(sess, images[0])
    for r in refs.values():
        r.predict(images[0])
    times = {"onnx": [], **{f"fdseg {k}": [] for k in refs}}
    same = {k: 0 for k in refs}
    pixels, score_diff, mask_px, graph_masks, per_query_min = 0, 0.0, 0, {}, {k: 1.0 for k in refs}
    with torch.inference_mode():
        for i, rgb in enumerate(images):
            t = time.perf_counter()
            out = run(sess, rgb)
            times["onnx"].append(time.perf_counter() - t)
            graph_masks[str(i)] = out["mask"]
            pixels += out["mask"].size
            mask_px += int(out["mask"].sum())
            for k, r in refs.items():
                t = time.perf_counter()
                pred = r.predict(rgb)
                times[f"fdseg {k}"].append(time.perf_counter() - t)
                eq = int((pred.mask == out["mask"]).sum())
                same[k] += eq
                per_query_min[k] = min(per_query_min[k], eq / out["mask"].size)
                if k == "fp32":
                    score_diff = max(score_diff, abs(float(out["defect_score"]) - pred.defect_score))
    # the same queries through the graph in a process with onnxruntime and numpy only
    np.savez(tmp / "q.npz", **{str(i): im for i, im in enumerate(images)})
    res = subprocess.run([sys.executable, "-c", _ORT_ONLY, str(model), str(tmp / "q.npz"), str(tmp / "m.npz")],
                         capture_output=True, text=True, timeout=1800)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    alone = json.loads(res.stdout)
    z = np.load(tmp / "m.npz")
    alone["masks_equal_in_process"] = all(np.array_equal(z[k], graph_masks[k]) for k in graph_masks)
    shapes = sorted({im.shape[:2] for im in images})
    return {"class": name, "preset": args.preset, "shots": args.shots, "queries": len(images),
            "image_sizes": [list(s) for s in shapes[:3]], "grid": list(out["margin"].shape),
            "recorded_precision": recorded, "colour": (meta["colour"] or {}).get("mode"),
            "query_views": meta["query_views"], "bg_cells": meta["matching"]["bg_cells"],
            "pruned": meta["matching"]["pruned"], "onnx_mb": round(model.stat().st_size / 1e6, 1),
            "export_s": round(export_s, 1), "mask_pixels": mask_px, "pixels": pixels,
            "agreement": {k: same[k] / pixels for k in refs}, "worst_query": per_query_min,
            "max_defect_score_diff_fp32": score_diff,
            "median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
            "mean_ms": {k: 1000 * statistics.fmean(v) for k, v in times.items()},
            "onnxruntime_alone": alone}


def table(rows: list[dict]) -> str:
    lines = ["| class (images) | grid | colour | views | bank bg | mask px | agree fp32 | agree bf16 | "
             "|d score| | onnx ms | fdseg fp32 ms | fdseg bf16 ms | ort-alone RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, m = r["agreement"], r["median_ms"]
        sz = "x".join(map(str, r["image_sizes"][0][::-1])) + ("+" if len(r["image_sizes"]) > 1 else "")
        lines.append(
            f"| {r['class']} ({sz}) | {r['grid'][0]}x{r['grid'][1]} | {r['colour']} | {r['query_views']} | "
            f"{r['bg_cells']} | {r['mask_pixels']} | {100 * a['fp32']:.4f}% | "
            f"{'%.4f%%' % (100 * a['bf16']) if 'bf16' in a else '-'} | {r['max_defect_score_diff_fp32']:.1e} | "
            f"{m['onnx']:.1f} | {m['fdseg fp32']:.1f} | {'%.1f' % m['fdseg bf16'] if 'fdseg bf16' in m else '-'} | "
            f"{r['onnxruntime_alone']['peak_rss_mb']:.0f} MB |")
    tot = {k: sum(r["agreement"][k] * r["pixels"] for r in rows if k in r["agreement"]) /
           sum(r["pixels"] for r in rows if k in r["agreement"]) for k in ("fp32", "bf16")
           if any(k in r["agreement"] for r in rows)}
    lines.append("")
    lines.append("all pixels: " + ", ".join(f"agreement with fdseg {k} {100 * v:.4f}%" for k, v in tot.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", nargs="+", default=list(CLASSES))
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--exact-margins", action="store_true", help="export with every cell matched exactly")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.classes:
            r = run_class(name, args, Path(d))
            rows.append(r)
            print(json.dumps(r), flush=True)
    print()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"command": sys.argv, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
