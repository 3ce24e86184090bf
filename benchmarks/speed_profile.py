"""Where a query's time goes: wall-clock per pipeline step of ``FewShotSegmenter`` (and of its fit).

    .venv/bin/python benchmarks/speed_profile.py --classes magnetic_tile/blowhole visa/macaroni1_small_scratches \
        --shots 1 5 --queries 6 --threads 1

For each class and shot count: fit on the supports of the class's first episode (paper episodes,
seed 2), then segment the first ``--queries`` episodes' queries one at a time with ``predict``.
Every step is timed by wrapping the function that does it (no sampling); nested steps are
reported apart from their parent (``score: rest`` = the score call minus matching and head). It
prints a markdown table of ms per query (and of the fit) and the share of the query's total.
``--scale 3`` upscales every image 3 times first (a 1500 x 1000 VisA image becomes 13.5 MP, as from a
high-resolution camera; the images are then given as arrays, so decoding is not timed).
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import fdseg.methods.fm as fm_mod
import fdseg.segmenter as seg_mod
from fdseg import FewShotSegmenter
from fdseg.data import make_episodes, scan
from fdseg.features import FeatureExtractor
from fdseg.hardware import describe_cpu
from fdseg.refine.colour import ColourModel

TIMES: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
_STACK: list[str] = []


def _wrap(owner, attr: str, label: str) -> None:
    orig = getattr(owner, attr, None)
    if orig is None:              # the pipeline moves between modules: wrap where it is
        return

    @functools.wraps(orig)
    def timed(*a, **k):
        _STACK.append(label)
        t = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            TIMES[label] += time.perf_counter() - t
            CALLS[label] += 1
            _STACK.pop()
    setattr(owner, attr, timed)


def _modules() -> list:
    """The fdseg modules that call upsample_scores / components by their own global name."""
    import importlib
    out = [seg_mod]
    for name in ("fdseg.pipeline.finish",):
        try:
            out.append(importlib.import_module(name))
        except ImportError:
            pass
    return out


def instrument() -> None:
    S = FewShotSegmenter
    _wrap(S, "load", "decode")
    _wrap(S, "_ensure_features", "backbone: image")             # the query (or the supports at fit)
    _wrap(S, "_augmented", "backbone: support views")
    _wrap(FeatureExtractor, "batch_maps", "backbone")             # nested in the two above or in _score
    _wrap(fm_mod.FeatureMatching, "score", "score")
    _wrap(fm_mod, "max_similarity", "matching")
    _wrap(fm_mod.FeatureMatching, "score_views", "score")
    _wrap(fm_mod, "head_logits", "head")
    _wrap(fm_mod.FeatureMatching, "fit", "fm fit")
    _wrap(fm_mod, "fit_linear_head", "head fit")
    _wrap(fm_mod, "greedy_coreset", "coreset")
    _wrap(S, "_score", "views + score")
    for mod in _modules():
        _wrap(mod, "upsample_scores", "upsample")
        # the components' labelling (verdict + boxes: one call since they share it; before, two)
        _wrap(mod, "components" if hasattr(mod, "components") else "connected_boxes", "components")
    _wrap(ColourModel, "__call__", "colour rule")
    _wrap(ColourModel, "fit", "colour fit")
    _wrap(S, "fit", "fit")
    _wrap(S, "predict", "predict")


@contextmanager
def fresh():
    TIMES.clear()
    CALLS.clear()
    yield


def breakdown(n: int) -> dict[str, float]:
    """ms per query (or per fit when n = 1) of each step, nested steps subtracted from their parents."""
    t = {k: 1e3 * v / n for k, v in TIMES.items()}
    bb_total = t.get("backbone", 0.0)
    bb_image = t.get("backbone: image", 0.0)
    bb_views = t.get("backbone: support views", 0.0)
    out = {}
    if "predict" in t:
        out["decode"] = t.get("decode", 0.0)
        out["backbone: query"] = bb_image
        out["backbone: query views"] = bb_total - bb_image
        out["matching"] = t.get("matching", 0.0)
        out["head"] = t.get("head", 0.0)
        out["score: rest"] = t.get("score", 0.0) - t.get("matching", 0.0) - t.get("head", 0.0)
        out["views: flip back + mean"] = (t.get("views + score", 0.0) - t.get("score", 0.0)
                                          - (bb_total - bb_image))
        out["upsample"] = t.get("upsample", 0.0)
        out["colour rule"] = t.get("colour rule", 0.0)
        out["components (verdict, boxes)"] = t.get("components", 0.0)
        out["total"] = t["predict"]
        out["other"] = out["total"] - sum(v for k, v in out.items() if k != "total")
    else:
        out["decode"] = t.get("decode", 0.0)
        out["backbone: supports"] = bb_image
        out["backbone: support views"] = bb_views
        out["fm fit: head"] = t.get("head fit", 0.0)
        out["fm fit: coreset"] = t.get("coreset", 0.0)
        out["fm fit: rest"] = t.get("fm fit", 0.0) - t.get("head fit", 0.0) - t.get("coreset", 0.0)
        out["colour fit"] = t.get("colour fit", 0.0)
        out["total"] = t["fit"]
        out["other"] = out["total"] - sum(v for k, v in out.items() if k != "total")
    return out


def scaled(path: Path, scale: float, mask: bool = False):
    """The file itself (``scale`` 1), else its pixels upscaled ``scale`` times as an array (bilinear; a mask
    nearest): a camera of that many more pixels, the decode then not timed."""
    if scale == 1:
        return path
    from PIL import Image
    im = Image.open(path).convert("L" if mask else "RGB")
    size = (round(im.width * scale), round(im.height * scale))
    a = np.asarray(im.resize(size, Image.NEAREST if mask else Image.BILINEAR))
    return a > 0 if mask else a


def profile(cat, dataset: str, cls: str, shots: int, queries: int, seg_kwargs: dict, scale: float = 1.0) -> dict:
    root = cat.root
    eps = [e for e in make_episodes(cat, shots, seed=2) if e.dataset == dataset and e.cls == cls][:queries]
    seg = FewShotSegmenter(**seg_kwargs)
    qs = [scaled(root / e.query, scale) for e in eps]
    with fresh():
        seg.fit([scaled(root / p, scale) for p in eps[0].supports],
                [scaled(root / p, scale, mask=True) for p in eps[0].support_masks])
        fit = breakdown(1)
    d = seg.describe()
    m = seg.method
    info = {"class": f"{dataset}/{cls}", "shots": shots, "queries": len(eps), "zoom": d["zoom_in_use"],
            "support_views": d["support_views"], "query_views": d["query_views"],
            "bank": {"fg": len(m.fg), "bg": len(m.bg)}, "matmul": d["matching"]["matmul"]}
    seg.predict(qs[0])                      # warm-up (allocator, oneDNN kernels), not counted
    with fresh():
        for q in qs:
            seg.predict(q)
        q = breakdown(len(eps))
    grid, query_size = seg.margins(qs[0])
    info["grid"], info["query_size"] = list(grid.shape), list(query_size)
    return {**info, "fit_ms": fit, "query_ms": q}


def table(res: list[dict]) -> str:
    cols = [f"{r['class']} {r['shots']}-shot (zoom {r['zoom']}, {'x'.join(map(str, r.get('query_size', [])))} px)"
            for r in res]
    lines = ["| step (ms per query) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    keys = list(res[0]["query_ms"])
    for k in keys:
        cells = []
        for r in res:
            v, tot = r["query_ms"][k], r["query_ms"]["total"]
            cells.append(f"**{v:.0f}**" if k == "total" else f"{v:.1f} ({100 * v / tot:.0f} %)")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "| step (ms per fit) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k in res[0]["fit_ms"]:
        cells = [f"**{r['fit_ms'][k]:.0f}**" if k == "total" else f"{r['fit_ms'][k]:.1f}" for r in res]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k, f in [("query grid", lambda r: "x".join(map(str, r["grid"]))),
                 ("bank fg / bg cells", lambda r: f"{r['bank']['fg']} / {r['bank']['bg']}"),
                 ("support / query views", lambda r: f"{r['support_views']} / {r['query_views']}"),
                 ("matmul dtype", lambda r: r["matmul"])]:
        lines.append(f"| {k} | " + " | ".join(f(r) for r in res) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/defects")
    ap.add_argument("--classes", nargs="+", default=["magnetic_tile/blowhole", "visa/macaroni1_small_scratches"])
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--queries", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                    help="fm option for the profiled segmenter (value parsed as JSON, else a string)")
    ap.add_argument("--preset", default=None, help="FewShotSegmenter(preset=...) (default: the default)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="upscale every image this many times (a higher-resolution camera; decode not timed)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    instrument()
    opts = {}
    for kv in args.method_option:
        k, v = kv.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    cat = scan(args.data)
    res = []
    for c in args.classes:
        ds, cls = c.split("/", 1)
        for k in args.shots:
            kw = {**({"method_options": opts} if opts else {}), **({"preset": args.preset} if args.preset else {})}
            r = profile(cat, ds, cls, k, args.queries, kw, args.scale)
            r["preset"] = args.preset or "accurate"
            print(json.dumps(r), flush=True)
            res.append(r)
    print(f"\n{describe_cpu()}, torch {torch.__version__}, {args.threads} thread(s)\n")
    print(table(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
