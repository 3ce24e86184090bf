"""Post steps replayed on saved margins: measure a change to the threshold / colour rule on every
paper episode in minutes instead of a whole bench per variant.

``collect`` runs a preset over the paper's episodes (the bench's own episode path, 256 x 256
metric) and keeps each query's margin grid; ``compare`` redoes the post steps (colour rule, its slack,
threshold) from those margins with the default colour rule and the options given (a preset's own
colour options are not applied: give them),
and prints per-dataset mIoU, the class mean and the leave-one-dataset-out folds. The margins do not
depend on the post steps, so a replay gives the masks ``fdseg bench`` gives with the same settings.
They are exact at and above the collected run's own threshold (the pruned search): to replay a looser
threshold (the slack given where the collected run withheld it), collect with it (``--colour-option
min_trimmed=0``) and compare variants that only raise it.

    python benchmarks/post_replay.py collect --shots 5 --out m5.pkl            # resumable
    python benchmarks/post_replay.py compare m5.pkl --base tune_from=0 --new tune_from=1

``collect --view-subsets`` also keeps, where the query is matched in three views (1-shot), the margins of
the query alone (``views1``) and of the query with its left-right flip (``views2``), each pruned at the
same threshold as the three: ``compare --base-margin margin --new-margin views1`` then measures what the
query's views add, on the same episodes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import pickle
import sys
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from fdseg import FewShotSegmenter
from fdseg.bench import _KeepLast, run_episode
from fdseg.data import load_mask, make_episodes, scan
from fdseg.data.images import load_image
from fdseg.data.preprocess import resize_mask
from fdseg.metrics import benchmark_mean, dataset_scores, episode_counts
from fdseg.pipeline import ColourStep, Post, ThresholdStep, finish

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "defects"


def _save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f)
    tmp.replace(path)


def collect(a) -> None:
    torch.set_num_threads(a.threads)
    cat = scan(a.data)
    if a.datasets or a.max_per_class:
        cat = cat.subset(a.datasets, None, a.max_per_class)
    eps = make_episodes(cat, a.shots, 2)
    out = Path(a.out)
    done = pickle.loads(out.read_bytes()) if out.exists() else {"preset": a.preset, "episodes": {}}
    options = dict(_options(getattr(a, "colour_option", None)))    # e.g. min_trimmed=0: the slack always
    seg = FewShotSegmenter(preset=a.preset, cache_size=192, **({"colour_options": options} if options else {}))
    grids: list = []

    class Recording(ColourStep):      # the colour step as the segmenter runs it, keeping the supports' grids
        def fit(self, images, masks, g=None):
            grids.append(g)
            return super().fit(images, masks, g)

    seg.model = dataclasses.replace(seg.model, colour=Recording(seg.model.colour.tau, seg.model.colour.options))

    subsets: dict = {}
    extra = getattr(a, "subsets", None) or (view_subsets if getattr(a, "view_subsets", False) else None)
    with contextlib.ExitStack() as stack:
        if extra is not None:               # more margins of the same query kept beside the segmenter's own
            from fdseg.methods.fm import FeatureMatching
            whole = FeatureMatching.score_views

            def score_views(self, queries, flips, exact_above=None):
                subsets.update(extra(seg, self, queries, flips, exact_above, whole))
                return whole(self, queries, flips, exact_above)
            stack.enter_context(mock.patch.object(FeatureMatching, "score_views", score_views))

        t0 = time.time()
        for i, ep in enumerate(eps):
            if ep.id in done["episodes"]:
                continue
            subsets.clear()
            keep = _KeepLast(seg)             # the segmenter as the bench runs it, keeping the prediction
            gt, pred, _, _ = run_episode(keep, cat.root, ep, 256)
            done["episodes"][ep.id] = {"episode": ep, "margin": keep.last.margin_grid.astype(np.float32),
                                       "grids": grids[-1], "root": str(cat.root),
                                       "counts": episode_counts(gt, pred), **subsets}
            if i % 20 == 0:
                _save(done, out)
                print(f"{i + 1}/{len(eps)} episodes, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    _save(done, out)


def view_subsets(seg, fm, queries, flips, exact_above, whole) -> dict:
    """Where the query is matched in three views (1-shot): the margins of the query alone (``views1``) and
    with its left-right flip (``views2``), pruned at the same threshold (``collect --view-subsets``)."""
    if len(queries) != 3:
        return {}
    return {"views1": whole(fm, queries[:1], flips[:1], exact_above).float().numpy(),
            "views2": whole(fm, queries[:2], flips[:2], exact_above).float().numpy()}


def _options(items: list[str]) -> tuple:
    out = {}
    for kv in items or []:
        k, v = kv.split("=", 1)
        out[k] = float(v) if k != "grey" else v
    return tuple(sorted(out.items()))


def replay(saved: dict, options: tuple, tau: float = 0.3, margin: str = "margin") -> dict[str, list[dict]]:
    """Per-dataset episode counts of the masks from the saved margins with these colour options
    (``margin``: which saved margins; an episode without them, e.g. one not matched in three views,
    uses its own)."""
    @functools.lru_cache(maxsize=32)
    def image(p):
        return load_image(p)

    per: dict[str, list[dict]] = defaultdict(list)
    step = ColourStep(tau, options)
    for rec in saved["episodes"].values():
        ep, root = rec["episode"], Path(rec["root"])
        rgbs = [image(root / p) for p in ep.supports]
        masks = [load_mask(root / m, size=im.shape[:2]) for m, im in zip(ep.support_masks, rgbs)]
        colour, _ = step.fit(rgbs, masks, rec["grids"]) if tau else (None, None)
        threshold = ThresholdStep(0.0).fit(len(rgbs), colour).value
        post = Post(threshold, None, colour if colour is not None and colour.active else None)
        query = image(root / ep.query)
        pred = finish(torch.from_numpy(rec.get(margin, rec["margin"])), (256, 256), post, 1.0, image=query).mask
        gt = resize_mask(load_mask(root / ep.query_mask, size=query.shape[:2]), (256, 256))
        tp, fp, fn, tn = episode_counts(gt, pred)
        per[ep.dataset].append({"cls": ep.cls, "tp": tp, "fp": fp, "fn": fn, "tn": tn, "id": ep.id})
    return per


def compare(a) -> None:
    saved = {"episodes": {}}
    for path in a.margins:              # several collected runs (e.g. split by dataset) are merged
        saved["episodes"].update(pickle.loads(Path(path).read_bytes())["episodes"])
    root = Path(next(iter(saved["episodes"].values()))["root"])
    classes = {ds: sorted(c) for ds, c in scan(root).classes.items()}
    runs = {}
    for name, opts, key in (("base", _options(a.base), a.base_margin), ("new", _options(a.new), a.new_margin)):
        per = replay(saved, opts, margin=key)
        runs[name] = [dataset_scores(ds, classes[ds], e) for ds, e in sorted(per.items())]
        cm = benchmark_mean(runs[name])["class_mean_miou"]
        print(f"{name} {dict(opts)} {key}: " + " | ".join(f"{s.dataset} {100 * s.miou:.1f} / {100 * s.fbiou:.1f}"
                                                    for s in runs[name]) + f" | class mean {100 * cm:.2f}")
    ious = {n: {s.dataset: list(s.class_iou.values()) for s in r} for n, r in runs.items()}
    if len(ious["base"]) < 2:
        return
    print("\nleave one dataset out: gain of new over base on the other datasets' classes, and on the held-out one")
    for held in ious["base"]:
        other = [np.mean([v for d, x in ious[n].items() if d != held for v in x]) for n in ("base", "new")]
        mine = [np.mean(ious[n][held]) for n in ("base", "new")]
        print(f"  {held:16s} others {100 * (other[1] - other[0]):+.2f}   held out {100 * (mine[1] - mine[0]):+.2f} "
              f"({100 * mine[0]:.1f} -> {100 * mine[1]:.1f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="run a preset over the paper's episodes, keep the margins")
    c.add_argument("--data", default=str(DATA))
    c.add_argument("--shots", type=int, required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--preset", default="accurate")
    c.add_argument("--datasets", nargs="*")
    c.add_argument("--max-per-class", type=int, default=None, help="first N images of each class only")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--colour-option", nargs="*", default=[],
                   help="colour options KEY=VALUE of the collected run (its margins are exact at its own threshold: "
                        "collect with the loosest variant to be compared)")
    c.add_argument("--view-subsets", action="store_true",
                   help="also keep the margins of the query alone and with its left-right flip (1-shot)")
    r = sub.add_parser("compare", help="replay the post steps with two sets of colour options")
    r.add_argument("margins", nargs="+", help="collected runs (merged)")
    r.add_argument("--base", nargs="*", default=[], help="colour options KEY=VALUE (e.g. tune_from=0)")
    r.add_argument("--new", nargs="*", default=[], help="colour options KEY=VALUE")
    r.add_argument("--base-margin", default="margin", help="margin, views1 or views2 (collect --view-subsets)")
    r.add_argument("--new-margin", default="margin", help="margin, views1 or views2")
    a = p.parse_args()
    collect(a) if a.cmd == "collect" else compare(a)


if __name__ == "__main__":
    main()
