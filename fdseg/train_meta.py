"""Episodic training of the ``meta`` network (fdseg/methods/meta.py) and its evaluation.

* The backbone is frozen: every training image's feature grid (and its mask coverage) is
  computed once and cached on disk per dataset (``FeatureBank``), so an episode costs only
  the small network.
* Episodes: a training dataset, then a class, uniformly; ``shots`` supports and one query
  of that class; random flips. Episode ``s`` is drawn from ``seed`` and ``s`` alone, so a
  resumed run draws exactly the episodes an uninterrupted one would.
* Loss: query BCE + soft Dice on the cell coverage, plus PANet's prototype-alignment loss
  (prototypes pooled from the query's own prediction must segment the support).
* Checkpoints (model, optimiser, step, loss curve) are written atomically every
  ``save_every`` steps; rerunning the same command resumes; other settings are refused.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_open
from .data.images import load_image, load_mask
from .data.layouts import Catalog, scan
from .data.preprocess import Preprocess, mask_coverage
from .errors import InputError
from .methods.meta import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, MetaProtoNet, build_net, load_checkpoint


@dataclass
class FeatureSpec:
    """How the frozen features are made (must match what the segmenter does at test time)."""
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    input_size: int = 256
    feature_stride: int = 4

    def tag(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def segmenter_kwargs(self) -> dict:
        return dict(backbone=self.backbone, weights=self.weights, input_size=self.input_size,
                    resize="resize", feature_stride=self.feature_stride)


@dataclass
class TrainConfig:
    data: Path
    out: Path                                  # folder; the checkpoint is OUT/meta.pt
    train_datasets: list[str]
    test_datasets: list[str] = field(default_factory=list)
    skip_first_per_class: int = 0              # never train on the first N images of a class
    features: FeatureSpec = field(default_factory=FeatureSpec)
    cache: Path | None = None                  # feature cache folder (default OUT/../feature-cache)
    steps: int = 600
    batch: int = 4                             # episodes per step
    shots: int = 1
    lr: float = 2e-3
    weight_decay: float = 1e-4
    align_weight: float = 1.0
    dim: int = 64
    hidden: int = 32
    pool: int = 2
    seed: int = 0
    save_every: int = 100
    max_minutes: float | None = None           # stop (resumably) after this much training time
    progress: bool = True

    @property
    def checkpoint(self) -> Path:
        return Path(self.out) / "meta.pt"

    def key(self) -> dict:
        """Settings a resumed run must share with the run it continues."""
        return {"data": str(Path(self.data).resolve()), "train_datasets": sorted(self.train_datasets),
                "skip_first_per_class": self.skip_first_per_class, "features": asdict(self.features),
                "steps": self.steps, "batch": self.batch, "shots": self.shots, "lr": self.lr,
                "weight_decay": self.weight_decay, "align_weight": self.align_weight, "dim": self.dim,
                "hidden": self.hidden, "pool": self.pool, "seed": self.seed}


# -- feature bank ------------------------------------------------------------------------------------
class FeatureBank:
    """Frozen feature grids + mask coverage of a catalog's images, cached per dataset on disk."""

    def __init__(self, feats: torch.Tensor, cov: torch.Tensor, groups: dict[tuple[str, str], list[int]]):
        self.feats, self.cov, self.groups = feats, cov, groups

    @property
    def channels(self) -> int:
        return int(self.feats.shape[1])

    @classmethod
    def build(cls, cat: Catalog, spec: FeatureSpec, cache: Path, skip_first: int = 0,
              progress: bool = True) -> "FeatureBank":
        feats, covs, groups, n = [], [], {}, 0
        for ds in sorted(cat.classes):
            f, c, index = _dataset_features(cat, ds, spec, cache, progress)
            keep = []
            for c_name in sorted(cat.classes[ds]):
                rows = index[c_name][skip_first:]
                if rows:
                    groups[(ds, c_name)] = list(range(n + len(keep), n + len(keep) + len(rows)))
                    keep.extend(rows)
            feats.append(f[keep])
            covs.append(c[keep])
            n += len(keep)
        if not n:
            raise InputError(cat.root, "no training images left (check --train-datasets / --skip-first-per-class)")
        return cls(torch.cat(feats), torch.cat(covs), groups)


def _file_id(p: Path) -> list:
    st = os.stat(p)
    return [str(p.resolve()), st.st_size, st.st_mtime_ns]


def _dataset_features(cat: Catalog, ds: str, spec: FeatureSpec, cache: Path, progress: bool):
    """-> (N x C x H x W fp16, N x H x W fp16, {cls: [row, ...]} in file-name order), cached."""
    samples = [s for cls in sorted(cat.classes[ds]) for s in cat.classes[ds][cls]]
    ids = [[_file_id(s.image), _file_id(s.mask)] for s in samples]
    path = Path(cache) / f"{spec.backbone}-{spec.tag()}" / f"{ds}.pt"
    index: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        index.setdefault(s.cls, []).append(i)
    if path.is_file():
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            if d.get("ids") == ids and d.get("spec") == asdict(spec):
                return d["feats"], d["cov"], index
        except Exception:
            pass          # unreadable / stale cache: rebuild
    from .backbones import create_backbone
    from .features import FeatureConfig, FeatureExtractor
    ex = FeatureExtractor(create_backbone(spec.backbone, weights=spec.weights),
                          Preprocess(mode="resize", size=spec.input_size), FeatureConfig(spec.feature_stride))
    it = range(0, len(samples), 8)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"features {ds}", unit="batch", dynamic_ncols=True)
    feats, covs = [], []
    for i in it:
        chunk = samples[i:i + 8]
        rgbs = [load_image(s.image) for s in chunk]
        for s, rgb, f in zip(chunk, rgbs, ex.batch(rgbs)):
            m = load_mask(s.mask, size=rgb.shape[:2], name=str(s.mask))
            feats.append(f.half())
            covs.append(mask_coverage(m, tuple(f.shape[-2:])).half())
    d = {"ids": ids, "spec": asdict(spec), "feats": torch.stack(feats), "cov": torch.stack(covs)}
    with atomic_open(path, "wb") as fh:
        torch.save(d, fh)
    return d["feats"], d["cov"], index


# -- episodes and loss -------------------------------------------------------------------------------
def sample_episode(bank: FeatureBank, rng: np.random.Generator, shots: int):
    """-> support feats K x C x H x W, support cov K x H x W, query feats 1 x ..., query cov 1 x ..."""
    by_ds: dict[str, list[tuple[str, str]]] = {}
    for key, rows in bank.groups.items():
        if len(rows) > shots:
            by_ds.setdefault(key[0], []).append(key)
    if not by_ds:
        raise InputError(None, f"no training class has more than {shots} images")
    dss = sorted(by_ds)
    keys = sorted(by_ds[dss[rng.integers(len(dss))]])
    rows = bank.groups[keys[rng.integers(len(keys))]]
    pick = [rows[i] for i in rng.choice(len(rows), shots + 1, replace=False)]
    f = bank.feats[pick].float()
    c = bank.cov[pick].float()
    flips = rng.integers(0, 2, (shots + 1, 2))
    f = torch.stack([_flip(x, a, b) for x, (a, b) in zip(f, flips)])
    c = torch.stack([_flip(x, a, b) for x, (a, b) in zip(c, flips)])
    return f[:shots], c[:shots], f[shots:], c[shots:]


def _flip(x: torch.Tensor, h: int, v: int) -> torch.Tensor:
    dims = [d for d, on in ((-1, h), (-2, v)) if on]
    return x.flip(dims) if dims else x


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE (soft targets = cell coverage) + soft Dice on the foreground."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


def episode_loss(net: MetaProtoNet, sf: torch.Tensor, sc: torch.Tensor, qf: torch.Tensor, qc: torch.Tensor,
                 align_weight: float = 1.0) -> tuple[torch.Tensor, float, float]:
    es, eq = net.embed(sf), net.embed(qf)
    sc, qc = net.pool_mask(sc), net.pool_mask(qc)
    logits = net.match(eq, net.prototypes(es, sc))
    seg = seg_loss(logits, qc)
    if align_weight <= 0:
        return seg, float(seg.detach()), 0.0
    # PANet alignment: prototypes from the query's (predicted) segmentation segment the supports
    pq = torch.sigmoid(logits).detach()
    align = seg_loss(net.match(es, net.prototypes(eq, pq)), sc)
    return seg + align_weight * align, float(seg.detach()), float(align.detach())


# -- training ----------------------------------------------------------------------------------------
def _catalog(cfg: TrainConfig) -> Catalog:
    cat = scan(cfg.data)
    if not cfg.train_datasets:
        raise InputError("--train-datasets", f"name at least one (have: {', '.join(cat.datasets)})")
    for flag, names in (("--train-datasets", cfg.train_datasets), ("--test-datasets", cfg.test_datasets)):
        unknown = sorted(set(names) - set(cat.datasets))
        if unknown:
            raise InputError(flag, f"no dataset named {', '.join(unknown)} under {cat.root} "
                                   f"(have: {', '.join(cat.datasets)})")
    both = sorted(set(cfg.train_datasets) & set(cfg.test_datasets))
    if both and cfg.skip_first_per_class <= 0:
        raise InputError("--test-datasets", f"{', '.join(both)} is also a training dataset: add "
                                            f"--skip-first-per-class N and evaluate with --max-per-class N, "
                                            f"so that no test image is trained on")
    return cat


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) and return the final checkpoint dict."""
    cat = _catalog(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    key = cfg.key()
    ck = None
    if cfg.checkpoint.exists():
        ck = load_checkpoint(cfg.checkpoint)
        if ck.get("train", {}).get("key") != key:
            raise InputError(cfg.checkpoint, "was trained with other settings; use another --out or delete it")
        if ck["step"] >= cfg.steps:
            return ck
    cache = Path(cfg.cache) if cfg.cache else out.parent / "feature-cache"
    bank = FeatureBank.build(cat.subset(cfg.train_datasets), cfg.features, cache, cfg.skip_first_per_class,
                             cfg.progress)
    torch.manual_seed(cfg.seed)            # here: the init must not depend on whether the cache existed
    net = MetaProtoNet(bank.channels, cfg.dim, cfg.hidden, cfg.pool)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, curve, seconds = 0, [], 0.0
    if ck is not None:
        net = build_net(ck, cfg.checkpoint).train()
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        opt.load_state_dict(ck["optimizer"])
        step, curve, seconds = int(ck["step"]), list(ck["curve"]), float(ck["seconds"])
    net.train()
    sched = lambda s: cfg.lr * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))    # cosine decay
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, desc=f"train-meta {'+'.join(sorted(cfg.train_datasets))}",
                   unit="step", dynamic_ncols=True)
    t0, c0, run_s = time.perf_counter(), time.process_time(), 0.0
    cpu0 = float(ck.get("cpu_seconds", 0.0)) if ck is not None else 0.0
    acc = []
    while step < cfg.steps:
        rng = np.random.default_rng([cfg.seed, step])
        for g in opt.param_groups:
            g["lr"] = sched(step)
        opt.zero_grad(set_to_none=True)
        tot, segs, als = 0.0, 0.0, 0.0
        for _ in range(cfg.batch):
            loss, s, a = episode_loss(net, *sample_episode(bank, rng, cfg.shots), cfg.align_weight)
            (loss / cfg.batch).backward()
            tot, segs, als = tot + float(loss.detach()), segs + s, als + a
        opt.step()
        step += 1
        acc.append((tot / cfg.batch, segs / cfg.batch, als / cfg.batch))
        if len(acc) == 10 or step == cfg.steps:
            m = np.mean(acc, 0)
            curve.append([step, float(m[0]), float(m[1]), float(m[2])])
            acc = []
            if bar is not None:
                bar.set_postfix(loss=f"{m[0]:.3f}", seg=f"{m[1]:.3f}", align=f"{m[2]:.3f}")
        if bar is not None:
            bar.update(1)
        run_s = time.perf_counter() - t0
        over = cfg.max_minutes is not None and seconds + run_s >= 60 * cfg.max_minutes
        if step % cfg.save_every == 0 or step == cfg.steps or over:
            ck = _save(cfg, net, opt, step, curve, seconds + run_s, key, cpu0 + time.process_time() - c0)
        if over and step < cfg.steps:
            if bar is not None:
                bar.close()
            print(f"train-meta: stopped at step {step}/{cfg.steps} after --max-minutes {cfg.max_minutes}; "
                  f"rerun to continue")
            return ck
    if bar is not None:
        bar.close()
    return ck


def _save(cfg: TrainConfig, net: MetaProtoNet, opt, step: int, curve: list, seconds: float, key: dict,
          cpu_seconds: float) -> dict:
    ck = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": dict(net.arch),
          "model": {k: v.detach().clone() for k, v in net.state_dict().items()},
          "optimizer": opt.state_dict(), "step": step, "curve": curve, "seconds": seconds, "cpu_seconds": cpu_seconds,
          "features": asdict(cfg.features),
          "train": {"key": key, "train_datasets": sorted(cfg.train_datasets),
                    "skip_first_per_class": cfg.skip_first_per_class, "threads": torch.get_num_threads()}}
    with atomic_open(cfg.checkpoint, "wb") as fh:
        torch.save(ck, fh)
    return ck


# -- evaluation --------------------------------------------------------------------------------------
def evaluate(checkpoint: Path, data: Path, out: Path, datasets: list[str], shots: list[int],
             max_per_class: int | None, progress: bool = True) -> dict:
    """``fdseg bench --method meta`` on ``datasets`` with the checkpoint's feature settings."""
    from .bench import BenchConfig, run_bench
    ck = load_checkpoint(checkpoint)
    seg = {**FeatureSpec(**ck["features"]).segmenter_kwargs(),
           "method_options": {"checkpoint": str(Path(checkpoint).resolve())}}
    cfg = BenchConfig(data=Path(data), out=Path(out), methods=["meta"], shots=list(shots), datasets=list(datasets),
                      max_per_class=max_per_class, segmenter=seg, progress=progress)
    return run_bench(cfg)


def lodo(base: TrainConfig, out: Path, shots: list[int], max_per_class: int | None,
         datasets: list[str] | None = None) -> dict[str, dict]:
    """Leave-one-dataset-out: for each dataset, train on the others (OUT/DS/meta.pt) and evaluate
    on it (OUT/DS/eval). Resumable: finished folds are skipped, killed ones continue."""
    cat = scan(base.data)
    names = datasets or cat.datasets
    unknown = sorted(set(names) - set(cat.datasets))
    if unknown:
        raise InputError("--lodo", f"no dataset named {', '.join(unknown)} (have: {', '.join(cat.datasets)})")
    res = {}
    for ds in names:
        cfg = TrainConfig(**{**base.__dict__, "out": Path(out) / ds, "test_datasets": [ds],
                             "train_datasets": [d for d in cat.datasets if d != ds],
                             "cache": base.cache or Path(out) / "feature-cache"})
        ck = train(cfg)
        if ck["step"] < cfg.steps:
            raise InputError(cfg.checkpoint, "training stopped early (--max-minutes); rerun to finish")
        res[ds] = evaluate(cfg.checkpoint, cfg.data, Path(out) / ds / "eval", [ds], shots, max_per_class,
                           cfg.progress)
    return res
