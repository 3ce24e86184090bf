"""DINOv2 through timm (the extras venv: torch 2.14.1 + torchvision 0.29.1 + timm), on random weights
saved in the formats users have: timm state dicts and the original facebookresearch checkpoints."""
import importlib.util

import pytest
import torch

from fdseg import InputError, create_backbone
from fdseg.errors import MissingExtraError

HAVE_TIMM = importlib.util.find_spec("timm") is not None
_skip_without_timm = pytest.mark.skipif(not HAVE_TIMM, reason="needs fdseg[timm] in the extras venv "
                                        "(pip install torch==2.14.1 torchvision==0.29.1 && pip install 'fdseg[timm]')")


def need_timm(test):
    """Runs in the SAM extras venv (marker ``sam``, ``make test-sam``); skips elsewhere."""
    return pytest.mark.sam(_skip_without_timm(test))


@pytest.mark.skipif(HAVE_TIMM, reason="timm is installed here")
def test_without_timm_the_error_names_the_extra(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(MissingExtraError, match=r"timm.*torchvision.*pip install torch==2\.14\.1 torchvision==0\.29\.1 && pip install 'fdseg\[timm\]'"):
        create_backbone("dinov2_vits14", weights=tmp_path / "w.pth")


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    torch.manual_seed(0)
    bb = create_backbone("dinov2_vits14", weights="random")
    path = tmp_path_factory.mktemp("w") / "vits14_timm.pth"
    torch.save(bb.vit.state_dict(), path)
    return bb, path


@need_timm
def test_timm_state_dict_loads_and_gives_the_same_features(vits):
    bb, path = vits
    again = create_backbone("dinov2_vits14", weights=path)
    assert not again.registers and again.strides == (14,) and again.channels == (384,)
    x = bb.normalize(torch.rand(1, 3, 70, 98) * 255)
    with torch.inference_mode():
        assert torch.allclose(bb(x)[0], again(x)[0], atol=1e-5)


@need_timm
@pytest.mark.parametrize("h,w,grid", [(56, 56, (4, 4)), (70, 112, (5, 8)), (64, 100, (5, 7)), (256, 256, (18, 18))])
def test_patch_grid_at_several_sizes_and_determinism(vits, h, w, grid):
    """Stride 14: sides that are not multiples of 14 are resized to the nearest multiple; the
    position embeddings (trained at 518 = 37 x 37 patches) are interpolated to the grid."""
    bb, _ = vits
    x = bb.normalize(torch.rand(2, 3, h, w) * 255)
    with torch.inference_mode():
        a, b = bb(x), bb(x)
    assert [tuple(m.shape) for m in a] == [(2, 384, *grid)]
    assert torch.equal(a[0], b[0]) and torch.isfinite(a[0]).all()
    assert bb.vit.pos_embed.shape[1] == 37 * 37 + 1


@need_timm
def test_intermediate_layers_option(vits):
    _, path = vits
    bb = create_backbone("dinov2_vits14", weights=path, layers=(5, 11))
    assert bb.strides == (14, 14) and bb.channels == (384, 384)
    with torch.inference_mode():
        maps = bb(torch.zeros(1, 3, 42, 42))
    assert [tuple(m.shape) for m in maps] == [(1, 384, 3, 3)] * 2 and not torch.equal(maps[0], maps[1])
    with pytest.raises(InputError, match="block indices must be in 0..11"):
        create_backbone("dinov2_vits14", weights=path, layers=(12,))


@need_timm
def test_facebookresearch_checkpoints_with_and_without_registers(vits, tmp_path):
    """The original hub files (mask_token, register_tokens, class token inside pos_embed) load and
    match the equivalent timm model; the register variant is recognised by its tokens."""
    bb, path = vits
    fb = dict(torch.load(path, weights_only=True))
    fb["mask_token"] = torch.zeros(1, 384)
    p = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(fb, p)
    x = bb.normalize(torch.rand(1, 3, 56, 84) * 255)
    with torch.inference_mode():
        assert torch.allclose(create_backbone("dinov2_vits14", weights=p)(x)[0], bb(x)[0], atol=1e-5)

    torch.manual_seed(1)
    reg = create_backbone("dinov2_vits14", weights="random", registers=True)
    sd = reg.vit.state_dict()
    assert sd["reg_token"].shape == (1, 4, 384) and sd["pos_embed"].shape == (1, 37 * 37, 384)
    p0 = torch.randn(1, 1, 384)
    fb = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    fb.update(mask_token=torch.zeros(1, 384), register_tokens=sd["reg_token"], cls_token=sd["cls_token"] - p0,
              pos_embed=torch.cat([p0, sd["pos_embed"]], 1))
    p = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(fb, p)
    loaded = create_backbone("dinov2_vits14", weights=p)
    assert loaded.registers
    with torch.inference_mode():
        assert torch.allclose(loaded(x)[0], reg(x)[0], atol=1e-4)


@need_timm
def test_wrong_checkpoint_missing_file_and_no_weights(vits, tmp_path):
    _, path = vits
    with pytest.raises(InputError, match="vits14_timm.pth: these are not dinov2_vitb14 weights"):
        create_backbone("dinov2_vitb14", weights=path)
    with pytest.raises(InputError, match="nope.pth: dinov2_vits14 weights file does not exist"):
        create_backbone("dinov2_vits14", weights=tmp_path / "nope.pth")
    with pytest.raises(InputError, match="needs a weights file"):
        create_backbone("dinov2_vits14")


@need_timm
def test_vitl14_builds_with_its_shape():
    """ViT-L is only built (random init): running it at 224 on a CPU is too slow for the tests."""
    bb = create_backbone("dinov2_vitl14", weights="random")
    assert bb.channels == (1024,) and bb.strides == (14,) and len(bb.vit.blocks) == 24
    assert sum(p.numel() for p in bb.parameters()) == pytest.approx(304e6, rel=0.01)


@need_timm
def test_segmenter_end_to_end_with_dinov2(vits):
    from conftest import planted
    from fdseg import FewShotSegmenter
    _, path = vits
    sup, sm = planted(128, 128, (28, 28, 84, 84), seed=1)
    q, _ = planted(100, 140, (14, 42, 70, 98), seed=2)
    seg = FewShotSegmenter(backbone="dinov2_vits14", weights=path, input_size=128).fit([sup], [sm])
    pred = seg.predict(q)   # 128 -> 126 = 9 x 9 patches, upsampled to the 32 x 32 grid, then to 100 x 140
    assert pred.mask.shape == (100, 140) and 0.0 <= pred.score.min() <= pred.score.max() <= 1.0
