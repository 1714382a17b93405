"""A byte-bounded LRU of FrameFeatures, keyed by file content hash + sampling + model."""

from __future__ import annotations

import threading
from collections import OrderedDict

from engine.types import FrameFeatures


class FeatureCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, FrameFeatures] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _size(features: FrameFeatures) -> int:
        return features.patches.numel() * features.patches.element_size()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._size(f) for f in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> FrameFeatures | None:
        with self._lock:
            features = self._items.get(key)
            if features is not None:
                self._items.move_to_end(key)
            return features

    def put(self, features: FrameFeatures) -> None:
        """Insert, evicting least recently used entries; an entry larger than the whole budget is not kept."""
        size = self._size(features)
        with self._lock:
            self._items.pop(features.cache_key, None)
            if size > self.max_bytes:
                return
            self._items[features.cache_key] = features
            used = sum(self._size(f) for f in self._items.values())
            while used > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                used -= self._size(evicted)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
