"""Defect-free images ("normals") as background, the image-level verdict and AUROC.

Real images: the demo's blowhole supports, the distillation pool's defect-free magnetic tiles
(``shared/data/distill``) as normals and as OK queries (never the same files)."""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fdseg
from fdseg.errors import InputError
from fdseg.methods.normal_bank import (DEFAULT_BUDGET, POOL, candidate_cells, check_size_class, normal_bank,
                                      normal_sample)
from fdseg.metrics import auroc, dataset_scores
from fdseg.normals import NormalPool, bench_pools, collect_normals, evenly, group_matches
from fdseg.pipeline.finish import largest_component, verdict


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=0)


# -- the normal bank: bounded, remembered, size classes (synthetic) --------------------------------

def test_normal_sample_is_a_uniform_draw_over_all_cells():
    grids = [_unit(8, 10, 10, seed=1), _unit(8, 20, 20, seed=2)]        # 100 + 400 cells
    rows = normal_sample(grids, 50, seed=0)
    assert rows.shape == (50, 8) and torch.equal(rows, normal_sample(grids, 50, seed=0))   # seeded
    # the same draw as a permutation of all the cells concatenated (which it never builds)
    every = torch.cat([g.flatten(1).T for g in grids])
    assert torch.equal(rows, every[torch.randperm(500, generator=torch.Generator().manual_seed(0))[:50]])
    assert not torch.equal(rows, normal_sample(grids, 50, seed=1))
    assert normal_sample(grids, 1000).shape == (500, 8)                   # fewer cells than asked: all


def test_normal_pool_reads_a_classes_normals_folder_not_its_defect_images(tmp_path):
    """A dataset class laid out as images/ + masks/ + normals/ (the transfer sets): its defect-free images
    are normals/ (or good/); images/ are normals only where no masks/ lie beside them."""
    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    for rel in ("ds/a/images/d1.png", "ds/a/masks/d1.png", "ds/a/normals/n1.png", "ds/a/normals/n2.png",
                "ds/b/images/g1.png", "ds/c/good/g2.png", "ds/c/images/d2.png", "ds/c/masks/d2.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / rel)
    pool = NormalPool.scan(tmp_path)
    assert {g: [p.name for p in fs] for g, fs in pool.groups.items()} == \
        {"ds/a": ["n1.png", "n2.png"], "ds/b": ["g1.png"], "ds/c": ["g2.png"]}


def test_normal_head_modes():
    from fdseg.methods.fm import FeatureMatching
    assert [FeatureMatching(normal_head=v).normal_head for v in (True, False, "bank", "sample", "off")] == \
        ["sample", "off", "bank", "sample", "off"]
    assert FeatureMatching().normal_head == "sample"
    with pytest.raises(InputError, match="normal_head"):
        FeatureMatching(normal_head="kcenter")


def test_normal_bank_option_keeps_the_normals_out_of_the_matching_bank():
    from fdseg.methods.base import Support
    from fdseg.methods.fm import FeatureMatching
    feats = _unit(8, 12, 12, seed=3)
    cov = torch.zeros(12, 12)
    cov[4:7, 4:7] = 1.0                                                 # 9 defect cells, 135 background
    normals = [_unit(8, 12, 12, seed=10 + i) for i in range(3)]         # 432 cells
    plain, both, head_only = (FeatureMatching(**kw) for kw in ({}, {"normal_bank": "true"}, {}))
    plain.fit([Support(None, None, feats, cov)])
    both.fit([Support(None, None, feats, cov)], normals=normals)
    head_only.fit([Support(None, None, feats, cov)], normals=normals)
    assert (len(plain.bg), len(both.bg), len(head_only.bg)) == (135, 135 + 432, 135)
    assert head_only.n_normal_cells == 0 and head_only.n_normals == 3 and head_only.n_head_normal_cells == 432
    assert not FeatureMatching().normal_bank                            # the default: the head alone
    assert torch.equal(head_only.bg, plain.bg)
    assert torch.equal(head_only.head_w, both.head_w)                  # the head sees the same normal cells
    assert not torch.equal(head_only.head_w, plain.head_w)
    assert [FeatureMatching(normal_bank=v).normal_bank for v in (True, False, "true", "false", 0)] == \
        [True, False, True, False, False]
    with pytest.raises(InputError, match="normal_bank"):
        FeatureMatching(normal_bank="maybe")


def test_normal_bank_is_bounded_by_the_budget_and_keeps_small_sets_whole():
    small = [_unit(8, 4, 4, seed=i) for i in range(3)]                 # 48 cells < budget
    assert normal_bank(small, budget=64).shape == (48, 8)
    many = [_unit(8, 16, 16, seed=i) for i in range(20)]               # 5120 cells
    bank = normal_bank(many, budget=100)
    assert bank.shape == (100, 8)
    assert normal_bank(many, budget=100) is bank                       # the same normals: reduced once
    assert normal_bank(many[:-1], budget=100) is not bank
    cand = candidate_cells(many, POOL * 100)
    assert abs(len(cand) - POOL * 100) <= len(many)                     # each image its share, rounded
    assert DEFAULT_BUDGET == 4096


def test_greedy_normal_bank_covers_rare_cells():
    """A rare appearance in one normal (the kind that gives false alarms) is kept in the bank."""
    common = torch.nn.functional.normalize(torch.ones(8, 1, 1) + 0.01 * torch.randn(8, 16, 16), dim=0)
    rare = common.clone()
    rare[:, 3, 3] = torch.nn.functional.normalize(torch.tensor([1.0, -1, 1, -1, 1, -1, 1, -1]), dim=0)
    bank = normal_bank([common] * 9 + [rare], budget=16)
    assert float((bank @ rare[:, 3, 3]).max()) > 0.999


def test_size_class_rejects_a_strip_and_another_scale_naming_the_normal():
    check_size_class([(64, 64)], [(64, 48), (48, 64), (64, 64)])             # same scale, any aspect below 4:1
    with pytest.raises(InputError, match="normal image 2.*size class.*a strip"):
        check_size_class([(64, 64)], [(64, 64), (16, 256)])
    with pytest.raises(InputError, match="normal image 1.*64x43"):          # at zoom 1 while supports zoomed
        check_size_class([(128, 85)], [(64, 43)])


# -- AUROC and the verdict rule (known answers) -----------------------------------------------------

def test_auroc_known_answers():
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75             # 3 of 4 pairs ordered
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5                        # ties count one half
    assert auroc([1, 2, 2, 3], [0, 1, 0, 1]) == pytest.approx(0.875)       # (1 + 0.5 + 1 + 1) / 4
    assert auroc([1, 2], [1, 1]) is None
    with pytest.raises(ValueError):
        auroc([1, 2, 3], [0, 1])


def test_dataset_scores_image_level():
    eps = [{"cls": "a", "tp": 5, "fp": 0, "fn": 0, "tn": 95, "defect_score": 0.3, "is_defective": True},
           {"cls": "a", "tp": 0, "fp": 0, "fn": 5, "tn": 95, "defect_score": -0.1, "is_defective": False},
           {"cls": "a", "defect_free": True, "tp": 0, "fp": 2, "fn": 0, "tn": 98, "defect_score": 0.1,
            "is_defective": True},
           {"cls": "a", "defect_free": True, "tp": 0, "fp": 0, "fn": 0, "tn": 100, "defect_score": -0.2,
            "is_defective": False}]
    s = dataset_scores("d", ["a"], eps)
    assert s.auroc == 0.75 and s.ok_flagged == 0.5 and s.defect_flagged == 0.5 and s.defect_free == 2
    assert dataset_scores("d", ["a"], eps[:2]).auroc is None                 # no OK query: no AUROC


def test_verdict_rule_on_a_known_mask():
    grid = np.full((4, 4), -0.3, np.float32)
    grid[1, 1] = 0.2
    mask = np.zeros((64, 64), bool)
    mask[10:20, 10:20] = True                       # 100 px = 100 * 16 / 4096 = 0.39 cells: a speck
    score, bad, cells = verdict(grid, mask, threshold=-0.05)
    assert score == pytest.approx(0.25) and not bad and cells == pytest.approx(100 * 16 / 4096)
    mask[30:50, 30:50] = True                       # 400 px = 1.56 cells
    assert largest_component(mask) == 400
    assert verdict(grid, mask, 0.0)[1] and not verdict(grid, mask, 0.0, min_cells=2)[1]
    assert not verdict(grid, np.zeros_like(mask), 0.0)[1]


# -- pools: which normals go with which class; OK queries never among normals -----------------------

def test_group_matching_rule():
    assert group_matches("magnetic_tile", "magnetic_tile", "blowhole")
    assert group_matches("visa_capsules", "visa", "capsules")
    assert group_matches("visa_macaroni1", "visa", "macaroni1_small_cracks")
    assert not group_matches("visa_macaroni1", "visa", "capsules")
    assert group_matches("visa/capsules", "visa", "capsules") and group_matches("", "x", "y")
    assert not group_matches("bsdata", "sd_saliency_900", "inclusion")


def test_folder_layouts(tmp_path):
    for rel in ("ds/cls/a.png", "ds/cls/b.png", "ds/c.png", "flat.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / rel)
    pool = NormalPool.scan(tmp_path)
    assert [p.name for p in pool.files("ds", "cls")] == ["a.png", "b.png"]     # the longest group wins
    assert [p.name for p in pool.files("ds", "other")] == ["c.png"]
    assert [p.name for p in pool.files("zz", "q")] == ["flat.png"]
    assert [p.name for p in collect_normals([tmp_path / "ds" / "cls", tmp_path / "flat.png"])] == \
        ["a.png", "b.png", "flat.png"]
    with pytest.raises(InputError, match="does not exist"):
        collect_normals([tmp_path / "nope"])
    with pytest.raises(InputError, match="no image files"):
        (tmp_path / "empty").mkdir()
        collect_normals([tmp_path / "empty"])
    assert evenly(list(range(10)), 3) == [0, 4, 9] and evenly([1, 2], 5) == [1, 2]


@pytest.mark.data
def test_distill_pool_maps_to_the_defect_classes_and_keeps_ok_queries_out(defects_root, distill_root, tmp_path):
    from fdseg.data.layouts import scan
    pool = NormalPool.scan(distill_root)
    assert {g: len(v) for g, v in pool.groups.items()} == {"bsdata": 355, "magnetic_tile": 937,
                                                           "visa_capsules": 400, "visa_macaroni1": 400}
    assert pool.group_for("visa", "macaroni1_small_cracks") == "visa_macaroni1"
    assert pool.group_for("bsdata", "pitting") == "bsdata" and pool.group_for("crackforest", "crack") is None
    cat = scan(defects_root).subset(classes=["blowhole", "pitting", "crack"], max_per_class=2)
    normals, oks = bench_pools(cat, distill_root, 6, distill_root, 3, tmp_path / "cache")
    assert set(normals) == set(oks) == {("magnetic_tile", "blowhole"), ("magnetic_tile", "crack"),
                                        ("bsdata", "pitting")}                   # crackforest: none
    for key in normals:
        assert len(normals[key]) == 6 and len(oks[key]) == 3
        src = lambda p: p.name.split("_1130x460")[0].split("_1540x645")[0]   # noqa: E731 (restored copies)
        assert not {src(p) for p in normals[key]} & {src(p) for p in oks[key]}
    # bsdata's pool copies (512 px) are restored to the source size, the scale of the defect images
    with Image.open(normals[("bsdata", "pitting")][0]) as im:
        assert im.size in ((1130, 460), (1540, 645))


# -- the segmenter with normals on real images ---------------------------------------------------------

@pytest.fixture(scope="module")
def mt(demo, distill_root):
    """(support image, mask), 12 OK queries and 60 normals (disjoint) of the magnetic-tile pool."""
    files = NormalPool.scan(distill_root).files("magnetic_tile", "blowhole")
    oks = evenly(files, 12)
    rest = [p for p in files if p not in set(oks)]
    return demo.supports[0], oks, rest[:60]


@pytest.mark.data
def test_normals_grow_the_bank_then_it_is_bounded_and_margins_drop(mt):
    torch.set_num_threads(1)
    (s_img, s_mask), oks, normals = mt
    # the normals in the matching bank (normal_bank=True), the head kept on the supports' cells
    # (normal_head=False): the margins can only drop; the default (the normals in the head's background
    # only, the bank the supports' own) is checked at the end
    seg = fdseg.FewShotSegmenter(preset="fast", cache_size=128, ok_gate="off",
                                 method_options={"normal_head": False, "normal_bank": True})
    seg.fit([s_img], [s_mask])
    bg0 = seg.method.describe()["bg_cells"]
    plain = [seg.margins(q)[0] for q in oks[:4]]
    cells = seg.margins(normals[0])[0].numel()               # the normal's grid, as a query's
    seg.fit([s_img], [s_mask], normals=normals[:1])          # one normal: all of its cells
    assert seg.method.describe()["bg_cells"] == bg0 + cells and seg.method.describe()["normals"] == 1
    seg.fit([s_img], [s_mask], normals=normals[:2])
    assert seg.method.describe()["bg_cells"] == bg0 + DEFAULT_BUDGET      # 8192 cells -> the budget
    seg.fit([s_img], [s_mask], normals=normals)
    d = seg.method.describe()
    assert d["bg_cells"] == bg0 + DEFAULT_BUDGET and d["normals"] == 60 and d["normal_cells"] == DEFAULT_BUDGET
    with_normals = [seg.margins(q)[0] for q in oks[:4]]
    for a, b in zip(plain, with_normals):
        assert (b <= a + 0.01).all()                         # more background evidence: no margin rises (bf16)
        assert float(b.mean()) < float(a.mean()) - 0.005    # and on a normal-like query they drop
    seg.fit([s_img], [s_mask], normals=[])                   # zero normals: as without
    assert seg.method.describe()["bg_cells"] == bg0
    assert all(torch.equal(seg.margins(q)[0], m) for q, m in zip(oks[:2], plain))
    default = fdseg.FewShotSegmenter(preset="fast", cache_size=128).fit([s_img], [s_mask], normals=normals)
    assert default.method.normal_head == "sample" and default.method.describe()["bg_cells"] == bg0
    assert default.method.describe()["normal_head_cells"] == 65536               # of 50 grids' 204,800 cells
    # the default gate holds every fifth normal out of the fit (10 of 60) to calibrate its level
    assert default.method.describe()["normals"] == 50 and isinstance(default.plan.get("ok gate"), float)
    # the default: only the head's vote moves (bounded), so on defect-free tiles the cells matched as
    # defect can only get fewer and the top margins drop (measured: 41 -> 34 cells, max -0.026 on average)
    seg.fit([s_img], [s_mask])
    before = [seg.margins(q)[0] for q in oks]
    after = [default.margins(q)[0] for q in oks]
    assert all(int((b > 0).sum()) <= int((a > 0).sum()) for a, b in zip(before, after))
    assert sum(int((b > 0).sum()) for b in after) < sum(int((a > 0).sum()) for a in before)
    assert np.mean([float(b.max() - a.max()) for a, b in zip(before, after)]) < -0.01


@pytest.mark.data
def test_verdicts_on_defect_free_queries_are_mostly_ok(mt, demo):
    (s_img, s_mask), oks, normals = mt
    seg = fdseg.FewShotSegmenter(cache_size=128).fit([s_img], [s_mask])
    free = seg.predict(list(oks))
    assert sum(p.is_defective for p in free) <= 4, [p.defect_score for p in free]       # measured 3 of 12
    bad = seg.predict([q for q, _ in demo.queries])
    assert sum(p.is_defective for p in bad) >= 3                                        # measured 4 of 6
    scores = [p.defect_score for p in bad] + [p.defect_score for p in free]
    assert auroc(scores, [1] * len(bad) + [0] * len(free)) >= 0.75
    for p in free + bad:
        assert p.is_defective == (p.largest_cells >= 1) and p.verdict in ("ok", "defective")
        assert (p.defect_score > 0) or not p.mask.any()      # a predicted pixel needs a margin above the threshold


def test_ok_gate_holds_out_every_fifth_normal_and_takes_the_median():
    from fdseg.pipeline.post import OK_GATE_MAX, OkGate
    assert OkGate().mode == "auto" and OkGate().per_component and not OkGate("median").per_component
    auto = OkGate()
    assert auto.split(24) == (list(range(24)), [])                          # 4 would be held out: too few
    fit, held = auto.split(25)
    assert held == [4, 9, 14, 19, 24] and len(fit) == 20
    level, d = auto.fit([0.4, -0.2, 0.0, 0.1, 0.2], 25)                     # sorted -0.2 0 0.1 0.2 0.4
    # Harrell-Davis: Beta(1.5, 4.5) weights of the order statistics 0.451 0.365 0.150 0.033 0.002
    assert level == pytest.approx(-0.2 * 0.4507 + 0.1 * 0.1496 + 0.2 * 0.0327 + 0.4 * 0.0022, abs=2e-4)
    assert "lower quartile (Harrell-Davis)" in d.reason and "5 defect-free" in d.reason
    from fdseg.pipeline.post import harrell_davis
    assert harrell_davis([3.0], 0.25) == 3.0 and harrell_davis([1, 2, 3], 0.5) == pytest.approx(2.0)
    x = np.random.default_rng(0).normal(size=4001)
    assert harrell_davis(x, 0.25) == pytest.approx(np.quantile(x, 0.25), abs=0.02)   # many values: the quantile
    assert auto.fit([], 24)[0] is None and "< 25" in auto.fit([], 24)[1].reason
    gate = OkGate("median")
    assert gate.split(4) == ([0, 1, 2, 3], [])                              # under 5 normals: no gate
    fit, held = gate.split(12)
    assert held == [4, 9] and fit == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11]
    fit, held = gate.split(200)
    assert len(held) == OK_GATE_MAX == 10 and held[-1] == 49 and len(fit) == 190
    assert OkGate("off").split(12) == (list(range(12)), [])
    level, d = gate.fit([0.3, -0.1, 0.05], 15)
    assert level == pytest.approx(0.05) and d.step == "ok gate" and "3 defect-free" in d.reason
    assert gate.fit([], 3)[0] is None and "< 5" in gate.fit([], 3)[1].reason
    assert OkGate("off").fit([0.1], 12)[0] is None
    with pytest.raises(InputError, match="ok_gate"):
        OkGate("max")


def test_finish_gate_empties_a_query_no_more_defective_than_the_ok_level():
    from fdseg.pipeline.finish import finish
    from fdseg.pipeline.post import Post
    margin = torch.full((8, 8), -0.5)
    margin[2:4, 2:4] = 0.25                                  # a 2 x 2-cell defect, defect score 0.25
    for level, gated in ((None, False), (0.1, False), (0.25, True), (0.5, True)):   # not above the level: OK
        p = finish(margin, (64, 64), Post(0.0, ok_level=level), 0.1)
        assert p.ok_gated == gated and p.defect_score == 0.25   # the score is kept for ranking
        assert p.mask.any() == (not gated) and p.is_defective == (not gated) and bool(p.boxes) == (not gated)
        assert (p.score < 0.5).all() == gated


def test_finish_auto_gate_removes_only_the_components_no_stronger_than_the_level():
    from fdseg.pipeline.finish import finish
    from fdseg.pipeline.post import Post
    margin = torch.full((16, 16), -0.5)
    margin[2:5, 2:5] = 0.2                                   # a faint region (peak 0.2) ...
    margin[10:13, 9:13] = 0.3
    margin[11, 10] = 0.6                                     # ... and a strong one (peak 0.6)
    plain = finish(margin, (128, 128), Post(0.0), 0.1)
    assert len(plain.boxes) == 2
    for level, n_left in ((None, 2), (0.1, 2), (0.25, 1), (0.6, 0), (0.9, 0)):
        p = finish(margin, (128, 128), Post(0.0, ok_level=level, ok_components=True), 0.1)
        assert len(p.boxes) == n_left and p.ok_gated == (n_left == 0) and p.is_defective == (n_left > 0)
        assert p.defect_score == pytest.approx(0.6)          # kept for ranking
        assert ((p.score > 0.5) == p.mask).all()             # the score map follows the mask
        assert not (p.mask & ~plain.mask).any()              # the gate only removes
        if n_left == 1:                                      # the strong region is kept whole
            assert p.boxes[0][1] >= 64 and np.array_equal(p.mask[64:], plain.mask[64:])
            assert not p.mask[:64].any()


def test_finish_soft_gate_keeps_a_weak_components_core_and_strong_components_whole():
    """``ok_soft``: a pixel stays where its margin plus its component's peak (both above the threshold) exceeds
    the level: a component above the level stays whole, one under half of it goes, one between keeps its core;
    the kept pixels change little when the level moves a little (no all-or-nothing flip)."""
    from fdseg.data.preprocess import upsample_scores
    from fdseg.pipeline.finish import finish
    from fdseg.pipeline.post import Post
    margin = torch.full((16, 16), -0.5)
    margin[1:6, 1:6] = 0.05
    margin[2:5, 2:5] = 0.15
    margin[3, 3] = 0.2                                       # a faint region, peak 0.2, core 0.15-0.2 ...
    margin[10:13, 9:13] = 0.3
    margin[11, 10] = 0.6                                     # ... and a strong one (peak 0.6)
    plain = finish(margin, (128, 128), Post(0.0), 0.1)
    e = upsample_scores(margin, (128, 128)).numpy()
    faint = plain.mask.copy()
    faint[64:] = False
    peak = float(e[faint].max())
    for level in (0.1, 0.25, 0.3, 0.35, 0.5, 0.7):
        p = finish(margin, (128, 128), Post(0.0, ok_level=level, ok_components=True, ok_soft=True), 0.1)
        assert not (p.mask & ~plain.mask).any()                               # it only removes
        want = faint & (e + peak > level)
        assert np.array_equal(p.mask[:64], want[:64])                        # the faint one: its core
        if level < 0.6:
            assert np.array_equal(p.mask[64:], plain.mask[64:])              # the strong one: whole
        assert p.defect_score == pytest.approx(0.6) and ((p.score > 0.5) == p.mask).all()
        assert p.ok_gated == (not p.mask.any()) and len(p.boxes) == int(want.any()) + int(p.mask[64:].any())
    core = lambda lv: int(finish(margin, (128, 128), Post(0.0, ok_level=lv, ok_components=True, ok_soft=True),
                                 0.1).mask[:64].sum())
    assert core(0.1) == int(faint.sum()) and 0 < core(0.3) < int(faint.sum()) and core(0.5) == 0   # > 2 x peak: gone
    assert abs(core(0.30) - core(0.31)) < 0.2 * core(0.30)               # a small move of the level, a small change
    hard = lambda lv: int(finish(margin, (128, 128), Post(0.0, ok_level=lv, ok_components=True), 0.1).mask[:64].sum())
    assert hard(peak - 0.005) == int(faint.sum()) and hard(peak + 0.005) == 0   # the hard rule flips at the peak


def test_finish_makes_the_score_map_on_first_use_and_labels_only_the_masks_box():
    """The H x W score map is made when asked for, equal to the eager rule; the components, labelled
    inside the mask's bounding box, give the boxes and sizes of the whole mask's labelling."""
    from fdseg.data.preprocess import upsample_scores
    from fdseg.pipeline.finish import components, finish
    from fdseg.pipeline.post import Post

    margin = torch.full((20, 30), -0.4)
    margin[3:6, 20:24] = 0.3
    margin[12:15, 4:7] = 0.2
    margin[13, 5] = 0.5
    size, t, temp = (160, 240), 0.05, 0.1
    full = upsample_scores(margin, size)
    eager = torch.sigmoid((full - t) / temp).numpy()
    raw = (full > t).numpy()
    cases = [(Post(t), raw, eager), (Post(t, ok_level=0.3, ok_components=True), None, None)]
    for post, want_mask, want_score in cases:
        p = finish(margin, size, post, temp)
        assert p._score is None                              # not made until asked for
        largest, boxes, _ = components(p.mask)               # the whole mask's labelling
        assert p.boxes == boxes and p.largest_cells == pytest.approx(largest * margin.numel() / raw.size)
        if want_mask is not None:
            assert np.array_equal(p.mask, want_mask) and np.array_equal(p.score, want_score)
        else:                                                # the gate removed the faint component
            assert len(p.boxes) == 1 and p.mask.sum() < raw.sum()
            assert np.array_equal(p.score, np.where(p.mask, eager, np.minimum(eager, 0.5 - 1e-3)))
        assert p.score.dtype == np.float32 and ((p.score > 0.5) == p.mask).all()
    refined = Post(t, refiner=lambda image, mask: np.where(np.arange(size[1]) == 180, False, mask))
    p = finish(margin, size, refined, temp, image=np.zeros((*size, 3), np.uint8))
    assert not p.mask[:, 180].any() and p.mask.sum() == raw.sum() - raw[:, 180].sum()
    assert np.array_equal(p.score, np.where(p.mask, np.maximum(eager, 0.5 + 1e-3), np.minimum(eager, 0.5 - 1e-3)))


@pytest.fixture(scope="module")
def uneven_gate(defects_root, distill_root):
    """magnetic_tile/uneven, 5-shot ``fast``, 25 normals (5 held out for the OK gate), on both numeric paths:
    per path the gated segmenter, the same fit without the gate (the same 20 normals), the held-out
    normals, and both's predictions of 12 OK tiles and 6 defective ones."""
    torch.set_num_threads(1)
    cls = defects_root / "magnetic_tile" / "uneven"          # the class whose good tiles draw most false alarms
    images = sorted((cls / "images").iterdir())
    sup, masks, defective = images[:5], [cls / "masks" / f"{p.stem}.png" for p in images[:5]], images[5:11]
    files = NormalPool.scan(distill_root).files("magnetic_tile", "uneven")
    oks = evenly(files, 12)
    normals = evenly([p for p in files if p not in set(oks)], 25)
    held = [normals[i] for i in (4, 9, 14, 19, 24)]
    out = {}
    for path in ("fp32", "bf16"):                            # bf16 forced on a CPU without it: slow but exact
        seg = fdseg.FewShotSegmenter(preset="fast", cache_size=128, precision=path).fit(sup, masks, normals=normals)
        open_ = fdseg.FewShotSegmenter(preset="fast", cache_size=128, ok_gate="off", precision=path).fit(
            sup, masks, normals=[n for n in normals if n not in held])
        queries = list(oks) + defective
        out[path] = (seg, held, seg.predict(queries), open_.predict(queries), len(oks))
    return out


@pytest.mark.data
@pytest.mark.parametrize("path", ["fp32", "bf16"])
def test_auto_gate_on_real_tiles_keeps_what_is_stronger_than_the_held_out_quartile(uneven_gate, path):
    """Each gated mask is the ungated one less, in every component, the pixels whose margin plus the
    component's peak (above the threshold) is not above the level (Harrell-Davis lower quartile of the
    held-out normals' defect scores)."""
    from scipy import ndimage

    from fdseg.data.preprocess import upsample_scores
    from fdseg.pipeline.post import harrell_davis
    seg, held, gated, plain, n_ok = uneven_gate[path]
    assert seg.method.describe()["normals"] == 20 and seg.plan["precision"] == path
    level = seg.plan["ok gate"]
    assert level == pytest.approx(harrell_davis([seg.predict(h).defect_score for h in held], 0.25), abs=1e-6)
    t = seg.state.post.threshold
    for g, p in zip(gated, plain):
        assert g.defect_score == pytest.approx(p.defect_score, abs=1e-6)
        e = upsample_scores(torch.from_numpy(p.margin_grid), p.mask.shape).numpy() - t
        lab, n = ndimage.label(p.mask, structure=np.ones((3, 3), dtype=bool))
        peak = np.concatenate([[-np.inf], ndimage.maximum(e, lab, np.arange(1, n + 1))])[lab]
        assert np.array_equal(g.mask, p.mask & (e + peak > level))
        assert g.ok_gated == (p.mask.any() and not g.mask.any())
    # measured (Zen 4): the good tiles' mask pixels fp32 67,004 -> 30,308, bf16 66,719 -> 35,495; the defects'
    # 165,411 -> 157,344 and 167,500 -> 159,294
    ok_g, ok_p = (sum(int(x.mask.sum()) for x in r[:n_ok]) for r in (gated, plain))
    bad_g, bad_p = (sum(int(x.mask.sum()) for x in r[n_ok:]) for r in (gated, plain))
    assert ok_g < 0.65 * ok_p and bad_g > 0.9 * bad_p


@pytest.mark.data
def test_auto_gate_keeps_the_same_defect_pixels_on_both_numeric_paths(uneven_gate):
    """The bf16 backbone moves margins by ~0.01 (up to 0.1 in a cell); the gate's decisions must not turn
    that into whole regions: the defect pixels it keeps differ by < 2 % between the paths (measured 1.2 %;
    the all-or-nothing gate at the plain quartile: 17 %), and so do the OK tiles' verdicts mostly."""
    (_, _, g32, p32, n_ok), (_, _, g16, p16, _) = uneven_gate["fp32"], uneven_gate["bf16"]
    kept32, kept16 = (sum(int(x.mask.sum()) for x in g[n_ok:]) for g in (g32, g16))
    assert abs(kept32 - kept16) < 0.02 * max(kept32, kept16)
    raw32, raw16 = (sum(int(x.mask.sum()) for x in p[n_ok:]) for p in (p32, p16))
    assert abs(raw32 - raw16) < 0.02 * max(raw32, raw16)            # the ungated masks: measured 1.25 %
    assert [x.is_defective for x in g32[n_ok:]] == [x.is_defective for x in g16[n_ok:]]


@pytest.mark.data
def test_ok_gate_on_real_tiles_empties_only_queries_below_the_held_out_median(mt, demo):
    torch.set_num_threads(1)
    (s_img, s_mask), oks, normals = mt
    normals = evenly(normals, 20)             # spread over the pool's acquisition groups, as a user's OK images
    seg = fdseg.FewShotSegmenter(preset="fast", cache_size=128, ok_gate="median").fit([s_img], [s_mask],
                                                                                      normals=normals)
    level = seg.plan["ok gate"]
    held = [normals[i] for i in (4, 9, 14, 19)]
    assert seg.method.describe()["normals"] == 16
    assert level == pytest.approx(float(np.median([seg.predict(h).defect_score for h in held])), abs=1e-6)
    # the same fit without the gate (the same 16 normals in the fit): the masks are those, or empty
    open_ = fdseg.FewShotSegmenter(preset="fast", cache_size=128).fit(
        [s_img], [s_mask], normals=[n for n in normals if n not in held])
    queries = list(oks) + [q for q, _ in demo.queries]
    gated, plain = seg.predict(queries), open_.predict(queries)
    for g, p in zip(gated, plain):
        assert g.defect_score == pytest.approx(p.defect_score, abs=1e-6)
        assert g.ok_gated == (p.defect_score <= level)
        assert np.array_equal(g.mask, np.zeros_like(p.mask) if g.ok_gated else p.mask)
    # measured: 2 of the 12 OK tiles below the level (judged OK, masks emptied), none of the 6 blowholes
    assert sum(g.ok_gated for g in gated[:len(oks)]) >= 1
    assert sum(g.ok_gated for g in gated[len(oks):]) <= 1 and sum(g.is_defective for g in gated[len(oks):]) >= 3


@pytest.mark.data
def test_bad_normals_name_the_file(mt, tmp_path):
    (s_img, s_mask), _, normals = mt
    seg = fdseg.FewShotSegmenter(preset="fast")
    broken = tmp_path / "broken_ok.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(InputError, match="broken_ok.png"):
        seg.fit([s_img], [s_mask], normals=[normals[0], broken])
    strip = np.full((256, 4096, 3), 128, np.uint8)              # a line-scan strip among square tiles
    with pytest.raises(InputError, match="normal image 2.*size class"):
        seg.fit([s_img], [s_mask], normals=[normals[0], strip])
    with pytest.raises(InputError, match="does not use defect-free images"):
        fdseg.FewShotSegmenter(method="proto").fit([s_img], [s_mask], normals=[normals[0]])


# -- CLI, API ----------------------------------------------------------------------------------------------

@pytest.mark.data
def test_cli_segment_with_normals_writes_verdicts(mt, tmp_path, capsys):
    from fdseg.cli import main
    (s_img, s_mask), oks, normals = mt
    ndir = tmp_path / "ok"
    ndir.mkdir()
    for p in normals[:5]:
        (ndir / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "out"
    rc = main(["segment", "--support", str(s_img), str(s_mask), "--query", *map(str, oks[:3]), "--out", str(out),
               "--normal", str(ndir), "--preset", "fast", "--no-progress", "--explain"])
    assert rc == 0
    err = capsys.readouterr()
    assert "judged defective" in err.out and "normals 5" in err.err             # the plan names the normals
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["verdict"] for r in rows] and all(r["verdict"] in ("ok", "defective") for r in rows)
    assert all(float(r["defect_score"]) == json.loads((out / "summary.json").read_text())[i]["defect_score"]
               for i, r in enumerate(rows))
    for p in normals[5:25]:                                   # 25 normals: the default gate holds 5 out
        (ndir / p.name).write_bytes(p.read_bytes())
    for gate, shown in ((None, "lower quartile"), ("median", "median defect score"), ("off", None)):
        rc = main(["segment", "--support", str(s_img), str(s_mask), "--query", str(oks[0]), "--out",
                   str(tmp_path / f"out-{gate}"), "--normal", str(ndir), "--preset", "fast", "--no-progress",
                   "--explain"] + (["--ok-gate", gate] if gate else []))
        err = capsys.readouterr().err
        assert rc == 0 and (shown in err if shown else "ok gate" not in err), err


@pytest.mark.data
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_api_takes_ok_images_and_returns_verdicts(mt, tmp_path):
    pytest.importorskip("fastapi", reason="needs the serve extra")
    from starlette.testclient import TestClient

    from fdseg.serve import ServeConfig, create_app
    (s_img, s_mask), oks, normals = mt
    f = lambda field, p, name=None: (field, (name or Path(p).name, Path(p).read_bytes()))  # noqa: E731
    with TestClient(create_app(ServeConfig(max_normals=4, sessions_dir=tmp_path)),
                    base_url="http://127.0.0.1") as c:
        base = [f("support", s_img), f("mask", s_mask)]
        r = c.post("/v1/sessions", files=base + [f("normal", p) for p in normals[:3]], data={"preset": "fast"})
        assert r.status_code == 201, r.text
        info = r.json()
        assert info["normals"] == 3 and any("normals 3" in str(d["reason"]) for d in info["plan"])
        r = c.post(f"/v1/sessions/{info['id']}/segment", files=[f("query", oks[0]), f("query", oks[1])])
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        seg = fdseg.FewShotSegmenter(preset="fast").fit([s_img], [s_mask], normals=normals[:3])
        for x, q in zip(res, oks[:2]):
            p = seg.predict(q)
            assert x["verdict"] == p.verdict and x["defect_score"] == pytest.approx(p.defect_score, abs=1e-4)
            m = np.array(Image.open(io.BytesIO(base64.b64decode(x["mask"]["data"])))) > 0
            assert (m == p.mask).all()
        # bad OK images: unreadable (named), too many, another size class (named), on a fitted session
        r = c.post("/v1/sessions", files=base + [f("normal", normals[0]), ("normal", ("junk.png", b"nope"))])
        assert r.status_code == 400 and "junk.png" in r.json()["error"], r.text
        r = c.post("/v1/sessions", files=base + [f("normal", p) for p in normals[:5]])
        assert r.status_code == 400 and "at most 4" in r.json()["error"], r.text
        buf = io.BytesIO()
        Image.fromarray(np.full((256, 4096, 3), 128, np.uint8)).save(buf, format="PNG")
        r = c.post("/v1/sessions", files=base + [("normal", ("strip.png", buf.getvalue()))], data={"preset": "fast"})
        assert r.status_code == 400 and "strip.png" in r.json()["error"] and "size class" in r.json()["error"], r.text
        r = c.post(f"/v1/sessions/{info['id']}/segment", files=[f("normal", normals[0]), f("query", oks[0])])
        assert r.status_code == 400, r.text
        # zero OK images: as before
        r = c.post("/v1/segment", files=base + [f("query", oks[0])], data={"preset": "fast"})
        assert r.status_code == 200 and r.json()["results"][0]["verdict"] in ("ok", "defective")


@pytest.mark.data
def test_bench_with_normals_and_ok_queries_reports_auroc(defects_root, distill_root, tmp_path):
    from fdseg.bench import BenchConfig, markdown_table, run_bench
    torch.set_num_threads(1)
    cfg = BenchConfig(data=defects_root, out=tmp_path / "b", shots=[1], classes=["blowhole"], max_per_class=3,
                      gallery=0, progress=False, segmenter={"preset": "fast"}, normals=distill_root,
                      normal_count=4, ok_queries=distill_root, ok_count=3)
    res = run_bench(cfg)
    recs = [json.loads(x) for x in (tmp_path / "b" / "runs" / "fm_1shot.jsonl").read_text().splitlines()[1:]]
    assert len(recs) == 6 and sum(r["defect_free"] for r in recs) == 3
    assert all(r["normals"] == 4 and isinstance(r["defect_score"], float) for r in recs)
    ok_files = {r["id"].rsplit("/", 1)[1] for r in recs if r["defect_free"]}
    d = res["runs"][0]["datasets"][0]
    assert d["defect_free"] == 3 and 0 <= d["auroc"] <= 1 and d["ok_flagged"] is not None
    assert "image AUROC" in markdown_table(res)
    # OK queries and normals never overlap (normals are not recorded per episode: recompute the split)
    from fdseg.data.layouts import scan
    normals, oks = bench_pools(scan(defects_root).subset(classes=["blowhole"], max_per_class=3),
                               distill_root, 4, distill_root, 3, tmp_path / "c")
    assert {p.name for p in oks[("magnetic_tile", "blowhole")]} == ok_files
    assert not ok_files & {p.name for p in normals[("magnetic_tile", "blowhole")]}
