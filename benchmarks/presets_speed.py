"""Queries per second of each preset against the paper's per-episode loop, in one run, plus peak RSS.

    .venv/bin/python benchmarks/presets_speed.py --data ../shared/data/defects --per-class 2 --shots 1 5 --threads 1

For each shot count K, the same queries (the first ``--per-class`` paper episodes of every class, seed 2,
or of ``--classes``) are segmented by:

* ``paper-loop``: the paper's code path: for every query the K supports are decoded and run through the
  backbone again (no cache, batch 1), then matched exactly in fp32 (``preset="paper"``: every image
  squeezed to 256 x 256, a 64 x 64 grid, max-cosine argmax, no head, no views, no refinement);
* ``paper``, ``fast``, ``accurate`` (the default): the preset fitted once on the class's first episode's
  supports, the class's queries streamed through ``predict_stream``;
* ``fast+views``: a proposal measured beside them (``fast`` with the default's support views).

Variants run interleaved class by class, so the ratios to ``paper-loop`` are comparable under a changing
load. Peak RSS: each variant is run again in a process of its own (one query per class) and its
peak RSS (VmHWM) reported. With ``fdseg.presets`` missing, the presets are built from keyword arguments.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from fdseg import FewShotSegmenter
from fdseg.data import make_episodes, scan
from fdseg.hardware import describe_cpu

try:                                     # the presets, where the library has them
    from fdseg.presets import PRESETS as _PRESETS
except ImportError:                      # pragma: no cover - older checkouts
    _PRESETS = None

# the presets as keyword arguments (used where fdseg.presets does not exist)
PRESET_KWARGS = {
    "paper": dict(resize="resize", support_augment="none", query_augment="none", zoom=1, colour_refine=0,
                  method_options={"head": 0.0}),
    "fast": dict(zoom=1, support_augment="none", query_augment="none"),
    "accurate": {},
}


def make(preset: str, **extra) -> FewShotSegmenter:
    """``FewShotSegmenter(preset=...)`` where presets exist, else the preset's keyword arguments."""
    if _PRESETS is not None and preset in _PRESETS:
        if "method_options" in extra:         # merged with the preset's own (given ones replace them)
            from fdseg.presets import preset_settings
            extra["method_options"] = {**(preset_settings(preset).get("method_options") or {}),
                                       **extra["method_options"]}
        return FewShotSegmenter(preset=preset, **extra)
    kw = dict(PRESET_KWARGS[preset])
    if "method_options" in extra:
        kw["method_options"] = {**kw.get("method_options", {}), **extra.pop("method_options")}
    return FewShotSegmenter(**kw, **extra)


# a proposal measured beside the presets: fast with the support views of the default (they cost at fit,
# not per query, once the matching is pruned)
PROPOSED = {"fast+views": ("fast", dict(support_augment="auto"))}


def build(name: str, device: str, batch_size: int) -> FewShotSegmenter:
    """A variant by its name: a preset or a proposal."""
    preset, extra = PROPOSED.get(name, (name, {}))
    return make(preset, device=device, batch_size=batch_size, **extra)


def variants(device: str, batch_size: int) -> dict[str, FewShotSegmenter]:
    return {n: build(n, device, batch_size) for n in ("paper", "fast", "accurate", *PROPOSED)}


def paper_loop(device: str) -> FewShotSegmenter:
    seg = make("paper", device=device, cache_size=0, batch_size=1, loader_threads=1,
               method_options={"precision": "fp32"})
    ex = seg.extractor
    if getattr(ex, "channels_last", False):    # the paper's code: the default memory layout
        ex.channels_last = False
        ex.backbone.to(memory_format=torch.contiguous_format)
    # ... and its BatchNorms as they are (the extractor folds them into the convolutions)
    from fdseg.backbones import create_backbone
    ex.backbone = create_backbone("efficientnet_lite0").to(ex.device)
    return seg


def groups_for(cat, k: int, per_class: int, classes: list[str] | None) -> list[list]:
    by_cls = defaultdict(list)
    for e in make_episodes(cat, k, seed=2):
        if classes and f"{e.dataset}/{e.cls}" not in classes and e.cls not in classes:
            continue
        if e.query_mask is not None and len(by_cls[(e.dataset, e.cls)]) < per_class:
            by_cls[(e.dataset, e.cls)].append(e)
    return list(by_cls.values())


def run_variant(seg: FewShotSegmenter, groups, root, loop: bool) -> float:
    """Seconds to segment every group's queries (fit-once variants: the fit is not counted)."""
    secs = 0.0
    for g in groups:
        if loop:
            t = time.perf_counter()
            for e in g:
                seg.fit([root / p for p in e.supports], [root / p for p in e.support_masks])
                seg.predict(root / e.query)
            secs += time.perf_counter() - t
        else:
            seg.fit([root / p for p in g[0].supports], [root / p for p in g[0].support_masks])
            t = time.perf_counter()
            list(seg.predict_stream([root / e.query for e in g]))
            secs += time.perf_counter() - t
    return secs


def timing(args) -> dict:
    cat = scan(args.data)
    res = {}
    for k in args.shots:
        groups = groups_for(cat, k, args.per_class, args.classes)
        n = sum(len(g) for g in groups)
        loop = paper_loop(args.device)
        segs = variants(args.device, args.batch_size)
        secs = defaultdict(float)
        for g in groups:                          # interleaved class by class
            secs["paper-loop"] += run_variant(loop, [g], cat.root, loop=True)
            for name, seg in segs.items():
                secs[name] += run_variant(seg, [g], cat.root, loop=False)
        qps = {name: n / t for name, t in secs.items()}
        res[k] = {"queries": n, "qps": qps, "ratio": {v: q / qps["paper-loop"] for v, q in qps.items()}}
        print(json.dumps({"shots": k, **res[k]}), flush=True)
    return res


def rss_child(args) -> None:
    """One variant in this process, one query per class; prints its peak RSS (MB)."""
    cat = scan(args.data)
    name = args.rss_variant
    loop = name == "paper-loop"
    for k in args.shots:
        seg = paper_loop(args.device) if loop else build(name, args.device, args.batch_size)
        run_variant(seg, groups_for(cat, k, 1, args.classes), cat.root, loop=loop)
    print(json.dumps({"variant": name, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (its own address space; ru_maxrss carries the parent's peak over
    fork + exec on Linux, so every child would report the parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(args, names: list[str]) -> dict[str, float]:
    out = {}
    for name in names:
        cmd = [sys.executable, __file__, "--data", str(args.data), "--threads", str(args.threads),
               "--device", args.device, "--batch-size", str(args.batch_size), "--rss-variant", name,
               "--shots", *map(str, args.shots)]
        if args.classes:
            cmd += ["--classes", *args.classes]
        r = subprocess.run(cmd, capture_output=True, text=True)
        try:
            out[name] = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        except (IndexError, ValueError, KeyError):
            print(f"peak RSS of {name} failed: {r.stderr[-500:]}", file=sys.stderr)
            out[name] = float("nan")
    return out


SETTINGS = {
    "paper-loop": "preset paper, fp32, supports re-extracted per query",
    "paper": "resize, no views, no head, no colour rule",
    "fast": "auto resize, no zoom, no views, head, colour rule",
    "accurate": "the default: auto resize + zoom, support + query views, head, colour rule",
    "fast+views": "fast with the default's support views (dihedral for 1 support, flips for more)",
}


def table(res: dict, rss: dict[str, float]) -> str:
    shots = sorted(res)
    names = list(res[shots[0]]["qps"])
    head = "| variant | settings | " + " | ".join(f"{k}-shot q/s | x loop" for k in shots) + " | peak RSS MB |"
    lines = [head, "|---" * (3 + 2 * len(shots)) + "|"]
    for n in names:
        cells = []
        for k in shots:
            cells += [f"{res[k]['qps'][n]:.2f}", f"x{res[k]['ratio'][n]:.2f}"]
        setting = SETTINGS.get(n, "")
        lines.append(f"| {n} | {setting} | " + " | ".join(cells) + f" | {rss.get(n, float('nan')):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/defects")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--per-class", type=int, default=2, help="queries per class (default 2 -> 34 per K)")
    ap.add_argument("--classes", nargs="+", default=None, help="only these classes (CLASS or DATASET/CLASS)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-rss", dest="rss", action="store_false", help="skip the peak-RSS processes")
    ap.add_argument("--rss-variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_variant:
        rss_child(args)
        return
    print(f"{describe_cpu()}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{args.threads} thread(s); presets from {'fdseg.presets' if _PRESETS is not None else 'keyword arguments'}",
          flush=True)
    res = timing(args)
    rss = peak_rss(args, list(res[args.shots[0]]["qps"])) if args.rss else {}
    print()
    print(table(res, rss))
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": describe_cpu(), "threads": args.threads, "results": res,
                                              "peak_rss_mb": rss}, indent=1))


if __name__ == "__main__":
    main()
