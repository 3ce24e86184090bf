"""Many fm decision rules on the same episodes, from one matching pass per feature setting.

For every episode it keeps each query cell's best support-foreground cosine, best
support-background cosine, mean of the top-3 of each, and its k-th best cosine to the query's
own cells (several k), then scores every rule on the paper's metric (GFDS confusion matrix at
256x256, class-mean mIoU). Used to choose the default decision rule of ``fm`` (BENCHMARKS.md)::

    .venv/bin/python benchmarks/decision_rules.py --data ../shared/data/defects --shots 1 \
        --max-per-class 12 --setting size=512,stride=8,resize=aspect --out rules.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fdseg import FewShotSegmenter
from fdseg.data import make_episodes, scan
from fdseg.data.images import load_mask
from fdseg.data.preprocess import resize_mask, upsample_scores
from fdseg.methods.fm import FeatureMatching
from fdseg.methods.similarity import max_similarity
from fdseg.metrics import episode_counts

sys.path.insert(0, str(Path(__file__).parent))
from ablation import markdown, summarise  # noqa: E402

QMULTS = (0.5, 1.0, 2.0, 4.0)
THRESH = (-0.06, -0.04, -0.02, 0.0, 0.02, 0.04)


def topk_mean(q: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, len(bank))
    out = torch.empty(len(q))
    for i in range(0, len(q), 1024):
        out[i:i + 1024] = (q[i:i + 1024] @ bank.T).topk(k, dim=1).values.mean(1)
    return out


def self_kth(q: torch.Tensor, h: int, w: int, ks: list[int], radius: int = 1) -> dict[int, torch.Tensor]:
    m = len(q)
    kmax = max(1, min(max(ks), m - (2 * radius + 1) ** 2))
    ys = torch.arange(h).repeat_interleave(w)
    xs = torch.arange(w).repeat(h)
    out = {k: torch.empty(m) for k in ks}
    for i in range(0, m, 512):
        sim = q[i:i + 512] @ q.T
        near = ((ys[i:i + 512, None] - ys[None]).abs() <= radius) & ((xs[i:i + 512, None] - xs[None]).abs() <= radius)
        sim.masked_fill_(near, -2.0)
        top = sim.topk(kmax, dim=1).values
        for k in ks:
            out[k][i:i + 512] = top[:, min(k, kmax) - 1]
    return out


def rules(fm: FeatureMatching, qf: torch.Tensor) -> dict[str, torch.Tensor]:
    c, h, w = qf.shape
    q = qf.flatten(1).T.float()
    sfg = max_similarity(q, fm.fg, 4096, torch.float32)
    sbg = max_similarity(q, fm.bg, 4096, torch.float32)
    out = {}
    for t in THRESH:
        out[f"argmax{t:+.2f}"] = sfg - sbg - t
    out["knn3"] = topk_mean(q, fm.fg, 3) - topk_mean(q, fm.bg, 3)
    ks = {m: max(3, int(round(m * fm.fg_fraction * h * w))) for m in QMULTS}
    kth = self_kth(q, h, w, sorted(set(ks.values())))
    for m, k in ks.items():
        qb = torch.maximum(sbg, kth[k])
        for t in (0.0, -0.02, 0.02):
            out[f"qbg{m:g}{t:+.2f}"] = sfg - qb - t
    return {k: v.view(h, w) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/defects")
    ap.add_argument("--shots", type=int, nargs="+", default=[1])
    ap.add_argument("--max-per-class", type=int, default=None)
    ap.add_argument("--datasets", nargs="+", default=None)
    ap.add_argument("--setting", default="", help="size=512,stride=8,resize=aspect,augment=flip")
    ap.add_argument("--out", required=True)
    ap.add_argument("--merge", nargs="+", default=None,
                    help="instead of running: combine earlier --out files (variant = setting / rule) and "
                         "print the table with the leave-one-dataset-out choice")
    a = ap.parse_args()
    if a.merge:
        merged = {"runs": {}}
        for f in a.merge:
            r = json.loads(Path(f).read_text())
            tag = ",".join(f"{k}={v}" for k, v in r["setting"].items()) or "paper 256 squeeze, stride 4"
            for name, run in r["runs"].items():
                for v in run.values():
                    v.setdefault("ms_per_episode", float("nan"))
                merged["runs"][f"{tag} / {name}"] = run
        md = markdown(merged)
        Path(a.out).write_text(md)
        print(md)
        return
    torch.set_num_threads(1)
    kv = dict(x.split("=") for x in a.setting.split(",") if x)
    seg = FewShotSegmenter(input_size=int(kv.get("size", 256)), feature_stride=int(kv.get("stride", 4)),
                           resize=kv.get("resize", "resize"), support_augment=kv.get("augment", "none"),
                           cache_size=120)
    cat = scan(Path(a.data))
    if a.max_per_class or a.datasets:
        cat = cat.subset(a.datasets, None, a.max_per_class)
    res = {"setting": kv, "runs": {}}
    for k in a.shots:
        eps = make_episodes(cat, k, seed=2)
        recs = defaultdict(list)
        t0 = time.perf_counter()
        for ep in tqdm(eps, desc=f"{a.setting or 'default'} {k}-shot", mininterval=30):
            root = cat.root
            seg.fit([root / p for p in ep.supports], [root / p for p in ep.support_masks])
            item = seg._load(root / ep.query, ep.query)
            seg._ensure_features([item])
            maps = rules(seg.method, item[1].float().cpu())
            h, w = item[2]
            if ep.query_mask is None:
                gt = np.zeros((256, 256), bool)
            else:
                gt = resize_mask(load_mask(root / ep.query_mask, size=(h, w)), (256, 256))
            for name, m in maps.items():
                pred = (upsample_scores(m, (256, 256)) > 0).numpy()
                tp, fp, fn, tn = episode_counts(gt, pred)
                recs[name].append({"dataset": ep.dataset, "cls": ep.cls, "tp": tp, "fp": fp, "fn": fn, "tn": tn})
        secs = time.perf_counter() - t0
        for name, rs in recs.items():
            res["runs"].setdefault(name, {})[str(k)] = summarise(rs, cat, 1e3 * secs / len(eps))
        res.setdefault("seconds", {})[str(k)] = secs
        Path(a.out).write_text(json.dumps(res, indent=1))
    for k in a.shots:
        best = sorted(res["runs"].items(), key=lambda kv_: -kv_[1][str(k)]["class_mean"])
        print(f"{k}-shot", [(n, round(100 * r[str(k)]["class_mean"], 1)) for n, r in best[:8]])
        print("  argmax+0.00:", round(100 * res["runs"]["argmax+0.00"][str(k)]["class_mean"], 1))


if __name__ == "__main__":
    main()
