"""Refinement through FewShotSegmenter, bench and the CLI, on the real defect images (core venv)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import fdseg
from fdseg.cli import main
from fdseg.errors import MissingExtraError


def _pair(root, ds, cls, i):
    imgs = sorted((root / ds / cls / "images").iterdir())
    im = imgs[i]
    return im, root / ds / cls / "masks" / f"{im.stem}.png"


@pytest.mark.data
def test_segmenter_refine_superpixel_real(defects_root):
    s_img, s_mask = _pair(defects_root, "magnetic_tile", sorted(p.name for p in (defects_root / "magnetic_tile").iterdir() if p.is_dir())[0], 0)
    q1, _ = _pair(defects_root, "magnetic_tile", s_img.parent.parent.name, 1)
    q2, _ = _pair(defects_root, "magnetic_tile", s_img.parent.parent.name, 2)
    plain = fdseg.FewShotSegmenter(colour_refine=0)        # the proposer alone (the colour rule is tested apart)
    ref = fdseg.FewShotSegmenter(refine="superpixel", refine_options={"scale": 100}, colour_refine=0)
    plain.fit(s_img, s_mask)
    ref.fit(s_img, s_mask)
    a, b = plain.predict([q1, q2]), ref.predict([q1, q2])
    changed = 0
    for pa, pb in zip(a, b):
        assert pb.mask.shape == pa.mask.shape and pb.mask.dtype == bool
        assert ((pb.score > 0.5) == pb.mask).all()          # score agrees with the refined mask
        changed += int((pa.mask != pb.mask).sum())
    assert changed > 0
    assert ref.describe()["refine"] == "superpixel"
    # the same fusion applied by hand gives the same mask
    from fdseg.refine import Refiner
    assert (Refiner("superpixel", {"scale": 100})(a[0].image, a[0].mask) == b[0].mask).all()


def test_sam_parts_name_the_extra_or_the_checkpoint():
    try:
        import sam2  # noqa: F401
        have = True
    except ImportError:
        have = False
    if not have:
        for make in (lambda: fdseg.FewShotSegmenter(method="sam2_track"),
                     lambda: fdseg.FewShotSegmenter(refine="sam2_auto")):
            with pytest.raises(MissingExtraError, match=r"fdseg\[sam\]"):
                make()
    else:
        with pytest.raises(fdseg.InputError, match="sam2-checkpoint"):
            fdseg.FewShotSegmenter(method="sam2_track")
    with pytest.raises(fdseg.InputError, match="fastsam-checkpoint"):
        fdseg.FewShotSegmenter(refine="fastsam")
    assert {"superpixel", "fastsam", "sam2_auto"} <= set(fdseg.list_proposers())
    assert {"sam2_track", "fm_prompt"} <= set(fdseg.list_methods())
    # the web app lists the proposers with their summaries and extras
    from fdseg.serve.engine import options
    sp = {r["name"]: r for r in options({})["refine"]}["superpixel"]
    assert sp["extra"] == "refine" and "Felzenszwalb" in sp["summary"]


@pytest.mark.data
def test_bench_and_segment_cli_with_refine(defects_root, tmp_path, capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "refinements (--refine)" in listed and "superpixel" in listed and "fdseg[sam]" in listed
    out = tmp_path / "b"
    rc = main(["bench", "--data", str(defects_root), "--datasets", "crackforest", "--max-per-class", "3",
               "--shots", "1", "--out", str(out), "--no-progress", "--gallery", "0", "--threads", "1",
               "--refine", "superpixel", "--refine-option", "scale=150"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["segmenter"]["refine"] == "superpixel" and res["segmenter"]["refine_options"] == {"scale": 150}
    assert res["runs"][0]["episodes"] == 3 and not res["runs"][0]["errors"]
    s_img, s_mask = _pair(defects_root, "crackforest", "crack", 0)
    q, _ = _pair(defects_root, "crackforest", "crack", 1)
    so = tmp_path / "s"
    assert main(["segment", "--support", str(s_img), str(s_mask), "--query", str(q), "--out", str(so),
                 "--no-progress", "--refine", "superpixel"]) == 0
    from PIL import Image
    mask = np.array(Image.open(so / "masks" / f"{q.stem}.png"))
    assert mask.shape == np.array(Image.open(q)).shape[:2] and set(np.unique(mask)) <= {0, 255}
    row, = json.loads((so / "summary.json").read_text())
    assert row["status"] == "ok" and row["defect_fraction"] == pytest.approx((mask > 0).mean(), abs=1e-6)
    assert main(["segment", "--support", str(s_img), str(s_mask), "--query", str(q), "--out", str(so),
                 "--no-progress", "--refine", "fastsam", "--fastsam-checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt: FastSAM checkpoint not found" in capsys.readouterr().err
