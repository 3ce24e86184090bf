"""Dataset readers (fdseg, GFDS, MVTec AD, VisA layouts), validation and the episode protocol."""
import json
import random

import numpy as np
import pytest
from PIL import Image

from fdseg import InputError
from fdseg.data import load_episodes, make_episodes, save_episodes, scan, validate


def _img(p, h=40, w=50, v=100):
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), v, np.uint8)).save(p)


def _mask(p, h=40, w=50, value=255):
    p.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((h, w), np.uint8)
    m[5:10, 5:10] = value
    Image.fromarray(m).save(p)


@pytest.mark.data
def test_shared_defects_catalog(defects_root):
    cat = scan(defects_root)
    assert cat.layout == "fdseg"
    assert cat.datasets == ["bsdata", "crackforest", "magnetic_tile", "sd_saliency_900", "visa"]
    n_classes = sum(len(c) for c in cat.classes.values())
    n_images = sum(len(s) for c in cat.classes.values() for s in c.values())
    assert (n_classes, n_images) == (17, 749)
    assert cat.problems == []
    assert [s.image.name for s in cat.classes["bsdata"]["pitting"]] == \
        sorted(s.image.name for s in cat.classes["bsdata"]["pitting"])


@pytest.mark.data
def test_paper_protocol_episodes(defects_root):
    cat = scan(defects_root).subset(["sd_saliency_900", "visa"])
    eps = make_episodes(cat, 5, seed=2)
    # every image is a query exactly once, supports are K distinct other images of its class
    queries = [e.query for e in eps]
    assert len(queries) == len(set(queries)) == 180 + 180
    for e in eps:
        assert len(set(e.supports)) == 5 and e.query not in e.supports
        assert all(s.split("/")[1] == e.cls for s in e.supports)
    # the draw is random.Random(seed) per dataset, consumed in class then query order
    rng = random.Random(2)
    inc = sorted(s.image.name for s in cat.classes["sd_saliency_900"]["inclusion"])
    first = rng.sample(inc[1:], 5)
    assert [p.split("/")[-1] for p in eps[[e.dataset for e in eps].index("sd_saliency_900")].supports] == first
    # same seed -> same episodes; another seed -> others
    assert make_episodes(cat, 5, seed=2) == eps
    assert make_episodes(cat, 5, seed=3) != eps


@pytest.mark.data
def test_episode_json_round_trip(tmp_path, defects_root):
    cat = scan(defects_root).subset(["crackforest"], max_per_class=6)
    eps = make_episodes(cat, 1)
    save_episodes(tmp_path / "e.json", eps, cat.root, 2)
    back, root = load_episodes(tmp_path / "e.json")
    assert back == eps and root == defects_root.resolve()
    (tmp_path / "bad.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(InputError, match="not an fdseg episode file"):
        load_episodes(tmp_path / "bad.json")


@pytest.mark.data
def test_too_few_images_for_k(defects_root):
    cat = scan(defects_root).subset(["crackforest"], max_per_class=3)
    with pytest.raises(InputError, match="5-shot episodes need at least 6"):
        make_episodes(cat, 5)


def test_fdseg_layout_problems_are_reported(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        _img(root / "ds" / "scratch" / "images" / f"{i}.png")
        _mask(root / "ds" / "scratch" / "masks" / f"{i}.png")
    _img(root / "ds" / "scratch" / "images" / "orphan.png")             # image without mask
    _mask(root / "ds" / "scratch" / "masks" / "lonely.png")              # mask without image
    _img(root / "ds" / "scratch" / "images" / "wrongsize.png")
    _mask(root / "ds" / "scratch" / "masks" / "wrongsize.png", h=20)
    (root / "ds" / "scratch" / "images" / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    _mask(root / "ds" / "scratch" / "masks" / "broken.png")
    _img(root / "ds" / "scratch" / "images" / "empty.png")
    _mask(root / "ds" / "scratch" / "masks" / "empty.png", value=0)
    cat = scan(root)
    text = "\n".join(map(str, cat.problems))
    assert "orphan.png: image has no mask" in text and "lonely.png: mask has no image" in text
    validate(cat, deep=True)
    text = "\n".join(map(str, cat.problems))
    assert "wrongsize.png: mask is 50x20 but its image is 50x40" in text
    assert "broken.jpg: not a readable image" in text
    assert "empty.png: mask is empty" in text
    assert sorted(s.stem for s in cat.classes["ds"]["scratch"]) == ["0", "1", "2"]


def test_gfds_layout(tmp_path):
    for c in ("hole", "spot"):
        for i in range(2):
            _img(tmp_path / "sub1" / "images" / c / f"{i}.jpg")
            _mask(tmp_path / "sub1" / "ground_truth" / c / f"{i}.png")
    cat = scan(tmp_path)
    assert cat.layout == "gfds" and sorted(cat.classes["sub1"]) == ["hole", "spot"] and not cat.problems


def test_mvtec_layout_with_good_images(tmp_path):
    root = tmp_path / "mvtec"
    for d in ("crack", "cut"):
        for i in range(3):
            _img(root / "bottle" / "test" / d / f"{i:03d}.png")
            _mask(root / "bottle" / "ground_truth" / d / f"{i:03d}_mask.png")
    for i in range(2):
        _img(root / "bottle" / "test" / "good" / f"{i:03d}.png")
    (root / "bottle" / "train" / "good").mkdir(parents=True)
    cat = scan(root)
    assert cat.layout == "mvtec" and sorted(cat.classes["bottle"]) == ["crack", "cut"]
    assert len(cat.good["bottle"]) == 2 and not cat.problems
    eps = make_episodes(cat, 1)
    assert sum(e.defect_free for e in eps) == 2 and len(eps) == 8


def test_visa_layout_from_split_csv(tmp_path):
    root = tmp_path / "visa"
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        _img(root / "candle" / "Data" / "Images" / "Anomaly" / f"{i:03d}.JPG")
        _mask(root / "candle" / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png", value=2)
        rows.append(f"candle,test,anomaly,candle/Data/Images/Anomaly/{i:03d}.JPG,"
                    f"candle/Data/Masks/Anomaly/{i:03d}.png")
    _img(root / "candle" / "Data" / "Images" / "Normal" / "0000.JPG")
    rows.append("candle,test,normal,candle/Data/Images/Normal/0000.JPG,")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    cat = scan(root)
    assert cat.layout == "visa" and len(cat.classes["candle"]["candle"]) == 3 and len(cat.good["candle"]) == 1


def test_missing_root_and_unknown_dataset(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        scan(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="found no images with masks"):
        scan(tmp_path / "empty")
    for ds in ("visa", "crackforest"):
        _img(tmp_path / "data" / ds / "c" / "images" / "0.png")
        _mask(tmp_path / "data" / ds / "c" / "masks" / "0.png")
    cat = scan(tmp_path / "data")
    assert cat.subset(["visa"]).datasets == ["visa"]
    with pytest.raises(InputError, match="no dataset named mvtec"):
        cat.subset(["mvtec"])
