"""An LRU cache of feature grids for image files, so a file used again (a support in
many benchmark episodes, the same reference image in several runs) is not decoded
and passed through the backbone again. Keyed by the file's resolved path, size and
modification time: an edited file is a new entry.

The segmenter stores an image's features in their compact form (:class:`fdseg.features.LayerMaps`:
the backbone's maps before they are resized to the grid, ~1/18 of the grid's bytes; a zoomed image's
~0.4 MB instead of its grid's ~6.5 MB) and rebuilds the grid, bit-identical, on a hit. Bounded by a
number of entries and by their bytes (``MAX_BYTES``; tiled inputs are kept as grids)."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch


def file_key(path: str | Path) -> tuple | None:
    try:
        p = Path(path).resolve()
        st = os.stat(p)
    except OSError:
        return None
    return (str(p), st.st_size, st.st_mtime_ns)


MAX_BYTES = 512 * 2**20     # feature bytes kept at most (least recently used dropped first)


def _nbytes(t) -> int:
    """Bytes of a grid (a tensor) or of its compact form (:class:`fdseg.features.LayerMaps`)."""
    return int(t.nbytes)


class FeatureCache:
    def __init__(self, max_items: int, max_bytes: int = MAX_BYTES):
        self.max_items, self.max_bytes = max_items, max_bytes
        self.nbytes = 0
        self._d: OrderedDict[tuple, tuple[torch.Tensor, tuple[int, int]]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple | None):
        if key is None or self.max_items <= 0:
            return None
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key: tuple | None, features: torch.Tensor, size: tuple[int, int]) -> None:
        if key is None or self.max_items <= 0:
            return
        if _nbytes(features) > self.max_bytes:
            return
        if isinstance(features, torch.Tensor) and features.untyped_storage().nbytes() > _nbytes(features):
            features = features.clone()        # a view into a batch's tensor would keep the whole batch alive
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.nbytes -= _nbytes(old[0])
            self._d[key] = (features, size)
            self.nbytes += _nbytes(features)
            while len(self._d) > self.max_items or self.nbytes > self.max_bytes:
                _, (f, _) = self._d.popitem(last=False)
                self.nbytes -= _nbytes(f)

    def __getstate__(self):
        # shipped to another process (Ray actors, pickling): the size travels, not the entries or lock
        return {"max_items": self.max_items, "max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__init__(state["max_items"], state.get("max_bytes", MAX_BYTES))

    def __len__(self) -> int:
        return len(self._d)
