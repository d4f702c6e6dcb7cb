"""Figures: spots that fill the tissue, domain colours matched to the annotation's, files written whole."""
from __future__ import annotations

import numpy as np
import pandas as pd

from semst.cluster.plots import annotation_palette, domain_colours, plot_domain_maps, plot_losses, spot_diameter


def test_spots_on_a_square_grid_are_as_wide_as_the_grid_spacing():
    coords = np.stack(np.meshgrid(np.arange(20.0), np.arange(15.0)), -1).reshape(-1, 2) * 137.0
    assert np.isclose(spot_diameter(coords), 137.0)


def test_spots_scattered_with_close_pairs_are_sized_by_tissue_area_not_the_closest_pair():
    # 100 pairs of cells 1 unit apart, the pairs 10 units apart: 5 x 5 units of tissue per cell.
    centres = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2) * 10
    coords = np.concatenate([centres, centres + [1.0, 0.0]])
    assert 5.0 <= spot_diameter(coords) <= 10.0


def test_each_domain_takes_the_colour_of_the_annotated_domain_it_matches():
    annotation = pd.Series(["L1"] * 4 + ["L2"] * 4 + ["L3"] * 4)
    labels = np.array([5] * 4 + [2] * 4 + [9] * 3 + [7])
    palette, colours = annotation_palette(annotation), domain_colours(labels, annotation)
    assert (colours[5], colours[2], colours[9]) == (palette["L1"], palette["L2"], palette["L3"])
    assert colours[7] not in palette.values()  # an unmatched domain gets a colour of its own


def test_domain_maps_and_loss_curves_are_written_as_png(tmp_path):
    coords = np.stack(np.meshgrid(np.arange(12.0), np.arange(10.0)), -1).reshape(-1, 2)
    truth = pd.Series(np.where(coords[:, 0] < 6, "left", None), dtype="object")
    labels = (coords[:, 0] >= 6).astype(int)
    maps = plot_domain_maps(tmp_path / "maps.png", coords, truth, [("SemST", labels), ("failed", None)], title="t")
    unannotated = plot_domain_maps(tmp_path / "plain.png", coords, None, [("SemST", labels)])
    losses = plot_losses({0: {"total": [3, 2, 1], "zinb": [2, 1.5, 1]}, 1: {"total": [3, 2.5, 1]}}, tmp_path / "l.png")
    for path in (maps, unannotated, losses):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.png", "maps.png", "plain.png"]  # no temporaries left
