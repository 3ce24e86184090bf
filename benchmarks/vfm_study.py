"""The DINOv2 (``dinov2_vits14_imgfocus``) study: screening, the default's rules, LODO, distillation.

Writes everything under ``--root`` (default ./vfm-runs; the study's own runs: /work/runs35); each bench run is one ``fdseg bench``
process (resumable: rerunning a config continues it). Results: docs/vfm.md.

    # run named bench configs (one process at a time, 1 thread), on the transfer sets and/or the dev subset
    python benchmarks/vfm_study.py bench B_b9_448 B_b69_448 --sets transfer devsub --shots 1
    # table of every finished run (class mean, per dataset, ms/query, peak RSS, precision)
    python benchmarks/vfm_study.py table
    # leave-one-dataset-out over the finished runs of a group of configs
    python benchmarks/vfm_study.py lodo B_b9_224 B_b9_448 ... --shots 1
    # distillation with cached teacher targets (part 3)
    python benchmarks/vfm_study.py cache-teacher --out vfm-runs/E_teacher --size 448 --layers 9
    python benchmarks/vfm_study.py distill --cache vfm-runs/E_teacher --out vfm-runs/E_student ...
    # time teacher vs student per query in one process
    python benchmarks/vfm_study.py speed --student vfm-runs/E_student/student.pt ...
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"      # ../shared/data beside the checkout
ROOT = Path("vfm-runs")
DATA = {"transfer": ["--data", str(SHARED / "transfer")],
        "devsub": ["--data", str(SHARED / "defects"), "--max-per-class", "20"],
        "dev": ["--data", str(SHARED / "defects")]}
DINO = ["--backbone", "dinov2_vits14_imgfocus"]
BLOCKS = {"b9": ["--backbone-option", "layers=[9]"],
          "b69": ["--backbone-option", "layers=[6,9]"],
          "b8": ["--backbone-option", "layers=[8]"],
          "b89": ["--backbone-option", "layers=[8,9]"],
          "b11n": ["--backbone-option", "layers=[11]", "--backbone-option", "norm=true"]}
SIZES = {"224": ["--size", "224", "--feature-stride", "4"],      # 16 x 16 tokens -> 56 x 56 grid
         "448": ["--size", "448", "--feature-stride", "8"],      # 32 x 32 tokens -> 56 x 56 grid
         "672": ["--size", "672", "--feature-stride", "8"]}      # 48 x 48 tokens -> 84 x 84 grid


def config(name: str) -> list[str]:
    """Config name -> fdseg bench model flags.

    A_default / A_paper / A_fast: efficientnet_lite0 with the preset (no model flags).
    B_<block>_<size>: DINOv2, --preset paper.  F_<block>_<size>: DINOv2, --preset fast.
    C_<block>_<size>: DINOv2, the default (accurate) rules with --zoom 1.
    S_<arch>_<size>[_<tag>]: a student PDN (weights from ROOT/E_<arch>_<tag>/student.pt) with --preset paper;
    SF_ / SC_ likewise with fast / accurate (zoom 1)."""
    p = name.split("_")
    if p[0] == "A":
        return {"default": [], "paper": ["--preset", "paper"], "fast": ["--preset", "fast"]}[p[1]]
    rules = {"B": ["--preset", "paper"], "F": ["--preset", "fast"], "C": ["--zoom", "1"],
             "S": ["--preset", "paper"], "SF": ["--preset", "fast"], "SC": ["--zoom", "1"]}[p[0]]
    if p[0] in ("B", "F", "C"):
        return DINO + BLOCKS[p[1]] + SIZES[p[2]] + rules
    at = next(i for i in range(1, len(p)) if p[i].isdigit())        # S_pdn_small_224[_tag]: the arch has a _
    arch, size = "_".join(p[1:at]), p[at]
    tag = "_".join(p[at + 1:]) or "main"
    w = ROOT / f"E_{arch}_{tag}" / "student.pt"
    stride = {"224": "4", "256": "4", "448": "8"}[size]
    return ["--backbone", arch, "--weights", str(w), "--size", size, "--feature-stride", stride] + rules


def run_dir(name: str, dset: str) -> Path:
    return ROOT / f"{name}__{dset}"


def cmd_bench(a) -> None:
    for name in a.configs:
        for dset in a.sets:
            out = run_dir(name, dset)
            cmd = [sys.executable, "-m", "fdseg", "bench", *DATA[dset], "--shots", *map(str, a.shots),
                   "--threads", "1", "--no-progress", "--gallery", "0", "--out", str(out), *config(name)]
            print("$", " ".join(cmd[2:]), flush=True)
            t0 = time.time()
            with open(str(out) + f".{'-'.join(map(str, a.shots))}.log", "a") as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
            print(f"  rc={rc} wall {time.time() - t0:.0f}s", flush=True)
            if rc:
                print(open(str(out) + f".{'-'.join(map(str, a.shots))}.log").read()[-2000:])


def load_runs() -> dict:
    """(config, set, shots) -> run dict of results.json (the last run of that shot count)."""
    out = {}
    for d in sorted(ROOT.glob("*__*")):
        f = d / "results.json"
        if not d.is_dir() or not f.exists():
            continue
        name, dset = d.name.split("__")
        res = json.loads(f.read_text())
        for r in res["runs"]:
            out[(name, dset, r["shots"])] = r
    return out


def class_ious(run: dict) -> dict:
    return {f"{d['dataset']}/{c}": v for d in run["datasets"] for c, v in d["class_iou"].items()}


def cmd_table(a) -> None:
    runs = load_runs()
    sets = a.sets or sorted({k[1] for k in runs})
    for dset in sets:
        keys = sorted(k for k in runs if k[1] == dset and (not a.configs or k[0] in a.configs))
        if not keys:
            continue
        dsn = sorted({d["dataset"] for k in keys for d in runs[k]["datasets"]})
        print(f"\n### {dset}\n")
        print("| config | shots | " + " | ".join(dsn) + " | class mean | ms/query | peak RSS MB | precision | episodes |")
        print("|---|---|" + "---|" * (len(dsn) + 5))
        for k in sorted(keys, key=lambda k: (k[2], k[0])):
            r = runs[k]
            by = {d["dataset"]: d for d in r["datasets"]}
            cells = [f"{100 * by[x]['miou']:.1f}" if x in by else "-" for x in dsn]
            print(f"| {k[0]} | {k[2]} | " + " | ".join(cells) + f" | **{100 * r['class_mean_miou']:.1f}** | "
                  f"{r['ms_per_query_median']:.0f} | {r['peak_rss_mb']:.0f} | {r['precision']} | {r['episodes']} |")


def dataset_means(run: dict) -> dict:
    """dataset -> mean IoU over its classes (the class mean's parts)."""
    out = {}
    for d in run["datasets"]:
        v = list(d["class_iou"].values())
        out[d["dataset"]] = (sum(v) / len(v), len(v))
    return out


def cmd_lodo(a) -> None:
    """For each held-out dataset (5 dev + 2 transfer): choose the config with the best class mean over
    the other datasets' classes (dev subset + transfer pooled, class-weighted), report the held-out score."""
    runs = load_runs()
    per = {}   # config -> {dataset: (sum of class IoUs, n classes)}
    for name in a.configs:
        acc = {}
        for dset in a.sets:
            r = runs.get((name, dset, a.shots))
            if r is None:
                break
            for d in r["datasets"]:
                v = list(d["class_iou"].values())
                acc[d["dataset"]] = (sum(v), len(v))
        else:
            per[name] = acc
    if not per:
        print("no complete configs")
        return
    dsn = sorted(next(iter(per.values())))
    print(f"\nLODO over {', '.join(per)} ({a.shots}-shot, sets {' + '.join(a.sets)})\n")
    print("| held out | chosen on the others | its score on the others | held-out score of the choice | "
          "best on the held-out | choice = all-data choice |")
    print("|---|---|---|---|---|---|")

    def mean_over(name, keep):
        s = sum(per[name][x][0] for x in keep)
        n = sum(per[name][x][1] for x in keep)
        return s / n
    full = max(per, key=lambda c: mean_over(c, dsn))
    for held in dsn:
        rest = [x for x in dsn if x != held]
        pick = max(per, key=lambda c: mean_over(c, rest))
        best = max(per, key=lambda c: mean_over(c, [held]))
        print(f"| {held} | {pick} | {100 * mean_over(pick, rest):.1f} | {100 * mean_over(pick, [held]):.1f} | "
              f"{best} ({100 * mean_over(best, [held]):.1f}) | {'yes' if pick == full else 'no'} |")
    print(f"\nall-data choice: {full} ({100 * mean_over(full, dsn):.1f})")


# ------------------------------------------------------------------------------------- distillation

def _teacher(size: int, layers: list[int], norm: bool):
    from fdseg.backbones import create_backbone
    return create_backbone("dinov2_vits14_imgfocus", layers=tuple(layers), norm=norm)


def distill_files(limit_per_class: int | None = None) -> list[Path]:
    """../shared/data/distill/images (all) + the transfer sets' normals."""
    from fdseg.distill import list_images
    files = list_images(SHARED / "distill" / "images")
    for d in sorted((SHARED / "transfer").glob("*/*/normals")):
        files += list_images(d)
    return files


def cmd_cache_teacher(a) -> None:
    """Teacher maps of every training image, squeezed to size x size, computed once (bf16 autocast where
    the CPU runs it, as the bench does), stored as fp16 token maps (N x L x 384 x t x t) + the images
    at the student's size (uint8)."""
    import numpy as np
    import torch
    from fdseg.data.images import load_image
    from fdseg.data.preprocess import resize_image, to_tensor
    from fdseg.hardware import fast_bf16
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = distill_files()[:a.limit or None]
    teacher = _teacher(a.size, a.layers, a.norm).eval()
    t = round(a.size / 14)
    n, L = len(files), len(teacher.taps)
    maps = np.lib.format.open_memmap(out / "maps.npy", mode="w+", dtype=np.float16, shape=(n, L, 384, t, t)) \
        if not (out / "maps.npy").exists() else np.load(out / "maps.npy", mmap_mode="r+")
    imgs = np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=np.uint8,
                                     shape=(n, 3, a.student_size, a.student_size)) \
        if not (out / "images.npy").exists() else np.load(out / "images.npy", mmap_mode="r+")
    done_f = out / "done.txt"
    done = int(done_f.read_text()) if done_f.exists() else 0
    use_bf16 = fast_bf16() if a.precision == "auto" else a.precision == "bf16"
    t0 = time.time()
    for i in range(done, n):
        x = to_tensor(load_image(files[i]))
        xt = resize_image(x, (a.size, a.size))
        imgs[i] = resize_image(x, (a.student_size, a.student_size))[0].round().clamp(0, 255).to(torch.uint8).numpy()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            ms = teacher(teacher.normalize(xt))
        for j, m in enumerate(ms):
            maps[i, j] = m[0].float().numpy().astype(np.float16)
        if (i + 1) % 50 == 0 or i + 1 == n:
            maps.flush(); imgs.flush()
            done_f.write_text(str(i + 1))
            print(f"{i + 1}/{n} {time.time() - t0:.0f}s", flush=True)
    (out / "meta.json").write_text(json.dumps({"files": [str(f) for f in files], "size": a.size,
                                               "student_size": a.student_size, "layers": a.layers,
                                               "norm": a.norm, "bf16": use_bf16,
                                               "seconds_this_run": round(time.time() - t0, 1)}, indent=1))


def cmd_distill(a) -> None:
    """Student PDN on the cached teacher maps: target = the teacher's maps combined as fm combines them
    (per-layer L2 norm, bilinear to the grid, concat, L2 norm) on the student's stride-4 grid of a
    student_size x student_size input, rotated to 384 ch and standardised per channel (fdseg.distill's
    Target, fed cached maps); student input = the image at student_size (random grid-aligned crops,
    flips, grey); MSE; Adam; time budget; checkpoint + resume; export as fdseg.distill.export_student."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from fdseg.backbones.pdn import PDN
    from fdseg.distill import CHANNELS, STRIDE, _save, augment, export_student
    from fdseg.features import combine_layers
    torch.set_num_threads(1)
    cache = Path(a.cache)
    meta = json.loads((cache / "meta.json").read_text())
    maps = np.load(cache / "maps.npy", mmap_mode="r")
    imgs = torch.from_numpy(np.load(cache / "images.npy"))
    n, L, C, t, _ = maps.shape
    S = meta["student_size"]
    grid = (S // STRIDE, S // STRIDE)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(a.seed)
    c = L * C
    proj = torch.eye(CHANNELS) if c == CHANNELS else None     # set below for c > 384 (PCA)

    def combined(idx, flips):
        """Unit-norm teacher grid (fm's combine_layers) of images idx, flipped as the student's input."""
        m = torch.from_numpy(np.stack([maps[i] for i in idx])).float()       # B x L x C x t x t
        f = combine_layers([m[:, j] for j in range(L)], grid)                # B x c x gh x gw
        for b, (fh, fv) in enumerate(flips):
            if fh:
                f[b] = f[b].flip(-1)
            if fv:
                f[b] = f[b].flip(-2)
        return f

    def target_of(idx, flips):
        return torch.einsum("oc,bchw->bohw", proj, combined(idx, flips))

    ck_path = out / "checkpoint.pt"
    torch.manual_seed(a.seed)
    student = PDN(a.arch)
    student.train()
    opt = torch.optim.Adam(student.net.parameters(), lr=a.lr, weight_decay=1e-5)
    sidx = np.linspace(0, n - 1, min(a.stats_images, n)).round().astype(int)
    if ck_path.exists():
        ck = torch.load(ck_path, map_location="cpu", weights_only=True)
        proj = ck["proj"]
        student.net.load_state_dict(ck["student"])
        opt.load_state_dict(ck["optimizer"])
        g.set_state(ck["rng"])
        mean, std = ck["mean"], ck["std"]
        step, elapsed, history = int(ck["step"]), float(ck["elapsed"]), json.loads(ck["history"])
    else:
        if proj is None:
            # c > 384 channels (several blocks): the top-384 eigenvectors of the uncentred second moment
            # of the combined features (the rotation that best keeps their dot products, i.e. cosines)
            M = torch.zeros(c, c, dtype=torch.float64)
            for i in range(0, len(sidx), 16):
                f = combined(sidx[i:i + 16], [(0, 0)] * len(sidx[i:i + 16])).double()
                f = f.permute(0, 2, 3, 1).reshape(-1, c)
                M += f.T @ f
            ev, V = torch.linalg.eigh(M)
            proj = V[:, -CHANNELS:].T.float().contiguous()
            print(f"PCA {c} -> {CHANNELS}: kept {float(ev[-CHANNELS:].sum() / ev.sum()):.4f} of the energy", flush=True)
        s1 = torch.zeros(CHANNELS, dtype=torch.float64)
        s2 = torch.zeros(CHANNELS, dtype=torch.float64)
        cnt = 0
        for i in range(0, len(sidx), 16):
            tt = target_of(sidx[i:i + 16], [(0, 0)] * len(sidx[i:i + 16])).double()
            s1 += tt.sum((0, 2, 3)); s2 += (tt * tt).sum((0, 2, 3)); cnt += tt.shape[0] * tt.shape[2] * tt.shape[3]
        mean = (s1 / cnt).float()
        var = (s2 / cnt - (s1 / cnt) ** 2).clamp_min(1e-12)
        if a.std == "global":
            # one scale for all channels: the MSE then weighs each PCA component by its energy, as the
            # cosines of the feature vectors do (per-channel standardisation would weigh the noise-like
            # tail components as much as the leading ones)
            var = var.mean().expand(CHANNELS).clone()
        std = var.sqrt().float()
        step, elapsed, history = 0, 0.0, []

    def norm_t(tt):
        return (tt - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

    # probe: 16 fixed images, the centre crop, no augmentation
    pidx = np.linspace(0, n - 1, 16).round().astype(int)
    cc = a.crop // STRIDE
    o = (grid[0] - cc) // 2
    probe_x = imgs[pidx].float()[:, :, STRIDE * o:STRIDE * o + a.crop, STRIDE * o:STRIDE * o + a.crop]
    probe_t = norm_t(target_of(pidx, [(0, 0)] * 16))[:, :, o:o + cc, o:o + cc]

    def probe():
        student.eval()
        with torch.inference_mode():
            v = F.mse_loss(student.raw(student.normalize(probe_x)), probe_t).item()
        student.train()
        return v

    class _T:       # what export_student reads
        pass
    tgt = _T()
    tgt.mean, tgt.std = mean, std
    if not history:
        history.append({"step": 0, "seconds": 0.0, "probe_loss": probe()})
    budget = a.minutes * 60
    per = a.batch // a.crops_per_image
    last = time.monotonic()
    ema = None
    try:
        while elapsed < budget and (not a.max_steps or step < a.max_steps):
            t0 = time.monotonic()
            idx = torch.randint(0, n, (per,), generator=g).tolist()
            x = imgs[idx]
            r = torch.rand(per, 3, generator=g)
            flips = [(bool(r[b, 0] < 0.5), bool(r[b, 1] < 0.5)) for b in range(per)]
            x = x.float()
            for b, (fh, fv) in enumerate(flips):
                if fh:
                    x[b] = x[b].flip(-1)
                if fv:
                    x[b] = x[b].flip(-2)
                if r[b, 2] < a.gray_p:
                    y = 0.299 * x[b, 0] + 0.587 * x[b, 1] + 0.114 * x[b, 2]
                    x[b] = y.expand(3, -1, -1)
            f = combined(idx, flips)                       # the full unit-norm grid; projected on the crops only
            x = x.repeat_interleave(a.crops_per_image, 0)
            nn_ = grid[0] - cc + 1
            oo = torch.randint(0, nn_, (x.shape[0], 2), generator=g).tolist()
            xc = torch.stack([x[i, :, STRIDE * p:STRIDE * p + a.crop, STRIDE * q_:STRIDE * q_ + a.crop]
                              for i, (p, q_) in enumerate(oo)])
            fc = torch.stack([f[i // a.crops_per_image, :, p:p + cc, q_:q_ + cc] for i, (p, q_) in enumerate(oo)])
            tc = norm_t(torch.einsum("oc,bchw->bohw", proj, fc))
            if a.schedule == "cosine":          # lr decays over the time budget (or the step cap)
                frac = step / a.max_steps if a.max_steps else elapsed / budget
                for grp in opt.param_groups:
                    grp["lr"] = a.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
            loss = F.mse_loss(student.raw(student.normalize(xc)), tc)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            elapsed += time.monotonic() - t0
            lv = float(loss.item())
            ema = lv if ema is None else 0.95 * ema + 0.05 * lv
            if step % a.probe_every == 0:
                history.append({"step": step, "seconds": round(elapsed, 1), "train_loss_ema": round(ema, 5),
                                "probe_loss": probe()})
                print(history[-1], flush=True)
            if time.monotonic() - last > 120:
                _save(ck_path, {"student": student.net.state_dict(), "optimizer": opt.state_dict(),
                                "rng": g.get_state(), "step": step, "elapsed": elapsed, "mean": mean, "std": std, "proj": proj,
                                "history": json.dumps(history)})
                last = time.monotonic()
    finally:
        _save(ck_path, {"student": student.net.state_dict(), "optimizer": opt.state_dict(),
                        "rng": g.get_state(), "step": step, "elapsed": elapsed, "mean": mean, "std": std, "proj": proj,
                        "history": json.dumps(history)})
    if history[-1]["step"] != step:
        history.append({"step": step, "seconds": round(elapsed, 1), "train_loss_ema": ema, "probe_loss": probe()})
    student.eval()
    size = export_student(student, tgt, out / "student.pt")
    (out / "train.json").write_text(json.dumps({"args": vars(a), "teacher": meta | {"files": len(meta["files"])},
                                                "steps": step, "seconds": round(elapsed, 1),
                                                "student_bytes": size, "history": history}, indent=1))
    print(f"student: {out / 'student.pt'} ({size} bytes), {step} steps, {elapsed / 60:.1f} min, "
          f"probe {history[0]['probe_loss']:.3f} -> {history[-1]['probe_loss']:.3f}")


def cmd_speed(a) -> None:
    """Per-query time of several configs in one process, interleaved: for every class of --data, fit each
    config on the class's first image (1-shot) or first 5 (5-shot) and predict the next --queries images
    with each config in turn (round robin, so load changes hit all alike). CPU ms (process_time) and wall
    ms per predict, and per fit, medians; bench-style fit + predict per query as well."""
    import statistics
    import torch
    from fdseg import FewShotSegmenter
    from fdseg.data.layouts import scan
    torch.set_num_threads(1)
    cat = scan(a.data)
    cfgs = {}
    for spec in a.config:
        name, _, flags = spec.partition("=")
        cfgs[name] = json.loads(flags)
    segs = {k: FewShotSegmenter(**v) for k, v in cfgs.items()}
    res = {k: {"predict_cpu": [], "predict_wall": [], "fit_cpu": [], "fit_wall": []} for k in segs}
    for ds in sorted(cat.classes):
        for cls in sorted(cat.classes[ds]):
            sm = cat.classes[ds][cls]
            sup, qs = sm[:a.shots], sm[a.shots:a.shots + a.queries]
            for k, seg in segs.items():
                c0, w0 = time.process_time(), time.perf_counter()
                seg.fit([s.image for s in sup], [s.mask for s in sup])
                res[k]["fit_cpu"].append(time.process_time() - c0)
                res[k]["fit_wall"].append(time.perf_counter() - w0)
            for q in qs:
                for k, seg in segs.items():
                    c0, w0 = time.process_time(), time.perf_counter()
                    seg.predict(q.image, size=(256, 256))
                    res[k]["predict_cpu"].append(time.process_time() - c0)
                    res[k]["predict_wall"].append(time.perf_counter() - w0)
    print(f"\n{a.data}, {a.shots}-shot, {len(res[next(iter(res))]['predict_cpu'])} queries per config, "
          f"1 thread, precision {next(iter(segs.values())).settings.get('precision')}\n")
    print("| config | predict CPU ms | predict wall ms | fit CPU ms | fit wall ms |")
    print("|---|---|---|---|---|")
    med = {k: {m: 1e3 * statistics.median(v) for m, v in r.items()} for k, r in res.items()}
    for k, m in med.items():
        print(f"| {k} | {m['predict_cpu']:.0f} | {m['predict_wall']:.0f} | {m['fit_cpu']:.0f} | {m['fit_wall']:.0f} |")
    names = list(med)
    for k in names[1:]:
        print(f"{names[0]} / {k}: predict CPU x{med[names[0]]['predict_cpu'] / med[k]['predict_cpu']:.2f}, "
              f"wall x{med[names[0]]['predict_wall'] / med[k]['predict_wall']:.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"configs": cfgs, "medians_ms": med, "raw_s": res}, indent=1))


def main() -> None:
    global ROOT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT))
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("configs", nargs="+")
    b.add_argument("--sets", nargs="+", default=["transfer", "devsub"], choices=list(DATA))
    b.add_argument("--shots", nargs="+", type=int, default=[1])
    t = sub.add_parser("table")
    t.add_argument("configs", nargs="*")
    t.add_argument("--sets", nargs="*")
    lo = sub.add_parser("lodo")
    lo.add_argument("configs", nargs="+")
    lo.add_argument("--sets", nargs="+", default=["devsub", "transfer"])
    lo.add_argument("--shots", type=int, default=1)
    c = sub.add_parser("cache-teacher")
    c.add_argument("--out", required=True)
    c.add_argument("--size", type=int, default=448)
    c.add_argument("--student-size", type=int, default=224)
    c.add_argument("--layers", type=int, nargs="+", default=[9])
    c.add_argument("--norm", action="store_true")
    c.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    c.add_argument("--limit", type=int, default=0, help="first N images only (a test)")
    d = sub.add_parser("distill")
    d.add_argument("--cache", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--arch", default="pdn_small")
    d.add_argument("--minutes", type=float, default=45)
    d.add_argument("--max-steps", type=int, default=0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--crop", type=int, default=64)
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--crops-per-image", type=int, default=2)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--gray-p", type=float, default=0.0)
    d.add_argument("--stats-images", type=int, default=256)
    d.add_argument("--probe-every", type=int, default=100)
    d.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    d.add_argument("--std", default="global", choices=["global", "channel"],
                   help="target standardisation: one scale for all channels (default) or per channel (fdseg.distill)")
    sp = sub.add_parser("speed")
    sp.add_argument("--data", default=str(SHARED / "transfer"))
    sp.add_argument("--config", action="append", required=True, metavar='NAME={"backbone": ...}',
                    help="a FewShotSegmenter keyword set as JSON; the first is the reference of the ratios")
    sp.add_argument("--shots", type=int, default=1)
    sp.add_argument("--queries", type=int, default=5)
    sp.add_argument("--out")
    a = ap.parse_args()
    ROOT = Path(a.root)
    {"bench": cmd_bench, "table": cmd_table, "lodo": cmd_lodo, "cache-teacher": cmd_cache_teacher,
     "distill": cmd_distill, "speed": cmd_speed}[a.cmd](a)


if __name__ == "__main__":
    main()
