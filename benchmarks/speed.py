"""Speed of fit-once / predict-many against the paper's per-episode loop, in one run.

    .venv/bin/python benchmarks/speed.py --data ../shared/data/defects --per-class 6 --out speed.json

For each shot count K, the same queries (the first ``--per-class`` episodes of every class,
the paper's episodes with seed 2) are segmented by:

* ``episode-loop``: the paper's reference loop: every query re-extracts its K supports
  (no cache, batch 1) and matches exactly in fp32, with the paper's bank (no support flips, no
  linear head, no zoom, no colour rule; ``--resize auto`` preprocessing);
* ``fit-once-paper-bank``: fit once / stream, with that same paper bank: what the default's
  accuracy levers (flips, head, zoom, colour rule) cost is the ratio of ``fit-once`` to this;
* ``fit-once``: the supports of the class's first episode are fitted once, then the
  class's queries stream through ``predict_stream`` (decoding ahead, batched backbone);
* ``fit-once-no-colour``: the default without the support colour rule (what the rule costs);
* ``fit-once+coreset``: the same with the background bank cut to 25 % by greedy k-center;
* ``fit-once+onnx``: the same with the backbone run by onnxruntime (if installed).

It prints queries/s and the ratios, and the floors: backbone GFLOP per image and matching
GFLOP per query divided by the measured fp32 matmul rate of this machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from fdseg import FewShotSegmenter
from fdseg.data import make_episodes, scan
from fdseg.hardware import describe_cpu


def matmul_rate(n: int = 2048, reps: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def backbone_gflop(seg: FewShotSegmenter, size: int = 256) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros(1, 3, size, size)
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        seg.extractor.backbone(x)
    return fc.get_total_flops() / 1e9


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bank_probe(cat, device: str, k: int = 20) -> dict:
    """A 20-shot support bank: fit + 3 queries; peak RSS vs the full similarity matrix."""
    import resource
    ds, cls = max(((d, c) for d in cat.classes for c in cat.classes[d]),
                  key=lambda dc: len(cat.classes[dc[0]][dc[1]]))
    samples = [s for s in cat.classes[ds][cls] if s.mask is not None][:k + 3]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seg = FewShotSegmenter(device=device)
    t = time.perf_counter()
    seg.fit([s.image for s in samples[:k]], [s.mask for s in samples[:k]])
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    seg.predict([s.image for s in samples[k:]])
    q_ms = 1e3 * (time.perf_counter() - t) / 3
    bank = len(seg.method.fg) + len(seg.method.bg)
    return {"class": f"{ds}/{cls}", "supports": k, "bank_cells": bank, "fit_s": fit_s, "ms_per_query": q_ms,
            "full_matrix_mb": 64 * 64 * bank * 4 / 2 ** 20,
            "peak_rss_mb_before": before,
            "peak_rss_mb_after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    cat = scan(args.data)
    root = cat.root
    out = {"cpu": describe_cpu(), "torch": torch.__version__, "threads": args.threads,
           "python": platform.python_version(), "matmul_fp32_gflops": matmul_rate(), "runs": []}
    # first, while the process's peak RSS is still its own
    out["bank20"] = bank_probe(cat, args.device)
    print(json.dumps(out["bank20"]))
    onnx_path = None
    if args.onnx:
        try:
            from fdseg.export import export_onnx
            onnx_path = Path(tempfile.mkdtemp()) / "lite0.onnx"
            export_onnx("efficientnet_lite0", onnx_path)
        except Exception as e:  # onnx extra missing
            print(f"onnx variant skipped: {e}")
            onnx_path = None
    for k in args.shots:
        eps = make_episodes(cat, k, seed=2)
        by_cls = defaultdict(list)
        for e in eps:
            if len(by_cls[(e.dataset, e.cls)]) < args.per_class:
                by_cls[(e.dataset, e.cls)].append(e)
        groups = list(by_cls.values())
        n = sum(len(g) for g in groups)
        res = {"shots": k, "queries": n}

        paper_bank = {"support_augment": "none", "zoom": 1, "colour_refine": 0}
        loop = FewShotSegmenter(cache_size=0, batch_size=1, loader_threads=1, device=args.device,
                                method_options={"precision": "fp32", "head": 0.0}, **paper_bank)
        variants = {"fit-once": {}, "fit-once-paper-bank": {**paper_bank, "method_options": {"head": 0.0}},
                    "fit-once-no-colour": {"colour_refine": 0},
                    "fit-once+coreset": {"method_options": {"bg_coreset": 0.25}}}
        if onnx_path:
            variants["fit-once+onnx"] = {"backbone": "onnx", "weights": onnx_path}
        segs = {name: FewShotSegmenter(batch_size=args.batch_size, device=args.device, **kw)
                for name, kw in variants.items()}
        secs = defaultdict(float)
        # interleaved class by class, so that a change in machine load hits every variant alike
        for g in groups:
            def episode_loop():
                for e in g:
                    loop.fit([root / p for p in e.supports], [root / p for p in e.support_masks])
                    loop.predict(root / e.query)
            secs["episode-loop"] += timed(episode_loop)
            for name, seg in segs.items():
                seg.fit([root / p for p in g[0].supports], [root / p for p in g[0].support_masks])
                secs[name] += timed(lambda: list(seg.predict_stream([root / e.query for e in g])))
        for name, t in secs.items():
            res[name] = n / t
        res["ratios"] = {v: res[v] / res["episode-loop"] for v in res if v.startswith("fit-once")}
        out["runs"].append(res)
        print(json.dumps(res))
    seg = FewShotSegmenter()
    gf = backbone_gflop(seg)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        out["gpu"] = torch.cuda.get_device_name()
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    rate = out["matmul_fp32_gflops"]
    cells, ch = 64 * 64, sum(seg.extractor.backbone.channels)
    out["floors"] = {"backbone_gflop_per_image": gf,
                     "backbone_floor_ms": 1e3 * gf / rate,
                     **{f"matching_gflop_{k}shot": 2 * cells * cells * k * ch / 1e9 for k in args.shots},
                     **{f"matching_floor_ms_{k}shot": 1e3 * 2 * cells * cells * k * ch / 1e9 / rate for k in args.shots}}
    print(json.dumps(out["floors"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/defects")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--per-class", type=int, default=6, help="queries per class (default 6 -> 102 per K)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-onnx", dest="onnx", action="store_false")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast + bf16 matching on a GPU)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    res = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
