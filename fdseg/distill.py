"""Knowledge distillation of a PDN student from any registered backbone (``fdseg distill``).

Target (as EfficientAD pretrains its teacher, with our feature grid): the teacher's
multi-layer features of the whole ``size x size`` image, combined exactly as
:func:`fdseg.features.combine_layers` does for matching (per-layer L2 norm, bilinear
to the stride-4 grid, concatenated, L2 norm), projected to 384 channels by a fixed
seeded matrix with orthonormal columns (so cosines are unchanged) and standardised per
channel with mean / std measured over training images. The student sees a random
crop (aligned to the stride-4 grid) of the same augmented image (flips, grayscale) and
is trained with MSE to the matching crop of the target; Adam.

The exported student file holds the network (fp16) plus ``feature_mean`` /
``feature_std``: :class:`fdseg.backbones.pdn.PDN` undoes the standardisation, so its
features approximate the teacher's grid under cosine similarity.

Checkpoints (atomic) every ``checkpoint_s`` seconds and at the end; ``resume=True``
continues from ``OUT/checkpoint.pt`` with the same data order (seeded generator state
is saved). The time budget counts the training time of all runs together.
"""
from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import write_bytes, write_text
from .backbones import create_backbone
from .backbones.pdn import PDN
from .data.images import is_image_file, load_image
from .data.preprocess import resize_image, to_tensor
from .errors import InputError
from .features import combine_layers

STRIDE = 4
CHANNELS = 384


@dataclass
class DistillConfig:
    data: str
    out: str
    teacher: str = "efficientnet_lite0"
    teacher_weights: str | None = None
    arch: str = "pdn_small"
    minutes: float = 30.0          # training-time budget over all runs (resume included)
    max_steps: int | None = None   # optional step cap as well
    seed: int = 0
    size: int = 256                # images are squeezed to size x size (as `--resize resize`)
    crop: int = 64                 # student crop (multiple of 4)
    batch: int = 8                 # crops per step
    crops_per_image: int = 4       # crops taken from each teacher pass (the teacher runs batch / this images)
    lr: float = 1e-3
    weight_decay: float = 1e-5
    gray_p: float = 0.1            # probability of grayscale augmentation
    flip: bool = True              # random horizontal / vertical flips
    stats_images: int = 256        # images used for the per-channel target mean / std
    max_images: int | None = None  # first N images (sorted) of DATA only
    checkpoint_s: float = 120.0
    probe_every: int = 50          # steps between probe-loss evaluations
    progress: bool = True

    def check(self) -> None:
        if self.crop % STRIDE or not 16 <= self.crop <= self.size:
            raise InputError("--crop", f"must be a multiple of 4 in [16, size], got {self.crop}")
        if self.size % 32:
            raise InputError("--size", f"must be a multiple of 32, got {self.size}")
        if self.minutes <= 0 and not self.max_steps:
            raise InputError("--minutes", "give a positive time budget (or --max-steps)")
        if self.batch < 1:
            raise InputError("--batch", f"must be >= 1, got {self.batch}")
        if self.crops_per_image < 1 or self.batch % self.crops_per_image:
            raise InputError("--crops-per-image", f"must divide --batch ({self.batch}), got {self.crops_per_image}")

    # settings that must match for a resume
    def identity(self) -> dict:
        d = asdict(self)
        for k in ("out", "minutes", "max_steps", "checkpoint_s", "probe_every", "progress"):
            d.pop(k)
        return d


def list_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "training data folder does not exist")
    files = sorted(p for p in folder.rglob("*") if is_image_file(p))
    if not files:
        raise InputError(folder, "holds no image files (.png .jpg .jpeg .bmp .tif .tiff .webp)")
    return files[:limit] if limit else files


def load_pool(files: list[Path], size: int, progress: bool = True) -> torch.Tensor:
    """All images squeezed to size x size, as one uint8 N x 3 x size x size tensor."""
    from tqdm import tqdm
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    for i, p in enumerate(tqdm(files, desc="load images", unit="img", disable=not progress, dynamic_ncols=True)):
        x = resize_image(to_tensor(load_image(p)), (size, size))
        out[i] = x[0].round().clamp(0, 255).to(torch.uint8)
    return out


class Target:
    """Teacher features -> projected, standardised stride-4 target grid."""

    def __init__(self, teacher, seed: int, proj: torch.Tensor | None = None):
        self.teacher = teacher
        c = int(sum(teacher.channels))
        if proj is None:
            g = torch.Generator().manual_seed(seed + 7919)
            q, _ = torch.linalg.qr(torch.randn(CHANNELS, c, generator=g))
            proj = q[:, :c].contiguous() if c <= CHANNELS else torch.randn(CHANNELS, c, generator=g) / math.sqrt(c)
        self.proj = proj
        self.mean = torch.zeros(CHANNELS)
        self.std = torch.ones(CHANNELS)

    @torch.inference_mode()
    def projected(self, rgb: torch.Tensor) -> torch.Tensor:
        """float RGB B x 3 x S x S (0..255) -> B x 384 x S/4 x S/4 (unit-norm features, rotated)."""
        grid = (rgb.shape[-2] // STRIDE, rgb.shape[-1] // STRIDE)
        f = combine_layers(self.teacher(self.teacher.normalize(rgb)), grid)
        return torch.einsum("oc,bchw->bohw", self.proj, f)

    def fit_stats(self, pool: torch.Tensor, n: int, batch: int = 16, progress: bool = False) -> None:
        from tqdm import tqdm
        s1 = torch.zeros(CHANNELS, dtype=torch.float64)
        s2 = torch.zeros(CHANNELS, dtype=torch.float64)
        cnt = 0
        idx = np.linspace(0, len(pool) - 1, min(n, len(pool))).round().astype(int)
        for i in tqdm(range(0, len(idx), batch), desc="target statistics", unit="batch", disable=not progress,
                      dynamic_ncols=True):
            t = self.projected(pool[idx[i:i + batch]].float()).double()
            s1 += t.sum((0, 2, 3))
            s2 += (t * t).sum((0, 2, 3))
            cnt += t.shape[0] * t.shape[2] * t.shape[3]
        mean = s1 / cnt
        self.mean = mean.float()
        self.std = (s2 / cnt - mean * mean).clamp_min(1e-12).sqrt().float()

    def __call__(self, rgb: torch.Tensor) -> torch.Tensor:
        return (self.projected(rgb) - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


def augment(x: torch.Tensor, g: torch.Generator, gray_p: float, flip: bool = True) -> torch.Tensor:
    """uint8 B x 3 x S x S -> float, each image flipped (h / v) and turned grey at random."""
    x = x.float()
    r = torch.rand(x.shape[0], 3, generator=g)
    for i in range(x.shape[0]):
        if flip and r[i, 0] < 0.5:
            x[i] = x[i].flip(-1)
        if flip and r[i, 1] < 0.5:
            x[i] = x[i].flip(-2)
        if r[i, 2] < gray_p:
            y = 0.299 * x[i, 0] + 0.587 * x[i, 1] + 0.114 * x[i, 2]
            x[i] = y.expand(3, -1, -1)
    return x


def crops(x: torch.Tensor, t: torch.Tensor, crop: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random grid-aligned crops: image crop x crop and the matching crop/4 target cells."""
    n = (x.shape[-1] - crop) // STRIDE + 1
    o = torch.randint(0, n, (x.shape[0], 2), generator=g)
    c = crop // STRIDE
    xs = [x[i, :, STRIDE * a:STRIDE * a + crop, STRIDE * b:STRIDE * b + crop] for i, (a, b) in enumerate(o.tolist())]
    ts = [t[i, :, a:a + c, b:b + c] for i, (a, b) in enumerate(o.tolist())]
    return torch.stack(xs), torch.stack(ts)


def _save(path: Path, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def export_student(student: PDN, target: Target, path: Path) -> int:
    """fp16 network + fp32 output statistics -> state dict file; returns its size in bytes."""
    sd = {k: v.detach().to(torch.float16).clone() for k, v in student.net.state_dict().items()}
    sd["feature_mean"] = target.mean.clone()
    sd["feature_std"] = target.std.clone()
    _save(path, sd)
    return path.stat().st_size


@dataclass
class DistillResult:
    steps: int
    seconds: float
    images: int
    probe_loss_start: float
    probe_loss_end: float
    train_loss_last: float
    student_file: str
    student_bytes: int
    history: list = field(default_factory=list)


def distill(cfg: DistillConfig, resume: bool = False) -> DistillResult:
    """Train (or continue training) a PDN student; see the module docstring."""
    from tqdm import tqdm
    wall0 = time.monotonic()
    cfg.check()
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    out.mkdir(parents=True, exist_ok=True)
    ck = None
    if ckpt_path.exists():
        if not resume:
            raise InputError(ckpt_path, "a distillation checkpoint is already here: pass --resume to continue "
                                        "it, or choose another --out")
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(ckpt_path, f"cannot read the checkpoint ({str(e).splitlines()[0] if str(e) else e})") from None
        # settings added after a checkpoint was written count as their defaults
        defaults = DistillConfig(data=cfg.data, out=cfg.out).identity()
        saved = {**defaults, **ck.get("identity", {})}
        if saved != json.loads(json.dumps(cfg.identity())):
            diff = [k for k, v in cfg.identity().items() if saved.get(k) != v]
            raise InputError(ckpt_path, f"checkpoint was made with other settings ({', '.join(diff)}); "
                                        "use the same ones to resume, or another --out")
    files = list_images(cfg.data, cfg.max_images)
    pool = load_pool(files, cfg.size, cfg.progress)
    teacher = create_backbone(cfg.teacher, weights=cfg.teacher_weights)
    torch.manual_seed(cfg.seed)   # the initial student weights depend on the seed alone
    student = PDN(cfg.arch)
    student.train()
    opt = torch.optim.Adam(student.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    if ck is not None:
        target = Target(teacher, cfg.seed, proj=ck["proj"])
        target.mean, target.std = ck["mean"], ck["std"]
        student.net.load_state_dict(ck["student"])
        opt.load_state_dict(ck["optimizer"])
        g.set_state(ck["rng"])
        step, elapsed, history = int(ck["step"]), float(ck["elapsed"]), list(json.loads(ck["history"]))
    else:
        target = Target(teacher, cfg.seed)
        target.fit_stats(pool, cfg.stats_images, progress=cfg.progress)
        step, elapsed, history = 0, 0.0, []

    # fixed probe batch: first-crop of evenly spaced images, no augmentation (measures progress)
    pg = torch.Generator().manual_seed(cfg.seed + 1)
    pidx = np.linspace(0, len(pool) - 1, min(16, len(pool))).round().astype(int)
    px = pool[pidx].float()
    probe_x, probe_t = crops(px, target(px), cfg.crop, pg)

    def probe() -> float:
        student.eval()
        with torch.inference_mode():
            v = F.mse_loss(student.raw(student.normalize(probe_x)), probe_t).item()
        student.train()
        return v

    def checkpoint() -> None:
        _save(ckpt_path, {"identity": cfg.identity(), "student": student.net.state_dict(),
                          "optimizer": opt.state_dict(), "rng": rng_done, "step": step,
                          "elapsed": elapsed, "proj": target.proj, "mean": target.mean, "std": target.std,
                          "history": json.dumps(history)})

    if not history:
        history.append({"step": 0, "seconds": 0.0, "probe_loss": probe()})
    budget = cfg.minutes * 60.0
    cap = cfg.max_steps or 10**12
    total = cfg.max_steps if cfg.max_steps else None
    bar = tqdm(total=total, initial=step, desc=f"distill {cfg.arch} <- {cfg.teacher}", unit="step",
               disable=not cfg.progress, dynamic_ncols=True)
    last_ck = time.monotonic()
    ema = None
    rng_done = g.get_state()      # the generator as it was after the last finished step (what a resume needs)
    try:
        while elapsed < budget and step < cap:
            t0 = time.monotonic()
            idx = torch.randint(0, len(pool), (cfg.batch // cfg.crops_per_image,), generator=g)
            x = augment(pool[idx], g, cfg.gray_p, cfg.flip)
            t = target(x)
            if cfg.crops_per_image > 1:
                x = x.repeat_interleave(cfg.crops_per_image, 0)
                t = t.repeat_interleave(cfg.crops_per_image, 0)
            xc, tc = crops(x, t, cfg.crop, g)
            loss = F.mse_loss(student.raw(student.normalize(xc)), tc)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            rng_done = g.get_state()
            elapsed += time.monotonic() - t0
            lv = float(loss.item())
            ema = lv if ema is None else 0.95 * ema + 0.05 * lv
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}", min=f"{elapsed / 60:.1f}/{cfg.minutes:g}")
            if step % cfg.probe_every == 0:
                history.append({"step": step, "seconds": round(elapsed, 1), "train_loss_ema": round(ema, 5),
                                "probe_loss": probe()})
            if time.monotonic() - last_ck >= cfg.checkpoint_s:
                checkpoint()
                last_ck = time.monotonic()
    finally:
        bar.close()
        if step and (not history or history[-1]["step"] != step):
            history.append({"step": step, "seconds": round(elapsed, 1),
                            "train_loss_ema": None if ema is None else round(ema, 5), "probe_loss": probe()})
        checkpoint()
    student.eval()
    size = export_student(student, target, out / "student.pt")
    res = DistillResult(step, round(elapsed, 1), len(pool), history[0]["probe_loss"], history[-1]["probe_loss"],
                        ema if ema is not None else float("nan"), str(out / "student.pt"), size, history)
    write_text(out / "train.json", json.dumps({"config": asdict(cfg), "result": asdict(res),
                                               "this_run_wall_seconds": round(time.monotonic() - wall0, 1),
                                               "torch": torch.__version__, "threads": torch.get_num_threads()},
                                              indent=1))
    return res
