"""Labelled grids: layout, nearest-neighbour enlargement, labels and verdict colours, drawn from synthetic arrays."""

import numpy as np
import pytest
import torch
from PIL import Image

from spm_train.grids import (ABSENT, PRESENT, Group, GridLayout, Tile, draw_grid, fit, gamma_caption, wrap,
                             write_grid)


def _image(seed, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _groups(labels, columns, samples, size=32, verdicts=True):
    return [[Group([Tile(_image(100 * r + 10 * c + k, size), "red circle" if verdicts else "",
                         (k % 2 == 0) if verdicts else None) for k in range(samples)], f"gamma {c / 4:.2f}")
             for c in range(columns)] for r in range(len(labels))]


def test_a_toyworld_grid_is_upscaled_pixel_exactly_and_its_size_follows_the_counts(tmp_path):
    labels = ["a red circle", "a blue square"]
    groups = _groups(labels, 3, 4)
    layout = write_grid(str(tmp_path / "g.png"), labels, ["original", "membrane", "all"], groups)
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    assert layout.tile == (128, 128) and layout.factor == 4  # 32 px enlarged to 128
    assert grid.shape[:2] == (layout.size[1], layout.size[0])
    # one more sample per group widens every column by one framed image and its gap
    wider = GridLayout(2, 3, 5, (32, 32))
    assert wider.size[0] - layout.size[0] == 3 * (layout.slot + 2) and wider.size[1] == layout.size[1]
    # row 1, column 2, sample 3: every source pixel is a 4x4 block of the same colour
    x0, y0, x1, y1 = layout.box(1, 2, 3)
    expected = np.repeat(np.repeat(_image(100 + 20 + 3), 4, axis=0), 4, axis=1)
    assert np.array_equal(grid[y0:y1, x0:x1], expected)
    # the frame shows the verdict: sample 3 (odd) is "absent" (green), sample 2 "present" (red)
    assert tuple(grid[y0 - 1, x0]) == ABSENT
    x0, y0, _, _ = layout.box(1, 2, 2)
    assert tuple(grid[y0 - 1, x0]) == PRESENT


def test_labels_are_drawn_in_the_label_strip_and_change_with_the_text():
    groups = _groups(["x"], 1, 2, verdicts=False)
    with_text, layout = draw_grid(["a striped red circle"], ["original"], groups)
    other, _ = draw_grid(["a solid blue square"], ["original"], groups)
    blank, _ = draw_grid([""], ["original"], groups)
    strip = layout.label_box(0)
    a, b, c = (np.asarray(im.crop(strip)) for im in (with_text, other, blank))
    assert (c == 255).all()  # an empty label leaves the strip white
    assert (a < 128).any() and not np.array_equal(a, b)
    # no verdict: no frame, the image sits on white
    x0, y0, _, _ = layout.box(0, 0, 0)
    assert tuple(np.asarray(with_text)[y0 - 1, x0]) == (255, 255, 255)


def test_large_images_are_not_upscaled_and_float_tensors_are_accepted():
    image = torch.rand(3, 160, 160, generator=torch.Generator().manual_seed(0))
    grid, layout = draw_grid(["a prompt"], ["original"], [[Group([Tile(image)])]])
    assert layout.factor == 1 and layout.tile == (160, 160)
    x0, y0, x1, y1 = layout.box(0, 0, 0)
    expected = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(grid)[y0:y1, x0:x1], expected)
    _, shrunk = draw_grid(["a prompt"], ["original"], [[Group([Tile(image)])]], max_cell=80)
    assert shrunk.tile == (80, 80)


def test_text_is_fitted_to_its_room_and_mismatched_input_is_refused():
    assert fit("short", 200) == "short"
    cut = fit("a very long prompt " * 10, 120)
    assert cut.endswith("...") and len(cut) < 25
    lines = wrap("one two three four five six seven eight nine ten eleven twelve", 60, 2)
    assert len(lines) == 2 and lines[-1].endswith("...")
    assert fit("Schlo\u00df \u03b3 \u2713", 200) == "Schlo\u00df ? ?"  # outside Latin-1: "?"
    assert gamma_caption(["red"], [0.931]) == "gamma 0.93"
    assert gamma_caption(["red", "circle", "star"], [0.1, 0.9, 0.0]) == "gamma circle 0.90, red 0.10"
    assert gamma_caption(["red"], [1.0], transport=False) == "transport off: gamma 1"
    with pytest.raises(ValueError, match="must be 1 rows of 2 columns"):
        draw_grid(["a"], ["x", "y"], _groups(["a"], 1, 1))
    mixed = [[Group([Tile(_image(0, 32)), Tile(_image(1, 16))])]]
    with pytest.raises(ValueError, match="one size"):
        draw_grid(["a"], ["x"], mixed)
