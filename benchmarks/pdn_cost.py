"""Cost of a backbone in fm: parameters, GFLOP per 256 x 256 image, ms per query (median).

    OMP_NUM_THREADS=1 python benchmarks/pdn_cost.py --backbone pdn_small efficientnet_lite0 \
        --data ../shared/data/defects --queries 12

ms per query: `FewShotSegmenter.predict` of one query (backbone + fm matching + upsampling) after a
1-shot fit, each query a different image, median over the queries (CPU time under whatever load the
machine has: say so when reporting). GFLOP: torch's FlopCounterMode on one forward (2 x MACs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fdseg import FewShotSegmenter, create_backbone


def _w(name: str):
    """pdn_small / pdn_medium ship no weights: time them untrained (the cost does not depend on it)."""
    return "random" if name in ("pdn_small", "pdn_medium") else None


def gflop(name: str, size: int = 256) -> float:
    bb = create_backbone(name, weights=_w(name))
    x = torch.zeros(1, 3, size, size)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        bb(x)
    return fc.get_total_flops() / 1e9


def used_params(name: str, size: int = 256) -> int:
    """Parameters of the modules a feature forward actually runs (a classifier head is not counted)."""
    bb = create_backbone(name, weights=_w(name))
    called: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: called.add(id(mod)))
             for m in bb.modules() if not list(m.children())]
    with torch.inference_mode():
        bb(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return sum(p.numel() for m in bb.modules() if id(m) in called for p in m.parameters(recurse=False))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", nargs="+", default=["pdn_small", "efficientnet_lite0"])
    ap.add_argument("--data", default="../shared/data/defects")
    ap.add_argument("--cls", default="magnetic_tile/blowhole")
    ap.add_argument("--queries", type=int, default=12)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    d = Path(a.data) / a.cls
    ims = sorted((d / "images").iterdir())[: a.queries + 1]
    mask = d / "masks" / (ims[0].stem + ".png")
    rows = []
    for name in a.backbone:
        seg = FewShotSegmenter(backbone=name, method="fm", weights=_w(name))
        t0 = time.perf_counter()
        seg.fit([ims[0]], [mask])
        fit = time.perf_counter() - t0
        ts = []
        for q in ims[1:]:
            t0 = time.perf_counter()
            seg.predict(q)
            ts.append(time.perf_counter() - t0)
        bb = create_backbone(name, weights=_w(name))
        rows.append({"backbone": name, "params_file": sum(p.numel() for p in bb.parameters()),
                     "params_used": used_params(name),
                     "gflop_256": round(gflop(name), 2), "fit_1shot_ms": round(fit * 1e3),
                     "ms_per_query_median": round(statistics.median(ts) * 1e3),
                     "ms_per_query_min": round(min(ts) * 1e3), "queries": len(ts)})
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
