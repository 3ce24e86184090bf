"""Beyond-the-paper levers on synthetic cases with known answers."""
import numpy as np
import pytest

from fdseg import FewShotSegmenter, InputError

from conftest import iou, planted, texture


def test_dihedral_support_augmentation_keeps_images_and_masks_aligned():
    """8 views of an off-centre, non-square defect: a mask transformed unlike its image would put
    background cells in the foreground bank and the query's rotated defect would be lost."""
    s_img, s_mask = planted(256, 256, (20, 30, 90, 200), seed=1)
    q_img, q_mask = planted(256, 256, (60, 150, 230, 220), seed=2)
    q_img[60:230, 150:220] = np.rot90(texture(70, 170, 1001, "stripes"))  # the rotated defect
    aug = FewShotSegmenter(support_augment="dihedral").fit(s_img, s_mask)
    plain_cells = FewShotSegmenter(support_augment="none").fit(s_img, s_mask).method.describe()["fg_cells"]
    assert aug.method.describe()["fg_cells"] == 8 * plain_cells
    pred = aug.predict(q_img)
    assert iou(pred.mask, q_mask) > 0.7 and pred.mask[~q_mask].mean() < 0.02
    with pytest.raises(InputError, match="support_augment"):
        FewShotSegmenter(support_augment="shear")


def test_query_flips_average_margins_mapped_back_onto_the_query():
    """Known answer: with ``query_augment="flip"`` the margins are the mean of the query's and its two
    flips' margins, each flipped back; an off-centre defect on a non-square image stays where it is."""
    s_img, s_mask = planted(200, 300, (20, 30, 90, 120), seed=1)
    q_img, q_mask = planted(200, 300, (110, 200, 180, 280), seed=2)
    plain = FewShotSegmenter(colour_refine=0, query_augment="none").fit(s_img, s_mask)
    tta = FewShotSegmenter(colour_refine=0, query_augment="flip").fit(s_img, s_mask)
    assert FewShotSegmenter(colour_refine=0).fit(s_img, s_mask).query_views == "flip"   # auto, one support
    two = FewShotSegmenter(colour_refine=0).fit([s_img, q_img], [s_mask, q_mask])
    assert (two.query_views, two.support_views(2)) == ("none", "flip")                # auto, two supports
    m_id = plain.margins(q_img)[0]
    m_h = plain.margins(np.ascontiguousarray(q_img[:, ::-1]))[0].flip(-1)
    m_v = plain.margins(np.ascontiguousarray(q_img[::-1]))[0].flip(-2)
    expected = (m_id + m_h + m_v) / 3
    got = tta.margins(q_img)[0]
    assert got.shape == m_id.shape
    assert float((got - expected).abs().max()) < 1e-5
    assert float((got - m_id).abs().max()) > 1e-3          # the views do differ
    pred = tta.predict(q_img)
    assert iou(pred.mask, q_mask) > 0.7 and pred.mask[~q_mask].mean() < 0.02
    # predict agrees with margins: the same mask (the exact margins thresholded), and its grid equals the
    # exact one wherever the margin is above the threshold (below it, predict keeps upper bounds)
    exact = tta.finish(got, pred.mask.shape, q_img)
    np.testing.assert_array_equal(pred.mask, exact.mask)
    above = got.numpy() > tta.decision_threshold
    assert above.any() and np.allclose(pred.margin_grid[above], got.numpy()[above], atol=2e-3)
    assert (pred.margin_grid >= got.numpy() - 2e-3).all()
    with pytest.raises(InputError, match="query_augment"):
        FewShotSegmenter(query_augment="rotate")


def test_query_background_bank_handles_an_unseen_background():
    """The query's background is a texture the support never showed; its own cells tell it apart."""
    s_img, s_mask = planted(256, 256, (40, 40, 110, 110), seed=1)
    rng = np.random.default_rng(7)
    q_img = np.clip(60 + 60 * ((np.indices((256, 256)).sum(0) // 16) % 2)[..., None] + rng.normal(0, 4, (256, 256, 3)),
                    0, 255).astype(np.uint8)                               # a chequerboard background
    q_img[150:210, 140:200] = texture(60, 60, 1001, "stripes")
    q_mask = np.zeros((256, 256), bool)
    q_mask[150:210, 140:200] = True
    plain = FewShotSegmenter().fit(s_img, s_mask).predict(q_img)
    qbg = FewShotSegmenter(method_options={"query_bg": 2.0}).fit(s_img, s_mask).predict(q_img)
    assert iou(qbg.mask, q_mask) > iou(plain.mask, q_mask) + 0.1
    assert qbg.mask[~q_mask].mean() < plain.mask[~q_mask].mean()


def test_auto_resolution_rule():
    """resize='auto': an image with a long side >= 2 x size is seen aspect-kept at 2 x size with a
    2 x coarser cell (the grid keeps size/stride cells on its long side); smaller ones as the paper."""
    from fdseg.data import Preprocess
    p = Preprocess(mode="auto", size=256)
    assert p.input_size(1000, 1500) == (352, 512) and p.cell(352, 512, 4) == 8
    assert p.input_size(460, 1130) == (224, 512)
    assert p.input_size(200, 200) == (256, 256) and p.cell(256, 256, 4) == 4
    assert p.input_size(320, 480) == (256, 256)                       # long side < 512: the paper's squeeze
    seg = FewShotSegmenter(resize="auto")
    big, small = np.zeros((1000, 1500, 3), np.uint8), np.zeros((200, 200, 3), np.uint8)
    assert tuple(seg.extractor(big).shape[1:]) == seg.extractor.grid_size(1000, 1500) == (44, 64)
    assert tuple(seg.extractor(small).shape[1:]) == (64, 64)
    s_img, s_mask = planted(600, 900, (200, 300, 320, 460), seed=1)   # a planted patch is still found
    q_img, q_mask = planted(600, 900, (100, 500, 230, 640), seed=2)
    pred = seg.fit(s_img, s_mask).predict(q_img)
    assert pred.mask.shape == (600, 900) and iou(pred.mask, q_mask) > 0.6


def test_linear_head_learns_the_channel_that_separates_the_defect():
    """Known answer on feature vectors: fg and bg differ only in channel 0 (+0.3 vs -0.3) while 15
    nuisance channels carry large random values. A query cell with the defect's channel-0 sign but
    the nuisance pattern of a background cell is background by nearest-neighbour cosine, and the
    fitted head (a logistic regression on the supports' cells) turns it to defect."""
    import torch
    from fdseg.methods import Query, Support
    from fdseg.methods.fm import FeatureMatching, fit_linear_head, head_logits

    g = torch.Generator().manual_seed(0)
    h = w = 16
    noise = torch.randn(15, h, w, generator=g)
    cov = torch.zeros(h, w)
    cov[4:8, 4:8] = 1.0
    ch0 = torch.where(cov > 0, 0.3, -0.3)[None]
    feats = torch.nn.functional.normalize(torch.cat([ch0, noise]), dim=0)
    sup = Support(None, None, feats, cov)
    # query: every cell copies a background cell's nuisance values, with the defect's channel 0
    q = torch.nn.functional.normalize(torch.cat([torch.full((1, h, w), 0.3), noise.roll(5, 1)]), dim=0)
    q[:, 4:8, 4:8] = torch.nn.functional.normalize(torch.cat([torch.full((1, 4, 4), -0.3), noise[:, 0:4, 0:4]]), dim=0)
    truth = torch.ones(h, w, dtype=torch.bool)
    truth[4:8, 4:8] = False                    # the cells whose channel 0 says "background"

    plain, headed = FeatureMatching(), FeatureMatching(head=20.0)   # vote up to +-2: the head decides
    plain.fit([sup])
    headed.fit([sup])
    acc_plain = ((plain.score(Query(None, q)) > 0) == truth).float().mean()
    acc_head = ((headed.score(Query(None, q)) > 0) == truth).float().mean()
    assert acc_plain < 0.5 < 0.95 < acc_head
    # the head alone separates the supports' own cells
    wv = fit_linear_head(feats.flatten(1).T[cov.flatten() > 0], feats.flatten(1).T[cov.flatten() == 0])
    lg = head_logits(feats.flatten(1).T, wv)
    assert bool(((lg > 0) == (cov.flatten() > 0)).all())
    with pytest.raises(InputError, match="head"):
        FeatureMatching(head=-1)


def test_zoom_rule_for_small_defects_on_large_images():
    """zoom='auto': supports whose defects are under 2 grid cells across, on images with the pixels
    for it (long side >= 4 x size), switch the segmenter to 4 x size input with the same cell (twice
    the grid on each side); large defects or small images keep the zoom-1 grid."""
    from fdseg.data import Preprocess
    from fdseg.segmenter import choose_zoom
    p2 = Preprocess(mode="auto", size=256, zoom=2)
    assert p2.input_size(1000, 1500) == (672, 1024) and p2.cell(672, 1024, 4) == 8
    assert p2.input_size(460, 1130) == (416, 1024)
    assert p2.input_size(460, 900) == (256, 512)           # long side < 1024: zoom has no pixels to use
    assert p2.input_size(200, 200) == (256, 256)
    p1 = Preprocess(mode="auto", size=256)
    tiny, big, small_img = np.zeros((1000, 1500), bool), np.zeros((1000, 1500), bool), np.zeros((400, 400), bool)
    tiny[500:520, 700:720] = True          # 20 px: 0.7 cells of 8 px at 512 / 1500 -> 0.9 cells
    big[300:600, 400:800] = True
    small_img[100:104, 100:104] = True
    assert choose_zoom([tiny], p1, 4) == 2
    assert choose_zoom([big], p1, 4) == 1
    assert choose_zoom([small_img], p1, 4) == 1
    assert choose_zoom([tiny, big, big], p1, 4) == 1       # the median component decides

    s_img, s_mask = planted(1000, 1500, (500, 700, 524, 730), seed=1)
    q_img, q_mask = planted(1000, 1500, (200, 300, 224, 330), seed=2)
    # the colour rule off: a striped patch on grey is separated by colour alone at any grid
    zoomed = FewShotSegmenter(colour_refine=0).fit(s_img, s_mask)
    plain = FewShotSegmenter(zoom=1, colour_refine=0).fit(s_img, s_mask)
    assert zoomed.preprocess.zoom == 2 and plain.preprocess.zoom == 1
    pz, pp = zoomed.predict(q_img), plain.predict(q_img)
    assert pz.margin_grid.shape == (84, 128) and pp.margin_grid.shape == (44, 64)
    # measured: 0.40 zoomed vs 0.22 at zoom 1 (a 24 x 30 px defect: the finer grid hugs it)
    assert iou(pz.mask, q_mask) > iou(pp.mask, q_mask) + 0.1
    # refitting on a large defect goes back to zoom 1
    b_img, b_mask = planted(1000, 1500, (300, 400, 600, 800), seed=3)
    assert zoomed.fit(b_img, b_mask).preprocess.zoom == 1
    with pytest.raises(InputError, match="zoom"):
        FewShotSegmenter(zoom=3)


def _crack(h: int, w: int, seed: int, x0: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey grain with a 3-px dark reddish crack running down from (0, x0) with a gentle drift."""
    img = texture(h, w, seed, "noise")
    m = np.zeros((h, w), bool)
    for y in range(h):
        x = x0 + int(12 * np.sin(y / 30 + seed))
        m[y, x:x + 3] = True
    img[m] = (45, 20, 20)
    return img, m


def test_colour_rule_trims_a_thin_crack_to_its_pixels():
    """Known answer: a 3-px crack is a cell-wide blob to the matching; the supports say the defect's
    pixels are dark red and its surroundings grey, so the colour rule keeps only the crack's pixels."""
    s_img, s_mask = _crack(256, 256, 1, 90)
    q_img, q_mask = _crack(256, 256, 2, 160)
    plain = FewShotSegmenter(colour_refine=0).fit(s_img, s_mask).predict(q_img)
    seg = FewShotSegmenter(colour_refine=0.3).fit(s_img, s_mask)
    pred = seg.predict(q_img)
    assert not (pred.mask & ~plain.mask).any()                       # it only removes pixels
    assert plain.mask[q_mask].mean() > 0.8                           # the matching found the crack ...
    assert iou(plain.mask, q_mask) < 0.5                             # ... as a blob several pixels wide
    assert iou(pred.mask, q_mask) > 0.8 and iou(pred.mask, q_mask) > iou(plain.mask, q_mask) + 0.3
    # the score map agrees with the trimmed mask
    assert bool(((pred.score > 0.5) == pred.mask).all())


def _grey_crack(x0: int, depth: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A grey 256 x 256 image whose brightness ramps from 40 (left) to 220 (right), with a 3-px
    vertical crack at column ``x0`` that is ``depth`` grey levels darker than the ramp there."""
    ramp = np.linspace(40, 220, 256)[None, :].repeat(256, 0)
    mask = np.zeros((256, 256), bool)
    mask[40:216, x0:x0 + 3] = True
    g = np.where(mask, ramp - depth, ramp).round().astype(np.uint8)
    return np.repeat(g[..., None], 3, -1), mask


def test_grey_images_get_a_local_contrast_rule():
    """Known answer: on grey images the defect is darker than its surroundings, not a grey level of
    its own. The support's crack lies where the ramp is bright, the query's where it is dark, so the
    query's background around its crack has the support crack's grey level: a grey-level histogram
    (the RGB rule) keeps that background and trims nothing; the local-contrast one keeps the crack."""
    from fdseg.refine.colour import ColourModel
    s_img, s_mask = _grey_crack(160)
    q_img, q_mask = _grey_crack(40)
    blob = np.zeros_like(q_mask)
    blob[32:224, 32:52] = True                           # the matching's cell-wide blob around the crack
    rgb = ColourModel(grey="rgb").fit([s_img], [s_mask])
    local = ColourModel().fit([s_img], [s_mask])
    assert rgb.mode == "rgb" and local.mode == "contrast"
    assert iou(rgb(q_img, blob), q_mask) < 0.35
    kept = local(q_img, blob)
    assert not (kept & ~blob).any() and iou(kept, q_mask) > 0.8
    # the same at another resolution (full-size predict): the window scales with the image
    big = np.repeat(np.repeat(q_img, 2, 0), 2, 1)
    big_kept = local(big, np.repeat(np.repeat(blob, 2, 0), 2, 1))
    assert iou(big_kept, np.repeat(np.repeat(q_mask, 2, 0), 2, 1)) > 0.8
    # colour supports keep the RGB rule; grey="off" leaves grey images alone
    red = s_img.copy()
    red[s_mask] = (200, 30, 30)
    assert ColourModel().fit([red], [s_mask]).mode == "rgb"
    assert ColourModel(grey="off").fit([s_img], [s_mask])(q_img, blob).sum() == blob.sum()
    with pytest.raises(InputError, match="grey"):
        ColourModel(grey="gray")


def test_grey_levels_equal_the_float_mean_of_every_colour():
    """The local-contrast rule's grey level from the integer channel sum is numpy's float32 mean of the
    three channels for every one of the 2^24 colours (and for non-uint8 images it is that mean)."""
    from fdseg.refine.colour import grey_levels
    v = np.arange(256, dtype=np.uint8)
    every = np.stack(np.meshgrid(v, v, v, indexing="ij"), -1).reshape(4096, 4096, 3)
    want = every.astype(np.float32).mean(-1)
    got = grey_levels(every)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    four = np.dstack([every[:8, :8], np.full((8, 8), 255, np.uint8)])   # a fourth channel is ignored
    assert np.array_equal(grey_levels(four), want[:8, :8])
    floats = every[:16, :16].astype(np.float64) + 0.25
    assert np.array_equal(grey_levels(floats), floats.astype(np.float32).mean(-1))


def test_colour_rule_loosens_the_matching_only_for_a_single_support():
    """The colour rule's slack: with one support (and the rule in effect) the margin threshold drops by
    the slack, so the prediction can only grow before the rule trims it; not with two supports, not
    without the rule, not with slack 0; unknown colour options are refused."""
    s_img, s_mask = _crack(128, 128, 1, 40)
    q_img, _ = _crack(128, 128, 2, 80)
    one = FewShotSegmenter(threshold=0.01).fit(s_img, s_mask)
    assert one.decision_threshold == pytest.approx(0.01 - 0.04)
    two = FewShotSegmenter(threshold=0.01).fit([s_img, q_img], [s_mask, _crack(128, 128, 2, 80)[1]])
    assert two.decision_threshold == pytest.approx(0.01)
    assert FewShotSegmenter(colour_refine=0).fit(s_img, s_mask).decision_threshold == 0
    strict = FewShotSegmenter(threshold=0.01, colour_options={"slack": 0}).fit(s_img, s_mask)
    assert strict.decision_threshold == pytest.approx(0.01)
    # the same margins: the slack can only add proposed pixels (the rule then trims both the same way)
    np.testing.assert_allclose(one.margins(q_img)[0], strict.margins(q_img)[0], atol=1e-5)
    loose, tight = one.predict(q_img), strict.predict(q_img)
    assert loose.mask.sum() >= tight.mask.sum()
    # grey supports with grey="off": the rule is not in effect, so neither is its slack
    g_img, g_mask = _grey_crack(160)
    assert FewShotSegmenter(colour_options={"grey": "off"}).fit(g_img, g_mask).decision_threshold == 0
    assert FewShotSegmenter().fit(g_img, g_mask).decision_threshold == pytest.approx(-0.04)
    with pytest.raises(InputError, match="colour_options"):
        FewShotSegmenter(colour_options={"slak": 0})


def test_colour_model_keeps_unseen_colours_and_needs_defect_pixels():
    from fdseg.refine.colour import ColourModel
    img = np.full((64, 64, 3), 128, np.uint8)
    img[20:30, 20:30] = (200, 30, 30)                   # red defect on grey
    m = np.zeros((64, 64), bool)
    m[20:30, 20:30] = True
    cm = ColourModel(tau=0.3).fit([img], [m])
    q = np.full((64, 64, 3), 128, np.uint8)
    q[:, 32:] = (30, 30, 220)                           # a colour neither histogram has seen
    q[5:10, 5:10] = (200, 30, 30)
    everything = np.ones((64, 64), bool)
    kept = cm(q, everything)
    assert kept[5:10, 5:10].all() and kept[:, 32:].all() and not kept[40:, :30].any()
    # a mask at another resolution: the image is resized to it
    assert cm(q, np.ones((32, 32), bool))[:, 16:].all()
    # no defect pixel in the supports: nothing is known, nothing is removed
    assert ColourModel().fit([img], [np.zeros((64, 64), bool)])(q, everything).all()
    with pytest.raises(InputError, match="colour_refine"):
        ColourModel(tau=-1)


def test_colour_rule_is_used_only_if_it_keeps_the_supports_own_defect():
    """Known answer: the rule checks itself on its supports. A 3 x 3-px defect of its surroundings'
    colour gives a defect histogram of 9 counts, which add-one smoothing puts far below the ring's: the
    rule would remove every pixel of the very defect it was fitted on (kept 0), so it is not used, and
    neither is its slack. The same defect in its own colour is kept whole, and so is the rule; so is a
    large defect of the surroundings' colour (its histogram is no longer flat); ``min_kept=0`` turns the
    check off; bad values are refused."""
    from fdseg.refine.colour import ColourModel
    brown = np.full((256, 256, 3), (120, 90, 60), np.uint8)     # the rule's own 256-px frame
    tiny = np.zeros((256, 256), bool)
    tiny[120:123, 120:123] = True
    same = ColourModel().fit([brown], [tiny])
    assert same.kept == 0 and not same.active and same.table is None
    red = brown.copy()
    red[tiny] = (200, 30, 30)
    own = ColourModel().fit([red], [tiny])
    assert own.kept == 1 and own.active
    large = np.zeros((256, 256), bool)
    large[32:224, 32:160] = True
    assert ColourModel().fit([brown], [large]).active
    assert ColourModel(min_kept=0).fit([brown], [tiny]).active
    # in the segmenter: the rule is off for the invisible defect, so the single support gets no slack
    # and the prediction is the plain matching's
    seg = FewShotSegmenter().fit(brown, tiny)
    assert seg.decision_threshold == 0 and not seg.colour.active
    assert FewShotSegmenter().fit(red, tiny).decision_threshold == pytest.approx(-0.04)
    with pytest.raises(InputError, match="min_kept"):
        ColourModel(min_kept=1.5)


def test_slack_only_where_the_colour_rule_trims_the_ring_around_the_support_defect():
    """Known answer: the slack lowers a single support's threshold so that the colour rule trims what
    the looser matching adds around the defect; it is given only if the rule removes at least half of
    the ring around the support's defect. A dark defect in a texture that is 70 % that dark colour:
    the rule keeps the whole defect (it is used) but removes only the ring's light pixels (~0.3), so
    no slack. A red defect on brown: the rule removes the whole ring, so the slack. ``min_trimmed=0``
    (and the ``fast`` preset) gives the slack whenever the rule is on; bad values are refused."""
    from fdseg.refine.colour import ColourModel
    rng = np.random.default_rng(0)
    dark = (rng.random((256, 256)) < 0.7)[..., None]
    texture = np.where(dark, np.array((45, 40, 40), np.uint8), np.array((155, 150, 150), np.uint8)).astype(np.uint8)
    m = np.zeros((256, 256), bool)
    m[100:156, 120:130] = True
    texture[m] = (45, 40, 40)
    c = ColourModel().fit([texture], [m])
    assert c.active and c.kept == 1.0 and 0.2 < c.trimmed < 0.4 and not c.loosens
    red = np.full((256, 256, 3), (120, 90, 60), np.uint8)
    red[m] = (200, 30, 30)
    r = ColourModel().fit([red], [m])
    assert r.trimmed == 1.0 and r.loosens
    assert ColourModel(min_trimmed=0).fit([texture], [m]).loosens
    seg = FewShotSegmenter().fit(texture, m)
    assert seg.colour.active and seg.decision_threshold == 0.0 and "no slack" in str(seg.plan)
    assert FewShotSegmenter().fit(red, m).decision_threshold == pytest.approx(-0.04)
    assert FewShotSegmenter(colour_options={"min_trimmed": 0}).fit(texture, m).decision_threshold == pytest.approx(-0.04)
    # `fast` keeps the slack without the check (measured: there it gains nothing and costs magnetic_tile)
    assert FewShotSegmenter(preset="fast").fit(texture, m).decision_threshold == pytest.approx(-0.04)
    with pytest.raises(InputError, match="min_trimmed"):
        ColourModel(min_trimmed=2)


def _speckled(mask: np.ndarray, seed: int) -> np.ndarray:
    """A 256 x 256 colour image: background pixels grey A (80 %), olive C (15 %) or dark red B (5 %),
    defect pixels B (70 %) or C (30 %), drawn independently (the rule's own frame: no resampling)."""
    rng = np.random.default_rng(seed)
    a, b, c = (150, 150, 150), (150, 20, 20), (110, 110, 40)
    u = rng.random(mask.shape)
    img = np.empty(mask.shape + (3,), np.uint8)
    img[...] = a
    img[(u >= 0.80) & ~mask] = c
    img[(u >= 0.95) & ~mask] = b
    img[mask] = b
    img[mask & (u < 0.30)] = c
    return img


def test_colour_rule_chooses_its_threshold_on_three_or_more_supports():
    """Known answer. Defect pixels are 70 % colour B and 30 % C, the background 80 % A, 15 % C, 5 % B:
    with the histograms' add-one smoothing, B is several times as likely in the defect as around it, C
    about as likely (ratio 1-2), A almost never. The matching proposes a defect grown by about a grid
    cell (4 px of the 256-px frame at a 64 x 64 grid). Around a 1-px line that growth is 8x the line's
    area, so keeping C keeps 1.6x the line in background (IoU 0.38), keeping B only gives IoU 0.5: the
    smallest candidate above C's ratio is chosen. Around a 60-px square the growth is a
    quarter of its area: keeping C pays (IoU 0.95 vs 0.69), tau stays 0.3. One support, or
    ``tune_from=0``, or no grid, or fewer than three supports: tau stays as set."""
    from fdseg.refine.colour import ColourModel

    def line(x0):
        m = np.zeros((256, 256), bool)
        m[20:236, x0] = True
        return m

    def square(y0):
        m = np.zeros((256, 256), bool)
        m[y0:y0 + 56, 90:146] = True
        return m

    lines = [line(60), line(120), line(180)]
    imgs = [_speckled(m, i) for i, m in enumerate(lines)]
    G = [(64, 64)] * 3                     # the matching's grid on each support
    tuned = ColourModel().fit(imgs, lines, grids=G)
    taus, ious = tuned.tuned
    assert taus == (0.3, 0.5, 1.0, 2.0, 4.0)
    ratio = {k: tuned.ratio(np.array([[rgb]], np.uint8))[0, 0] for k, rgb in
             (("B", (150, 20, 20)), ("C", (110, 110, 40)))}
    assert 1 <= ratio["C"] < 2 < 4 < ratio["B"], ratio
    assert tuned.tau == 2 and tuned.active            # the smallest candidate above C's ratio
    assert ious[0] == pytest.approx(0.38, abs=0.04) and ious[3] == pytest.approx(0.5, abs=0.05)
    assert ious[0] == ious[1] == ious[2] and ious[3] == ious[4]
    # on a new query: the line grown by a cell, trimmed by each rule
    from scipy import ndimage
    q_mask = line(90)
    q_img = _speckled(q_mask, 7)
    grown = ndimage.binary_dilation(q_mask, iterations=4)
    loose = ColourModel().fit(imgs, lines)               # no grid: tau stays 0.3
    assert loose.tau == 0.3 and loose.tuned is None
    assert iou(tuned(q_img, grown), q_mask) > iou(loose(q_img, grown), q_mask) + 0.08
    # one or two supports, or tune_from=0: as set
    assert ColourModel().fit(imgs[:1], lines[:1], grids=G[:1]).tau == 0.3
    assert ColourModel().fit(imgs[:2], lines[:2], grids=G[:2]).tau == 0.3
    assert ColourModel(tune_from=2).fit(imgs[:2], lines[:2], grids=G[:2]).tau > 0.3
    assert ColourModel(tune_from=0).fit(imgs, lines, grids=G).tau == 0.3
    # a refit starts from tau as set, not from the last choice
    assert tuned.fit(imgs[:2], lines[:2], grids=G[:2]).tau == 0.3 and tuned.tuned is None
    assert tuned.fit(imgs, lines, grids=G).tau == 2 and tuned.describe()["tau"] == 0.3
    # a wide defect keeps tau (its grown mask is mostly defect); a stricter tau is a floor
    squares = [square(20), square(100), square(180)]
    wide = ColourModel().fit([_speckled(m, 3 + i) for i, m in enumerate(squares)], squares, grids=G)
    assert wide.tau == 0.3 and wide.tuned[1][0] == pytest.approx(0.95, abs=0.03)
    assert ColourModel(tau=1.5).fit(imgs, lines, grids=G).tuned[0] == (1.5, 2.0, 4.0)
    # each support is grown by its own grid's cell: a coarser grid grows it more (lower IoU at tau 0.3)
    coarse = ColourModel().fit(imgs, lines, grids=[(32, 32)] * 3)
    assert coarse.tuned[1][0] < tuned.tuned[1][0]
    with pytest.raises(InputError, match="tune_from"):
        ColourModel(tune_from=-1)


def test_segmenter_chooses_the_colour_threshold_from_three_supports_on():
    """In the segmenter: three supports with thin lines get the stricter rule, named in the plan; two
    supports keep tau 0.3, one keeps it and its slack; the fast preset keeps it fixed."""
    masks = [np.zeros((256, 256), bool) for _ in range(3)]
    for m, x in zip(masks, (60, 120, 180)):
        m[20:236, x] = True
    imgs = [_speckled(m, i) for i, m in enumerate(masks)]
    three = FewShotSegmenter().fit(imgs, masks)
    assert three.colour.tau == 2 and three.decision_threshold == 0
    colour_step = [d for d in three.plan.decisions if d.step == "colour"][0]
    assert "chosen on the 3 supports" in colour_step.reason
    assert FewShotSegmenter().fit(imgs[:2], masks[:2]).colour.tau == 0.3
    one = FewShotSegmenter().fit(imgs[0], masks[0])
    assert one.colour.tau == 0.3 and one.colour.tuned is None and one.decision_threshold < 0
    assert FewShotSegmenter(colour_options={"tune_from": 0}).fit(imgs, masks).colour.tau == 0.3
    assert FewShotSegmenter(preset="fast").fit(imgs, masks).colour.tau == 0.3
