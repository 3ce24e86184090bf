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


def test_fused_lite0_keeps_its_function():
    """fold_batchnorm() folds every BatchNorm into the convolution before it (inference only): none is left, the
    ImageNet logits and the feature maps of real photos equal the unfused network's within fp32
    rounding (at a square and at an odd-sized input, where the 'SAME' padding is asymmetric), the
    parameters stay frozen, and a backbone in training mode is refused."""
    from torch import nn
    from fdseg.backbones.efficientnet_lite import SameConv2d
    from fdseg.features import FeatureExtractor
    plain, fused = create_backbone("efficientnet_lite0"), create_backbone("efficientnet_lite0").fold_batchnorm()
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert not any(p.requires_grad for p in fused.parameters())
    x = _batch(["chelsea.png", "coffee.png"])
    with torch.inference_mode():
        torch.testing.assert_close(fused.classify(fused.normalize(x)), plain.classify(plain.normalize(x)),
                                   rtol=1e-4, atol=1e-3)
        for size in (224, 197):
            y = _batch(["chelsea.png", "astronaut.png"], size)
            for a, b in zip(fused(fused.normalize(y)), plain(plain.normalize(y))):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the extractor folds an eval-mode backbone's BatchNorms unless told not to
    assert not any(isinstance(m, nn.BatchNorm2d)
                   for m in FeatureExtractor(create_backbone("efficientnet_lite0"), amp=False).backbone.modules())
    kept = FeatureExtractor(create_backbone("efficientnet_lite0"), amp=False, fold_batchnorm=False).backbone
    assert any(isinstance(m, nn.BatchNorm2d) for m in kept.modules())
    with pytest.raises(RuntimeError, match="eval"):
        create_backbone("efficientnet_lite0").train().fold_batchnorm()
    # 'SAME' padding done by the convolution where it is symmetric equals the explicit pad
    conv = SameConv2d(8, 8, 5, stride=1, groups=8, bias=False)
    z = torch.randn(1, 8, 13, 10)
    torch.testing.assert_close(conv(z), torch.nn.functional.conv2d(
        torch.nn.functional.pad(z, [2, 2, 2, 2]), conv.weight, None, 1, 0, 1, 8), rtol=0, atol=1e-6)


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
