"""Cheaper stand-ins for a 1-shot query's two flipped views, measured on the same episodes (speed issue 19).

The default matches a single support's query in three views (the query, its left-right and up-down flips)
and averages the margins: two of a 1-shot query's three backbone passes. Two stand-ins, both dropped
(docs/experiments.md, *Cheaper query views*):

* ``collect``: every 1-shot paper episode's margins of the default (three exact views), of the query
  alone (``views1``), and of three views whose flipped views reuse the query's own early layers, flipped
  at that depth (``approx_stem``: after the stem, ``approx_s1``: after stage 1, ``approx_s2``: after
  stage 2, the stride-4 map: what would save 80 of a zoomed pass's 135 ms). All pruned at the episode's
  threshold, as ``predict`` does. Then ``benchmarks/post_replay.py compare FILE --new-margin approx_s2``
  (or ``--base-margin views1``) replays the post steps on any two of them.
* ``smooth``: the query alone (or the three views) with its margin grid smoothed 3 x 3 (``box`` or
  ``[1, 2, 1]``) instead of averaged over flips, replayed from the margins ``post_replay.py collect
  --view-subsets`` or ``collect`` here kept.

    python benchmarks/cheap_query_views.py collect --out q1.pkl               # resumable; --datasets, --max-per-class
    python benchmarks/post_replay.py compare q1.pkl --new-margin approx_s2
    python benchmarks/cheap_query_views.py smooth q1.pkl --margins margin views1 views1:gauss views1:box margin:gauss
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import post_replay  # noqa: E402

from fdseg.data import scan  # noqa: E402
from fdseg.data.preprocess import resize_image, to_tensor  # noqa: E402
from fdseg.features import LayerMaps, as_grid  # noqa: E402
from fdseg.methods.base import Query  # noqa: E402
from fdseg.metrics import benchmark_mean, dataset_scores  # noqa: E402

# the last block whose output the flipped views share with the query (EfficientNet-Lite0: block 0 ends
# stage 1 at stride 2, block 2 stage 2 at stride 4; -1: the stem only)
SHARED = {"approx_stem": -1, "approx_s1": 0, "approx_s2": 2}


@torch.inference_mode()
def shared_flip_views(ex, rgb: np.ndarray, last_shared: int) -> list[torch.Tensor]:
    """Feature grids of the query's left-right and up-down views, computed from the query's own
    activations after block ``last_shared``, flipped, through the rest of the network."""
    H, W = ex.preprocess.input_size(*rgb.shape[:2])
    if len(ex.preprocess.tiles(H, W)) != 1:
        raise ValueError("tiled inputs are not supported here")
    x = ex.backbone.normalize(resize_image(to_tensor(rgb, ex.device), (H, W), ex.preprocess.antialias))
    c = ex.preprocess.cell(H, W, ex.config.stride)
    bb, grid = ex.backbone, (H // c, W // c)
    with torch.autocast(ex.device.type, dtype=torch.bfloat16, enabled=ex.amp):
        a = F.relu6(bb._bn0(bb._conv_stem(x.contiguous(memory_format=torch.channels_last))))
        for i in range(last_shared + 1):
            a = bb._blocks[i](a)
        out = []
        for dims in ([-1], [-2]):           # the order of fdseg.pipeline.views.QUERY_VIEWS["flip"]
            b, maps = torch.flip(a, dims).contiguous(memory_format=torch.channels_last), []
            for i in range(last_shared + 1, bb.tap_blocks[-1] + 1):
                b = bb._blocks[i](b)
                if i in bb.tap_blocks:
                    maps.append(b)
            out.append(as_grid(LayerMaps(maps, grid, ex.config.local_avg)))
    return out


def shared_layer_subsets(seg, fm, queries, flips, exact_above, whole) -> dict:
    """``post_replay.collect``'s extra margins: the query alone (and with one flip), and the three views
    with the flipped ones from the query's own maps (:data:`SHARED`)."""
    out = post_replay.view_subsets(seg, fm, queries, flips, exact_above, whole)
    if out:
        for name, last in SHARED.items():
            feats = shared_flip_views(seg.extractor, queries[0].image, last)
            views = [queries[0]] + [Query(q.image, f) for q, f in zip(queries[1:], feats)]
            out[name] = whole(fm, views, flips, exact_above).float().numpy()
    return out


def collect(a) -> None:
    """The default over the 1-shot paper episodes (``post_replay.collect``, the slack always given so that
    the margins are exact down to its threshold), keeping the margins of :func:`shared_layer_subsets`."""
    post_replay.collect(argparse.Namespace(
        data=a.data, datasets=a.datasets, max_per_class=a.max_per_class, shots=1, out=a.out, preset="accurate",
        threads=a.threads, colour_option=["min_trimmed=0"], subsets=shared_layer_subsets))


def smoothed(m: np.ndarray, kind: str) -> np.ndarray:
    """The margin grid smoothed 3 x 3 (edges replicated): ``box`` or ``gauss`` ([1, 2, 1] x [1, 2, 1])."""
    w = torch.tensor([1.0, 2.0, 1.0]) if kind == "gauss" else torch.ones(3)
    k = (w[:, None] * w[None]) / w.sum() ** 2
    t = F.pad(torch.from_numpy(np.ascontiguousarray(m, np.float32))[None, None], (1, 1, 1, 1), mode="replicate")
    return F.conv2d(t, k[None, None])[0, 0].numpy()


def smooth(a) -> None:
    saved = {"episodes": {}}
    for path in a.files:
        saved["episodes"].update(pickle.loads(Path(path).read_bytes())["episodes"])
    for rec in saved["episodes"].values():
        for spec in a.margins:
            src, _, kind = spec.partition(":")
            if kind and src in rec:
                rec[spec] = smoothed(rec[src], kind)
    root = Path(next(iter(saved["episodes"].values()))["root"])
    classes = {ds: sorted(c) for ds, c in scan(root).classes.items()}
    for spec in a.margins:
        per = post_replay.replay(saved, (), margin=spec)
        runs = [dataset_scores(ds, [c for c in classes[ds] if any(e["cls"] == c for e in eps)], eps)
                for ds, eps in sorted(per.items())]
        print(f"{spec:14s} " + " | ".join(f"{s.dataset} {100 * s.miou:.2f}" for s in runs)
              + f" | class mean {100 * benchmark_mean(runs)['class_mean_miou']:.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="1-shot margins: three exact views, the query alone, shared-layer flips")
    c.add_argument("--data", type=Path, default=post_replay.DATA)
    c.add_argument("--datasets", nargs="*")
    c.add_argument("--max-per-class", type=int)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", required=True)
    s = sub.add_parser("smooth", help="replay the post steps on smoothed margins")
    s.add_argument("files", nargs="+")
    s.add_argument("--margins", nargs="+", default=["margin", "views1", "views1:gauss", "views1:box", "margin:gauss"],
                   help="saved margin keys, KEY:gauss or KEY:box for that margin smoothed")
    a = ap.parse_args()
    collect(a) if a.cmd == "collect" else smooth(a)


if __name__ == "__main__":
    main()
