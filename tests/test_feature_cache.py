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
