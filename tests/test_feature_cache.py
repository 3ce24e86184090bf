"""The feature cache keeps at most max_items grids and max_bytes of them, dropping the least recently used."""
import pickle

import torch

from fdseg.feature_cache import FeatureCache


def _grid(mb: float) -> torch.Tensor:
    return torch.zeros(int(mb * 2**20) // 4)            # fp32: mb megabytes


def test_byte_bound_drops_the_least_recently_used():
    c = FeatureCache(max_items=100, max_bytes=10 * 2**20)
    for i in range(3):
        c.put(("f", i), _grid(4), (1, 1))                # 12 MB > 10: the first goes
    assert c.get(("f", 0)) is None and c.get(("f", 1)) is not None and len(c) == 2
    assert c.nbytes == 8 * 2**20
    c.put(("f", 3), _grid(4), (1, 1))                    # ("f", 1) was used last: ("f", 2) goes
    assert c.get(("f", 2)) is None and c.get(("f", 1)) is not None
    c.put(("f", 1), _grid(2), (1, 1))                    # replacing an entry recounts its bytes
    assert c.nbytes == 6 * 2**20
    c.put(("big", 0), _grid(11), (1, 1))                 # larger than the whole budget: not kept
    assert c.get(("big", 0)) is None and c.nbytes == 6 * 2**20


def test_item_bound_and_pickling():
    c = FeatureCache(max_items=2, max_bytes=2**30)
    for i in range(3):
        c.put(("f", i), _grid(0.01), (1, 1))
    assert len(c) == 2 and c.get(("f", 0)) is None
    back = pickle.loads(pickle.dumps(c))                 # the bounds travel, the entries do not
    assert (back.max_items, back.max_bytes, len(back), back.nbytes) == (2, 2**30, 0, 0)


def test_a_view_into_a_batch_is_stored_on_its_own():
    """Grids come out of a batched backbone pass as views of one tensor; the cache keeps copies, so
    its byte count is what it holds (a view would keep the whole batch alive)."""
    batch = torch.zeros(4, 1024)
    c = FeatureCache(max_items=10, max_bytes=2**30)
    c.put(("f", 0), batch[1], (1, 1))
    kept = c.get(("f", 0))[0]
    assert kept.untyped_storage().nbytes() == 1024 * 4 == c.nbytes
    torch.testing.assert_close(kept, batch[1])


def test_compact_features_rebuild_the_batch_grid_exactly():
    """The cache keeps the backbone's maps (LayerMaps), not the grid; the grid rebuilt from them is the
    one a batched pass gives, bit for bit, at a small fraction of its bytes."""
    import numpy as np

    from fdseg import FewShotSegmenter
    from fdseg.data.preprocess import resize_image, to_tensor
    from fdseg.features import LayerMaps, as_grid

    ex = FewShotSegmenter(preset="fast").extractor
    rng = np.random.default_rng(0)
    for shape in [(96, 160, 3), (256, 256, 3)]:
        imgs = [rng.integers(0, 255, shape, dtype=np.uint8) for _ in range(3)]
        compact = ex.batch_maps(imgs)
        H, W = ex.preprocess.input_size(*shape[:2])
        x = ex.backbone.normalize(torch.cat([resize_image(to_tensor(im, ex.device), (H, W), ex.preprocess.antialias)
                                             for im in imgs]))
        with torch.inference_mode():
            batched = ex._forward(x)
        for c, ref in zip(compact, batched):
            assert isinstance(c, LayerMaps)
            assert torch.equal(as_grid(c), ref)
            assert c.nbytes * 8 < ref.nbytes
        c = FeatureCache(max_items=10)
        c.put(("f", 0), compact[0], (H, W))
        assert c.nbytes == compact[0].nbytes and torch.equal(as_grid(c.get(("f", 0))[0]), batched[0])
