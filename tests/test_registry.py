"""Every registered backend keeps the contract the engine and UI rely on (parametrized over the registry)."""

import dataclasses

import numpy as np
import pytest
import torch

from backends.base import Param, param_field_info
from backends.registry import get_backend, list_backends, register_backend
from engine.types import FrameFeatures


def tiny_features(engine, num_frames: int, seed: int = 0) -> FrameFeatures:
    loaded = engine.loaded
    grid, dim = loaded.grid, loaded.model.config.vision_config.hidden_size
    patches = torch.randn(num_frames, grid * grid, dim, generator=torch.Generator().manual_seed(seed))
    return FrameFeatures(patches=patches, grid=grid, timestamps=np.arange(num_frames) * 0.5, cache_key=f"r{seed}")


@pytest.mark.parametrize("name", list_backends())
def test_backend_describes_itself_and_declares_its_params(name):
    backend = get_backend(name)
    assert backend.name == name
    assert backend.label and backend.paper and backend.description and backend.about
    assert dataclasses.is_dataclass(backend.Params) and backend.Params.__dataclass_params__.frozen
    for field, default, meta in param_field_info(backend.Params):
        assert isinstance(meta, Param) and meta.label, field
        assert default is not dataclasses.MISSING, field


@pytest.mark.parametrize("name", list_backends())
@pytest.mark.parametrize("num_frames", [1, 7, 20])
def test_token_count_known_up_front_equals_what_compress_returns(tiny_engine, name, num_frames):
    backend = get_backend(name)
    params = backend.make_params()
    features = tiny_features(tiny_engine, num_frames)
    tokens = tiny_engine.compress(name, features, "Which frame shows the red square?")
    assert tokens.num_tokens == backend.num_tokens(num_frames, features.grid, params)
    assert tokens.frame_span.shape == (tokens.num_tokens, 2)
    spans = tokens.frame_span[tokens.frame_span[:, 0] >= 0]
    assert spans.numel() and int(spans.max()) < num_frames and bool((spans[:, 0] <= spans[:, 1]).all())
    assert all(0 <= index <= tokens.num_tokens for index, _ in tokens.markers)
    for mark, values in tokens.frame_marks.items():
        assert len(values) == num_frames, mark


def test_a_name_cannot_be_registered_twice():
    with pytest.raises(ValueError):
        register_backend("uniform")(type("Impostor", (get_backend("uniform").__class__,), {}))
