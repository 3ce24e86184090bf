"""Regression episodes: save the masks today's code makes, or check that a change keeps them identical.

    python benchmarks/regression_masks.py --save /tmp/before.npz      # before a refactor
    python benchmarks/regression_masks.py --check /tmp/before.npz     # after it: every mask identical

Episodes: the paper's protocol (seed 2), the first ``--per-class`` queries of one class per dataset at
1 and 5 shots, with the default segmenter (zoomed VisA / bsdata included); each episode's mask as the
bench makes it (256 x 256) and as ``predict`` makes it (the query's own size).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["magnetic_tile/blowhole", "crackforest/crack", "sd_saliency_900/inclusion", "visa/capsules",
           "bsdata/pitting"]


def masks(data: Path, per_class: int, shots: list[int]) -> dict[str, np.ndarray]:
    import torch
    from fdseg import FewShotSegmenter
    from fdseg.bench import run_episode
    from fdseg.data import make_episodes, scan
    torch.set_num_threads(1)
    cat = scan(data)
    out = {}
    for k in shots:
        seg = FewShotSegmenter(cache_size=64)
        for cls in CLASSES:
            ds, c = cls.split("/")
            eps = [e for e in make_episodes(cat.subset([ds], [c]), k, 2)][:per_class]
            for ep in eps:
                t = time.perf_counter()
                _, pred, _, _ = run_episode(seg, cat.root, ep, 256)
                out[f"bench:{ep.id}"] = pred
                out[f"predict:{ep.id}"] = seg.predict(cat.root / ep.query).mask
                print(f"{ep.id}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "defects"))
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--save")
    g.add_argument("--check")
    a = ap.parse_args()
    got = masks(Path(a.data), a.per_class, a.shots)
    if a.save:
        np.savez_compressed(a.save, **got)
        print(f"saved {len(got)} masks to {a.save}")
        return 0
    ref = dict(np.load(a.check))
    bad = [k for k in ref if k not in got or got[k].shape != ref[k].shape or (got[k] != ref[k]).any()]
    for k in bad:
        d = "missing" if k not in got else f"{int((got[k] != ref[k]).sum())} pixels differ"
        print(f"DIFFERS {k}: {d}")
    print(f"{len(ref) - len(bad)}/{len(ref)} masks identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
