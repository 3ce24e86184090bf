"""The pipeline as named steps: the fitted plan, presets, one finish path, model vs fitted state."""
from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from fdseg import FewShotSegmenter
from fdseg.errors import InputError
from fdseg.presets import DEFAULTS, PRESETS, preset_settings

from conftest import planted

VISA_SMALL = "visa/macaroni1_small_cracks"      # small defects on 1500-px images: the zoom rule fires
TEXTURE = "magnetic_tile/blowhole"


# -- presets (synthetic tier) ----------------------------------------------------------------------
def test_presets_resolve_to_their_settings():
    assert set(PRESETS) == {"accurate", "fast", "paper", "line"}
    line = FewShotSegmenter(preset="line")            # the accurate settings behind a first pass (fdseg.cascade)
    assert type(line).__name__ == "CascadeSegmenter"
    assert {k: v for k, v in line.settings.items() if k != "preset"} == \
        {k: v for k, v in FewShotSegmenter().settings.items() if k != "preset"}
    assert preset_settings(None) == preset_settings("accurate") == dict(DEFAULTS)
    paper = FewShotSegmenter(preset="paper").settings
    assert (paper["resize"], paper["zoom"], paper["support_augment"], paper["query_augment"],
            paper["colour_refine"], paper["method_options"]) == ("resize", 1, "none", "none", 0.0, {"head": 0.0})
    fast = FewShotSegmenter(preset="fast").settings
    assert {k: fast[k] for k in PRESETS["fast"]} == dict(PRESETS["fast"])
    acc = FewShotSegmenter().settings
    assert (acc["preset"], acc["resize"], acc["zoom"], acc["support_augment"], acc["colour_refine"]) == \
        ("accurate", "auto", "auto", "auto", 0.3)
    # an explicit setting overrides the preset's; the others stay the preset's
    over = FewShotSegmenter(preset="paper", zoom=2, colour_refine=0.5).settings
    assert (over["zoom"], over["colour_refine"], over["resize"], over["support_augment"]) == (2, 0.5, "resize", "none")
    with pytest.raises(InputError, match="unknown preset 'quick'"):
        FewShotSegmenter(preset="quick")


def test_plan_on_synthetic_supports_says_what_and_why():
    img, mask = planted(160, 160, (60, 60, 100, 100), seed=3)
    seg = FewShotSegmenter().fit(img, mask)
    plan = seg.plan
    assert [d.step for d in plan.decisions] == ["precision", "zoom", "support views", "query views", "matcher",
                                                "colour", "threshold"]
    assert plan["zoom"] == 1 and "long side 160 < 1024" in str(plan)
    assert plan["support views"] == "dihedral" and plan["query views"] == "flip"
    assert plan.threshold == seg.decision_threshold
    d = seg.describe()
    assert d["plan"]["zoom"] == 1 and d["explain"] == str(plan) and d["supports"] == 1
    two = FewShotSegmenter().fit([img, img[:, ::-1]], [mask, mask[:, ::-1]])
    assert two.plan["support views"] == "flip" and two.plan["query views"] == "none"
    assert two.plan.threshold == 0.0 and "no slack" in str(two.plan)
    paper = FewShotSegmenter(preset="paper").fit(img, mask).plan
    assert paper["colour"] == "off" and paper["support views"] == "none" and paper.threshold == 0.0


def test_query_views_are_the_flipped_pixels_of_the_query():
    from fdseg.pipeline.views import QUERY_VIEWS, merge_views, view_images
    rng = np.random.default_rng(0)
    for shape in ((7, 9, 3), (7, 9)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        views = view_images(image, "flip")
        assert [v.tolist() for v in views] == [image[:, ::-1].tolist(), image[::-1].tolist()]
        assert all(v.flags.c_contiguous for v in views) and view_images(image, "none") == []
    import torch
    g = torch.arange(12.0).reshape(3, 4)            # margins of each view flipped back onto the query's grid
    flipped = [torch.flip(g, dims) for _, dims in QUERY_VIEWS["flip"]]
    assert torch.equal(merge_views(g, flipped, "flip"), g)


def test_spawned_segmenters_share_the_model_and_keep_their_own_state():
    a_img, a_mask = planted(128, 128, (20, 20, 60, 60), seed=1)
    b_img, b_mask = planted(128, 128, (70, 70, 110, 110), seed=2)
    q, q_mask = planted(128, 128, (30, 70, 70, 110), seed=5)
    base = FewShotSegmenter(colour_refine=0)
    one, two = base.spawn().fit(a_img, a_mask), base.spawn().fit([a_img, b_img], [a_mask, b_mask])
    assert one.model is two.model is base.model
    assert one.extractor.backbone is two.extractor.backbone is base.model.extractor.backbone
    assert base.state is None and one.n_supports == 1 and two.n_supports == 2
    assert one.method is not two.method and one.method.fg.shape != two.method.fg.shape
    # the fitted state pickles alone and predicts the same masks on the shared model
    state = pickle.loads(pickle.dumps(one.state))
    assert state.extractor is None                      # no networks in the pickle
    again = base.spawn(state)
    np.testing.assert_array_equal(again.predict(q).mask, one.predict(q).mask)
    # and a whole segmenter round-trips too
    whole = pickle.loads(pickle.dumps(one))
    np.testing.assert_array_equal(whole.predict(q).mask, one.predict(q).mask)


# -- real images ---------------------------------------------------------------------------------
def _first(root, cls, n=1):
    ds, c = cls.split("/")
    ims = sorted((root / ds / c / "images").iterdir())[:n]
    return ims, [root / ds / c / "masks" / f"{p.stem}.png" for p in ims]


@pytest.mark.data
def test_plan_on_a_zoomed_visa_support_and_a_texture_support(defects_root):
    ims, masks = _first(defects_root, VISA_SMALL)
    visa = FewShotSegmenter().fit(ims, masks).plan
    assert visa["zoom"] == 2, str(visa)
    assert "cells < 2 and long side" in str(visa).splitlines()[1]        # line 0: the precision
    assert visa.preprocess.zoom == 2
    ims, masks = _first(defects_root, TEXTURE)
    tex = FewShotSegmenter().fit(ims, masks).plan
    assert tex["zoom"] == 1 and tex.preprocess.zoom == 1
    assert tex["colour"] == "contrast, on"        # magnetic tile is grey: the local-contrast histogram
    assert tex.threshold == pytest.approx(-0.04)


@pytest.mark.data
def test_segment_explain_prints_the_plan(defects_root, tmp_path):
    ims, masks = _first(defects_root, VISA_SMALL, 2)
    r = subprocess.run([sys.executable, "-m", "fdseg", "segment", "--explain", "--no-progress",
                        "--support", str(ims[0]), str(masks[0]), "--query", str(ims[1]), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "plan (accurate preset, 1 support):" in r.stderr
    assert "zoom=2 because support defects" in r.stderr and "threshold=" in r.stderr
    assert "<h2>Plan</h2>" in (tmp_path / "report.html").read_text()


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("shots", [1, 5])
def test_predict_and_bench_give_identical_masks(defects_root, tmp_path, shots):
    """One finish path: the bench's episode masks are predict()'s at the evaluation size."""
    import json

    from fdseg.bench import BenchConfig, run_bench, run_episode
    from fdseg.data import make_episodes, scan
    cat = scan(defects_root).subset(["magnetic_tile", "visa"], ["blowhole", "macaroni1_small_cracks"], shots + 2)
    eps = make_episodes(cat, shots, 2)[::3]
    seg = FewShotSegmenter(cache_size=32)
    for ep in eps:
        _, bench_mask, _, _ = run_episode(seg, cat.root, ep, 256)
        fresh = FewShotSegmenter().fit([cat.root / p for p in ep.supports], [cat.root / p for p in ep.support_masks])
        pred = fresh.predict(cat.root / ep.query, size=(256, 256))
        np.testing.assert_array_equal(pred.mask, bench_mask, err_msg=ep.id)
        full = fresh.predict(cat.root / ep.query)
        assert full.mask.shape == full.query_size == pred.query_size
    # the run key holds the resolved settings and rule constants; each record its plan
    run_bench(BenchConfig(data=defects_root, out=tmp_path, shots=[shots], datasets=["visa"],
                          classes=["macaroni1_small_cracks"], max_per_class=shots + 1, progress=False, gallery=0))
    lines = (tmp_path / "runs" / f"fm_{shots}shot.jsonl").read_text().splitlines()
    key = json.loads(lines[0])["key"]["segmenter"]
    assert key["preset"] == "accurate" and key["below_cells"] == 2.0 and key["colour"]["tau"] == 0.3
    assert all(json.loads(ln)["plan"].startswith("precision=") and "; zoom=2; support views=" in json.loads(ln)["plan"]
               for ln in lines[1:])


def test_server_sessions_share_one_model_and_take_a_preset(tmp_path):
    """Sessions of one setting are spawned from one template (networks shared, not copied); the preset
    travels through the API's settings; each session reports its own plan."""
    pytest.importorskip("fastapi", reason="needs the serve extra")
    from PIL import Image

    from fdseg.serve.engine import Engine, ServeConfig, Settings
    from fdseg.serve.uploads import Upload, UploadError

    def png(a) -> bytes:
        import io
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    img, mask = planted(128, 128, (40, 40, 80, 80), seed=4)
    pair = (Upload(png(img), "s.png", "support 1"), Upload(png((mask * 255).astype(np.uint8)), "m.png", "mask 1"))
    eng = Engine(ServeConfig(sessions_dir=None))
    fast = Settings.parse({"preset": "fast"}, Settings())
    a, b = eng.fit(fast, [pair]), eng.fit(fast, [pair])
    assert a.seg.model is b.seg.model and a.seg.state is not b.seg.state
    assert a.seg.settings["preset"] == "fast" and a.seg.plan["support views"] == "none"
    assert [d["step"] for d in a.info()["plan"]][:4] == ["precision", "zoom", "support views", "query views"]
    acc = eng.fit(Settings.parse({}, Settings()), [pair])
    assert acc.seg.model is not a.seg.model and acc.seg.plan["support views"] == "dihedral"
    with pytest.raises(UploadError, match="unknown preset"):
        Settings.parse({"preset": "quickest"}, Settings())
