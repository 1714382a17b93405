"""The feature cache stays within its byte budget and evicts least recently used entries first."""

import numpy as np
import torch

from engine.feature_cache import FeatureCache
from engine.types import FrameFeatures


def features(key: str, megabytes: int) -> FrameFeatures:
    patches = torch.zeros(megabytes, 1024, 256)  # 1 MiB per frame in float32
    return FrameFeatures(patches=patches, grid=16, timestamps=np.arange(megabytes, dtype=float), cache_key=key)


def test_lru_eviction_keeps_the_byte_budget():
    cache = FeatureCache(max_bytes=3 << 20)
    cache.put(features("a", 1))
    cache.put(features("b", 1))
    cache.put(features("c", 1))
    assert cache.get("a") is not None  # a becomes most recent
    cache.put(features("d", 1))
    assert cache.get("b") is None
    assert {k for k in "acd" if cache.get(k) is not None} == {"a", "c", "d"}
    assert cache.nbytes <= 3 << 20


def test_an_entry_larger_than_the_budget_is_not_kept():
    cache = FeatureCache(max_bytes=2 << 20)
    cache.put(features("small", 1))
    cache.put(features("huge", 3))
    assert cache.get("huge") is None
    assert cache.get("small") is not None
