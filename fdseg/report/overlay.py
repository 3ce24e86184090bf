"""Pictures people look at: mask overlays, score heat maps, side-by-side panels."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

RED = (255, 40, 40)
GREEN = (40, 220, 80)

# A perceptual "inferno"-like ramp, 6 anchors linearly interpolated to 256 entries.
_ANCHORS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [187, 55, 84], [249, 142, 9], [252, 255, 164]], float)
_LUT = np.stack([np.interp(np.linspace(0, 5, 256), np.arange(6), _ANCHORS[:, c]) for c in range(3)], 1).astype(np.uint8)


def mask_edges(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boundary pixels of a boolean mask."""
    from scipy import ndimage
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return m
    inner = ndimage.binary_erosion(m, iterations=width, border_value=0)
    return m & ~inner


def overlay(rgb: np.ndarray, mask: np.ndarray, color=RED, alpha: float = 0.45, edge: bool = True) -> np.ndarray:
    """Tint the masked pixels and draw their outline."""
    out = rgb.astype(np.float32).copy()
    m = np.asarray(mask, dtype=bool)
    c = np.array(color, np.float32)
    out[m] = (1 - alpha) * out[m] + alpha * c
    if edge:
        w = max(1, round(max(rgb.shape[:2]) / 300))
        out[mask_edges(m, w)] = c
    return np.clip(out, 0, 255).astype(np.uint8)


def heatmap(score: np.ndarray) -> np.ndarray:
    """[0, 1] float map -> HxWx3 uint8 colour image."""
    idx = np.clip(np.nan_to_num(score) * 255, 0, 255).astype(np.uint8)
    return _LUT[idx]


def fit_height(rgb: np.ndarray, height: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    if h == height:
        return rgb
    nw = max(1, round(w * height / h))
    return np.array(Image.fromarray(rgb).resize((nw, height), Image.BILINEAR))


def panel(images: list[np.ndarray], captions: list[str], height: int = 180, gap: int = 4) -> np.ndarray:
    """Images side by side at one height, each with a caption strip above."""
    tiles = [fit_height(im if im.ndim == 3 else np.repeat(im[..., None], 3, 2), height) for im in images]
    cap = 16
    width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, height + cap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for t, c in zip(tiles, captions):
        canvas.paste(Image.fromarray(t), (x, cap))
        draw.text((x + 2, 2), c[: max(4, t.shape[1] // 6)], fill=(0, 0, 0))
        x += t.shape[1] + gap
    return np.array(canvas)
