"""Generation from the registry: named versions, verified, equipped with transport, images written."""

from pathlib import Path

import numpy as np
from PIL import Image

from spm_train.grids import GridLayout
from spm_train.registry import Registry, ValidationReport

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_generate(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    import pipelines.generate  # noqa: F401 - registers the schema

    base = ["model=tiny_random", f"paths.root={tmp_path}", f"registry.uri={tmp_path}/reg",
            f"registry.blobs={tmp_path}/reg/blobs", "steps=2", "guidance_scale=1.0"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("generate", overrides=base + list(overrides))


def test_generate_loads_named_versions_and_writes_original_and_membrane_images(tmp_path, membrane_file):
    from pipelines.generate import generate

    reg = Registry.open(tmp_path / "reg")
    passed = ValidationReport(structural="passed", behavioural="passed")
    v = reg.register(membrane_file("snoopy", 0), concept="snoopy", validation=passed)
    reg.promote(v.ref, "production")
    reg.register(membrane_file("cat", 1), concept="cat", validation=passed)
    cfg = compose_generate(tmp_path, "membranes=[snoopy@production,cat]", "prompts=[snoopy,a red car]",
                           "transport=false")
    result = generate(cfg, run_dir=str(tmp_path / "gen"))
    assert result.refs == ["snoopy:v1", "cat:v1"]
    assert len(result.originals) == len(result.with_membranes) == 2
    original = np.asarray(Image.open(result.originals[1]), dtype=np.int16)
    edited = np.asarray(Image.open(result.with_membranes[1]), dtype=np.int16)
    assert np.abs(original - edited).max() > 0  # fully open membranes (transport off) change the image
    # the grid: one labelled row per prompt, original | with membranes, small images enlarged by whole pixels
    grid = np.asarray(Image.open(result.grid).convert("RGB"), dtype=np.int16)
    layout = GridLayout(2, 2, 1, original.shape[:2], header_lines=1)
    assert grid.shape[:2] == (layout.size[1], layout.size[0]) and layout.factor > 1
    f = int(layout.factor)
    for column, image in enumerate((original, edited)):
        x0, y0, x1, y1 = layout.box(1, column, 0)
        assert np.array_equal(grid[y0:y1, x0:x1], np.repeat(np.repeat(image, f, axis=0), f, axis=1))
    x0, y0, x1, y1 = layout.label_box(1)
    assert (grid[y0:y1, x0:x1] < 128).any()  # the prompt is written beside its row
    # transport off: the caption above each membrane image says so
    caption = grid[layout.row_y(1):layout.row_y(1) + layout.line, layout.column_x(1):layout.column_x(1) + 60]
    assert (caption < 128).any()
    # the grid is remembered with each version for its model card
    assert reg.image_of(reg.resolve("snoopy@production")) == result.grid


def test_a_resolution_the_vae_cannot_decode_is_refused_before_any_image(tmp_path, membrane_file):
    import pytest

    from pipelines.generate import generate
    from spm_train.errors import ConfigError

    reg = Registry.open(tmp_path / "reg")
    reg.register(membrane_file("snoopy", 0), concept="snoopy",
                 validation=ValidationReport(structural="passed", behavioural="passed"))
    cfg = compose_generate(tmp_path, "membranes=[snoopy]", "prompt=snoopy", "resolution=30")
    with pytest.raises(ConfigError, match="resolution=30: must be a positive multiple of"):
        generate(cfg, run_dir=str(tmp_path / "gen"))
    assert not list((tmp_path / "gen").glob("*.png"))


def test_zero_steps_is_refused(tmp_path, membrane_file):
    import pytest

    from pipelines.generate import generate
    from spm_train.errors import ConfigError

    with pytest.raises(ConfigError, match="steps=0: at least 1"):
        generate(compose_generate(tmp_path, "membranes=[snoopy]", "prompt=snoopy", "steps=0"),
                 run_dir=str(tmp_path / "gen"))
