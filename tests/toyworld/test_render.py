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
