"""Several defect types in one inspector (fdseg.multitype): typed supports, label maps, the rule that
labels a pixel, the inspector round trip, --support-dir and bench --multi-type, and the bad inputs."""
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import fdseg
from fdseg.cli import main
from fdseg.errors import InputError
from fdseg.multitype import (MultiTypeSegmenter, TypedPrediction, combine, label_png, legend, read_support_dir)
from fdseg.pipeline.finish import ScoreRule
from fdseg.segmenter import FewShotSegmenter, Prediction

from conftest import iou

torch.set_num_threads(1)

# sd_saliency_900 (200 x 200 steel strips): two supports of patches and of scratches, two queries
PATCHES, SCRATCHES = "patches", "scratches"


def _pairs(root, cls, stems):
    return [(root / "sd_saliency_900" / cls / "images" / f"{s}.png", root / "sd_saliency_900" / cls / "masks" / f"{s}.png")
            for s in stems]


@pytest.fixture(scope="module")
def steel(request):
    from conftest import SHARED, require_data
    root = require_data(SHARED / "defects")
    sup = _pairs(root, PATCHES, ["Pa_1", "Pa_10"]) + _pairs(root, SCRATCHES, ["Sc_1", "Sc_10"])
    queries = {PATCHES: _pairs(root, PATCHES, ["Pa_11"])[0], SCRATCHES: _pairs(root, SCRATCHES, ["Sc_11"])[0]}
    seg = MultiTypeSegmenter(preset="fast", cache_size=32)
    seg.fit([s[0] for s in sup], [s[1] for s in sup], types=[PATCHES, PATCHES, SCRATCHES, SCRATCHES])
    return seg, sup, queries


def _gt(path):
    return np.array(Image.open(path)) > 0


# -- real images ------------------------------------------------------------------------------------------

@pytest.mark.data
def test_two_types_told_apart_on_real_queries(steel):
    seg, _, queries = steel
    assert seg.types == (PATCHES, SCRATCHES) and seg.n_supports == 4
    for k, t in enumerate(seg.types, 1):
        img, gt_path = queries[t]
        pred = seg.predict(img)
        gt = _gt(gt_path)
        assert isinstance(pred, TypedPrediction) and pred.types == seg.types
        assert pred.type == t, pred.areas                    # the largest labelled area is the true type
        assert iou(pred.labels == k, gt) > 0.4, iou(pred.labels == k, gt)
        assert pred.areas[t] > 20 * max(1, pred.areas[seg.types[2 - k]])
        # the binary mask is the union of the labels; defects and verdicts follow the labels
        assert np.array_equal(pred.mask, pred.labels > 0)
        assert pred.verdicts[t] == "defective" and pred.is_defective
        assert pred.defects and pred.defects[0]["type"] == t
        assert sum(d["area"] for d in pred.defects if d["type"] == t) == pred.areas[t]
        x0, y0, x1, y1 = pred.defects[0]["box"]
        assert (pred.labels[y0:y1, x0:x1] == k).any()
        # the score map keeps the union's decision boundary
        assert ((pred.score >= 0.5) == pred.mask).all()
    plan = seg.plans[SCRATCHES]
    assert plan["competition"] == seg.competition


@pytest.mark.data
def test_a_single_type_fit_is_todays_segmenter(defects_root):
    """One type: the masks (and margins) of FewShotSegmenter, 1-shot (8 support views, query flips) and 2-shot."""
    mt = defects_root / "magnetic_tile" / "blowhole"
    ims = sorted((mt / "images").iterdir())[:4]
    pairs = [(p, mt / "masks" / f"{p.stem}.png") for p in ims]
    ref = FewShotSegmenter(cache_size=32)
    typed = MultiTypeSegmenter(cache_size=32)
    for k in (1, 2):
        sup = pairs[:k]
        ref.fit([s[0] for s in sup], [s[1] for s in sup])
        typed.fit([s[0] for s in sup], [s[1] for s in sup], types="blowhole")
        assert str(typed.plan) == str(ref.plan)
        for q, _ in pairs[2:]:
            a, b = ref.predict(q), typed.predict(q)
            assert np.array_equal(a.mask, b.mask) and np.array_equal(a.margin_grid, b.margin_grid)
            assert np.array_equal(b.labels, a.mask.astype(np.uint8)) and b.types == ("blowhole",)
            assert a.defect_score == b.defect_score and a.boxes == b.boxes


@pytest.mark.data
def test_inspector_pickle_and_spawn_round_trip(steel, tmp_path):
    seg, sup, queries = steel
    q = queries[SCRATCHES][0]
    want = seg.predict(q)
    path = seg.save(tmp_path / "two.fdseg", include_supports=True, supports=sup)
    info = fdseg.inspector.describe(path)
    assert "types" in info["sections"] and info["supports_included"]
    back = fdseg.load(path)
    assert isinstance(back, MultiTypeSegmenter) and back.types == seg.types
    assert back.competition == seg.competition and back.n_supports == 4
    assert [str(p) for p in back.plans.values()] == [str(p) for p in seg.plans.values()]
    for other in (back, pickle.loads(pickle.dumps(seg)), seg.spawn(pickle.loads(pickle.dumps(seg.state)))):
        got = other.predict(q)
        assert np.array_equal(got.labels, want.labels) and got.defects == want.defects


@pytest.mark.data
def test_the_ray_payload_carries_the_types(steel):
    """segment --engine ray ships the fit as inspector bytes: an actor's segmenter labels as the driver's."""
    from fdseg.segment_ray import load_shipped, ship_payload
    seg, _, queries = steel
    actor = load_shipped(ship_payload(seg))
    assert isinstance(actor, MultiTypeSegmenter) and actor.types == seg.types
    q = queries[PATCHES][0]
    assert np.array_equal(actor.predict(q).labels, seg.predict(q).labels)


@pytest.mark.data
def test_support_dir_round_trip(steel, tmp_path):
    """segment --support-dir DIR (DIR/TYPE/images + masks): label PNGs with palette and legend, the types
    columns, the same labels as the Python API."""
    seg, sup, queries = steel
    sdir = tmp_path / "supports"
    for (img, mask), t in zip(sup, [PATCHES, PATCHES, SCRATCHES, SCRATCHES]):
        for sub, f in (("images", img), ("masks", mask)):
            (sdir / t / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, sdir / t / sub / f.name)
    qdir = tmp_path / "queries"
    qdir.mkdir()
    for img, _ in queries.values():
        shutil.copy(img, qdir / img.name)
    out = tmp_path / "out"
    assert main(["segment", "--support-dir", str(sdir), "--query", str(qdir), "--out", str(out), "--no-progress",
                 "--preset", "fast", "--explain"]) == 0
    images, masks, types = read_support_dir(sdir)
    assert types == [PATCHES, PATCHES, SCRATCHES, SCRATCHES] and [m.parent.name for m in masks] == ["masks"] * 4
    api = MultiTypeSegmenter(preset="fast").fit(images, masks, types=types)
    rows = json.loads((out / "summary.json").read_text())
    leg = json.loads((out / "labels" / "legend.json").read_text())
    assert leg["types"] == legend([PATCHES, SCRATCHES])
    csv_head = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert csv_head[-2:] == ["type", "types"]
    for r in rows:
        t = r["query"].startswith("Pa") and PATCHES or SCRATCHES
        assert r["type"] == t and max(r["types"], key=r["types"].get) == t
        png = Image.open(out / "labels" / f"{r['query']}.png")
        assert png.mode == "P" and json.loads(png.text["fdseg-legend"]) == leg["types"]
        assert png.getpalette()[3:9] == [230, 25, 75, 60, 180, 75]           # types 1 and 2 as in overlays
        pred = api.predict(queries[t][0])
        assert np.array_equal(np.array(png), pred.labels)
        assert np.array_equal(np.array(Image.open(out / "masks" / f"{r['query']}.png")) > 0, pred.mask)
    assert "Defect types" in (out / "report.html").read_text()


@pytest.mark.data
def test_bench_multi_type_reports_types_and_confusion(defects_root, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--multi-type", "--data", str(defects_root), "--datasets", "sd_saliency_900",
                 "--classes", "sd_saliency_900/p*", "sd_saliency_900/scratches", "--max-per-class", "3",
                 "--shots", "1", "--preset", "fast", "--no-progress", "--eval-size", "128", "--out", str(out)]) == 0
    res = json.loads((out / "multi_type" / "results.json").read_text())
    d, = res["runs"][0]["datasets"]
    assert d["classes"] == [PATCHES, SCRATCHES] and d["queries"] == 6
    assert set(d["iou_multi"]) == set(d["iou_single"]) == {PATCHES, SCRATCHES}
    assert np.array(d["cm_images"]).sum() == 6 and np.array(d["cm_pixels"]).sum() == 6 * 128 * 128
    assert 0 <= d["image_type_accuracy"] <= 1 and d["miou_single"] > 0
    md = (out / "multi_type" / "results.md").read_text()
    assert "image type accuracy" in md and "### sd_saliency_900, 1-shot" in md
    # a rerun resumes: nothing is computed again
    assert main(["bench", "--multi-type", "--data", str(defects_root), "--datasets", "sd_saliency_900",
                 "--classes", "sd_saliency_900/p*", "sd_saliency_900/scratches", "--max-per-class", "3",
                 "--shots", "1", "--preset", "fast", "--no-progress", "--eval-size", "128", "--out", str(out)]) == 0


# -- the labelling rule (no backbone) ------------------------------------------------------------------------

def _pred(grid, size=(8, 8), threshold=0.0):
    g = np.asarray(grid, np.float32)
    full = torch.nn.functional.interpolate(torch.from_numpy(g)[None, None], size=size, mode="bilinear",
                                           align_corners=False)[0, 0].numpy()
    mask = full > threshold
    return Prediction(mask, g, "q", [], None, size, float(g.max() - threshold), bool(mask.any()), 1.0,
                      score_rule=ScoreRule(size, threshold, 0.05, False, False))


def test_overlapping_types_take_the_higher_margin_and_components_vote():
    a = np.full((4, 4), -1.0)
    b = np.full((4, 4), -1.0)
    a[:, :2] = 0.5                  # type a: the left half, weaker
    b[:, 1:4] = 0.8                 # type b: the right, stronger where they overlap
    pa, pb = _pred(a), _pred(b)
    out = combine([pa, pb], [0.0, 0.0], ["a", "b"])
    assert np.array_equal(out.mask, pa.mask | pb.mask)
    only_a, both = pa.mask & ~pb.mask, pa.mask & pb.mask
    assert (out.labels[only_a] == 1).all() and both.any()
    fa = torch.nn.functional.interpolate(torch.from_numpy(a.astype(np.float32))[None, None], size=(8, 8),
                                         mode="bilinear", align_corners=False)[0, 0].numpy()
    fb = torch.nn.functional.interpolate(torch.from_numpy(b.astype(np.float32))[None, None], size=(8, 8),
                                         mode="bilinear", align_corners=False)[0, 0].numpy()
    assert (out.labels[both] == np.where(fb > fa, 2, 1)[both]).all()
    # a type's own threshold counts: margins above it compete, not raw margins
    shifted = combine([pa, pb], [0.0, 0.7], ["a", "b"])
    assert (shifted.labels[both] == np.where(fb - 0.7 > fa, 2, 1)[both]).all()
    raw = combine([pa, pb], [0.0, 0.7], ["a", "b"], relative=False)
    assert np.array_equal(raw.labels, out.labels)
    # component: the one region takes the type labelling most of it
    comp = combine([pa, pb], [0.0, 0.0], ["a", "b"], labelling="component")
    winner = 1 if (out.labels == 1).sum() >= (out.labels == 2).sum() else 2      # ties: the first type
    assert set(np.unique(comp.labels[out.mask])) == {winner}
    assert comp.type == ["a", "b"][winner - 1] and len(comp.defects) == 1
    # image level: the largest area is the type; areas and per-type verdicts follow the labels
    assert out.areas == {"a": int((out.labels == 1).sum()), "b": int((out.labels == 2).sum())}
    assert out.type == max(out.areas, key=out.areas.get)
    assert sum(d["area"] for d in out.defects) == int(out.mask.sum())


def test_one_type_keeps_its_prediction():
    p = _pred(np.linspace(-1, 1, 16).reshape(4, 4))
    out = combine([p], [0.0], ["crack"])
    assert out.mask is p.mask and out.margin_grid is p.margin_grid and out.types == ("crack",)
    assert np.array_equal(out.labels, p.mask.astype(np.uint8))


def test_label_png_holds_palette_and_legend():
    labels = np.array([[0, 1], [2, 2]], np.uint8)
    im = Image.open(__import__("io").BytesIO(label_png(labels, ["crack", "hole"])))
    assert im.mode == "P" and np.array_equal(np.array(im), labels)
    assert json.loads(im.text["fdseg-legend"]) == [{"value": 1, "type": "crack", "colour": "#e6194b"},
                                                   {"value": 2, "type": "hole", "colour": "#3cb44b"}]


# -- bad input: each error names the file ----------------------------------------------------------------

@pytest.fixture(scope="module")
def fast():
    return MultiTypeSegmenter(preset="fast")


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    img = lambda n, s=(64, 64): _write(tmp_path / f"{n}.png", rng.integers(0, 255, (*s, 3), dtype=np.uint8))  # noqa
    lab = np.zeros((64, 64), np.uint8)
    lab[10:20, 10:20] = 1
    lab[40:50, 40:50] = 2
    return tmp_path, img, lab


def test_a_label_value_with_no_name_is_refused(fast, files):
    tmp, img, lab = files
    lab = lab.copy()
    lab[0:4, 0:4] = 3
    m = _write(tmp / "label.png", lab)
    with pytest.raises(InputError, match="label value 3 has no type name") as e:
        fast.fit([img("a")], [m], types=[{1: "crack", 2: "hole"}])
    assert e.value.source == str(m)


def test_a_type_with_no_mask_pixels_is_refused(fast, files):
    tmp, img, lab = files
    m = _write(tmp / "label.png", np.where(lab == 2, 0, lab).astype(np.uint8))
    with pytest.raises(InputError, match="type 'hole' has no mask pixels") as e:
        fast.fit([img("a")], [m], types={1: "crack", 2: "hole"})
    assert e.value.source == str(m)
    empty = _write(tmp / "empty.png", np.zeros((64, 64), np.uint8))
    with pytest.raises(InputError, match="support mask is empty") as e:
        fast.fit([img("a"), img("b")], [m, empty], types=["crack", "hole"])
    assert e.value.source == str(empty)


def test_supports_and_masks_of_different_sizes_are_refused(fast, files):
    tmp, img, lab = files
    small = _write(tmp / "small_label.png", lab[:32, :48])
    with pytest.raises(InputError, match="label mask is 48x32 but its image is 64x64") as e:
        fast.fit([img("a")], [small], types=[["crack", "hole"]])
    assert e.value.source == str(small)
    binary = _write(tmp / "small_mask.png", (lab[:32, :48] > 0).astype(np.uint8) * 255)
    with pytest.raises(InputError, match="mask is 48x32 but its image is 48x48") as e:
        fast.fit([img("a"), img("b", (48, 48))], [_write(tmp / "ok.png", (lab > 0).astype(np.uint8) * 255), binary],
                 types=["crack", "crack"])
    assert e.value.source == str(binary)


def test_other_bad_type_lists_are_refused(fast, files, tmp_path):
    tmp, img, lab = files
    m = _write(tmp / "label.png", lab)
    with pytest.raises(InputError, match="one type per support"):
        fast.fit([img("a"), img("b")], [m, m], types=["crack"])
    with pytest.raises(InputError, match="colour label mask"):
        fast.fit([img("a")], [_write(tmp / "rgb.png", np.stack([lab * 100, lab, lab], -1))], types={1: "x", 2: "y"})
    # --support-dir: an image without its mask names the image
    (tmp_path / "sd" / "crack" / "images").mkdir(parents=True)
    (tmp_path / "sd" / "crack" / "masks").mkdir()
    lone = img("sd/crack/images/lone")
    with pytest.raises(InputError, match="image has no mask") as e:
        read_support_dir(tmp_path / "sd")
    assert e.value.source == str(lone)


def test_the_gate_drops_an_images_weak_regions():
    a = np.full((8, 8), -1.0)
    b = np.full((8, 8), -1.0)
    a[1:3, 1:3] = 0.8               # type a: one strong region
    b[5:7, 5:7] = 0.1               # type b: a weak one elsewhere
    pa, pb = _pred(a, (16, 16)), _pred(b, (16, 16))
    kept = combine([pa, pb], [0.0, 0.0], ["a", "b"])
    assert kept.areas["a"] and kept.areas["b"] and kept.type == "a"
    gated = combine([pa, pb], [0.0, 0.0], ["a", "b"], gate=0.5)
    assert gated.areas["a"] == kept.areas["a"] and gated.areas["b"] == 0
    assert np.array_equal(gated.mask, pa.mask) and [d["type"] for d in gated.defects] == ["a"]
    assert gated.verdicts == {"a": "defective", "b": "ok"}
    # one type: never gated (a fit with one type is FewShotSegmenter's)
    assert combine([pb], [0.0], ["b"], gate=0.9).mask is pb.mask
