"""Shared fixtures, the test tiers, small synthetic cases.

Markers (registered in pyproject.toml, which passes --strict-markers):

* ``data``: needs the real data beside the checkout (``../shared/data``, or ``$FDSEG_DATA``);
* ``slow``: takes more than ~20 s on the project's 2-core CPU;
* ``browser``: drives chromium through Playwright;
* ``sam``: needs the SAM extras venv (``.venv-sam``, ``make test-sam``).

``pytest -m "not data and not slow"`` is the self-contained tier: synthetic images, the photos
scikit-image ships and the demo images in ``demo/`` only. A ``data`` test skips, with the reason,
when the data is missing, except where ``CI=true`` or ``FDSEG_REQUIRE_DATA=1``: there it fails, so
that CI never skips the real-data tests silently. A test that uses ``defects_root`` or
``distill_root`` without the ``data`` marker fails: every data-bound test is marked.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FDSEG_DATA", REPO.parent / "shared" / "data"))
DEMO = REPO / "demo"
DATA_FIXTURES = {"defects_root": SHARED / "defects", "distill_root": SHARED / "distill"}


def data_required() -> bool:
    """CI=true (or 1 / yes) or FDSEG_REQUIRE_DATA=1: missing real data fails a test instead of skipping it."""
    return (os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
            or os.environ.get("FDSEG_REQUIRE_DATA", "").strip() == "1")


def require_data(root: Path) -> Path:
    """``root`` if it is a folder; otherwise skip the test, or fail it where the data is required."""
    if root.is_dir():
        return root
    why = f"real test data not found at {root} (put shared/ beside the checkout or set FDSEG_DATA)"
    if data_required():
        pytest.fail(f"{why}; CI=true / FDSEG_REQUIRE_DATA=1 require it", pytrace=False)
    pytest.skip(f"{why}; CI=true or FDSEG_REQUIRE_DATA=1 would make this a failure")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture runs: an unmarked test that uses the data fails; a marked one checks the data."""
    used = sorted(n for n in DATA_FIXTURES if n in item.fixturenames)
    if item.get_closest_marker("data") is None:
        if used:
            pytest.fail(f"{item.nodeid} uses {', '.join(used)} but is not marked @pytest.mark.data",
                        pytrace=False)
        return
    for root in [DATA_FIXTURES[n] for n in used] or [SHARED]:
        require_data(root)


@pytest.fixture(scope="session")
def defects_root() -> Path:
    return require_data(DATA_FIXTURES["defects_root"])


@pytest.fixture(scope="session")
def distill_root() -> Path:
    return require_data(DATA_FIXTURES["distill_root"])


@dataclass(frozen=True)
class Demo:
    """The demo set shipped in demo/ (magnetic-tile blowholes, see demo/README.md)."""
    supports: list[tuple[Path, Path]]       # image, mask
    queries: list[tuple[Path, Path]]        # image, ground-truth mask
    free: list[Path]                        # defect-free tiles


def demo_set() -> Demo:
    sup = sorted(p for p in (DEMO / "supports").iterdir() if not p.stem.endswith("_mask"))
    qs = sorted((DEMO / "queries").iterdir())
    return Demo(supports=[(p, p.with_name(f"{p.stem}_mask.png")) for p in sup],
                queries=[(p, DEMO / "ground_truth" / f"{p.stem}.png") for p in qs
                         if (DEMO / "ground_truth" / f"{p.stem}.png").is_file()],
                free=[p for p in qs if not (DEMO / "ground_truth" / f"{p.stem}.png").is_file()])


@pytest.fixture(scope="session")
def demo() -> Demo:
    d = demo_set()
    assert len(d.supports) == 2 and len(d.queries) == 6 and len(d.free) == 2, d
    return d


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
