"""The shipped EfficientNet-Lite0 weights and their input normalisation, checked on real photos."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fdseg import InputError, create_backbone, list_backbones
from fdseg.backbones import Backbone, register_backbone
from fdseg.backbones.base import load_state_dict_file

skimage_data = pytest.importorskip("skimage.data")
PHOTOS = Path(skimage_data.__file__).parent


def _batch(names, size=224):
    ims = [np.array(Image.open(PHOTOS / n).convert("RGB").resize((size, size), Image.BILINEAR)) for n in names]
    return torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float()


def test_lite0_classifies_real_photos_with_tflite_normalisation():
    bb = create_backbone("efficientnet_lite0")
    x = _batch(["chelsea.png", "coffee.png"])
    p = bb.classify(bb.normalize(x)).softmax(1)
    top = p.argmax(1).tolist()
    assert top[0] in range(281, 286)           # a cat (ImageNet 281-285)
    assert top[1] in (967, 968)                # espresso / cup
    # the TF-Lite normalisation (x-127)/128 is more confident than ImageNet mean/std
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    p_imnet = bb.classify((x - mean) / std).softmax(1)
    assert p.max(1).values.mean() > p_imnet.max(1).values.mean()
    # the prediction agrees with itself across input sizes
    assert bb.classify(bb.normalize(_batch(["chelsea.png"], 288))).argmax(1).item() == top[0]


@pytest.mark.parametrize("h,w", [(256, 256), (128, 320), (96, 64)])
def test_lite0_feature_shapes_and_strides(h, w):
    bb = create_backbone("efficientnet_lite0")
    assert bb.strides == (8, 16) and bb.channels == (40, 112)
    with torch.inference_mode():
        maps = bb(torch.zeros(2, 3, h, w))
    assert [tuple(m.shape) for m in maps] == [(2, 40, h // 8, w // 8), (2, 112, h // 16, w // 16)]


def test_lite0_deterministic_and_frozen():
    bb = create_backbone("efficientnet_lite0")
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.inference_mode():
        a, b = bb(bb.normalize(x)), bb(bb.normalize(x))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not any(p.requires_grad for p in bb.parameters()) and not bb.training


def test_weights_file_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        create_backbone("efficientnet_lite0", weights=tmp_path / "missing.pth")
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="garbage.pth"):
        create_backbone("efficientnet_lite0", weights=bad)
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), other)
    with pytest.raises(InputError, match="these are not efficientnet_lite0 weights"):
        create_backbone("efficientnet_lite0", weights=other)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    pickled = tmp_path / "pickled.pth"
    torch.save({"x": Evil()}, pickled)
    with pytest.raises(InputError, match="not a plain state dict"):
        load_state_dict_file(pickled, "test")


def test_registering_a_backbone_in_a_few_lines():
    class Tiny(Backbone):
        strides, channels = (4,), (8,)

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)

        def forward(self, x):
            return [self.conv(x)]

    register_backbone("tiny_test_net", summary="test")(lambda weights=None, **kw: Tiny())
    assert "tiny_test_net" in list_backbones()
    assert create_backbone("tiny_test_net").strides == (4,)
    with pytest.raises(InputError, match="unknown backbone"):
        create_backbone("no_such_net")
