"""SAM2 / FastSAM code paths with randomly initialised models saved in each library's checkpoint format.

Runs in the ``.venv-sam`` environment (``make test-sam``); elsewhere it skips, unless
FDSEG_REQUIRE_SAM=1 makes a missing extra a failure. No SAM weights exist here: the tests assert
loading, shapes, dtypes, empty-mask handling and that the support masks condition the output,
not accuracy.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import fdseg
from fdseg.errors import InputError

from conftest import planted

pytestmark = pytest.mark.sam

ASSETS = Path(__file__).parent / "assets"
TINY = ASSETS / "sam2_tiny.yaml"


def _need(mod: str):
    try:
        return importlib.import_module(mod)
    except ImportError:
        if os.environ.get("FDSEG_REQUIRE_SAM") == "1":
            pytest.fail(f"FDSEG_REQUIRE_SAM=1 but {mod} is not installed (pip install 'fdseg[sam]')")
        pytest.skip(f"{mod} not installed (pip install 'fdseg[sam]')", allow_module_level=True)


_need("sam2")
_need("ultralytics")


@pytest.fixture(scope="module")
def sam2_ckpt(tmp_path_factory) -> Path:
    from fdseg.sam import save_random_sam2
    return save_random_sam2(TINY, tmp_path_factory.mktemp("sam2") / "tiny.pt", seed=0)


@pytest.fixture(scope="module")
def fastsam_ckpt(tmp_path_factory) -> Path:
    from fdseg.sam.fastsam_random import save_random_fastsam
    return save_random_fastsam(tmp_path_factory.mktemp("fastsam") / "FastSAM-tiny.pt", scale="n", seed=0)


@pytest.fixture(scope="module")
def scene():
    """Two supports and a query with a striped patch on a noise texture (96 x 128)."""
    s1 = planted(96, 128, (20, 30, 50, 70), 1)
    s2 = planted(96, 128, (40, 60, 80, 110), 2)
    q = planted(96, 128, (30, 20, 70, 60), 3)
    return [s1, s2], q


def _object_score(model, bias: float) -> None:
    """Fix SAM2's object-score head: > 0 says the object is present, < 0 absent."""
    head = model.sam_mask_decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head
    with torch.no_grad():
        last.bias.fill_(bias)


def _track(ckpt, present: bool = True, **kw):
    seg = fdseg.FewShotSegmenter(method="sam2_track", method_options={"checkpoint": str(ckpt), "config": str(TINY),
                                                                      **kw})
    if present:                          # random weights would often say "absent" (all logits -1024)
        _object_score(seg.method.predictor, 100.0)
    return seg


# -- building ------------------------------------------------------------------------------------------

def test_build_errors_name_the_file(sam2_ckpt, fastsam_ckpt, tmp_path):
    from fdseg.sam import build_sam2
    with pytest.raises(InputError, match="missing.pt: SAM2 checkpoint not found"):
        build_sam2(TINY, tmp_path / "missing.pt")
    with pytest.raises(InputError, match="nope.yaml: SAM2 config not found"):
        build_sam2(tmp_path / "nope.yaml", sam2_ckpt)
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(InputError, match="bad.yaml: not a SAM2 model config"):
        build_sam2(bad, sam2_ckpt)
    # a checkpoint of another size: the tiny weights against sam2.1's hiera-t config
    with pytest.raises(InputError, match=r"tiny.pt: does not match SAM2 config sam2.1_hiera_t.yaml: .* missing"):
        build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", sam2_ckpt)
    # another family: an ultralytics (pickled module) checkpoint, a bare state dict
    with pytest.raises(InputError, match="FastSAM-tiny.pt: cannot be read as a SAM2 checkpoint"):
        build_sam2(TINY, fastsam_ckpt)
    sd = tmp_path / "sd.pt"
    torch.save({"weight": torch.zeros(2)}, sd)
    with pytest.raises(InputError, match="sd.pt: not a SAM2 checkpoint"):
        build_sam2(TINY, sd)
    with pytest.raises(InputError, match="sam2-config"):
        build_sam2(None, sam2_ckpt)                    # no config and a name that says none
    m = build_sam2(TINY, sam2_ckpt, kind="video")
    assert type(m).__name__ == "SAM2VideoPredictor" and not m.training and m.image_size == 256


# -- sam2_track ----------------------------------------------------------------------------------------

def test_sam2_track_shapes_and_reuse(sam2_ckpt, scene):
    sups, (q, _) = scene
    seg = _track(sam2_ckpt)
    seg.fit([s[0] for s in sups], [s[1] for s in sups])
    pred = seg.predict(q)
    assert pred.mask.shape == q.shape[:2] and pred.mask.dtype == bool and pred.margin_grid.dtype == np.float32
    assert pred.score.dtype == np.float32 and pred.margin_grid.shape == (256, 256)
    # the reused support memory gives what a fresh video state gives, query after query
    fresh = _track(sam2_ckpt, reuse_memory=False)
    fresh.fit([s[0] for s in sups], [s[1] for s in sups])
    q2 = planted(96, 128, (10, 10, 40, 40), 9)[0]
    for im in (q, q2, q):
        a, b = seg.margins(im)[0], fresh.margins(im)[0]
        assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    assert not torch.allclose(seg.margins(q)[0], seg.margins(q2)[0])


def test_sam2_track_support_masks_condition_the_output(sam2_ckpt, scene):
    sups, (q, _) = scene
    img = sups[0][0]
    other = np.zeros_like(sups[0][1])
    other[60:90, 5:40] = True
    a, b = _track(sam2_ckpt), _track(sam2_ckpt)
    a.fit([img], [sups[0][1]])
    b.fit([img], [other])
    ma, mb = a.margins(q)[0], b.margins(q)[0]
    # random weights damp the memory path (layer scale 1e-6), so the effect is small but far above
    # run-to-run noise, which is zero: the same supports give the same logits again
    assert float((ma - a.margins(q)[0]).abs().max()) == 0.0
    assert float((ma - mb).abs().max()) > 1e-4


def test_sam2_track_object_absent_gives_empty_mask(sam2_ckpt, scene):
    sups, (q, _) = scene
    seg = _track(sam2_ckpt, present=False)
    seg.fit([s[0] for s in sups], [s[1] for s in sups])
    _object_score(seg.method.predictor, -100.0)        # SAM2 says: the object is absent
    seg.method.to("cpu")                               # re-encode the supports with that head
    pred = seg.predict(q)
    assert not pred.mask.any() and pred.margin_grid.max() < -100 and pred.boxes == []
    _object_score(seg.method.predictor, 100.0)         # present: real logits, not the "no object" constant
    seg.method.to("cpu")
    m = seg.margins(q)[0]
    assert m.max() > -100 and m.std() > 0


def test_sam2_track_empty_support_masks(sam2_ckpt, scene):
    sups, _ = scene
    seg = _track(sam2_ckpt)
    with pytest.raises(InputError, match="support mask is empty"):
        seg.fit([sups[0][0]], [np.zeros(sups[0][1].shape, bool)])
    from fdseg.methods.base import Support
    with pytest.raises(InputError, match="at least one support mask"):
        seg.method.fit([Support(sups[0][0], np.zeros(sups[0][1].shape, bool), None, None)])


# -- fm_prompt -----------------------------------------------------------------------------------------

def test_fm_prompt(sam2_ckpt, scene):
    sups, (q, qm) = scene
    seg = fdseg.FewShotSegmenter(method="fm_prompt", input_size=128,
                                 method_options={"checkpoint": str(sam2_ckpt), "config": str(TINY)})
    fm = fdseg.FewShotSegmenter(method="fm", input_size=128)
    for s in (seg, fm):
        s.fit([x[0] for x in sups], [x[1] for x in sups])
    p, f = seg.predict(q), fm.predict(q)
    assert f.mask.any()                                 # FM finds the patch, so SAM2 is prompted
    assert p.mask.shape == q.shape[:2] and p.margin_grid.shape == q.shape[:2]   # SAM logits at query size
    assert not np.array_equal(p.mask, f.mask)
    # prompts: one region of a 4 x 4 grid at cells (1..2, 1..2) -> box in query pixels, point at the peak
    g = -np.ones((4, 4), np.float32)
    g[1:3, 1:3] = [[0.1, 0.2], [0.3, 0.9]]
    (box, pts, labels), = seg.method.prompts(g, (40, 80))
    # cells 1..2 grown by 0.1 x 2 cells: x (0.8 .. 3.2) x 20 px, y (0.8 .. 3.2) x 10 px
    assert np.allclose(box, [16, 8, 64, 32]) and labels.tolist() == [1, 0]
    assert np.allclose(pts[0], [50, 25])
    assert seg.method.prompts(-np.ones((4, 4), np.float32), (40, 80)) == []


# -- proposers -----------------------------------------------------------------------------------------

def test_sam2_auto_proposer(sam2_ckpt, scene):
    from fdseg.refine import Refiner
    _, (q, _) = scene
    opts = {"checkpoint": str(sam2_ckpt), "config": str(TINY), "points_per_side": 4, "pred_iou_thresh": 0.0,
            "stability_score_thresh": 0.0}
    r = Refiner("sam2_auto", opts)
    cands = r.proposer.propose(q)
    assert cands.dtype == bool and cands.ndim == 3 and cands.shape[1:] == q.shape[:2] and len(cands) > 0
    # nothing passes an impossible IoU threshold: no candidates, the prediction stays as it is
    none = Refiner("sam2_auto", {**opts, "pred_iou_thresh": 2.0})
    assert none.proposer.propose(q).shape == (0, *q.shape[:2])
    m = np.zeros(q.shape[:2], bool)
    m[30:70, 20:60] = True
    assert (none(q, m) == m).all()


def test_fastsam_proposer(fastsam_ckpt, sam2_ckpt, scene, tmp_path):
    from fdseg.refine import create_proposer
    sups, (q, _) = scene
    p = create_proposer("fastsam", checkpoint=str(fastsam_ckpt), imgsz=128, conf=0.0)
    c = p.propose(q)
    assert c.dtype == bool and c.ndim == 3 and c.shape[1:] == q.shape[:2]
    strict = create_proposer("fastsam", checkpoint=str(fastsam_ckpt), imgsz=128, conf=1.0)
    assert strict.propose(q).shape == (0, *q.shape[:2])          # no masks -> empty stack
    seg = fdseg.FewShotSegmenter(input_size=128, refine="fastsam",
                                 refine_options={"checkpoint": str(fastsam_ckpt), "imgsz": 128, "conf": 1.0})
    plain = fdseg.FewShotSegmenter(input_size=128)
    for s in (seg, plain):
        s.fit([x[0] for x in sups], [x[1] for x in sups])
    assert (seg.predict(q).mask == plain.predict(q).mask).all()   # no candidates: prediction unchanged
    with pytest.raises(InputError, match="tiny.pt: not a FastSAM / ultralytics checkpoint"):
        create_proposer("fastsam", checkpoint=str(sam2_ckpt))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="junk.pt: not a torch checkpoint"):
        create_proposer("fastsam", checkpoint=str(junk))


# -- CLI -----------------------------------------------------------------------------------------------

@pytest.mark.data
def test_cli_segment_and_bench_with_sam(sam2_ckpt, fastsam_ckpt, defects_root, tmp_path):
    import json

    from fdseg.cli import main
    cls = defects_root / "crackforest" / "crack"
    ims = sorted((cls / "images").iterdir())[:2]
    sup = [str(ims[0]), str(cls / "masks" / f"{ims[0].stem}.png")]
    out = tmp_path / "seg"
    assert main(["segment", "--support", *sup, "--query", str(ims[1]), "--out", str(out), "--no-progress",
                 "--method", "sam2_track", "--sam2-checkpoint", str(sam2_ckpt), "--sam2-config", str(TINY)]) == 0
    from PIL import Image
    mask = np.array(Image.open(out / "masks" / f"{ims[1].stem}.png"))
    assert mask.shape == np.array(Image.open(ims[1])).shape[:2] and set(np.unique(mask)) <= {0, 255}
    row, = json.loads((out / "summary.json").read_text())
    assert row["status"] == "ok" and row["defect_fraction"] == pytest.approx((mask > 0).mean(), abs=1e-6)
    b = tmp_path / "bench"
    assert main(["bench", "--data", str(defects_root), "--datasets", "crackforest", "--max-per-class", "2",
                 "--shots", "1", "--out", str(b), "--no-progress", "--gallery", "0", "--method", "fm", "sam2_track",
                 "--sam2-checkpoint", str(sam2_ckpt), "--sam2-config", str(TINY), "--size", "128",
                 "--refine", "fastsam", "--fastsam-checkpoint", str(fastsam_ckpt),
                 "--refine-option", "imgsz=128"]) == 0
    res = json.loads((b / "results.json").read_text())
    assert [r["method"] for r in res["runs"]] == ["fm", "sam2_track"]
    assert all(r["episodes"] == 2 and not r["errors"] for r in res["runs"])
