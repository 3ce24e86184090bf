"""Build a line-scan benchmark (long strips) from the shared defect classes.

Per class, each image is resized so that its short side is the strip's common short side S
(default: the class's median native short side), and one or more S x S crops are taken along
its long side (one crop: the position with the most defect pixels; more: evenly spaced,
``round(long / S - 0.25)`` of them). The crops of shuffled images are laid side by side into
horizontal strips of 8 x S by S (8:1) and 16 x S by S (16:1) pixels, masks laid out the same
way; no image is used twice in a class, so no strip shares pixels with another. Strip lengths
are shuffled, so episodes draw supports and queries of different lengths. Only strips with
defect pixels are written. Seeded (``random.Random(seed)`` per class), written atomically in
the fdseg layout, which ``fdseg bench --data OUT`` and ``fdseg.data.layouts.scan`` read:

    OUT/DATASET/CLASS/images/stripNN_Lx.png   OUT/DATASET/CLASS/masks/stripNN_Lx.png
    OUT/strips.json                            (settings and each strip's source images)

    python benchmarks/make_strips.py --out /tmp/strips [--data shared/data/defects]
        [--datasets magnetic_tile sd_saliency_900 crackforest] [--short class|PIXELS]
        [--lengths 8 16] [--strips 8] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from fdseg.atomic import encode_png, write_bytes, write_text  # noqa: E402
from fdseg.data.images import load_image, load_mask  # noqa: E402
from fdseg.data.layouts import scan  # noqa: E402
from fdseg.errors import InputError  # noqa: E402

TEXTURES = ("magnetic_tile", "sd_saliency_900", "crackforest")
MIN_STRIPS = 6          # 5-shot episodes need 5 supports + the query


def resize_short(img: np.ndarray, mask: np.ndarray, short: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (bilinear) and mask (bilinear on 0/255, > 127) with the short side at ``short`` px."""
    h, w = mask.shape
    s = short / min(h, w)
    size = (max(short, int(round(w * s))), max(short, int(round(h * s))))      # PIL: (W, H)
    if min(h, w) == short:
        return img, mask
    im = np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.BILINEAR)) > 127
    return im, m


def square_crops(img: np.ndarray, mask: np.ndarray, side: int, rng: random.Random
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``side x side`` crops along the long side of an image whose short side is ``side``."""
    h, w = mask.shape
    if min(h, w) != side:
        raise ValueError(f"short side {min(h, w)} != {side}")
    n_long = max(h, w)
    n = max(1, int(round(n_long / side - 0.25)))
    if n == 1:
        prof = mask.sum(0 if w >= h else 1).astype(np.int64)             # defect pixels per position
        win = np.convolve(prof, np.ones(side, np.int64), "valid")          # ... per window offset
        best = np.flatnonzero(win == win.max())
        offsets = [int(best[rng.randrange(len(best))])]
    else:
        offsets = [int(round(o)) for o in np.linspace(0, n_long - side, n)]
    out = []
    for o in offsets:
        if w >= h:
            out.append((img[:, o:o + side], mask[:, o:o + side]))
        else:
            out.append((img[o:o + side], mask[o:o + side]))
    return out


def concat_strip(tiles: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Square tiles side by side -> one horizontal strip (image, mask)."""
    return (np.concatenate([t[0] for t in tiles], axis=1), np.concatenate([t[1] for t in tiles], axis=1))


def plan_lengths(n_tiles: int, lengths: list[int], target: int, rng: random.Random) -> list[int]:
    """Strip lengths (in tiles) for a class with ``n_tiles`` tiles: of the strip counts from
    ``target`` down to ``MIN_STRIPS`` that fit at the shortest length, the one with the most even mix
    of the shortest and the longest length (up to half long; ties: more strips); any middle lengths
    replace short strips while tiles remain; shuffled."""
    a, b = min(lengths), max(lengths)
    best = (-1, 0, 0)
    for n in range(target, 0, -1):
        if n * a > n_tiles:
            continue
        n_long = 0 if a == b else min(n // 2, (n_tiles - n * a) // (b - a))
        if min(n_long, n - n_long) > best[0] and (n >= MIN_STRIPS or best[0] < 0):
            best = (min(n_long, n - n_long), n, n_long)
    _, n, n_long = best
    plan = [b] * n_long + [a] * (n - n_long)
    left = n_tiles - sum(plan)
    for i, L in enumerate(sorted(set(lengths))[1:-1]):
        j = n_long + i
        if j < len(plan) and left >= L - a:
            plan[j], left = L, left - (L - a)
    rng.shuffle(plan)
    return plan


def class_short_side(samples) -> int:
    from fdseg.data.images import image_size
    shorts = sorted(min(image_size(s.image)) for s in samples)
    return int(round(shorts[len(shorts) // 2] / 8)) * 8


def build_class(samples, short: int, lengths: list[int], target: int, rng: random.Random):
    """-> [(image, mask, length, [source stems])] for one class (only strips with defect pixels)."""
    order = list(samples)
    rng.shuffle(order)
    pool = []                            # (crop image, crop mask, source stem)
    for s in order:
        img = load_image(s.image)
        mask = load_mask(s.mask, size=img.shape[:2])
        img, mask = resize_short(img, mask, short)
        pool += [(ci, cm, s.stem) for ci, cm in square_crops(img, mask, short, rng)]
    plan = plan_lengths(len(pool), lengths, target, rng)
    strips, i = [], 0
    for L in plan:
        tiles, i = pool[i:i + L], i + L
        img, mask = concat_strip([(t[0], t[1]) for t in tiles])
        if mask.any():
            strips.append((img, mask, L, sorted({t[2] for t in tiles})))
    return strips


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "defects"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--datasets", nargs="+", default=list(TEXTURES))
    ap.add_argument("--short", default="class", help="strip short side: 'class' (median native short side "
                                                     "of the class, rounded to 8) or pixels")
    ap.add_argument("--lengths", nargs="+", type=int, default=[8, 16], help="strip lengths in tiles (L:1)")
    ap.add_argument("--strips", type=int, default=8, help="strips per class (at most; fewer if images run out)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if any(L < 1 for L in a.lengths):
        raise InputError("--lengths", f"lengths must be >= 1, got {a.lengths}")
    if a.short != "class" and (not a.short.isdigit() or int(a.short) < 32):
        raise InputError("--short", f"'class' or a number of pixels >= 32, got {a.short!r}")
    cat = scan(a.data).subset(a.datasets)
    out = Path(a.out)
    manifest = {"source": str(Path(a.data).resolve()), "seed": a.seed, "lengths": a.lengths,
                "short": a.short, "classes": {}}
    for ds in sorted(cat.classes):
        for cls in sorted(cat.classes[ds]):
            samples = sorted(cat.classes[ds][cls], key=lambda s: s.image.name)
            short = class_short_side(samples) if a.short == "class" else int(a.short)
            rng = random.Random(f"{a.seed}/{ds}/{cls}")
            strips = build_class(samples, short, a.lengths, a.strips, rng)
            rows = []
            for j, (img, mask, L, src) in enumerate(strips):
                stem = f"strip{j:02d}_{L}x"
                grey = img.ndim == 3 and (img == img[..., :1]).all()
                write_bytes(out / ds / cls / "images" / f"{stem}.png", encode_png(img[..., 0] if grey else img))
                write_bytes(out / ds / cls / "masks" / f"{stem}.png", encode_png(mask))
                rows.append({"stem": stem, "length": L, "size": list(mask.shape), "defect_fraction":
                             round(float(mask.mean()), 5), "sources": src})
            manifest["classes"][f"{ds}/{cls}"] = {"short": short, "strips": rows}
            flag = "" if len(strips) >= MIN_STRIPS else f"  (fewer than {MIN_STRIPS}: no 5-shot episodes)"
            print(f"{ds}/{cls}: {len(strips)} strips, short side {short}, lengths "
                  f"{[r['length'] for r in rows]}{flag}", flush=True)
    write_text(out / "strips.json", json.dumps(manifest, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
