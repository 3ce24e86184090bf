"""The fast matching paths keep their stated error on real images: fm's batched views, the pruned search
(mask identical to the exact one), near-duplicate bank reduction (margins within its radius bound).
Speed itself is measured in benchmarks/ (BENCHMARKS.md), never asserted here."""
import math
import pickle

import numpy as np
import pytest
import torch

from fdseg import FewShotSegmenter, InputError
from fdseg.data.images import load_image, load_mask
from fdseg.data.preprocess import upsample_scores
from fdseg.methods import Query, create_method
from fdseg.methods.fm import PRUNE_FIRST, PRUNE_STRIDE, merge_flipped
from fdseg.methods.similarity import cover_subset, max_similarity, strided_subset

FLIPS = [[], [-1], [-2]]                       # the query, flipped left-right, flipped up-down


def _unit(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, c, generator=g), dim=1)


def _pair(root, cls="magnetic_tile/blowhole", i=0, j=1):
    d = root / cls
    imgs = sorted((d / "images").iterdir())
    sup, query = imgs[i], imgs[j]
    return load_image(sup), load_mask(d / "masks" / f"{sup.stem}.png"), load_image(query)


@pytest.fixture(scope="module")
def fitted(defects_root):
    """A default 1-shot fit on a real magnetic_tile support (8 dihedral views: ~32 k background cells)
    and a real query with its two flipped views as fm sees them."""
    sup, mask, query = _pair(defects_root)
    seg = FewShotSegmenter().fit([sup], [mask])
    views = [query, np.ascontiguousarray(query[:, ::-1]), np.ascontiguousarray(query[::-1])]
    feats = seg.extractor.batch(views)
    return seg.method, [Query(v, f) for v, f in zip(views, feats)], query.shape[:2]


@pytest.mark.data
def test_score_many_equals_score_per_view(fitted):
    fm, queries, _ = fitted
    many = fm.score_many(queries)
    assert len(many) == 3
    for q, m in zip(queries, many):
        torch.testing.assert_close(m, fm.score(q), rtol=0, atol=0)


@pytest.mark.data
def test_score_views_unpruned_is_the_segmenters_merge(fitted):
    fm, queries, _ = fitted
    from fdseg.pipeline import merge_views
    per = [fm.score(q) for q in queries]
    merged = fm.score_views(queries, FLIPS)
    torch.testing.assert_close(merged, merge_views(per[0], per[1:], "flip"), rtol=0, atol=1e-6)
    torch.testing.assert_close(merged, merge_flipped(per, FLIPS), rtol=0, atol=0)


@pytest.mark.data
@pytest.mark.parametrize("t", [-0.04, 0.0, 0.05])
def test_pruned_views_give_the_exact_mask(fitted, t):
    """Every pixel's thresholded value, after the bilinear upsampling the segmenter does, is the exact one;
    where a cell kept its bound, the bound is at least the exact margin and below the threshold."""
    fm, queries, size = fitted
    exact = fm.score_views(queries, FLIPS)
    pruned = fm.score_views(queries, FLIPS, exact_above=t)
    for out in (size, (256, 256)):
        assert torch.equal(upsample_scores(pruned, out) > t, upsample_scores(exact, out) > t)
    bound = (pruned - exact).abs() > 1e-5                   # (matched cells: fp32 rounding of the head's matmul)
    assert bound.float().mean() > 0.5                       # most cells were not matched exactly
    assert (pruned[bound] > exact[bound]).all()
    assert (pruned[bound] < t).all()


@pytest.mark.data
def test_pruned_search_reads_the_whole_bank_for_few_cells(fitted, monkeypatch):
    """The pruned search's structure: every cell is bounded once by the coarsest subset (1/512 of the
    bank), only the cells left near the threshold by the 1/32 one, and few cells by the whole bank."""
    import fdseg.methods.fm as fm_mod
    fm, queries, _ = fitted
    seen: dict[int, int] = {}
    real = fm_mod.max_similarity

    def counting(q, bank, *a, **k):
        seen[len(bank)] = seen.get(len(bank), 0) + len(q)
        return real(q, bank, *a, **k)

    monkeypatch.setattr(fm_mod, "max_similarity", counting)
    fm.score_views(queries, FLIPS, exact_above=0.0)
    rows = sum(q.features[0].numel() for q in queries)
    n_bg = len(fm.bg)
    assert seen[len(strided_subset(n_bg, PRUNE_STRIDE * PRUNE_FIRST))] == rows
    assert seen.get(len(strided_subset(n_bg, PRUNE_STRIDE)), 0) < 0.5 * rows
    assert 0 < seen[n_bg] < 0.1 * rows


@pytest.mark.data
def test_pruned_single_view_and_5_shot_bank(defects_root):
    """5 supports with flips (no query views): the pruned mask equals the exact one."""
    d = defects_root / "magnetic_tile" / "blowhole"
    imgs = sorted((d / "images").iterdir())[:6]
    sups = [load_image(p) for p in imgs[:5]]
    masks = [load_mask(d / "masks" / f"{p.stem}.png") for p in imgs[:5]]
    seg = FewShotSegmenter(colour_refine=0).fit(sups, masks)
    q = load_image(imgs[5])
    query = Query(q, seg.extractor.batch([q])[0])
    exact = seg.method.score(query)
    torch.testing.assert_close(seg.method.score_views([query], [[]]), exact, rtol=0, atol=0)
    pruned = seg.method.score_views([query], [[]], exact_above=0.0)
    assert torch.equal(upsample_scores(pruned, q.shape[:2]) > 0, upsample_scores(exact, q.shape[:2]) > 0)


@pytest.mark.data
def test_pickled_method_scores_alike(fitted):
    fm, queries, _ = fitted
    fm.score(queries[0])                                     # builds the derived banks
    assert hasattr(fm, "_banks_cache")
    back = pickle.loads(pickle.dumps(fm))
    assert not hasattr(back, "_banks_cache")                 # derived banks are not pickled
    torch.testing.assert_close(back.score(queries[0]), fm.score(queries[0]), rtol=0, atol=0)


@pytest.mark.data
@pytest.mark.parametrize("cos_min", [0.99, 0.97])
def test_cover_subset_keeps_margins_within_its_radius(fitted, cos_min):
    """Near-duplicate removal on a real 8-view background bank: every cell has a kept one at cosine
    >= cos_min; each best cosine drops by at most sqrt(2 - 2 cos_min), and by little on average
    (measured on this bank: mean 0.0004 at 0.99, 0.0035 at 0.97)."""
    fm, queries, _ = fitted
    bg = fm.bg
    keep = cover_subset(bg, cos_min)
    assert 0 < len(keep) < len(bg) and len(set(keep.tolist())) == len(keep)
    assert (max_similarity(bg, bg[keep]) >= cos_min - 1e-5).all()
    q = queries[0].features.flatten(1).T
    drop = max_similarity(q, bg) - max_similarity(q, bg[keep])
    assert (drop >= -1e-6).all()
    assert drop.max() <= math.sqrt(2 - 2 * cos_min) + 1e-5
    assert drop.mean() < {0.99: 0.002, 0.97: 0.01}[cos_min]


@pytest.mark.data
def test_bg_cover_option_raises_margins_within_the_bound(fitted):
    fm, queries, _ = fitted
    red = create_method("fm", bg_cover=0.97)
    red.__dict__.update({k: v for k, v in fm.__dict__.items() if k not in ("bg_cover", "_banks_cache")})
    diff = red.score(queries[0]) - fm.score(queries[0])
    assert (diff >= -0.01).all() and diff.max() <= math.sqrt(2 - 2 * 0.97) + 0.01   # bf16: one ulp each side
    assert red.describe()["bg_cover"] == 0.97


def test_cover_subset_radius_on_synthetic_clusters():
    """Points scattered tightly around 20 centres: a radius wider than the scatter keeps about one per
    cluster; cos_min 1 keeps every distinct point."""
    centres = _unit(20, 16, 0)
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(centres.repeat(30, 1) + 0.01 * torch.randn(600, 16, generator=g), dim=1)
    keep = cover_subset(x, 0.99, block=128)
    assert 20 <= len(keep) <= 25
    assert (max_similarity(x, x[keep]) >= 0.99 - 1e-6).all()
    assert len(cover_subset(x, 1.0)) == 600
    with pytest.raises(ValueError):
        cover_subset(x, 1.5)


def test_strided_subset():
    assert strided_subset(10, 4).tolist() == [0, 4, 8]
    assert strided_subset(3, 32).tolist() == [0]
    assert strided_subset(0, 32).tolist() == []
    assert PRUNE_STRIDE >= 1


def test_max_similarity_query_blocks_and_bank_blocks_agree():
    """The bank is streamed in blocks against query blocks; every block shape gives the one-block answer."""
    q, bank = _unit(300, 24, 2), _unit(1000, 24, 3)
    full = (q @ bank.T).amax(1)
    for chunk in (1, 299, 300, 301, 12_345, 1 << 22):
        torch.testing.assert_close(max_similarity(q, bank, chunk=chunk), full, rtol=0, atol=1e-6)
    assert max_similarity(q[:0], bank).shape == (0,)
    assert (max_similarity(q, bank[:0]) == -1).all()


def test_score_views_needs_one_flip_per_view():
    fm = create_method("fm")
    with pytest.raises(InputError):
        fm.score_views([Query(None, torch.zeros(4, 2, 2))], [[], [-1]])
    with pytest.raises(InputError):
        create_method("fm", bg_cover=1.5)


@pytest.mark.data
@pytest.mark.parametrize("cls", ["magnetic_tile/blowhole", "sd_saliency_900/scratches"])
def test_predict_uses_the_pruned_search_with_the_exact_mask_and_defect_score(defects_root, cls):
    """predict() scores through score_views(exact_above=threshold): the same mask, verdict and defect
    score (the grid's maximum) as the exact margins of margins(); below-threshold cells are bounds."""
    sup, mask, _ = _pair(defects_root, cls)
    seg = FewShotSegmenter().fit([sup], [mask])
    d = defects_root / cls / "images"
    for q in sorted(d.iterdir())[1:4]:
        pred = seg.predict(q)
        exact = seg.finish(seg.margins(q)[0], pred.mask.shape, load_image(q), str(q))
        np.testing.assert_array_equal(pred.mask, exact.mask)
        assert pred.is_defective == exact.is_defective
        assert pred.defect_score == pytest.approx(exact.defect_score, abs=2e-3)
        assert (pred.margin_grid >= exact.margin_grid - 2e-3).all()       # bounds never below the exact
    # a query with nothing above the threshold keeps an exact maximum too (an all-background bank match)
    blank = np.full_like(sup, int(np.median(sup)))
    pred, exact = seg.predict(blank), seg.finish(seg.margins(blank)[0], blank.shape[:2], blank)
    assert pred.defect_score == pytest.approx(exact.defect_score, abs=2e-3)


@pytest.mark.data
def test_cpu_backbone_passes_take_one_image_each(defects_root, monkeypatch):
    """On the CPU the backbone sees one image per pass (zoomed 1024-px and squeezed 256-px inputs
    alike); the features equal those of one batch of all of them (what a GPU runs)."""
    from fdseg import features
    from fdseg.backbones import create_backbone
    from fdseg.data import Preprocess
    sup, _, query = _pair(defects_root, "visa/capsules")
    ims = [sup, query, np.ascontiguousarray(sup[::-1]), np.ascontiguousarray(query[:, ::-1])]
    for pre in (Preprocess(mode="auto", zoom=2), Preprocess(mode="resize")):
        ex = features.FeatureExtractor(create_backbone("efficientnet_lite0"), pre)
        assert ex.images_per_pass(4) == 1
        seen = []
        orig = ex._maps
        monkeypatch.setattr(ex, "_maps", lambda x: seen.append(x.shape[0]) or orig(x))
        split = ex.batch_maps(ims)
        assert seen == [1, 1, 1, 1]
        monkeypatch.setattr(ex, "images_per_pass", lambda n: n)       # a GPU's rule
        seen.clear()
        whole = ex.batch_maps(ims)
        assert seen == [4]
        for a, b in zip(split, whole):
            torch.testing.assert_close(features.as_grid(a), features.as_grid(b), rtol=0, atol=1e-5)
        monkeypatch.undo()


@pytest.mark.data
def test_channels_last_backbone_gives_the_same_features(defects_root):
    """The extractor runs its convolutions channels-last (3-4x faster under bf16 on the CPU); the
    features equal the default layout's within rounding, at a square and a zoomed input: 1e-5 in fp32;
    under bf16 autocast oneDNN's kernels for the two layouts may round differently (equal to 2e-7 on
    an AMX Xeon, up to 6e-3 per channel on a Zen 4 EPYC), so there each cell's feature keeps its
    direction (cosine >= 0.999) and no channel moves more than two bf16 steps."""
    from fdseg.backbones import create_backbone
    from fdseg.data import Preprocess
    from fdseg.features import FeatureExtractor
    sup, _, query = _pair(defects_root, "visa/capsules")
    fast = FeatureExtractor(create_backbone("efficientnet_lite0"), Preprocess(mode="auto", zoom=2))
    plain = FeatureExtractor(create_backbone("efficientnet_lite0"), Preprocess(mode="auto", zoom=2),
                             channels_last=False)
    assert fast.channels_last and not plain.channels_last
    small = np.ascontiguousarray(query[:200, :200])
    for im in (query, small):
        a, b = fast(im), plain(im)
        assert a.shape == b.shape
        if not fast.amp:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        else:
            assert float((a * b).sum(0).min()) >= 0.999 and float((a - b).abs().max()) < 2 * 2 ** -7
