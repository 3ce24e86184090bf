"""CPU cost of each backbone: feature-path parameters, backbone forward and FM matching per query.

    OMP_NUM_THREADS=1 python benchmarks/backbones_speed.py efficientnet_lite0 vgg16_hed ... [--repeat 5]

Times are CPU seconds of this process (time.process_time, 1 torch thread), the median of --repeat
runs: on a shared, oversubscribed machine they move far less than wall-clock times. One 256 x 256
query (the paper's setting, feature grid 64 x 64): the backbone forward alone, and a whole FM predict
(forward + matching + upsampling) with 1 and 5 support images, and a proto predict (5 supports; its
cost hardly depends on K).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch


def cpu_ms(fn, repeat: int) -> float:
    fn()                                   # warm-up
    ts = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        ts.append((time.process_time() - t) * 1e3)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("backbones", nargs="+")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--weights", action="append", default=[], metavar="BACKBONE=PATH",
                    help="weights of a backbone that needs a file (random ones do for timing)")
    a = ap.parse_args()
    weights = dict(w.split("=", 1) for w in a.weights)
    torch.set_num_threads(1)
    from fdseg import FewShotSegmenter
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from backbones_table import feature_params
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (a.size, a.size, 3), dtype=np.uint8) for _ in range(6)]
    masks = []
    for i in range(5):
        m = np.zeros((a.size, a.size), bool)
        m[40 + 10 * i:120 + 10 * i, 60:140] = True
        masks.append(m)
    print(f"| backbone | params (feature path) | feature channels | forward CPU ms | FM 1-shot predict CPU ms "
          f"| FM 5-shot predict CPU ms | proto 5-shot predict CPU ms |")
    print("|---|---|---|---|---|---|---|")
    for name in a.backbones:
        seg = FewShotSegmenter(backbone=name, method="fm", input_size=a.size, weights=weights.get(name))
        ex = seg.extractor
        fwd = cpu_ms(lambda: ex(imgs[5]), a.repeat)
        match = {}
        for k in (1, 5):
            seg.fit(imgs[:k], masks[:k])
            match[k] = cpu_ms(lambda: seg.predict(imgs[5]), a.repeat)
        proto = FewShotSegmenter(backbone=name, method="proto", input_size=a.size, weights=weights.get(name))
        proto.fit(imgs[:5], masks[:5])
        match["proto"] = cpu_ms(lambda: proto.predict(imgs[5]), a.repeat)
        print(f"| {name} | {feature_params(name, weights.get(name)) / 1e6:.2f} M | {ex.channels} | {fwd:.0f} | {match[1]:.0f} "
              f"| {match[5]:.0f} | {match['proto']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
