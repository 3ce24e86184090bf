"""What normals cost per query and per fit: the default fitted on one class's supports with 0 / 10 / 50 /
200 defect-free images of its product, the same queries timed for each, interleaved query by query.

    python benchmarks/normals_cost.py [--class magnetic_tile/blowhole] [--counts 0 10 50 200] [--shots 1]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    from fdseg import FewShotSegmenter
    from fdseg.normals import NormalPool, evenly
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--class", dest="cls", default="magnetic_tile/blowhole")
    ap.add_argument("--counts", type=int, nargs="+", default=[0, 10, 50, 200])
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = Path(a.data)
    ds, cls = a.cls.split("/")
    d = data / "defects" / ds / cls
    imgs = sorted((d / "images").iterdir())
    sups, queries = imgs[:a.shots], imgs[a.shots:a.shots + a.queries]
    masks = [d / "masks" / f"{p.stem}.png" for p in sups]
    pool = NormalPool.scan(data / "distill")
    files = pool.files(ds, cls)
    segs, fit_s = {}, {}
    for n in a.counts:
        seg = FewShotSegmenter()
        normals = evenly(files, n) if n else None
        t = time.perf_counter()
        seg.fit(sups, masks, normals=normals)
        fit_s[n] = time.perf_counter() - t
        segs[n] = seg
        seg.predict(queries[0])                      # warm-up (derived banks)
    secs = {n: 0.0 for n in a.counts}
    for q in queries:                                # interleaved: the same load for every count
        for n, seg in segs.items():
            t = time.perf_counter()
            seg.predict(q)
            secs[n] += time.perf_counter() - t
    print(f"{a.cls}, {a.shots}-shot, {len(queries)} queries, {a.threads} thread(s)\n")
    print("| normals | bg bank cells | fit s | ms per query | x no normals |")
    print("|---|---|---|---|---|")
    for n in a.counts:
        info = segs[n].method.describe()
        print(f"| {n} | {info['bg_cells']} | {fit_s[n]:.1f} | {1e3 * secs[n] / len(queries):.0f} | "
              f"x{secs[n] / secs[a.counts[0]]:.2f} |")


if __name__ == "__main__":
    main()
