"""Beyond-the-paper levers on synthetic cases with known answers."""
import numpy as np
import pytest

from fdseg import FewShotSegmenter, InputError

from conftest import iou, planted, texture


def test_dihedral_support_augmentation_keeps_images_and_masks_aligned():
    """8 views of an off-centre, non-square defect: a mask transformed unlike its image would put
    background cells in the foreground bank and the query's rotated defect would be lost."""
    s_img, s_mask = planted(256, 256, (20, 30, 90, 200), seed=1)
    q_img, q_mask = planted(256, 256, (60, 150, 230, 220), seed=2)
    q_img[60:230, 150:220] = np.rot90(texture(70, 170, 1001, "stripes"))  # the rotated defect
    aug = FewShotSegmenter(support_augment="dihedral").fit(s_img, s_mask)
    plain_cells = FewShotSegmenter().fit(s_img, s_mask).method.describe()["fg_cells"]
    assert aug.method.describe()["fg_cells"] == 8 * plain_cells
    pred = aug.predict(q_img)
    assert iou(pred.mask, q_mask) > 0.7 and pred.mask[~q_mask].mean() < 0.02
    with pytest.raises(InputError, match="support_augment"):
        FewShotSegmenter(support_augment="shear")


def test_query_background_bank_handles_an_unseen_background():
    """The query's background is a texture the support never showed; its own cells tell it apart."""
    s_img, s_mask = planted(256, 256, (40, 40, 110, 110), seed=1)
    rng = np.random.default_rng(7)
    q_img = np.clip(60 + 60 * ((np.indices((256, 256)).sum(0) // 16) % 2)[..., None] + rng.normal(0, 4, (256, 256, 3)),
                    0, 255).astype(np.uint8)                               # a chequerboard background
    q_img[150:210, 140:200] = texture(60, 60, 1001, "stripes")
    q_mask = np.zeros((256, 256), bool)
    q_mask[150:210, 140:200] = True
    plain = FewShotSegmenter().fit(s_img, s_mask).predict(q_img)
    qbg = FewShotSegmenter(method_options={"query_bg": 2.0}).fit(s_img, s_mask).predict(q_img)
    assert iou(qbg.mask, q_mask) > iou(plain.mask, q_mask) + 0.1
    assert qbg.mask[~q_mask].mean() < plain.mask[~q_mask].mean()


def test_auto_resolution_rule():
    """resize='auto': an image with a long side >= 2 x size is seen aspect-kept at 2 x size with a
    2 x coarser cell (the grid keeps size/stride cells on its long side); smaller ones as the paper."""
    from fdseg.data import Preprocess
    p = Preprocess(mode="auto", size=256)
    assert p.input_size(1000, 1500) == (352, 512) and p.cell(352, 512, 4) == 8
    assert p.input_size(460, 1130) == (224, 512)
    assert p.input_size(200, 200) == (256, 256) and p.cell(256, 256, 4) == 4
    assert p.input_size(320, 480) == (256, 256)                       # long side < 512: the paper's squeeze
    seg = FewShotSegmenter(resize="auto")
    big, small = np.zeros((1000, 1500, 3), np.uint8), np.zeros((200, 200, 3), np.uint8)
    assert tuple(seg.extractor(big).shape[1:]) == seg.extractor.grid_size(1000, 1500) == (44, 64)
    assert tuple(seg.extractor(small).shape[1:]) == (64, 64)
    s_img, s_mask = planted(600, 900, (200, 300, 320, 460), seed=1)   # a planted patch is still found
    q_img, q_mask = planted(600, 900, (100, 500, 230, 640), seed=2)
    pred = seg.fit(s_img, s_mask).predict(q_img)
    assert pred.mask.shape == (600, 900) and iou(pred.mask, q_mask) > 0.6
