"""The ONNX graph of a fitted inspector (fdseg/export_inspector.py, docs/onnx-inspector.md): its masks against
fdseg's predict on real queries (grey / contrast colour rule, RGB colour rule on the aspect-kept large class,
the accurate preset's flipped query views and a strip), the size classes against Preprocess, the OK gate
helper against finish, and the refusals (one line, exit 2)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fdseg
from fdseg.data.images import load_image
from fdseg.data.preprocess import Preprocess
from fdseg.errors import InputError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from fdseg.export_inspector import (META_KEY, OUTPUTS, export_inspector, gate_and_verdict,  # noqa: E402
                                    input_size, read_metadata, run, session)

AGREE = 0.999          # the goal: pixel agreement of the masks with fdseg's


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _class(root: Path, name: str) -> tuple[list[Path], list[Path]]:
    ims = sorted((root / name / "images").iterdir())
    return ims, [root / name / "masks" / f"{p.stem}.png" for p in ims]


def _fp32(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # fitted on bf16 where the CPU has it: compare the fp32 path
        return fdseg.load(path, precision="fp32")


# onnxruntime and numpy only: the graph needs nothing of fdseg or torch to run
_ORT_ONLY = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions(); so.intra_op_num_threads = 1
    sess = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
    meta = json.loads(sess.get_modelmeta().custom_metadata_map["fdseg_inspector"])
    out = {}
    for i, f in enumerate(sys.argv[3:]):
        x = np.load(f).transpose(2, 0, 1)[None]
        for name, v in zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": x})):
            out[f"{i}_{name}"] = v
    np.savez(sys.argv[2], **out)
    assert "torch" not in sys.modules and "fdseg" not in sys.modules, "the graph's run imported torch / fdseg"
    print(json.dumps({"threshold": meta["threshold"], "outputs": [o.name for o in sess.get_outputs()]}))
""")


def _ort_only(model: Path, images: list[np.ndarray], tmp: Path) -> tuple[list[dict], dict]:
    files = []
    for i, rgb in enumerate(images):
        files.append(tmp / f"q{i}.npy")
        np.save(files[-1], rgb)
    res = subprocess.run([sys.executable, "-c", _ORT_ONLY, str(model), str(tmp / "out.npz"), *map(str, files)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    z = np.load(tmp / "out.npz")
    return [{k: z[f"{i}_{k}"] for k in OUTPUTS} for i in range(len(images))], json.loads(res.stdout)


def _near_threshold_cells(grid: np.ndarray, t: float) -> np.ndarray:
    """The cells the pruned graph matches exactly in any case: within 3 x 3 of an exact margin >= t - 0.02."""
    from scipy import ndimage
    return ndimage.binary_dilation(grid >= t - 0.02, structure=np.ones((3, 3), bool))


# ------------------------------------------------------------------------------------------ real data

@pytest.mark.data
def test_grey_contrast_rule_matches_fdseg_onnxruntime_only(defects_root, tmp_path):
    """magnetic_tile/blowhole, `fast`, one support: grey images (the colour rule's local-contrast mode with
    its box filter); exported by the CLI, run by onnxruntime in a process without torch."""
    from fdseg.cli import main
    ims, masks = _class(defects_root, "magnetic_tile/blowhole")
    seg = fdseg.FewShotSegmenter(preset="fast").fit(ims[:1], masks[:1])
    insp = seg.save(tmp_path / "mt.fdseg")
    assert main(["export", "--inspector", str(insp), "--out", str(tmp_path / "mt.onnx")]) == 0
    ref = _fp32(insp)
    assert ref.state.post.colour is not None and ref.state.post.colour.mode == "contrast"
    queries = [load_image(p) for p in ims[1:5]]
    outs, info = _ort_only(tmp_path / "mt.onnx", queries, tmp_path)
    assert info["outputs"] == list(OUTPUTS) and info["threshold"] == pytest.approx(ref.decision_threshold)
    meta = read_metadata(tmp_path / "mt.onnx")
    assert meta["inspector_sha256"] == fdseg.inspector.file_sha256(insp)
    assert meta["preprocess"]["size"] == 256 and meta["colour"]["mode"] == "contrast"
    assert meta["ok_gate"]["mode"] == "off" and meta["graph_precision"] == "fp32" and meta["includes"]
    t = ref.decision_threshold
    for rgb, o in zip(queries, outs):
        pred = ref.predict(rgb)
        assert o["mask"].shape == rgb.shape[:2] and o["margin"].shape == (64, 64)
        assert (o["mask"] == pred.mask).mean() >= AGREE
        assert abs(float(o["defect_score"]) - pred.defect_score) < 1e-4
        exact = ref.margins(rgb)[0].numpy()
        near = _near_threshold_cells(exact, t)
        np.testing.assert_allclose(o["margin"][near], exact[near], atol=1e-4)
        assert (o["margin"] >= exact - 1e-4).all()               # elsewhere: upper bounds
        assert pred.mask.any() or not o["mask"].any()


@pytest.mark.data
def test_rgb_colour_rule_large_class_exact_margins(defects_root, tmp_path):
    """visa/capsules (1500 x 1000 RGB: the aspect-kept 512 x 352 input with the 2x coarser cell), `fast`, the
    RGB colour rule; exported with every cell matched exactly: all margins within 1e-4 of fdseg's."""
    ims, masks = _class(defects_root, "visa/capsules")
    seg = fdseg.FewShotSegmenter(preset="fast").fit(ims[:1], masks[:1])
    insp = seg.save(tmp_path / "visa.fdseg")
    out = export_inspector(insp, tmp_path / "visa.onnx", prune=False)
    ref = _fp32(insp)
    assert ref.state.post.colour is not None and ref.state.post.colour.mode == "rgb"
    sess = session(out)
    assert read_metadata(sess)["matching"]["pruned"] is False
    for p in ims[1:4]:
        rgb = load_image(p)
        o = run(sess, rgb)
        pred = ref.predict(rgb)
        assert o["margin"].shape == (44, 64) == pred.margin_grid.shape
        np.testing.assert_allclose(o["margin"], ref.margins(rgb)[0].numpy(), atol=1e-4)
        assert (o["mask"] == pred.mask).mean() >= AGREE


@pytest.mark.data
def test_accurate_flip_views_and_strip(defects_root, tmp_path):
    """The accurate preset with one support: the query's flipped views run in the graph and averaged;
    a strip (5 queries stacked: aspect 7.5) takes the strip size class."""
    ims, masks = _class(defects_root, "magnetic_tile/blowhole")
    seg = fdseg.FewShotSegmenter().fit(ims[:1], masks[:1])
    assert seg.query_views == "flip"
    insp = seg.save(tmp_path / "acc.fdseg")
    sess = session(export_inspector(insp, tmp_path / "acc.onnx"))
    assert read_metadata(sess)["query_views"] == "flip"
    ref = _fp32(insp)
    q = load_image(ims[1])
    strip = np.ascontiguousarray(np.concatenate([q] * 5, 0))
    for rgb in (q, strip):
        o, pred = run(sess, rgb), ref.predict(rgb)
        assert o["margin"].shape == pred.margin_grid.shape
        assert (o["mask"] == pred.mask).mean() >= AGREE
        assert abs(float(o["defect_score"]) - pred.defect_score) < 1e-4
    assert o["margin"].shape[0] > 4 * o["margin"].shape[1]


# ------------------------------------------------------------------------------------------ demo images

def test_size_classes_match_preprocess(tmp_path):
    """The graph's choice of network input and cell (traced shape arithmetic) equals Preprocess's for every
    mode and size class, through onnxruntime (rounding half to even included)."""
    import onnx  # noqa: F401

    class Sizes(torch.nn.Module):
        def __init__(self, pre):
            super().__init__()
            self.pre = pre

        def forward(self, image):
            return input_size(self.pre, 4, image.shape[2], image.shape[3])

    shapes = [(40, 60), (255, 256), (373, 248), (511, 300), (512, 300), (1000, 1500), (1030, 1030), (300, 1199),
              (300, 1200), (1600, 300), (2000, 100), (4096, 256), (1023, 1024), (2048, 1500), (460, 1130),
              (333, 1665), (80, 4000), (352, 1408)]
    for pre in (Preprocess("auto", 256), Preprocess("auto", 256, zoom=2), Preprocess("resize", 256),
                Preprocess("aspect", 256), Preprocess("auto", 320)):
        path = tmp_path / "sizes.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Sizes(pre), (torch.zeros(1, 3, 64, 64, dtype=torch.uint8),), str(path),
                              input_names=["image"], output_names=["H", "W", "cell"], opset_version=17,
                              dynamic_axes={"image": {2: "h", 3: "w"}}, dynamo=False)
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for h, w in shapes:
            H, W, cell = (int(v) for v in s.run(None, {"image": np.zeros((1, 3, h, w), np.uint8)}))
            want = pre.input_size(h, w)
            assert (H, W, cell) == (*want, pre.cell(*want, 4)), (pre, h, w)


def test_ok_gate_helper_matches_finish(demo, tmp_path):
    """The auto gate (components, soft) applied by gate_and_verdict to the graph's outputs, and the median
    gate in the graph, give fdseg's final masks, verdicts and boxes."""
    seg = fdseg.FewShotSegmenter(preset="fast", precision="fp32").fit(*zip(*demo.supports))
    queries = [load_image(p) for p, _ in demo.queries] + [load_image(p) for p in demo.free]
    scores = sorted(p.defect_score for p in seg.predict(queries))
    post = seg.state.post
    for mode in ("auto", "median"):
        post.ok_level = (scores[2] + scores[3]) / 2           # some queries above it, some not
        post.ok_components = post.ok_soft = mode == "auto"
        sess = session(export_inspector(seg, tmp_path / f"{mode}.onnx"))
        meta = read_metadata(sess)
        assert meta["ok_gate"]["mode"] == mode and meta["ok_gate"]["level"] == pytest.approx(post.ok_level)
        assert meta["inspector_sha256"] is None                  # exported from a segmenter, not a file
        changed = 0
        for rgb, pred in zip(queries, seg.predict(queries)):
            o = run(sess, rgb)
            g = gate_and_verdict(o, meta)
            assert (g["mask"] == pred.mask).mean() >= AGREE
            assert (g["is_defective"], g["ok_gated"], g["boxes"]) == (pred.is_defective, pred.ok_gated, pred.boxes)
            assert g["largest_cells"] == pytest.approx(pred.largest_cells)
            # auto: the graph's mask is the one before the gate; median: the graph empties it itself
            changed += bool((o["mask"] != g["mask"]).any()) if mode == "auto" else g["ok_gated"]
        assert changed >= 1                                       # the level gates something


def test_refusals_one_line(demo, tmp_path, capsys):
    """An inspector the graph cannot express, a file that is not one, or conflicting options: one error line
    (InputError from the API, exit 2 from the CLI), and no output file."""
    from fdseg.cli import main
    img, mask = demo.supports[0]
    bad = fdseg.FewShotSegmenter(preset="fast", method_options={"query_bg": 1.0}).fit(img, mask)
    insp = bad.save(tmp_path / "qbg.fdseg")
    out = tmp_path / "x.onnx"
    with pytest.raises(InputError, match="cannot export to ONNX: fm's query_bg") as e:
        export_inspector(insp, out)
    assert "\n" not in str(e.value)
    capsys.readouterr()
    for argv in (["export", "--inspector", str(insp), "--out", str(out)],
                 ["export", "--inspector", str(img), "--out", str(out)],                  # a JPEG, not an inspector
                 ["export", "--inspector", str(insp), "--backbone", "pdn_tiny", "--out", str(out)],
                 ["export", "--backbone", "efficientnet_lite0", "--exact-margins", "--out", str(out)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("fdseg: error: ") and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".x.onnx*"))
    tiled = fdseg.FewShotSegmenter(preset="fast", resize="tile").fit(img, mask)
    with pytest.raises(InputError, match="resize='tile'"):
        export_inspector(tiled, out)
    assert META_KEY == "fdseg_inspector"
