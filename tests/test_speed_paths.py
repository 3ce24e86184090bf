"""The fast paths give the same answers as the plain ones (speed itself is in BENCHMARKS.md)."""
import numpy as np
import pytest
import torch
from PIL import Image

from fdseg import FewShotSegmenter, InputError
from fdseg.hardware import fast_bf16, matmul_dtype
from fdseg.methods.fm import coreset_size
from fdseg.methods.similarity import greedy_coreset, max_similarity

from conftest import planted


def _unit(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, c, generator=g), dim=1)


def test_chunked_equals_one_block():
    # blocks of one similarity, of fewer / more query rows than there are, uneven bank blocks, one block
    q, bank = _unit(70, 32, 0), _unit(301, 32, 1)
    full = (q @ bank.T).amax(1)
    for chunk in (1, 69, 71, 300, 70 * 5 - 1, 50_000, 1 << 30):
        torch.testing.assert_close(max_similarity(q, bank, chunk=chunk), full, rtol=0, atol=1e-6)


def test_bf16_within_tolerance_of_fp32():
    q, bank = _unit(500, 152, 2), _unit(2000, 152, 3)
    exact = max_similarity(q, bank)
    approx = max_similarity(q, bank, dtype=torch.bfloat16)
    assert approx.dtype == torch.float32
    assert (approx - exact).abs().max() < 0.02     # bf16 keeps 8 bits of mantissa


def test_precision_choice_follows_the_hardware():
    assert matmul_dtype("fp32") == torch.float32 and matmul_dtype("bf16") == torch.bfloat16
    assert matmul_dtype("auto") == (torch.bfloat16 if fast_bf16("cpu") else torch.float32)
    with pytest.raises(ValueError):
        matmul_dtype("fp8")


def test_greedy_coreset_covers_better_than_random():
    x = _unit(4000, 24, 4)
    idx = greedy_coreset(x, 200, seed=0)
    assert len(set(idx.tolist())) == 200
    rnd = torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:200]
    radius = lambda sel: (1 - max_similarity(x, x[sel])).max()   # worst cosine distance to a center
    assert radius(idx) < radius(rnd)
    torch.testing.assert_close(greedy_coreset(x, 200, seed=0), idx)   # deterministic
    assert len(greedy_coreset(x, 5000)) == 4000
    assert coreset_size(1000, 0.1) == 100 and coreset_size(1000, 50) == 50 and coreset_size(10, None) == 10
    with pytest.raises(InputError):
        coreset_size(10, -1)


def test_coreset_only_lowers_background_similarity():
    s_img, s_mask = planted(256, 256, (40, 40, 110, 120), seed=1)
    q_img, _ = planted(256, 256, (150, 130, 220, 230), seed=2)
    # head=0: the property is about matching (a head fitted on another bank votes differently); one view
    one = dict(support_augment="none", query_augment="none")
    exact = FewShotSegmenter(method_options={"head": 0.0}, **one).fit(s_img, s_mask)
    core = FewShotSegmenter(method_options={"bg_coreset": 0.1, "head": 0.0}, **one).fit(s_img, s_mask)
    assert core.method.describe()["bg_cells"] == round(0.1 * exact.method.describe()["bg_cells"])
    me, mc = exact.margins(q_img)[0], core.margins(q_img)[0]
    assert (mc >= me - 1e-6).all()                 # fewer background cells: max can only drop


def test_cached_batched_streamed_equal_plain(tmp_path, demo):
    pairs = demo.supports + demo.queries[:3]          # images of several sizes
    imgs, masks = [p for p, _ in pairs], [m for _, m in pairs]
    # the fast preset (one view of each image): the cache and the batching are what is compared
    plain = FewShotSegmenter(preset="fast", batch_size=1, loader_threads=1).fit(imgs[:2], masks[:2])
    ref = [plain.predict(q) for q in imgs[2:]]
    fast = FewShotSegmenter(preset="fast", cache_size=16, batch_size=4, loader_threads=2).fit(imgs[:2], masks[:2])
    passes = []
    for _ in range(2):                             # second pass is served from the cache
        got = fast.predict(imgs[2:])
        for a, b in zip(ref, got):
            np.testing.assert_allclose(a.margin_grid, b.margin_grid, atol=1e-5)
            assert (a.mask != b.mask).mean() < 1e-3
        passes.append(got)
    assert fast.cache.hits >= 3
    for a, b in zip(*passes):                      # a cached (compact) image's grid is the one it was computed as
        assert np.array_equal(a.margin_grid, b.margin_grid) and np.array_equal(a.mask, b.mask)
    # refit from cache: same bank
    fast.fit(imgs[:2], masks[:2])
    torch.testing.assert_close(fast.method.bg, plain.method.bg, atol=1e-5, rtol=0)


def test_stream_goes_on_after_a_bad_query(tmp_path, demo):
    imgs = [p for p, _ in demo.queries[:3]]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    seg = FewShotSegmenter(preset="fast").fit(*demo.supports[0])
    out = list(seg.predict_stream([imgs[0], bad, imgs[1], imgs[2]]))
    assert [isinstance(r, InputError) for _, r in out] == [False, True, False, False]
    assert [q for q, _ in out] == [str(p) for p in (imgs[0], bad, imgs[1], imgs[2])]   # in order
    assert "bad.png" in str(out[1][1])
    for (q, r), ref in zip([out[0], out[2], out[3]], seg.predict(imgs)):
        assert r.image.shape == (*r.mask.shape, 3) == (*np.array(Image.open(q)).shape[:2], 3)
        assert (r.mask == ref.mask).all()                                      # what predict gives
    with pytest.raises(InputError):
        seg.predict([imgs[1], bad])


@pytest.mark.data
@pytest.mark.slow
def test_twenty_shot_bank_is_matched_in_bounded_blocks(defects_root):
    d = defects_root / "sd_saliency_900" / "inclusion"
    imgs = sorted((d / "images").iterdir())[:21]
    seg = FewShotSegmenter(method_options={"chunk": 1 << 20})
    seg.fit(imgs[:20], [d / "masks" / f"{p.stem}.png" for p in imgs[:20]])
    n_bank = seg.method.describe()["bg_cells"] + seg.method.describe()["fg_cells"]
    assert n_bank > 60_000               # 20 x 64 x 64 cells; the full matrix would be 4096 x n_bank
    calls = []
    real = torch.Tensor.amax
    def spy(self, *a, **k):
        calls.append(self.numel())
        return real(self, *a, **k)
    torch.Tensor.amax = spy
    try:
        seg.margins(imgs[20])
    finally:
        torch.Tensor.amax = real
    assert max(calls) <= 1 << 20 and len(calls) > 2


@pytest.mark.slow
def test_onnx_export_matches_torch(tmp_path, demo):
    pytest.importorskip("onnxruntime")
    from fdseg.cli import main
    path = tmp_path / "lite0.onnx"
    assert main(["export", "--backbone", "efficientnet_lite0", "--format", "onnx", "--out", str(path)]) == 0
    from fdseg import create_backbone
    tb, ob = create_backbone("efficientnet_lite0"), create_backbone("onnx", weights=path)
    assert (ob.strides, ob.channels, ob.mean) == (tb.strides, tb.channels, tb.mean)
    for shape in [(1, 3, 256, 256), (2, 3, 320, 192)]:                 # dynamic batch and size
        x = torch.randn(*shape)
        with torch.inference_mode():
            for a, b in zip(tb(x), ob(x)):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    sup, imgs = demo.supports[0], [None] + [p for p, _ in demo.queries[:2]]
    # fp32 on both sides: on a CPU with fast bf16 the torch backbone would run under bf16 autocast
    # and the matching in bf16, which is not what this test compares
    pt_seg = FewShotSegmenter(method_options={"precision": "fp32"})
    pt_seg.extractor.amp = False
    pt_seg.fit(*sup)
    pt = pt_seg.predict(imgs[1:])
    ox_seg = FewShotSegmenter(backbone="onnx", weights=path, method_options={"precision": "fp32"}).fit(*sup)
    ox = ox_seg.predict(imgs[1:])
    for q, a, b in zip(imgs[1:], pt, ox):
        np.testing.assert_allclose(pt_seg.margins(q)[0], ox_seg.margins(q)[0], atol=1e-3)    # exact margins
        assert (a.mask != b.mask).mean() < 0.002
    with pytest.raises(InputError, match="no fdseg metadata"):
        import onnx
        m = onnx.load(str(path))
        del m.metadata_props[:]
        onnx.save(m, str(tmp_path / "plain.onnx"))
        create_backbone("onnx", weights=tmp_path / "plain.onnx")
