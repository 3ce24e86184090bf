"""Peak RSS of a bench-like loop (fit + predict per episode, the bench's feature cache) in this process.

    .venv/bin/python benchmarks/peak_rss.py --datasets magnetic_tile --max-per-class 30 --shots 5 --colour-refine 0
    .venv/bin/python benchmarks/peak_rss.py --datasets magnetic_tile --max-per-class 30 --shots 5 --colour-refine 0.3

Run one setting per process: ru_maxrss is the process's peak.
"""
from __future__ import annotations

import argparse
import resource
from pathlib import Path

from fdseg import FewShotSegmenter
from fdseg.bench import run_episode
from fdseg.data import make_episodes, scan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/defects")
    ap.add_argument("--datasets", nargs="+", default=None)
    ap.add_argument("--max-per-class", type=int, default=None)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--cache-size", type=int, default=192)
    ap.add_argument("--colour-refine", type=float, default=0.3)
    a = ap.parse_args()
    cat = scan(Path(a.data)).subset(a.datasets, None, a.max_per_class)
    eps = make_episodes(cat, a.shots, seed=2)
    seg = FewShotSegmenter(cache_size=a.cache_size, colour_refine=a.colour_refine)
    for ep in eps:
        run_episode(seg, cat.root, ep, 256)
    print(f"colour_refine={a.colour_refine} episodes={len(eps)} "
          f"peak_rss_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}")


if __name__ == "__main__":
    main()
