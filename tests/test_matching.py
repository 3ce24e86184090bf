"""Feature grids, tiling and the matching methods on synthetic images with known answers."""
import numpy as np
import pytest
import torch

from fdseg import FewShotSegmenter, create_backbone, list_methods
from fdseg.data.preprocess import Preprocess
from fdseg.features import FeatureConfig, FeatureExtractor
from fdseg.methods import Query, Support, create_method, support_cells

from conftest import iou, planted


def test_feature_grid_is_unit_norm_at_stride():
    ex = FeatureExtractor(create_backbone("efficientnet_lite0"), Preprocess(), FeatureConfig(stride=4))
    f = ex(np.random.default_rng(0).integers(0, 255, (100, 300, 3), dtype=np.uint8))
    assert tuple(f.shape) == (152, 64, 64)
    torch.testing.assert_close(f.norm(dim=0), torch.ones(64, 64))


def test_tiles_cover_the_input():
    pre = Preprocess(mode="tile", size=128, overlap=32)
    H, W = pre.input_size(256, 1000)
    assert (H, W) == (256, 992)
    tiles = pre.tiles(H, W)
    cover = np.zeros((H, W), int)
    for y, x, h, w in tiles:
        cover[y:y + h, x:x + w] += 1
    assert cover.min() >= 1 and all(h == w == 128 for _, _, h, w in tiles)


@pytest.mark.data
def test_tiles_stitch_close_to_whole_image_features(defects_root):
    """On a real image, stitched tiles agree with one pass over the whole image, the more so the
    larger the overlap."""
    from fdseg.data.images import load_image
    img = load_image(sorted((defects_root / "visa" / "capsules" / "images").iterdir())[0])[::2, ::2]
    bb = create_backbone("efficientnet_lite0")
    whole = FeatureExtractor(bb, Preprocess(mode="tile", size=1024), FeatureConfig(4))(img)
    cos = {}
    for ov in (0, 64):
        t = FeatureExtractor(bb, Preprocess(mode="tile", size=256, overlap=ov), FeatureConfig(4))(img)
        assert t.shape == whole.shape == (152, 128, 184)      # 500x750 -> 512x736 input
        cos[ov] = (t * whole).sum(0)
    assert cos[64].mean() > 0.98 and cos[64].min() > 0.8
    assert cos[64].mean() > cos[0].mean() and cos[64].min() > cos[0].min()


def test_support_cells_small_defect_fallback():
    cov = torch.zeros(8, 8)
    cov[2, 3], cov[2, 4] = 0.2, 0.06
    fg, bg = support_cells(cov)
    assert fg.sum() == 2 and bg.sum() == 62                               # touched / untouched cells
    fg, bg = support_cells(cov, fg_min=0.5)
    assert fg.view(8, 8)[2, 3] and not fg.view(8, 8)[2, 4]               # >= half of the best cell
    full = torch.full((4, 4), 0.9)
    full[0, 0] = 0.3
    fg, bg = support_cells(full)
    assert bg.sum() == 1 and fg.sum() == 16


@pytest.mark.parametrize("method", ["fm", "proto"])
def test_planted_patch_is_found(method):
    """A striped patch on fine noise: the support shows one; the query's is elsewhere."""
    s_img, s_mask = planted(256, 256, (40, 40, 110, 120), seed=1)
    q_img, q_mask = planted(256, 256, (150, 130, 220, 230), seed=2)
    seg = FewShotSegmenter(method=method).fit(s_img, s_mask)
    pred = seg.predict(q_img)
    assert pred.mask.shape == q_mask.shape
    assert iou(pred.mask, q_mask) > 0.7
    assert pred.score[q_mask].mean() > 0.5 > pred.score[~q_mask].mean()
    assert len(pred.boxes) >= 1
    x0, y0, x1, y1 = max(pred.boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    assert abs(x0 - 130) < 16 and abs(y0 - 150) < 16 and abs(x1 - 230) < 16 and abs(y1 - 220) < 16


def test_defect_free_query_gives_empty_mask():
    s_img, s_mask = planted(256, 256, (40, 40, 110, 120), seed=1)
    seg = FewShotSegmenter(method="fm").fit(s_img, s_mask)
    clean, _ = planted(256, 256, (0, 0, 0, 0), seed=5)
    assert seg.predict(clean).defect_fraction < 0.01


def test_k_shot_pools_supports_and_keeps_original_size():
    sup = [planted(200, 300, (20 + 10 * i, 30, 80 + 10 * i, 110), seed=i) for i in range(3)]
    seg = FewShotSegmenter().fit([s[0] for s in sup], [s[1] for s in sup])
    assert seg.n_supports == 3
    assert seg.method.describe()["fg_cells"] > 0
    q_img, q_mask = planted(150, 400, (40, 250, 120, 380), seed=9)
    preds = seg.predict([q_img, q_img])
    assert len(preds) == 2 and preds[0].mask.shape == (150, 400)
    assert iou(preds[0].mask, q_mask) > 0.6
    np.testing.assert_array_equal(preds[0].mask, preds[1].mask)


def test_line_scan_strip_in_tile_mode():
    """A 4096 x 256 strip with a 40 px defect: squeezing to 256^2 loses it, tiling keeps it."""
    s_img, s_mask = planted(256, 1024, (100, 600, 150, 660), seed=3)
    q_img, q_mask = planted(256, 4096, (120, 3000, 160, 3040), seed=4)
    # the colour rule and the support / query views off: the grid is what is tested (the views would
    # cost 8 support and 3 query passes over the strip, and the colour rule trims either blob)
    plain = dict(feature_stride=8, colour_refine=0, support_augment="none", query_augment="none")
    tiled = FewShotSegmenter(resize="tile", input_size=256, **plain).fit(s_img, s_mask)
    p = tiled.predict(q_img)
    assert p.mask.shape == (256, 4096)
    assert iou(p.mask, q_mask) > 0.5
    squeezed = FewShotSegmenter(resize="resize", **plain).fit(s_img, s_mask)
    assert iou(squeezed.predict(q_img).mask, q_mask) < iou(p.mask, q_mask)


def test_method_registry():
    assert {"fm", "proto"} <= set(list_methods())
    m = create_method("fm")
    f = torch.nn.functional.normalize(torch.randn(8, 4, 4), dim=0)
    cov = torch.zeros(4, 4)
    cov[1, 1] = 1
    m.fit([Support(None, None, f, cov)])
    s = m.score(Query(None, f))
    assert s.shape == (4, 4) and s[1, 1] > 0          # a support cell matches itself
