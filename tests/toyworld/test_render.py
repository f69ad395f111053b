"""The ToyWorld renderer: deterministic from a seed, and captions that describe their scenes."""

import numpy as np
import pytest

from spm_train.toyworld.render import (BACKGROUNDS, COLOURS, SHAPES, STYLES, Scene, caption, make_batch,
                                       random_scene, render, scene_labels)


def test_make_batch_is_deterministic_per_seed():
    a_img, a_cap, a_scn = make_batch(16, seed=3)
    b_img, b_cap, b_scn = make_batch(16, seed=3)
    c_img, _, _ = make_batch(16, seed=4)
    assert a_img.shape == (16, 32, 32, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_scn == b_scn
    assert not np.array_equal(a_img, c_img)


def test_captions_only_name_the_scene_attributes():
    rng = np.random.default_rng(0)
    vocab = {"shape": SHAPES, "colour": COLOURS, "style": STYLES, "background": BACKGROUNDS}
    templates_seen = set()
    for _ in range(300):
        scene = random_scene(rng)
        text = caption(scene, rng)
        words = text.replace(",", " ").split()
        assert words[0] == "a" and scene.shape in words  # every template names the shape
        for field, names in vocab.items():
            named = [w for w in words if w in names]
            assert named in ([], [getattr(scene, field)]), (text, scene)
        templates_seen.add(tuple(f for f, names in vocab.items() if any(w in names for w in words)))
    assert len(templates_seen) >= 4  # some captions omit attributes


def test_fixed_attributes_and_rendered_colour():
    rng = np.random.default_rng(1)
    scene = random_scene(rng, shape="square", colour="red", style="solid", background="white", size=24.0,
                         x=16.0, y=16.0, rotation=0.0)
    img = render(scene)
    assert tuple(img[16, 16]) == (220, 40, 40)  # centre is the solid colour
    assert tuple(img[0, 0]) == (250, 250, 250)  # corner is the background
    assert scene_labels([scene]).tolist() == [[SHAPES.index("square"), COLOURS.index("red"), 0]]


def test_styles_differ_and_bad_attributes_are_rejected():
    base = dict(shape="circle", colour="blue", background="black", x=16.0, y=16.0, size=24.0, rotation=0.0)
    images = [render(Scene(style=s, **base)).astype(int) for s in STYLES]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).mean() > 5
    with pytest.raises(ValueError):
        random_scene(np.random.default_rng(0), shape="hexagon")
    with pytest.raises(ValueError):
        random_scene(np.random.default_rng(0), colur="red")


def test_max_rotation_keeps_shapes_near_upright_and_the_other_draws_unchanged():
    rng_free, rng_near = np.random.default_rng(11), np.random.default_rng(11)
    free = [random_scene(rng_free) for _ in range(200)]
    near = [random_scene(rng_near, max_rotation=12.0) for _ in range(200)]
    assert all(-12.0 <= s.rotation <= 12.0 for s in near)
    assert max(s.rotation for s in free) > 30.0  # any orientation over the symmetry period
    # the same draws otherwise: a pool with limited rotation shows the same shapes, colours and places
    assert [(s.shape, s.colour, s.style, s.x, s.size) for s in free] == \
           [(s.shape, s.colour, s.style, s.x, s.size) for s in near]
    imgs, _, scenes = make_batch(4, seed=2, max_rotation=0.0)
    assert all(s.rotation == 0.0 for s in scenes) and imgs.shape == (4, 32, 32, 3)


# ------------------------------------------------------------------------------------------ the wide world
def _silhouette(shape: str, rotation: float = 0.0) -> np.ndarray:
    from spm_train.toyworld.render import _coverage

    full, _ = _coverage(Scene(shape, "red", "solid", "white", 16.0, 16.0, 24.0, rotation))
    return np.asarray(full) > 0


def test_the_wide_world_is_large_enough_to_erase_ten_concepts_and_keep_two_of_each():
    from spm_train.toyworld.render import CLASSIC, WIDE

    assert (len(WIDE.shapes), len(WIDE.colours), len(WIDE.styles)) == (10, 8, 6)
    assert WIDE.combinations() == 480 and CLASSIC.combinations() == 100
    # the classic world is a part of the wide one, so the classic shipped assets describe a subset of it
    assert set(CLASSIC.words()) < set(WIDE.words())
    # the tests run in the classic world unless SPM_TOYWORLD says otherwise
    assert SHAPES == CLASSIC.shapes and STYLES == CLASSIC.styles


def test_every_pair_of_wide_shapes_has_a_different_silhouette():
    from itertools import combinations

    from spm_train.toyworld.render import WIDE

    masks = {s: _silhouette(s) for s in WIDE.shapes}
    assert all(m.mean() > 0.1 for m in masks.values())
    for a, b in combinations(WIDE.shapes, 2):
        differ = (masks[a] ^ masks[b]).sum() / (masks[a] | masks[b]).sum()
        assert differ > 0.25, (a, b, differ)
    # a diamond is no square turned by 45 degrees, nor a rectangle a square seen sideways
    for a, b in (("diamond", "square"), ("rectangle", "square")):
        turned = min(((_silhouette(b, r) ^ masks[a]).sum() / (_silhouette(b, r) | masks[a]).sum())
                     for r in range(0, 90, 15))
        assert turned > 0.25, (a, b, turned)


def test_checked_and_gradient_styles_are_what_they_say():
    square = dict(shape="square", colour="blue", background="white", x=16.0, y=16.0, size=26.0, rotation=0.0)
    checked = render(Scene(style="checked", **square)).astype(int)
    solid = render(Scene(style="solid", **square)).astype(int)
    # cells of 4 px alternate between the colour and its pale tint along a row and a column
    assert abs(int(checked[10, 10, 0]) - int(checked[10, 14, 0])) > 60
    assert abs(int(checked[10, 10, 0]) - int(checked[14, 10, 0])) > 60
    # a gradient is full colour at the top of the shape and fades towards the bottom
    gradient = render(Scene(style="gradient", **square)).astype(int)
    bg = np.array([250, 250, 250])
    strength = [np.abs(gradient[y, 16] - bg).sum() / np.abs(solid[y, 16] - bg).sum() for y in (8, 16, 23)]
    assert strength[0] > 0.75 and strength[0] > strength[1] > strength[2] > 0.1


def test_wide_captions_use_synonyms_at_the_world_rate_and_name_only_the_scene():
    from spm_train.toyworld.render import WIDE

    rng = np.random.default_rng(0)
    spoken = {v: {v} | ({WIDE.synonym(v)} if WIDE.synonym(v) else set())
              for v in WIDE.shapes + WIDE.colours + WIDE.styles}
    named = by_synonym = 0
    forms = set()
    for _ in range(3000):
        scene = random_scene(rng, world=WIDE)
        words = caption(scene, rng, WIDE).replace(",", " ").split()
        for value in (scene.shape, scene.colour, scene.style):
            here = spoken[value] & set(words)
            if here and WIDE.synonym(value):
                named += 1
                by_synonym += WIDE.synonym(value) in here
        # nothing is named that the scene does not show
        others = {w for v, names in spoken.items() if v not in (scene.shape, scene.colour, scene.style)
                  for w in names}
        assert not others & set(words), (words, scene)
        forms.add(words[0] + " " + words[1])
    assert abs(by_synonym / named - WIDE.synonym_rate) < 0.03
    assert {"this is", "a heart", "a rectangle"} & forms
    images, captions, scenes = make_batch(8, seed=0, world=WIDE)
    assert images.shape == (8, 32, 32, 3) and scene_labels(scenes, WIDE).max(axis=0).tolist() <= [9, 7, 5]
    with pytest.raises(ValueError, match="not one of"):
        random_scene(rng, shape="heart")  # the classic world has no hearts


def test_the_world_is_chosen_by_environment_and_a_wrong_name_is_one_clear_error():
    import os
    import subprocess
    import sys

    code = ("from spm_train.toyworld import ASSETS, SHAPES, WORLD; from spm_train.toyworld.model import "
            "toyworld_words; print(WORLD.name, len(SHAPES), ASSETS.name, len(toyworld_words()))")
    env = dict(os.environ, SPM_TOYWORLD="wide")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["wide", "10", "assets-wide", "70"]
    env["SPM_TOYWORLD"] = "huge"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "SPM_TOYWORLD='huge' names no ToyWorld; known: ['classic', 'wide']" in bad.stderr
