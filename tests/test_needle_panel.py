"""The needle tab's run: one row per method, attention shares consistent with the needle's frames, shaded span."""

import numpy as np
import pytest

from bench.needle import Needle, needle_frame_mask
from ui.needle_panel import needle_figure, needle_rows


def test_needle_rows_report_every_method_with_attention_on_the_needle(tiny_engine):
    needle = Needle(color="blue", depth=0.5, seconds=6.0)
    rows, curves, stamps, span = needle_rows(tiny_engine, ["uniform", "hico"], needle, duration_s=40.0, frames=8,
                                             max_new_tokens=2)
    assert [row[0] for row in rows] == ["Uniform (LLaVA-OneVision)", "HiCo (VideoChat-Flash / InternVideo2.5)"]
    mask = needle_frame_mask(stamps, span)
    assert 0 < mask.sum() < len(stamps)
    for row, attention in zip(rows, curves.values()):
        assert attention.shape == stamps.shape
        assert float(row[3].rstrip("%")) == pytest.approx(100 * attention[mask].sum() / attention.sum(), abs=0.06)
        assert row[5] == f"{int(mask.sum())} / {len(stamps)}"
    figure = needle_figure(curves, stamps, span)
    (shade,) = figure.layout.shapes
    assert (shade.x0, shade.x1) == span
    assert len(figure.data) == 2 and np.allclose(figure.data[0].y, curves["uniform"])
