"""fm on real defects beats the trivial predictors, and is deterministic."""
import dataclasses

import numpy as np
import pytest

from fdseg import FewShotSegmenter
from fdseg.bench import run_episode
from fdseg.data import load_mask, make_episodes, scan
from fdseg.data.images import load_image
from fdseg.data.preprocess import resize_mask
from fdseg.pipeline import Post, finish
from fdseg.metrics import benchmark_mean, dataset_scores, episode_counts

# a fast subset: small images from three datasets (textures), 10 images per class
SUBSET = dict(datasets=["sd_saliency_900", "magnetic_tile", "crackforest"], max_per_class=10)
# regression floor for the default (resize="auto", support_augment="auto" and query_augment="auto":
# one support's 8 dihedral views and the query's flips, fm head=1, colour rule tau 0.3 with its grey
# mode and single-support slack): measured 0.420 on this subset (0.412 with flipped supports only and no
# query flips; the dihedral views alone 0.406 -- this subset is the three datasets where they gain least,
# see BENCHMARKS.md -- the query's flips alone 0.423); before those views: (without the
# slack 0.416 -- crackforest pays for it here, see BENCHMARKS.md; the colour rule as first adopted,
# RGB on grey images, no slack, 0.403; without the colour rule 0.393; without flips 0.361, without the
# head 0.369, without both 0.345; the paper's resize="resize" 0.338); the floor leaves 1 point for
# BLAS / platform differences. The colour rule's self-check (min_kept) is off in none of these 90
# episodes (their supports' defects keep >= 0.82 of their pixels), so the measurement stands.
# Today's default (folded backbone; the slack only where the rule trims the ring around the support's
# defect): 0.425 (0.417 with the slack given whenever the rule is on).
FLOOR = 0.410

pytestmark = pytest.mark.data


def _score(records, cat):
    by = {}
    for r in records:
        by.setdefault(r["dataset"], []).append(r)
    return benchmark_mean([dataset_scores(ds, sorted(cat.classes[ds]), rs) for ds, rs in by.items()])


@pytest.fixture(scope="module")
def subset_results(defects_root):
    cat = scan(defects_root).subset(**SUBSET)
    eps = make_episodes(cat, 1, seed=2)
    seg = FewShotSegmenter(method="fm")
    out = {k: [] for k in ("fm", "all_bg", "all_fg", "copy_support")}
    for ep in eps:
        gt, pred, _, _ = run_episode(seg, cat.root, ep, 256)
        sup = load_mask(cat.root / ep.support_masks[0])
        trivial = {"fm": pred, "all_bg": np.zeros_like(gt), "all_fg": np.ones_like(gt),
                   "copy_support": resize_mask(sup, gt.shape)}
        for k, p in trivial.items():
            tp, fp, fn, tn = episode_counts(gt, p)
            out[k].append({"dataset": ep.dataset, "cls": ep.cls, "tp": tp, "fp": fp, "fn": fn, "tn": tn})
    return cat, eps, {k: _score(v, cat)["class_mean_miou"] for k, v in out.items()}


@pytest.mark.slow
def test_fm_beats_trivial_predictors(subset_results):
    _, eps, miou = subset_results
    assert len(eps) == 90
    assert miou["all_bg"] == 0.0
    best_trivial = max(miou["all_fg"], miou["copy_support"])
    # measured: fm 0.420, all-foreground 0.09, copied support mask 0.06 on this subset
    assert miou["fm"] > best_trivial + 0.1, miou
    assert miou["fm"] >= FLOOR, miou


@pytest.mark.slow
def test_same_seed_same_numbers(subset_results, defects_root):
    cat, eps, miou = subset_results
    again = make_episodes(cat, 1, seed=2)
    assert again == eps
    seg = FewShotSegmenter(method="fm")
    recs = []
    for ep in eps[:12]:
        gt, pred, _, _ = run_episode(seg, cat.root, ep, 256)
        recs.append(episode_counts(gt, pred))
    seg2 = FewShotSegmenter(method="fm")
    recs2 = [episode_counts(*run_episode(seg2, cat.root, ep, 256)[:2]) for ep in eps[:12]]
    assert recs == recs2


# small defects on large images (VisA macaroni, 1500 x 1000): the default zooms (4 x size input, twice
# the grid) because the supports' defects are under 2 cells across, and the colour rule trims the
# cell-wide blobs to the defects' pixels. Measured on these 26 episodes (class-mean mIoU), with the
# single-support views (8 support views, query flips): default 0.697 (0.696 without its slack); without
# the colour rule 0.420; without it and at zoom 1 0.326 (before those views: 0.713 / 0.716 / 0.439 /
# 0.329; on the full benchmark these two classes gain 0.1 and 0.6 from them). The floor leaves 1.5
# points for BLAS / platform differences (bf16 matmul on CPUs with AVX-512 BF16, fp32 elsewhere).
# The colour rule's self-check keeps the rule in all 26 episodes (>= 0.68 of the defect pixels kept).
ZOOM_SUBSET = dict(datasets=["visa"], classes=["macaroni1_different_colour_spot", "macaroni1_middle_breakage"])
ZOOM_FLOOR = 0.68


@pytest.mark.slow
def test_zoom_and_colour_defaults_on_small_defects_of_large_images(defects_root):
    cat = scan(defects_root).subset(**ZOOM_SUBSET)
    eps = make_episodes(cat, 1, seed=2)
    assert len(eps) == 26
    recs = {k: [] for k in ("default", "slack=0", "colour=0", "zoom=1,colour=0")}

    def count(name, ep, gt, pred):
        tp, fp, fn, tn = episode_counts(gt, pred)
        recs[name].append({"dataset": ep.dataset, "cls": ep.cls, "tp": tp, "fp": fp, "fn": fn, "tn": tn})

    seg = FewShotSegmenter(method="fm", cache_size=64)
    plain = FewShotSegmenter(method="fm", cache_size=64, zoom=1, colour_refine=0)
    for ep in eps:
        gt, pred, _, _ = run_episode(plain, cat.root, ep, 256)
        count("zoom=1,colour=0", ep, gt, pred)
        # the default's mask before and after the colour rule (and its slack), from one set of margins
        seg.fit([cat.root / p for p in ep.supports], [cat.root / p for p in ep.support_masks])
        assert seg.preprocess.zoom == 2, ep.id
        assert seg.decision_threshold == seg.threshold - seg.colour.slack < seg.threshold
        margin, _ = seg.margins(cat.root / ep.query)
        query = load_image(cat.root / ep.query)                 # decoded once for every variant
        post = seg.state.post                                   # the fitted post steps, varied below
        variants = {"default": post, "colour=0": Post(seg.threshold),
                    "slack=0": dataclasses.replace(post, threshold=seg.threshold)}
        masks = {k: finish(margin, gt.shape, p, seg.method.temperature, image=query).mask
                 for k, p in variants.items()}
        assert np.array_equal(masks["default"], seg.finish(margin, gt.shape, query).mask)
        loose = finish(margin, gt.shape, Post(post.threshold), seg.method.temperature).mask
        assert not (masks["default"] & ~loose).any()           # the colour rule only removes pixels
        for k, m in masks.items():
            count(k, ep, gt, m)
    scores = {k: _score(v, cat)["class_mean_miou"] for k, v in recs.items()}
    assert scores["default"] >= ZOOM_FLOOR, scores
    assert scores["colour=0"] > scores["zoom=1,colour=0"] + 0.05, scores      # the zoom's share
    assert scores["default"] > scores["colour=0"] + 0.15, scores              # the colour rule's share


def test_colour_rule_checks_itself_on_real_supports(defects_root):
    """The colour rule is used only if it keeps at least half of its supports' own defect pixels.
    VisA's hairline cracks (a few pixels in the rule's 256-px frame) give a defect histogram too thin to
    keep them: measured, the rule fitted on one image is off for 12 of the 14; on the same macaroni
    with its different-colour spots it is on for all 16."""
    from fdseg.refine.colour import ColourModel
    cat = scan(defects_root).subset(datasets=["visa"], classes=["macaroni1_small_cracks",
                                                                 "macaroni1_different_colour_spot"])
    off = {}
    for s in cat.samples():
        model = ColourModel().fit([load_image(s.image)], [load_mask(s.mask) > 0])
        assert model.active == (model.kept >= model.min_kept), s.image
        off.setdefault(s.cls, []).append(not model.active)
    assert len(off["macaroni1_small_cracks"]) == 14 and len(off["macaroni1_different_colour_spot"]) == 16
    assert np.mean(off["macaroni1_small_cracks"]) >= 0.75, off
    assert not any(off["macaroni1_different_colour_spot"]), off


def test_colour_threshold_chosen_on_five_real_supports(defects_root):
    """From two supports on, the colour rule's tau is chosen on the supports. Measured on real
    5-shot episodes drawn from 10 images per class: thin cracks (crackforest, magnetic_tile crack) get
    tau 1 in all 10 episodes, wide defects (sd_saliency_900 patches, magnetic_tile uneven) keep 0.3 in
    all 10; on the full benchmark it adds 6.1 points on crackforest at 5-shot (BENCHMARKS.md). Here: 4
    episodes per class, and on 6 crackforest episodes the chosen rule beats tau 0.3 on the same margins
    (measured: IoU of the summed counts 0.42 vs 0.34)."""
    from fdseg.refine.colour import ColourModel
    cat = scan(defects_root)
    for ds, cls, want in [("crackforest", "crack", 1.0), ("magnetic_tile", "crack", 1.0),
                          ("sd_saliency_900", "patches", 0.3), ("magnetic_tile", "uneven", 0.3)]:
        for ep in make_episodes(cat.subset([ds], [cls], 10), 5, seed=2)[:4]:
            ims = [load_image(cat.root / p) for p in ep.supports]
            ms = [load_mask(cat.root / p, size=i.shape[:2]) for p, i in zip(ep.support_masks, ims)]
            assert ColourModel().fit(ims, ms, grids=[(64, 64)] * 5).tau == want, ep.id
    sub = cat.subset(["crackforest"], None, 10)
    seg = FewShotSegmenter(cache_size=16)
    counts = {"chosen": np.zeros(3), "tau 0.3": np.zeros(3)}
    for ep in make_episodes(sub, 5, seed=2)[:6]:
        seg.fit([sub.root / p for p in ep.supports], [sub.root / p for p in ep.support_masks])
        assert seg.colour.tau == 1.0
        margin, _ = seg.margins(sub.root / ep.query)
        query = load_image(sub.root / ep.query)
        gt = resize_mask(load_mask(sub.root / ep.query_mask, size=query.shape[:2]), (256, 256))
        fixed = ColourModel().fit([load_image(sub.root / p) for p in ep.supports],
                                  [load_mask(sub.root / p) for p in ep.support_masks])
        for name, post in [("chosen", seg.state.post), ("tau 0.3", dataclasses.replace(seg.state.post, colour=fixed))]:
            pred = finish(margin, gt.shape, post, seg.method.temperature, image=query).mask
            tp, fp, fn, _ = episode_counts(gt, pred)
            counts[name] += (tp, fp, fn)
    iou = {k: v[0] / v.sum() for k, v in counts.items()}
    assert iou["chosen"] > iou["tau 0.3"] + 0.02, iou


def test_post_replay_gives_the_bench_masks(defects_root, tmp_path):
    """benchmarks/post_replay.py (how the colour rule's threshold was decided on every episode) keeps
    the default's margins and redoes the post steps: with the default's options it must give the very
    counts the segmenter gave on the same episodes (5-shot, where the rule chooses tau), and the rule
    turned off must change the thin cracks' masks."""
    import argparse
    import importlib.util
    import pickle
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "post_replay.py"
    spec = importlib.util.spec_from_file_location("post_replay", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "m5.pkl"
    mod.collect(argparse.Namespace(data=str(defects_root), shots=5, out=str(out), preset="accurate",
                                   datasets=["crackforest"], max_per_class=8, threads=1))
    saved = pickle.loads(out.read_bytes())
    assert len(saved["episodes"]) == 8
    live = {k: r["counts"][:3] for k, r in saved["episodes"].items()}
    same = {e["id"]: (e["tp"], e["fp"], e["fn"]) for e in mod.replay(saved, ())["crackforest"]}
    assert same == live
    fixed = {e["id"]: (e["tp"], e["fp"], e["fn"]) for e in mod.replay(saved, (("tune_from", 0),))["crackforest"]}
    assert fixed != live


def test_post_replay_view_subsets_give_the_one_view_masks(defects_root, tmp_path):
    """``collect --view-subsets`` (how the query's views were measured at 1-shot) keeps the margins of the
    query alone beside the three views': replayed, they must give the masks of a segmenter that matches
    the query alone (``query_augment="none"``) on the same episodes, and the patch must not outlive it."""
    import argparse
    import importlib.util
    import pickle
    from pathlib import Path

    from fdseg.methods.fm import FeatureMatching
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "post_replay.py"
    spec = importlib.util.spec_from_file_location("post_replay", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "m1.pkl"
    before = FeatureMatching.score_views
    mod.collect(argparse.Namespace(data=str(defects_root), shots=1, out=str(out), preset="accurate",
                                   datasets=["magnetic_tile"], max_per_class=2, threads=1, view_subsets=True))
    assert FeatureMatching.score_views is before
    saved = pickle.loads(out.read_bytes())
    recs = saved["episodes"]
    assert len(recs) == 10 and all(r["views1"].shape == r["margin"].shape == r["views2"].shape for r in recs.values())
    live = {k: r["counts"][:3] for k, r in recs.items()}
    assert {e["id"]: (e["tp"], e["fp"], e["fn"]) for e in mod.replay(saved, ())["magnetic_tile"]} == live
    one = {e["id"]: (e["tp"], e["fp"], e["fn"]) for e in mod.replay(saved, (), margin="views1")["magnetic_tile"]}
    alone = FewShotSegmenter(query_augment="none")
    root = Path(next(iter(recs.values()))["root"])
    for k, r in recs.items():
        gt, pred, _, _ = run_episode(alone, root, r["episode"], 256)
        assert episode_counts(gt, pred)[:3] == one[k], k
    assert one != live          # the views change some masks


@pytest.mark.slow
def test_slack_is_withheld_where_it_cannot_be_trimmed_on_real_cracks(defects_root):
    """crackforest's dark cracks in dark asphalt: the colour rule keeps the cracks but often cannot trim
    the ring of texture around them, so the single-support slack is withheld there (BENCHMARKS.md:
    crackforest 23.0 -> 27.2 over all 60 episodes). Measured on these 12 episodes (first 12 images):
    withheld in 3, IoU of the summed counts 0.339 with the rule against 0.312 with the slack given
    anyway (from the same margins)."""
    cat = scan(defects_root).subset(datasets=["crackforest"], max_per_class=12)
    eps = make_episodes(cat, 1, seed=2)
    seg = FewShotSegmenter(cache_size=64)
    counts = {"rule": np.zeros(3), "slack always": np.zeros(3)}
    withheld = 0
    for ep in eps:
        seg.fit([cat.root / p for p in ep.supports], [cat.root / p for p in ep.support_masks])
        post = seg.state.post
        assert seg.colour.active
        withheld += not seg.colour.loosens
        assert post.threshold == (seg.threshold - seg.colour.slack if seg.colour.loosens else seg.threshold)
        margin, _ = seg.margins(cat.root / ep.query)
        query = load_image(cat.root / ep.query)
        gt = resize_mask(load_mask(cat.root / ep.query_mask, size=query.shape[:2]), (256, 256))
        for name, p in (("rule", post),
                        ("slack always", dataclasses.replace(post, threshold=seg.threshold - seg.colour.slack))):
            tp, fp, fn, _ = episode_counts(gt, finish(margin, gt.shape, p, seg.method.temperature, image=query).mask)
            counts[name] += (tp, fp, fn)
    iou = {k: v[0] / v.sum() for k, v in counts.items()}
    assert 2 <= withheld < len(eps), withheld
    assert iou["rule"] > iou["slack always"] + 0.01, iou


def test_gate_replay_gives_the_default_gates_masks(defects_root, distill_root, tmp_path):
    """benchmarks/gate_replay.py (how the OK gate's rule was chosen) keeps each episode's ungated mask and
    the held-out normals' scores: its soft replay at the Harrell-Davis lower quartile must give the masks the
    default segmenter gives with the same normals, and the gate must remove something there."""
    import argparse
    import importlib.util
    import pickle
    from pathlib import Path

    import numpy as np
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gate_replay.py"
    spec = importlib.util.spec_from_file_location("gate_replay", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "g5.pkl"
    mod.collect(argparse.Namespace(data=str(defects_root), normal=str(distill_root), ok_queries=str(distill_root),
                                   normal_count=25, ok_count=2, shots=5, datasets=["magnetic_tile"],
                                   classes=["magnetic_tile/uneven"], max_per_class=6, eval_size=256, threads=1,
                                   precision=None, out=str(out)))
    recs = pickle.loads(out.read_bytes())["episodes"]
    assert len(recs) == 8 and all(len(r["held"]) == 5 for r in recs.values())
    seg = FewShotSegmenter(cache_size=64)
    changed = 0
    for r in recs.values():
        ep, root = r["episode"], Path(r["root"])
        seg.fit([root / p for p in ep.supports], [root / p for p in ep.support_masks], normals=r["normals"])
        live = seg.predict(root / ep.query, size=(256, 256)).mask
        replayed = mod.gated(r, "soft", mod.LEVELS["hd-quartile"])     # the default gate's rule and level
        assert np.array_equal(live, replayed), ep.id
        changed += not np.array_equal(replayed, mod.gated(r, "none", None))
    assert changed >= 1
