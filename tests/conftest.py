"""Shared fixtures: the real defect data beside the checkout, small synthetic cases."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FDSEG_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def defects_root() -> Path:
    root = SHARED / "defects"
    if not root.is_dir():
        pytest.fail(f"real test data not found at {root}: put shared/ beside the checkout or set FDSEG_DATA")
    return root


@pytest.fixture(scope="session")
def distill_root() -> Path:
    root = SHARED / "distill"
    if not root.is_dir():
        pytest.fail(f"real test data not found at {root}")
    return root


def texture(h: int, w: int, seed: int, kind: str = "noise") -> np.ndarray:
    """Synthetic RGB textures: 'noise' (fine grey grain) or 'stripes' (bold diagonal bands)."""
    rng = np.random.default_rng(seed)
    if kind == "noise":
        base = 120 + rng.normal(0, 12, (h, w))
        return np.repeat(np.clip(base, 0, 255).astype(np.uint8)[..., None], 3, 2)
    yy, xx = np.mgrid[0:h, 0:w]
    s = ((xx + yy) // 6) % 2
    img = np.stack([40 + 200 * s, 30 + 40 * s, 200 - 150 * s], -1) + rng.normal(0, 5, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def planted(h: int, w: int, box: tuple[int, int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise background with a striped patch at box = (y0, x0, y1, x1); returns image, mask."""
    img = texture(h, w, seed, "noise")
    y0, x0, y1, x1 = box
    img[y0:y1, x0:x1] = texture(y1 - y0, x1 - x0, seed + 1000, "stripes")
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return img, m


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 1.0
