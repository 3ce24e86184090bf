"""The FM-SAM fusion rules on synthetic masks with hand-checked answers, and the superpixel proposer."""
from __future__ import annotations

import numpy as np
import pytest

from fdseg.errors import InputError
from fdseg.refine import FusionRules, Refiner, create_proposer, deoverlap, list_proposers, refine, select

from conftest import iou


def box(shape, y0, x0, y1, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


S = (100, 100)
NO_RING = dict(boundary=False)


def test_selection_thresholds():
    pred = box(S, 0, 0, 10, 10)                         # 100 px
    a = box(S, 7, 0, 17, 10)                            # 100 px, 30 px overlap -> 0.3 > 0.2: joins
    b = box(S, 0, 8, 10, 18)                            # 20 px overlap -> 0.2 is not > 0.2: stays out
    out = refine(pred, [a, b], **NO_RING)
    assert (out == (pred | a)).all()


def test_large_candidate_needs_strong_overlap():
    pred = box(S, 0, 0, 50, 50)                          # 2500 px
    big = box(S, 0, 0, 50, 100)                          # 5000 px >= 0.4 * 10000, overlap 0.5 <= 0.6
    assert (refine(pred, [big], **NO_RING) == pred).all()
    pred2 = box(S, 0, 0, 50, 70)                         # overlap 3500 / 5000 = 0.7 > 0.6: joins
    assert (refine(pred2, [big], **NO_RING) == big | pred2).all()
    # the thresholds are parameters
    assert (refine(pred, [big], strong_overlap=0.4, **NO_RING) == big).all()
    assert (refine(pred, [big], max_area=0.6, **NO_RING) == big).all()


def test_deoverlap_smallest_first():
    small = box(S, 40, 40, 50, 50)                      # 100 px
    big = box(S, 35, 35, 55, 55)                        # 400 px, holds small
    lab = deoverlap([big, small], S)
    assert (lab[small] == 1).all() and (lab[big & ~small] == 2).all() and (lab[~big] == 0).all()
    # pred = small: without de-overlap big would overlap 100/400 = 0.25 > 0.2 and join;
    # de-overlapped it keeps only its 300-pixel ring with no overlap and stays out
    out = refine(small, [big, small], **NO_RING)
    assert (out == small).all()
    assert list(select(small, lab)) == [1]


def test_label_map_equals_stack():
    rng = np.random.default_rng(0)
    lab = (rng.integers(0, 4, (10, 10)).repeat(10, 0).repeat(10, 1)).astype(np.int32)
    stack = np.stack([lab == k for k in range(1, 4)])
    pred = box(S, 20, 20, 70, 60)
    assert (refine(pred, lab) == refine(pred, stack)).all()


def test_boundary_ring_removed_when_component_inside():
    shape = (256, 256)                                   # reference size: 21 x 21 square, radius 10
    cand = box(shape, 100, 100, 140, 140)
    pred = box(shape, 95, 95, 145, 145)                  # spills 5 px around the candidate
    out = refine(pred, [cand])
    assert (out == cand).all()                           # the whole spill lies in the ring
    assert (refine(pred, [cand], boundary=False) == pred).all()


def test_boundary_kept_when_component_reaches_far():
    shape = (256, 256)
    cand = box(shape, 100, 100, 140, 140)
    pred = box(shape, 95, 95, 145, 145) | box(shape, 118, 145, 122, 250)   # + a 105 x 4 bar
    # component 2500 + 420 px, inside the dilated candidate 2500 + 20: 86 % <= 90 % -> unchanged
    assert (refine(pred, [cand]) == pred).all()
    # with a 85 % rule the ring goes, the bar beyond the ring stays
    out = refine(pred, [cand], boundary_fraction=0.85)
    assert (out == (cand | box(shape, 118, 150, 122, 250))).all()


def test_dilation_scales_with_resolution():
    r = FusionRules()
    assert r.kernel((256, 256)) == 21 and r.kernel((512, 700)) == 43 and r.kernel((128, 128)) == 11
    shape = (512, 512)
    cand = box(shape, 200, 200, 280, 280)
    pred = box(shape, 185, 185, 295, 295)                # 15 px spill: inside the 21 px radius at 512
    assert (refine(pred, [cand]) == cand).all()


def test_no_candidates_leave_prediction_unchanged():
    pred = box(S, 10, 10, 30, 30)
    for c in ([], np.zeros((0, *S), bool), np.zeros(S, np.int32), [np.zeros(S, bool)]):
        out = refine(pred, c)
        assert (out == pred).all() and out is not pred
    empty = np.zeros(S, bool)
    assert not refine(empty, [box(S, 0, 0, 10, 10)]).any()   # nothing predicted -> nothing joins


def test_bad_shapes_are_named():
    with pytest.raises(InputError, match="candidate mask is"):
        refine(np.zeros(S, bool), [np.zeros((10, 10), bool)])
    with pytest.raises(InputError, match="label map"):
        refine(np.zeros(S, bool), np.zeros((10, 10), np.int32))
    with pytest.raises(InputError, match="H x W"):
        refine(np.zeros((2, *S), bool), [])


def test_superpixel_proposer_snaps_a_coarse_mask():
    assert "superpixel" in list_proposers()
    rng = np.random.default_rng(1)
    img = np.clip(120 + rng.normal(0, 6, (128, 160, 3)), 0, 255).astype(np.uint8)
    gt = np.zeros((128, 160), bool)
    yy, xx = np.mgrid[:128, :160]
    gt[(yy - 60) ** 2 + (xx - 70) ** 2 < 22 ** 2] = True           # a dark disc
    img[gt] = np.clip(40 + rng.normal(0, 6, (int(gt.sum()), 3)), 0, 255).astype(np.uint8)
    coarse = box(gt.shape, 36, 46, 84, 94)                          # a blocky box around the disc
    for algo in ("felzenszwalb", "slic"):
        prop = create_proposer("superpixel", algorithm=algo)
        cands = prop.propose(img)
        assert cands.shape == gt.shape and cands.dtype == np.int32 and cands.min() >= 1
        out = Refiner(prop)(img, coarse)
        assert out.dtype == bool and out.shape == gt.shape
    # Felzenszwalb keeps the disc in few segments: the box's corners lie in the ring and go
    out = Refiner("superpixel")(img, coarse)
    assert iou(out, gt) > iou(coarse, gt) + 0.1           # 0.66 -> 0.82
    with pytest.raises(InputError, match="felzenszwalb or slic"):
        create_proposer("superpixel", algorithm="watershed")


def test_refiner_splits_options_and_resizes_image():
    r = Refiner("superpixel", {"scale": 50, "min_overlap": 0.5, "dilation": 11})
    assert r.rules.min_overlap == 0.5 and r.rules.dilation == 11 and r.proposer.scale == 50
    img = np.zeros((200, 300, 3), np.uint8)
    img[50:150, 100:200] = 255
    m = np.zeros((100, 150), bool)                      # mask at half the image's resolution
    m[25:75, 50:100] = True
    out = r(img, m)
    assert out.shape == (100, 150)
    with pytest.raises(InputError, match="unknown refine"):
        Refiner("nope")
