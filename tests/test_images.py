"""Reading images and masks: every PIL mode, and every bad input gives a clear error."""
import numpy as np
import pytest
from PIL import Image

from fdseg import FewShotSegmenter, InputError
from fdseg.data.images import binarise_mask, load_image, load_mask


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I;16", "I", "1", "CMYK"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    a = (np.arange(40 * 30).reshape(30, 40) % 256).astype(np.uint8)
    if mode == "I;16":
        im = Image.fromarray(a.astype(np.uint16) * 257)
        assert im.mode == "I;16"
    elif mode == "I":
        im = Image.fromarray(a.astype(np.int32) * 16)  # a 12-bit image
    else:
        im = Image.fromarray(a).convert(mode)
    p = tmp_path / f"img_{mode.replace(';', '')}.{'tif' if mode in ('I;16', 'I', 'CMYK') else 'png'}"
    im.save(p)
    rgb = load_image(p)
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8
    if mode in ("L", "LA", "I;16", "I", "RGB", "RGBA"):
        # grey content survives the conversion (16 / 12 bit scaled by bit depth)
        assert abs(int(rgb[..., 0].max()) - 255) <= 1 and rgb[..., 0].min() == 0


def test_corrupt_and_missing_images_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    trunc = tmp_path / "truncated.png"
    trunc.write_bytes(good.read_bytes()[:60])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    for p, words in [(trunc, "corrupt"), (text, "not a readable image"), (tmp_path / "nope.png", "does not exist")]:
        with pytest.raises(InputError) as e:
            load_image(p)
        assert str(p) in str(e.value) and words in str(e.value)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("L", (12000, 10000)).save(p)          # 120 MP of zeros compresses to a few KB
    assert p.stat().st_size < 1_000_000
    with pytest.raises(InputError, match="decompression-bomb"):
        load_image(p)
    assert load_image(p, max_pixels=200_000_000).shape == (10000, 12000, 3)


def test_mask_rules(tmp_path):
    assert binarise_mask(np.array([[0, 1], [0, 0]], np.uint8)).tolist() == [[False, True], [False, False]]
    assert binarise_mask(np.array([[0, 255]], np.uint8)).tolist() == [[False, True]]
    soft = np.linspace(0, 255, 64).astype(np.uint8).reshape(8, 8)      # anti-aliased: 64 levels
    assert binarise_mask(soft).sum() == (soft >= 128).sum()
    assert binarise_mask(np.array([[0.2, 0.7]])).tolist() == [[False, True]]
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[1, 2, 0] = 255
    p = tmp_path / "m.png"
    Image.fromarray(rgb).save(p)
    assert load_mask(p).sum() == 1
    with pytest.raises(InputError, match="mask is 4x4 but its image is 5x4"):
        load_mask(p, size=(4, 5))


def _support(tmp_path, mask):
    img = tmp_path / "s.png"
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(img)
    m = tmp_path / "s_mask.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(m)
    return img, m


def test_support_mask_checks(tmp_path):
    seg = FewShotSegmenter()
    img, m = _support(tmp_path, np.zeros((64, 64), bool))
    with pytest.raises(InputError, match="support mask is empty") as e:
        seg.fit(img, m)
    assert str(m) in str(e.value)
    img, m = _support(tmp_path, np.ones((64, 64), bool))
    with pytest.raises(InputError, match="covers the whole image"):
        seg.fit(img, m)
    img, m = _support(tmp_path, np.ones((32, 64), bool))
    with pytest.raises(InputError, match="mask is 64x32 but its image is 64x64"):
        seg.fit(img, m)
    with pytest.raises(InputError, match="one mask per support image"):
        seg.fit([img, img], [m])


def test_image_smaller_than_backbone_stride(tmp_path):
    seg = FewShotSegmenter()
    p = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(p)
    with pytest.raises(InputError, match="smaller than the 16 px") as e:
        seg.load(p)
    assert "tiny.png" in str(e.value)


def test_predict_before_fit_is_an_error():
    with pytest.raises(RuntimeError, match="fit"):
        FewShotSegmenter().predict(np.zeros((64, 64, 3), np.uint8))
