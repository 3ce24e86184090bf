"""CPU cost per query of the refinement proposers and the SAM methods (random weights; timing only).

    OMP_NUM_THREADS=1 .venv-sam/bin/python benchmarks/sam_cpu_cost.py --queries 3 --out cost.json

Random-weight checkpoints in each library's format are written to a temp folder: SAM2 with the
sam2.1_hiera_t architecture that sam2 ships (1024 px) and tests/assets/sam2_tiny.yaml (256 px),
FastSAM-s (YOLOv8-s-seg) and FastSAM-x architectures. Times: CPU seconds (process time; the
machine may be shared) and wall seconds per query, median over ``--queries`` real queries after
one warm-up. Random weights make no masks worth keeping: proposers' post-processing (NMS,
filtering) may cost differently with trained weights.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fdseg
from fdseg.data.images import load_image, load_mask

ROOT = Path(__file__).resolve().parents[1]


def episode(data: Path, k: int, n: int):
    cls = data / "magnetic_tile" / "blowhole"
    ims = sorted((cls / "images").iterdir())
    sup = ims[:k]
    return ([load_image(p) for p in sup], [load_mask(cls / "masks" / f"{p.stem}.png") for p in sup],
            [load_image(p) for p in ims[k:k + n + 1]])


def timed(fn, items) -> dict:
    fn(items[0])                                    # warm-up
    cpu, wall = [], []
    for it in items[1:]:
        c, w = time.process_time(), time.perf_counter()
        fn(it)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return {"cpu_ms": 1e3 * statistics.median(cpu), "wall_ms": 1e3 * statistics.median(wall), "n": len(cpu)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "defects"))
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--sam2", nargs="+", default=["hiera_t", "toy"], help="SAM2 architectures to time")
    ap.add_argument("--out", default="sam-cost.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="fdseg-sam-cost-"))
    res: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__}

    def want(name):
        return a.only is None or name in a.only

    def save(name, r):
        res[name] = r
        print(f"{name:38s} cpu {r['cpu_ms']:8.0f} ms  wall {r['wall_ms']:8.0f} ms  (n={r['n']})", flush=True)
        Path(a.out).write_text(json.dumps(res, indent=1))

    s_im, s_m, qs = episode(Path(a.data), 5, a.queries)
    if want("fm"):
        seg = fdseg.FewShotSegmenter().fit(s_im[:1], s_m[:1])
        save("fm 1-shot predict (256)", timed(seg.predict, qs))
    if want("superpixel"):
        from fdseg.refine import Refiner
        r = Refiner("superpixel")
        pred = np.zeros((256, 256), bool)
        pred[100:150, 100:150] = True
        save("superpixel propose+fuse (mask 256)", timed(lambda q: r(q, pred), qs))
        r2 = Refiner("superpixel", {"algorithm": "slic"})
        save("superpixel slic propose+fuse (mask 256)", timed(lambda q: r2(q, pred), qs))
    from fdseg.sam import save_random_sam2
    archs = []
    if any(want(n) for n in ("sam2_track", "fm_prompt", "sam2_auto")):
        if "hiera_t" in a.sam2:
            archs.append((None, save_random_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", tmp / "sam2.1_hiera_tiny.pt"),
                          "hiera_t 1024"))
        if "toy" in a.sam2:
            toy = ROOT / "tests" / "assets" / "sam2_tiny.yaml"
            archs.append((toy, save_random_sam2(toy, tmp / "toy.pt"), "toy 256"))
    for cfg, ck, tag in archs:
        opts = {"checkpoint": str(ck), **({"config": str(cfg)} if cfg else {})}
        if want("sam2_track"):
            for k in (1, 5):
                seg = fdseg.FewShotSegmenter(method="sam2_track", method_options=opts).fit(s_im[:k], s_m[:k])
                save(f"sam2_track {k}-shot ({tag})", timed(seg.margins, qs))
            seg = fdseg.FewShotSegmenter(method="sam2_track", method_options={**opts, "reuse_memory": False})
            seg.fit(s_im[:5], s_m[:5])
            save(f"sam2_track 5-shot no reuse ({tag})", timed(seg.margins, qs))
        if want("fm_prompt"):
            seg = fdseg.FewShotSegmenter(method="fm_prompt", method_options=opts).fit(s_im[:1], s_m[:1])
            save(f"fm_prompt 1-shot ({tag}; SAM2 only if FM fires)", timed(seg.margins, qs))
        if want("sam2_auto"):
            from fdseg.refine import Refiner
            r = Refiner("sam2_auto", {**opts, "points_per_side": 16})
            pred = np.zeros((256, 256), bool)
            save(f"sam2_auto 16x16 points ({tag})", timed(lambda q: r(q, pred), qs))
    if want("fastsam"):
        from fdseg.refine import Refiner
        from fdseg.sam.fastsam_random import save_random_fastsam
        for scale in ("s", "x"):
            ck = save_random_fastsam(tmp / f"FastSAM-{scale}.pt", scale=scale)
            for imgsz in (1024, 640):
                r = Refiner("fastsam", {"checkpoint": str(ck), "imgsz": imgsz})
                pred = np.zeros((256, 256), bool)
                save(f"fastsam-{scale} imgsz {imgsz}", timed(lambda q: r(q, pred), qs))
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
