"""Wide ResNet-50-2 / 101-2 (native torch, torchvision key names) on random weights saved as a
torchvision state dict; compared with torchvision itself where it is installed (the extras venv)."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from fdseg import InputError, create_backbone
from fdseg.cli import main


def _torchvision_keys(depths, width=True):
    """torchvision's resnet key layout, written out from its naming rules (not from our module)."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{b}" for b in bn]
    for li, n in enumerate(depths, start=1):
        for j in range(n):
            p = f"layer{li}.{j}"
            for c in (1, 2, 3):
                keys += [f"{p}.conv{c}.weight"] + [f"{p}.bn{c}.{b}" for b in bn]
            if j == 0:
                keys += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{b}" for b in bn]
    return keys


@pytest.fixture(scope="module")
def wrn50_file(tmp_path_factory):
    """A random wide_resnet50_2 state dict in torchvision's layout, layer4 and fc included."""
    torch.manual_seed(0)
    bb = create_backbone("wide_resnet50_2", weights="random")
    sd = {k: v.clone() for k, v in bb.state_dict().items()}
    for k, v in sd.items():   # non-trivial BN statistics so that a wrong mapping shows
        if k.endswith("running_var"):
            v.uniform_(0.5, 2.0)
        elif k.endswith("running_mean") or (".bn" in k and k.endswith("bias")):
            v.normal_(0, 0.1)
    sd["layer4.0.conv1.weight"] = torch.zeros(1024, 1024, 1, 1)
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path_factory.mktemp("w") / "wide_resnet50_2-random.pth"
    torch.save(sd, path)
    return path


def test_key_layout_is_torchvisions():
    bb = create_backbone("wide_resnet50_2", weights="random")
    assert list(bb.state_dict()) == _torchvision_keys((3, 4, 6))
    assert bb.layer1[0].conv2.weight.shape == (128, 128, 3, 3)       # width_per_group 128: "wide"
    assert bb.layer3[0].conv3.weight.shape == (1024, 512, 1, 1)


def test_loads_torchvision_state_dict_and_extracts_patchcore_features(wrn50_file):
    bb = create_backbone("wide_resnet50_2", weights=wrn50_file)
    sd = torch.load(wrn50_file, weights_only=True)
    assert torch.equal(bb.layer3[5].bn3.running_var, sd["layer3.5.bn3.running_var"])
    assert bb.strides == (8, 16) and bb.channels == (512, 1024)
    x = bb.normalize(torch.rand(2, 3, 64, 96) * 255)
    with torch.inference_mode():
        f2, f3 = bb(x)
        again = bb(x)
        raw = create_backbone("wide_resnet50_2", weights=wrn50_file, local_avg=1)(x)
    assert tuple(f2.shape) == (2, 512, 8, 12) and tuple(f3.shape) == (2, 1024, 4, 6)
    assert torch.equal(f2, again[0]) and torch.equal(f3, again[1])
    # the PatchCore aggregation is a 3 x 3 neighbourhood mean of the raw layer output
    ref = F.avg_pool2d(raw[1], 3, stride=1, padding=1)
    assert torch.allclose(f3, ref, atol=1e-5) and not torch.allclose(f3, raw[1], atol=1e-3)


@pytest.mark.parametrize("h,w", [(32, 32), (80, 48), (100, 70)])
def test_shapes_at_several_sizes(wrn50_file, h, w):
    bb = create_backbone("wide_resnet50_2", weights=wrn50_file)
    with torch.inference_mode():
        maps = bb(torch.zeros(1, 3, h, w))
    c = lambda n, s: -(-n // s)   # noqa: E731  padded convs: ceil
    assert [tuple(m.shape[-2:]) for m in maps] == [(c(h, 8), c(w, 8)), (c(h, 16), c(w, 16))]


def test_wrong_checkpoints_and_missing_file(wrn50_file, tmp_path):
    with pytest.raises(InputError, match="needs a weights file"):
        create_backbone("wide_resnet50_2")
    with pytest.raises(InputError, match="nope.pth: wide_resnet50_2 weights file does not exist"):
        create_backbone("wide_resnet50_2", weights=tmp_path / "nope.pth")
    # a plain resnet50 (width 64 per group): same keys, other shapes
    sd = {k: v for k, v in torch.load(wrn50_file, weights_only=True).items()}
    sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    bad = tmp_path / "resnet50.pth"
    torch.save(sd, bad)
    with pytest.raises(InputError, match="resnet50.pth: these are not wide_resnet50_2 weights: shape mismatch"):
        create_backbone("wide_resnet50_2", weights=bad)
    # the 50-layer file lacks most of 101's layer3; a 101 file has blocks 50 does not know
    with pytest.raises(InputError, match="these are not wide_resnet101_2 weights.*missing keys"):
        create_backbone("wide_resnet101_2", weights=wrn50_file)
    deeper = dict(torch.load(wrn50_file, weights_only=True))
    deeper["layer3.6.conv1.weight"] = torch.zeros(256, 1024, 1, 1)
    p = tmp_path / "wrn101.pth"
    torch.save(deeper, p)
    with pytest.raises(InputError, match="wrn101.pth: these are not wide_resnet50_2 weights.*deeper ResNet"):
        create_backbone("wide_resnet50_2", weights=p)


def test_wide_resnet101_2_builds():
    bb = create_backbone("wide_resnet101_2", weights="random")
    assert len(bb.layer3) == 23 and list(bb.state_dict()) == _torchvision_keys((3, 4, 23))


def test_cli_segment_with_weights_path(wrn50_file, tmp_path, demo):
    (s_img, s_mask), (q, _) = demo.supports[0], demo.queries[0]
    out = tmp_path / "out"
    rc = main(["segment", "--backbone", "wide_resnet50_2", "--weights", str(wrn50_file), "--size", "64",
               "--support", str(s_img), str(s_mask), "--query", str(q),
               "--out", str(out), "--no-progress", "--threads", "1", "--preset", "fast"])
    assert rc == 0
    import json
    import numpy as np
    from PIL import Image
    mask = np.array(Image.open(out / "masks" / f"{q.stem}.png"))
    assert mask.shape == np.array(Image.open(q)).shape[:2] and set(np.unique(mask)) <= {0, 255}
    row, = json.loads((out / "summary.json").read_text())
    assert row["status"] == "ok" and row["defect_fraction"] == pytest.approx((mask > 0).mean(), abs=1e-6)


@pytest.mark.sam
@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="needs torchvision (extras venv: torch==2.14.1 torchvision==0.29.1)")
def test_matches_torchvision_wide_resnet50_2():
    """The real torchvision model's random state dict loads, and layer2 / layer3 agree with it."""
    import torchvision
    torch.manual_seed(3)
    tv = torchvision.models.wide_resnet50_2(weights=None).eval()
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "tv.pth")
        torch.save(tv.state_dict(), p)
        bb = create_backbone("wide_resnet50_2", weights=p, local_avg=1)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        h = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        l2 = tv.layer2(tv.layer1(h))
        l3 = tv.layer3(l2)
        ours = bb(x)
    assert torch.allclose(ours[0], l2, atol=1e-4) and torch.allclose(ours[1], l3, atol=1e-4)
