"""An LRU cache of feature grids for image files, so a file used again (a support in
many benchmark episodes, the same reference image in several runs) is not decoded
and passed through the backbone again. Keyed by the file's resolved path, size and
modification time: an edited file is a new entry."""
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


class FeatureCache:
    def __init__(self, max_items: int):
        self.max_items = max_items
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
        with self._lock:
            self._d[key] = (features, size)
            self._d.move_to_end(key)
            while len(self._d) > self.max_items:
                self._d.popitem(last=False)

    def __getstate__(self):
        # shipped to another process (Ray actors, pickling): the size travels, not the entries or lock
        return {"max_items": self.max_items}

    def __setstate__(self, state):
        self.__init__(state["max_items"])

    def __len__(self) -> int:
        return len(self._d)
