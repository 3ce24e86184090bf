"""The meta-learning baseline: train-meta trains (loss drops), checkpoints, resumes; method
'meta' segments real images through the segmenter, bench and segment; bad input is named."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fdseg import FewShotSegmenter
from fdseg.cli import main
from fdseg.errors import InputError
from fdseg.methods.meta import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, MetaProtoNet
from fdseg.train_meta import FeatureSpec, TrainConfig, train

SMALL = FeatureSpec(input_size=64)          # 16 x 16 grid: fast on one core


def _cfg(root: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=root, out=out, train_datasets=["crackforest"], features=SMALL, cache=out.parent / "cache",
                steps=40, batch=2, seed=3, save_every=10, progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(defects_root, tmp_path_factory) -> tuple[TrainConfig, dict]:
    out = tmp_path_factory.mktemp("meta") / "run"
    cfg = _cfg(defects_root, out)
    return cfg, train(cfg)


def test_training_lowers_the_loss_on_real_data(trained):
    cfg, ck = trained
    assert ck["step"] == 40 and cfg.checkpoint.is_file()
    curve = np.array(ck["curve"])                # step, loss, seg, align (means over 10 steps)
    assert curve[:, 0].tolist() == [10, 20, 30, 40]
    first, last = curve[0, 1], curve[-1, 1]
    assert np.isfinite(curve[:, 1:]).all()
    assert last < 0.85 * first, f"loss did not drop: {curve[:, 1]}"


def test_resume_continues_to_the_same_weights(defects_root, trained, tmp_path):
    cfg, ck = trained
    out = tmp_path / "resumed"
    # stops after its first step (a zero time budget), then a rerun finishes the 40 steps
    part = train(_cfg(defects_root, out, cache=cfg.cache, max_minutes=0.0))
    assert part["step"] == 1
    done = train(_cfg(defects_root, out, cache=cfg.cache))
    assert done["step"] == 40 and len(done["curve"]) == 4
    for k, v in ck["model"].items():
        assert torch.allclose(v, done["model"][k], atol=1e-5), k
    # a finished run is not retrained; other settings are refused
    assert train(_cfg(defects_root, out, cache=cfg.cache))["step"] == 40
    with pytest.raises(InputError, match="other settings"):
        train(_cfg(defects_root, out, cache=cfg.cache, lr=1e-4))


def test_meta_segments_real_images_via_segmenter(defects_root, trained):
    cfg, _ = trained
    imgs = sorted((defects_root / "bsdata" / "pitting" / "images").iterdir())[:3]
    masks = [defects_root / "bsdata" / "pitting" / "masks" / (p.stem + ".png") for p in imgs]
    seg = FewShotSegmenter(method="meta", input_size=64, resize="resize",
                           method_options={"checkpoint": str(cfg.checkpoint)})
    seg.fit(imgs[:1], masks[:1])
    preds = seg.predict(imgs[1:])
    from PIL import Image
    for p, path in zip(preds, imgs[1:]):
        w, h = Image.open(path).size
        assert p.mask.shape == (h, w) and p.score.shape == (h, w)
        assert p.margin_grid.shape == (8, 8)      # 16 x 16 grid pooled 2 x 2
    seg.fit(imgs[:2], masks[:2])                  # 2-shot works too
    assert seg.predict(imgs[2]).mask.shape[:2] == preds[-1].mask.shape[:2]


def test_meta_in_bench_and_segment_cli(defects_root, trained, tmp_path, capsys):
    cfg, _ = trained
    opt = f"checkpoint={cfg.checkpoint}"
    rc = main(["bench", "--data", str(defects_root), "--datasets", "bsdata", "--max-per-class", "2", "--shots", "1",
               "--method", "meta", "--method-option", opt, "--size", "64", "--out", str(tmp_path / "b"),
               "--no-progress", "--gallery", "0"])
    assert rc == 0
    import json
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["runs"][0]["method"] == "meta" and res["runs"][0]["episodes"] == 2
    assert 0.0 <= res["runs"][0]["class_mean_miou"] <= 1.0
    img = sorted((defects_root / "crackforest" / "crack" / "images").iterdir())[:2]
    mask = defects_root / "crackforest" / "crack" / "masks" / (img[0].stem + ".png")
    rc = main(["segment", "--support", str(img[0]), str(mask), "--query", str(img[1]), "--out", str(tmp_path / "s"),
               "--method", "meta", "--method-option", opt, "--size", "64", "--no-progress"])
    assert rc == 0 and (tmp_path / "s" / "masks" / f"{img[1].stem}.png").is_file()


# -- bad input -----------------------------------------------------------------------------------
def test_missing_or_foreign_checkpoint_is_named(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(InputError, match="does not exist") as e:
        FewShotSegmenter(method="meta", method_options={"checkpoint": str(missing)})
    assert str(missing) in str(e.value)
    with pytest.raises(InputError, match="needs checkpoint=PATH"):
        FewShotSegmenter(method="meta")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(InputError, match="not an fdseg meta checkpoint"):
        FewShotSegmenter(method="meta", method_options={"checkpoint": str(other)})
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable torch checkpoint"):
        FewShotSegmenter(method="meta", method_options={"checkpoint": str(junk)})


def _ck(net: MetaProtoNet, arch: dict | None = None) -> dict:
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": arch or dict(net.arch),
            "model": net.state_dict(), "step": 0, "features": {"backbone": "efficientnet_lite0"}}


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    bad = tmp_path / "arch.pt"
    net = MetaProtoNet(152, dim=32)
    torch.save(_ck(net, {**net.arch, "dim": 64}), bad)          # weights do not fit the stated arch
    with pytest.raises(InputError, match="does not fit the meta network architecture"):
        FewShotSegmenter(method="meta", method_options={"checkpoint": str(bad)})


def test_checkpoint_for_other_features_names_the_backbone(defects_root, tmp_path):
    path = tmp_path / "c10.pt"
    torch.save(_ck(MetaProtoNet(10)), path)                      # a valid net, for 10-channel features
    img = sorted((defects_root / "crackforest" / "crack" / "images").iterdir())[0]
    mask = defects_root / "crackforest" / "crack" / "masks" / (img.stem + ".png")
    seg = FewShotSegmenter(method="meta", input_size=64, method_options={"checkpoint": str(path)})
    with pytest.raises(InputError, match="10-channel features .* 152 channels: use --backbone") as e:
        seg.fit([img], [mask])
    assert str(path) in str(e.value)


def test_unknown_datasets_are_listed(defects_root, tmp_path, capsys):
    rc = main(["train-meta", "--data", str(defects_root), "--train-datasets", "crackforest", "mvtec_nope",
               "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "mvtec_nope" in err and "have: bsdata, crackforest, magnetic_tile" in err
    rc = main(["train-meta", "--data", str(defects_root), "--train-datasets", "crackforest",
               "--test-datasets", "crackforest", "--out", str(tmp_path / "y"), "--no-progress"])
    assert rc == 2 and "--skip-first-per-class" in capsys.readouterr().err
    rc = main(["train-meta", "--data", str(tmp_path / "missing"), "--train-datasets", "a",
               "--out", str(tmp_path / "z"), "--no-progress"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_in_domain_training_skips_the_test_images(defects_root, tmp_path):
    from fdseg.data.layouts import scan
    from fdseg.train_meta import FeatureBank
    cat = scan(defects_root).subset(None, ["crackforest/crack", "magnetic_tile/fray"])   # 60 and 32 images
    bank = FeatureBank.build(cat, SMALL, tmp_path / "cache", skip_first=50, progress=False)
    # fray (32 <= 50 images) gives nothing; crack gives its images 51..60, in file-name order
    assert list(bank.groups) == [("crackforest", "crack")] and len(bank.groups[("crackforest", "crack")]) == 10
    assert len(bank.feats) == 10 and bank.feats.shape[-2:] == (16, 16) and bank.cov.shape == (10, 16, 16)
    full = FeatureBank.build(cat.subset(["crackforest"]), SMALL, tmp_path / "cache", progress=False)
    assert torch.equal(bank.feats, full.feats[50:])         # the cached grids of exactly those images
