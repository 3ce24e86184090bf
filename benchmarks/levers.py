"""Accuracy levers of the matching rule, scored on cached features (paper protocol and metric).

Step 1 (once per backbone / resize setting): every image of the set goes through the backbone
(and, for support augmentation, its left-right and up-down flips); each tapped layer is
L2-normalised and resized to the image's grid, as ``fdseg.features`` does, and kept per layer
in a cache file. Step 2: every rule in ``--rules`` is scored on the same episodes from those
features, so rules and layer mixes are compared without re-running the backbone::

    .venv/bin/python benchmarks/levers.py --shots 1 5 --rules fm fm_flip probe --out levers/fm.json
    .venv/bin/python benchmarks/levers.py --merge levers/*.json --out levers/levers.md   # + LODO

A rule maps (support feature grids, their mask coverages, query feature grid) to a margin grid;
margin > 0 is defect, upsampled bilinearly to 256 x 256 and scored like ``fdseg bench``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fdseg.backbones import create_backbone
from fdseg.data import make_episodes, scan
from fdseg.data.episodes import _rel
from fdseg.data.images import load_image, load_mask
from fdseg.data.preprocess import Preprocess, mask_coverage, resize_image, resize_mask, to_tensor, upsample_scores
from fdseg.methods.similarity import max_similarity
from fdseg.refine.colour import ColourModel
from fdseg.metrics import episode_counts

sys.path.insert(0, str(Path(__file__).parent))
from ablation import markdown, summarise  # noqa: E402

VIEWS = {"id": lambda a: a, "h": lambda a: a[:, ::-1], "v": lambda a: a[::-1]}


# -- step 1: per-layer feature grids ----------------------------------------------------------
@torch.inference_mode()
def extract(cat, backbone: str, taps: tuple[int, ...], pre: Preprocess, stride: int, views: list[str],
            cache: Path) -> dict:
    if cache.exists():
        return torch.load(cache, weights_only=True)
    bb = create_backbone(backbone, layers=taps).eval()
    feats: dict = {}
    paths = sorted({_rel(s.image, cat.root) for s in cat.samples()})
    for p in tqdm(paths, desc=f"features {backbone} {taps}", mininterval=20):
        rgb = load_image(cat.root / p)
        H, W = pre.input_size(*rgb.shape[:2])
        c = pre.cell(H, W, stride)
        for v in views:
            x = resize_image(to_tensor(np.ascontiguousarray(VIEWS[v](rgb))), (H, W))
            maps = bb(bb.normalize(x))
            feats[(str(p), v)] = [F.interpolate(F.normalize(m.float(), dim=1), size=(H // c, W // c), mode="bilinear",
                                                align_corners=False)[0].half() for m in maps]
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, cache)
    return feats


def combine(layers: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    x = torch.cat([w * l.float() for w, l in zip(weights, layers) if w], 0)
    return F.normalize(x, dim=0).half()


# -- step 2: rules ----------------------------------------------------------------------------
def cells(feats: list[torch.Tensor], covs: list[torch.Tensor]):
    fg = torch.cat([f.flatten(1).T[c.flatten() > 0] for f, c in zip(feats, covs)])
    bg = torch.cat([f.flatten(1).T[c.flatten() == 0] for f, c in zip(feats, covs)])
    return fg, bg


def fm_margin(q: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    return max_similarity(q, fg) - max_similarity(q, bg)


def probe_logits(fg: torch.Tensor, bg: torch.Tensor, q: torch.Tensor, l2: float = 1e-3, steps: int = 60,
                 scale: float = 10.0) -> torch.Tensor:
    """Class-balanced logistic regression on the support cells (cosine features x scale)."""
    x = torch.cat([fg, bg]) * scale
    y = torch.cat([torch.ones(len(fg)), torch.zeros(len(bg))])
    wts = torch.where(y > 0, 0.5 / len(fg), 0.5 / len(bg))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (wts * F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")).sum() + l2 * (w @ w)
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return (q * scale @ w + b).detach()


def self_support(q: torch.Tensor, m0: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, tf: float, tb: float,
                 alpha: float) -> torch.Tensor:
    """Query cells confidently fg / bg under m0 join the banks (self-support); blend with m0."""
    qf, qb = q[m0 > tf], q[m0 < -tb]
    sfg = max_similarity(q, fg)
    sbg = max_similarity(q, bg)
    if len(qf):
        sfg = torch.maximum(sfg, max_similarity(q, qf))
    if len(qb):
        sbg = torch.maximum(sbg, max_similarity(q, qb))
    return (1 - alpha) * m0 + alpha * (sfg - sbg)


def run_rules(names: list[str], sup: list[torch.Tensor], covs: list[torch.Tensor], sup_aug: list[torch.Tensor],
              covs_aug: list[torch.Tensor], qf: torch.Tensor) -> dict[str, torch.Tensor]:
    c, h, w = qf.shape
    q = qf.flatten(1).T.float().contiguous()
    sup, sup_aug = [f.float() for f in sup], [f.float() for f in sup_aug]
    fg, bg = cells(sup, covs)
    out: dict[str, torch.Tensor] = {}
    if any("sub2" in n for n in names):   # background bank from every other cell of each axis (4x fewer)
        bg = torch.cat([f[:, ::2, ::2].flatten(1).T[F.max_pool2d(c[None], 2, ceil_mode=True)[0].flatten() == 0]
                        for f, c in zip(sup, covs)])
    m0 = fm_margin(q, fg, bg)
    need_aug = any("flip" in n for n in names)
    if need_aug:
        fga, bga = cells(sup + sup_aug, covs + covs_aug)
        m0a = fm_margin(q, fga, bga)
    memo: dict = {}

    def probe(flip: bool, l2: float) -> torch.Tensor:
        if (flip, l2) not in memo:
            memo[flip, l2] = probe_logits(fga if flip else fg, bga if flip else bg, q, l2=l2)
        return memo[flip, l2]

    ctx_memo: dict = {}

    def ctx_probe(flip: bool, kind: str) -> torch.Tensor:
        """The probe on each cell's features plus its 3x3 neighbourhood's mean (and max) features."""
        if (flip, kind) not in ctx_memo:
            def cx(f: torch.Tensor) -> torch.Tensor:
                parts = [f, F.avg_pool2d(f[None], 3, 1, 1, count_include_pad=False)[0]]
                if kind == "pmax":
                    parts.append(F.max_pool2d(f[None], 3, 1, 1)[0])
                return torch.cat(parts, 0)
            ss, cc = (sup + sup_aug, covs + covs_aug) if flip else (sup, covs)
            cfg, cbg = cells([cx(f) for f in ss], cc)
            ctx_memo[flip, kind] = probe_logits(cfg, cbg, cx(qf.float()).flatten(1).T.contiguous())
        return ctx_memo[flip, kind]

    for n in names:
        flip = "flip" in n
        base, bfg, bbg = (m0a, fga, bga) if flip else (m0, fg, bg)
        kind, *opt = n.replace("_flip", "").replace("_sub2", "").split(":")
        if kind == "fm":
            out[n] = base
        elif kind == "probe":                 # probe[:l2[:a]]: logit alone, or fm + a * 0.1 * tanh(logit / 4)
            l2 = float(opt[0]) if opt else 1e-3
            lg = probe(flip, l2)
            out[n] = lg if len(opt) < 2 else base + float(opt[1]) * 0.1 * torch.tanh(lg / 4)
        elif kind in ("pctx", "pmax"):         # pctx[:a]: fm + a * 0.1 * tanh(context-probe logit / 4)
            a = float(opt[0]) if opt else 1.0
            out[n] = base + a * 0.1 * torch.tanh(ctx_probe(flip, kind) / 4)
        elif kind == "ev":                    # ev:g: fm + g * (sqrt(2 ln n_bg) - sqrt(2 ln n_fg)), bank-size bias
            g = float(opt[0])
            hv = probe(flip, 1e-3) if len(opt) > 1 else None
            corr = g * (math.sqrt(2 * math.log(max(2, len(bbg)))) - math.sqrt(2 * math.log(max(2, len(bfg)))))
            out[n] = base + corr + (0 if hv is None else float(opt[1]) * 0.1 * torch.tanh(hv / 4))
        elif kind == "cap":                   # cap:mult[:a]: at most mult x the supports' defect fraction of cells
            mult = float(opt[0])
            m = base if len(opt) < 2 else base + float(opt[1]) * 0.1 * torch.tanh(probe(flip, 1e-3) / 4)
            frac = float(torch.cat([c.flatten() > 0 for c in covs]).float().mean())
            keep = max(1, int(round(mult * frac * len(m))))
            if keep < len(m):
                t = m.topk(keep).values[-1]
                m = m - torch.clamp(t, min=0)
            out[n] = m
        elif kind == "ssp":                   # ssp:tf:tb:alpha
            tf, tb, al = map(float, opt)
            out[n] = self_support(q, base, bfg, bbg, tf, tb, al)
        else:
            raise SystemExit(f"unknown rule {n}")
    return {k: v.view(h, w) for k, v in out.items()}


def colour_ratio(imgs: list[np.ndarray], masks: list[np.ndarray], query: np.ndarray, bins: int,
                 ring: int = 8, **kw) -> np.ndarray:
    """Per query pixel: the support colour rule's p(colour | defect) / p(colour | ring) (``fdseg.refine.colour``;
    inputs already at 256 x 256; no defect pixel in the supports -> inf, i.e. nothing removed)."""
    r = ColourModel(bins=bins, ring=ring, **kw).fit(imgs, masks).ratio(query)
    return np.full(query.shape[:2], np.inf) if r is None else r


def guarded(covs: list[torch.Tensor], g: int) -> list[torch.Tensor]:
    """Coverage grids with the background cells within ``g`` cells of a defect cell set to NaN
    (``cells`` then puts them in neither bank)."""
    if not g:
        return covs
    out = []
    for c in covs:
        near = F.max_pool2d((c > 0).float()[None], 2 * g + 1, 1, g)[0] > 0
        out.append(torch.where(near & (c == 0), torch.full_like(c, float("nan")), c))
    return out


def post_rule(m: torch.Tensor, spec: str) -> torch.Tensor:
    """A per-query rule on a margin grid (> 0 = defect), see ``--post``."""
    kind, val = spec.split(":")
    v = float(val)
    if kind == "force":          # the top cells are defect even when no cell passes 0
        return m - min(0.0, float(m.max()) - v)
    if kind == "shift":          # a looser (v > 0) or stricter threshold on the margin
        return m + v
    if kind == "grow":           # each cell takes the best margin within v cells: the region grows v cells
        k = int(v)
        return F.max_pool2d(m[None].float(), 2 * k + 1, 1, k)[0].to(m.dtype)
    if kind == "comp":           # drop defect components much weaker than the strongest one
        from scipy import ndimage
        pos = (m > 0).numpy()
        if not pos.any():
            return m
        lab, n = ndimage.label(pos)
        peaks = ndimage.maximum(m.numpy(), lab, np.arange(1, n + 1))
        weak = np.isin(lab, 1 + np.flatnonzero(np.asarray(peaks) < v * float(m.max())))
        out = m.clone()
        out[torch.from_numpy(weak)] = -1e-3
        return out
    raise SystemExit(f"unknown post rule {spec}")


def bench_runs(dirs: list[str]) -> dict:
    """Episode records of `fdseg bench --out DIR` runs (runs/METHOD_Kshot.jsonl) -> summaries per shot count.
    A later folder's record of an episode replaces an earlier one's (some episodes rerun with
    `fdseg bench --episodes`, laid over a full run)."""
    from fdseg.metrics import dataset_scores
    recs: dict[str, dict] = defaultdict(dict)
    for d in dirs:
        for f in sorted(Path(d, "runs").glob("*shot.jsonl")):
            k = f.stem.rsplit("_", 1)[1].removesuffix("shot")
            for r in (json.loads(ln) for ln in f.read_text().splitlines()[1:] if ln.strip()):
                recs[k][r["id"]] = r
    out = {}
    for k, by_id in recs.items():
        rs = list(by_id.values())
        by = defaultdict(list)
        for r in rs:
            by[r["dataset"]].append(r)
        sc = {ds: dataset_scores(ds, sorted({r["cls"] for r in v}), v).as_dict() for ds, v in by.items()}
        ms = float(np.median([r["fit_ms"] + r["predict_ms"] for r in rs]))
        out[k] = {"datasets": sc, "class_mean": float(np.mean([x for d in sc.values() for x in d["class_iou"].values()])),
                  "ms_per_episode": ms}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/defects")
    ap.add_argument("--shots", type=int, nargs="+", default=[1])
    ap.add_argument("--max-per-class", type=int, default=None)
    ap.add_argument("--datasets", nargs="+", default=None)
    ap.add_argument("--backbone", nargs="+", default=["efficientnet_lite0"], help="several: features concatenated")
    ap.add_argument("--taps", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--weights", nargs="+", default=None,
                    help="per-tap weight sets, comma-separated, e.g. 1,1 0,1 (0 drops a tap); one run each")
    ap.add_argument("--resize", default="auto")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--views", nargs="+", default=["id", "h", "v"])
    ap.add_argument("--cache", default="levers-cache")
    ap.add_argument("--rules", nargs="+", default=["fm"])
    ap.add_argument("--colour-refine", nargs="+", default=[],
                    help="BINS:TAU[:RING[:GATE]][:grey=MODE][:contrast=N][:window=W] variants of the support colour "
                         "rule: prediction kept where the ratio >= TAU (grey=rgb: the rule before grey images "
                         "got their own)")
    ap.add_argument("--post", nargs="+", default=[],
                    help="per-query rules on each margin grid: shift:C (margin + C), grow:K (best margin within K cells), force:D (threshold min(0, max - D)), "
                         "comp:R (keep components whose peak >= R x the highest peak)")
    ap.add_argument("--guard", type=int, nargs="+", default=[0],
                    help="background cells within G cells of a support defect cell left out of the bank")
    ap.add_argument("--full-cache", action="store_true",
                    help="with --datasets: read the whole set's feature cache (it has every image)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", required=True)
    ap.add_argument("--merge", nargs="+", default=None)
    a = ap.parse_args()
    if a.merge:
        merged = {"runs": {}}
        for f in a.merge:
            if "=" in f:              # NAME=BENCH_DIR[,BENCH_DIR...]: `fdseg bench` outputs (split by dataset)
                name, dirs = f.split("=", 1)
                merged["runs"][name] = bench_runs(dirs.split(","))
                continue
            r = json.loads(Path(f).read_text())
            for name, run in r["runs"].items():
                merged["runs"].setdefault(f"{r['tag']} / {name}" if r["tag"] else name, {}).update(run)
        md = markdown(merged)
        Path(a.out).write_text(md)
        print(md)
        return
    torch.set_num_threads(1)
    cat = scan(Path(a.data))
    if a.max_per_class or a.datasets:
        cat = cat.subset(a.datasets, None, a.max_per_class)
    pre = Preprocess(mode=a.resize, size=a.size)
    grid: dict = {}
    for bbn in a.backbone:
        key = f"{bbn}_t{''.join(map(str, a.taps))}_{a.resize}{a.size}_s{a.stride}_{''.join(a.views)}"
        key += f"_m{a.max_per_class}" if a.max_per_class else ""
        key += f"_{'+'.join(sorted(a.datasets))}" if a.datasets and not a.full_cache else ""
        feats = extract(cat, bbn, tuple(a.taps), pre, a.stride, a.views, Path(a.cache) / f"{key}.pt")
        for k, v in feats.items():
            grid.setdefault(k, []).extend(v)
        del feats
    raw = grid
    res = {"tag": a.tag, "args": vars(a), "runs": {}}
    for wspec in a.weights or [",".join(["1"] * len(a.taps))]:
        wts = [float(x) for x in wspec.split(",")]
        wts = wts * (len(next(iter(raw.values()))) // len(wts))
        grid = {k: combine(v, wts) for k, v in raw.items()}
        wtag = f"w{wspec} " if a.weights and len(a.weights) > 1 else ""
        evaluate(a, cat, grid, res, wtag)


def evaluate(a, cat, grid: dict, res: dict, wtag: str) -> None:
    for k in a.shots:
        recs, secs = defaultdict(list), defaultdict(float)
        eps = make_episodes(cat, k, seed=2)
        for ep in tqdm(eps, desc=f"{a.tag} {k}-shot", mininterval=30):
            root = cat.root
            sup, covs, sup_aug, covs_aug = [], [], [], []
            for sp, sm in zip(ep.supports, ep.support_masks):
                f = grid[(str(sp), "id")]
                m = load_mask(root / sm)
                sup.append(f)
                covs.append(mask_coverage(m, tuple(f.shape[-2:])))
                for v in a.views[1:]:
                    fv = grid[(str(sp), v)]
                    sup_aug.append(fv)
                    covs_aug.append(mask_coverage(np.ascontiguousarray(VIEWS[v](m)), tuple(fv.shape[-2:])))
            qf = grid[(str(ep.query), "id")]
            t = time.perf_counter()
            plain = [r for r in a.rules if not r.endswith("@tta")]
            maps = {}
            for g in a.guard:      # guard band: background cells within g cells of a defect cell leave the bank
                gm = run_rules(plain, sup, guarded(covs, g), sup_aug, guarded(covs_aug, g), qf) if plain else {}
                maps.update({(f"g{g}/{n}" if g else n): m for n, m in gm.items()})
            tta = [r[:-4] for r in a.rules if r.endswith("@tta")]
            if tta:      # test-time flips of the query: margins of each view flipped back and averaged
                acc = None
                for v in a.views:
                    mv = run_rules(tta, sup, covs, sup_aug, covs_aug, grid[(str(ep.query), v)])
                    dims = {"id": [], "h": [1], "v": [0]}[v]
                    mv = {n: torch.flip(m, dims) if dims else m for n, m in mv.items()}
                    acc = mv if acc is None else {n: acc[n] + mv[n] for n in acc}
                maps.update({f"{n}@tta": m / len(a.views) for n, m in acc.items()})
            secs["all"] += time.perf_counter() - t
            gt = (np.zeros((256, 256), bool) if ep.query_mask is None
                  else resize_mask(load_mask(root / ep.query_mask), (256, 256)))
            for spec in a.post:
                maps.update({f"{n}@{spec}": post_rule(m, spec) for n, m in list(maps.items())
                             if "@" not in n.removesuffix("@tta")})
            preds = {n: (upsample_scores(m.float(), (256, 256)) > 0).numpy() for n, m in maps.items()}
            if a.colour_refine:
                sz = (256, 256)
                simg = [resize_image(to_tensor(load_image(root / sp)), sz)[0].permute(1, 2, 0).round().clamp(0, 255)
                        .byte().numpy() for sp in ep.supports]
                smsk = [resize_mask(load_mask(root / sm), sz) for sm in ep.support_masks]
                qimg = resize_image(to_tensor(load_image(root / ep.query)), sz)[0].permute(1, 2, 0).round() \
                    .clamp(0, 255).byte().numpy()
                for spec in a.colour_refine:
                    bins, tau, *rest = spec.split(":")
                    # grey=contrast|rgb|off, contrast=N, window=W: ColourModel's grey-image options
                    kw = {k: (v if k == "grey" else int(v)) for k, v in (t.split("=") for t in rest if "=" in t)}
                    rest = [t for t in rest if "=" not in t]
                    ring = int(rest[0]) if rest else 8
                    ratio = colour_ratio(simg, smsk, qimg, int(bins), ring, **kw)
                    if len(rest) > 1:     # gate: the rule is used only if it removes >= GATE of the supports' ring
                        from scipy import ndimage
                        rs = [colour_ratio(simg, smsk, im, int(bins), ring, **kw) for im in simg]
                        rings = [ndimage.binary_dilation(m, iterations=ring) & ~m for m in smsk]
                        removed = np.concatenate([r[g] < float(tau) for r, g in zip(rs, rings)])
                        if removed.size and removed.mean() < float(rest[1]):
                            ratio = np.full_like(ratio, np.inf)
                    for n in list(maps):
                        preds[f"{n}+cr{spec}"] = preds[n] & (ratio >= float(tau))
            for name, pred in preds.items():
                tp, fp, fn, tn = episode_counts(gt, pred)
                recs[name].append({"dataset": ep.dataset, "cls": ep.cls, "tp": tp, "fp": fp, "fn": fn, "tn": tn})
        for name, rs in recs.items():
            res["runs"].setdefault(wtag + name, {})[str(k)] = summarise(rs, cat, 1e3 * secs["all"] / len(eps))
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
        best = sorted(res["runs"].items(), key=lambda kv: -kv[1][str(k)]["class_mean"])
        print(f"{k}-shot", [(n, round(100 * r[str(k)]["class_mean"], 1)) for n, r in best])


if __name__ == "__main__":
    main()
