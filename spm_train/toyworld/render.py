"""ToyWorld renderer: 32x32 RGB images of coloured shapes in a few styles, with captions.

Every image is drawn with numpy masks on a 4x supersampled grid and averaged down, which gives
anti-aliased edges for free. Everything random comes from a ``numpy.random.Generator`` so that a seed
fixes the images and the captions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple")
STYLES = ("solid", "outline", "striped", "dotted")
BACKGROUNDS = ("white", "black", "gray", "cream")

COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 30),
    "purple": (150, 50, 190),
}
BACKGROUND_RGB = {
    "white": (250, 250, 250),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "cream": (240, 226, 190),
}

IMAGE_SIZE = 32
SIZE_RANGE = (14.0, 26.0)  # bounding size in pixels; big enough that a style is visible at 32 px
_SS = 4  # supersampling factor
# Style geometry, in output pixels. Periods of 6 px survive the 4x downsampling of the VAE better than 4 px.
_STRIPE_PERIOD = 6.0
_DOT_PERIOD = 6.0
_DOT_RADIUS = 1.7
_OUTLINE_WIDTH = 2.0
_PATTERN_TINT = 0.4  # how much shape colour the "off" pixels of stripes and dots carry

# Rotational symmetry of each shape, so that a rotation is drawn in [0, period).
_ROTATION_PERIOD = {"circle": 360.0, "square": 90.0, "triangle": 120.0, "star": 72.0, "cross": 90.0}

# Caption templates; a template that leaves out an attribute leaves that attribute random in the image.
CAPTION_TEMPLATES = (
    ("{style} {colour} {shape} on a {background} background", 4.0),
    ("{style} {colour} {shape}", 4.0),
    ("{colour} {shape}, {style}", 2.0),
    ("{colour} {shape} on a {background} background", 1.0),
    ("{colour} {shape}", 1.5),
    ("{style} {shape}", 1.0),
    ("{shape}", 0.5),
)


@dataclass(frozen=True)
class Scene:
    """One image: what is drawn and where. ``x``, ``y`` is the centre in pixels, ``size`` the extent."""

    shape: str
    colour: str
    style: str
    background: str
    x: float
    y: float
    size: float
    rotation: float  # degrees

    def labels(self) -> tuple[int, int, int]:
        """(shape, colour, style) indices, the targets of the ToyWorld classifier."""
        return SHAPES.index(self.shape), COLOURS.index(self.colour), STYLES.index(self.style)

    def to_dict(self) -> dict:
        return asdict(self)


def random_scene(rng: np.random.Generator, max_rotation: float | None = None, **fixed) -> Scene:
    """A random scene; keyword arguments (e.g. ``shape="star"``) fix attributes instead of sampling them.

    ``max_rotation`` (degrees): shapes turned by at most that much either way from upright; None draws
    any orientation (over the shape's symmetry period).
    """
    unknown = set(fixed) - set(Scene.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown scene fields {sorted(unknown)}; known: {list(Scene.__dataclass_fields__)}")
    shape = fixed.get("shape", SHAPES[rng.integers(len(SHAPES))])
    colour = fixed.get("colour", COLOURS[rng.integers(len(COLOURS))])
    style = fixed.get("style", STYLES[rng.integers(len(STYLES))])
    background = fixed.get("background", BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    for name, value, allowed in (("shape", shape, SHAPES), ("colour", colour, COLOURS),
                                 ("style", style, STYLES), ("background", background, BACKGROUNDS)):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {allowed}")
    size = float(fixed.get("size", rng.uniform(*SIZE_RANGE)))
    margin = size / 2 + 1.0
    x = float(fixed.get("x", rng.uniform(margin, IMAGE_SIZE - margin)))
    y = float(fixed.get("y", rng.uniform(margin, IMAGE_SIZE - margin)))
    turn = (0.0, _ROTATION_PERIOD[shape]) if max_rotation is None else (-max_rotation, max_rotation)
    rotation = float(fixed.get("rotation", rng.uniform(*turn)))
    return Scene(shape, colour, style, background, x, y, size, rotation)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption for ``scene`` from a randomly chosen template (some templates omit attributes)."""
    weights = np.array([w for _, w in CAPTION_TEMPLATES])
    template = CAPTION_TEMPLATES[rng.choice(len(CAPTION_TEMPLATES), p=weights / weights.sum())][0]
    return "a " + template.format(shape=scene.shape, colour=scene.colour, style=scene.style,
                                  background=scene.background)


def _grid(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of the supersampled grid, in output-pixel units."""
    coords = (np.arange(size * _SS) + 0.5) / _SS
    return np.meshgrid(coords, coords, indexing="xy")


def _polygon_fan(px, py, cx, cy, vertices: np.ndarray) -> np.ndarray:
    """Inside test for a polygon that is star-shaped around its centre: a union of triangles (c, v_i, v_i+1)."""
    inside = np.zeros(px.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        (ax, ay), (bx, by) = vertices[i], vertices[(i + 1) % n]
        # Same-sign test against the three edges of the triangle (centre, a, b).
        d1 = (ax - cx) * (py - cy) - (ay - cy) * (px - cx)
        d2 = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
        d3 = (cx - bx) * (py - by) - (cy - by) * (px - bx)
        pos = (d1 >= 0) & (d2 >= 0) & (d3 >= 0)
        neg = (d1 <= 0) & (d2 <= 0) & (d3 <= 0)
        inside |= pos | neg
    return inside


def _vertices(shape: str, cx: float, cy: float, radius: float, rotation: float) -> np.ndarray:
    theta0 = np.deg2rad(rotation)
    if shape == "square":
        angles = theta0 + np.pi / 4 + np.arange(4) * np.pi / 2
        radii = np.full(4, radius * 0.95)
    elif shape == "triangle":
        angles = theta0 - np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        radii = np.full(3, radius * 1.05)
    elif shape == "star":
        angles = theta0 - np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius * 1.05, radius * 0.45)
    elif shape == "cross":
        # A plus sign: 12 corners, arms of half-width w reaching out to r.
        w, r = radius * 0.36, radius
        local = np.array([(w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r),
                          (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r)])
        c, s = np.cos(theta0), np.sin(theta0)
        return np.stack([cx + c * local[:, 0] - s * local[:, 1], cy + s * local[:, 0] + c * local[:, 1]], 1)
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)


def _shape_mask(scene: Scene, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    radius = scene.size / 2
    if scene.shape == "circle":
        return (px - scene.x) ** 2 + (py - scene.y) ** 2 <= (radius * 0.92) ** 2
    if scene.shape not in SHAPES:
        raise ValueError(f"unknown shape {scene.shape!r}; known: {SHAPES}")
    return _polygon_fan(px, py, scene.x, scene.y, _vertices(scene.shape, scene.x, scene.y, radius, scene.rotation))


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary erosion with a (2k+1)^2 square, separable: min over x then over y."""
    padded = np.pad(mask, k, constant_values=False)
    win = np.lib.stride_tricks.sliding_window_view
    out = win(padded, 2 * k + 1, axis=1).min(axis=-1)
    out = win(out, 2 * k + 1, axis=0).min(axis=-1)
    return out


def _coverage(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(full, tinted) coverage of the supersampled grid: pixels in shape colour and in the pale pattern tint."""
    px, py = _grid()
    mask = _shape_mask(scene, px, py)
    tint = np.zeros_like(mask)
    if scene.style == "solid":
        full = mask
    elif scene.style == "outline":
        full = mask & ~_erode(mask, int(round(_OUTLINE_WIDTH * _SS)))
    elif scene.style == "striped":
        on = np.floor((py - scene.y) / (_STRIPE_PERIOD / 2)) % 2 == 0
        full, tint = mask & on, mask & ~on
    elif scene.style == "dotted":
        dx = (px - scene.x + _DOT_PERIOD / 2) % _DOT_PERIOD - _DOT_PERIOD / 2
        dy = (py - scene.y + _DOT_PERIOD / 2) % _DOT_PERIOD - _DOT_PERIOD / 2
        on = dx ** 2 + dy ** 2 <= _DOT_RADIUS ** 2
        full, tint = mask & on, mask & ~on
    else:
        raise ValueError(f"unknown style {scene.style!r}; known: {STYLES}")
    return full, tint


def _downsample(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // _SS, a.shape[1] // _SS
    return a.reshape(h, _SS, w, _SS).mean(axis=(1, 3))


# The "community fine-tune" distribution: a deeper, shifted palette on dark backgrounds only.
VARIANT_COLOUR_RGB = {
    "red": (190, 20, 70),
    "green": (20, 150, 100),
    "blue": (30, 60, 180),
    "yellow": (245, 175, 20),
    "purple": (125, 40, 165),
}
VARIANT_BACKGROUNDS = ("black", "gray")


def render(scene: Scene, palette: dict | None = None) -> np.ndarray:
    """Draw ``scene`` as a uint8 array of shape (32, 32, 3); ``palette`` overrides the colour RGB values."""
    full, tint = _coverage(scene)
    a_full = _downsample(full.astype(np.float32))[..., None]
    a_tint = _downsample(tint.astype(np.float32))[..., None] * _PATTERN_TINT
    bg = np.asarray(BACKGROUND_RGB[scene.background], dtype=np.float32)
    fg = np.asarray((palette or COLOUR_RGB)[scene.colour], dtype=np.float32)
    img = bg * (1 - a_full - a_tint) + fg * (a_full + a_tint)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_batch(n: int, seed: int, palette: dict | None = None, backgrounds: tuple[str, ...] | None = None,
               max_rotation: float | None = None, **fixed) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` random scenes rendered and captioned: (uint8 images N x 32 x 32 x 3, captions, scenes).

    ``palette`` and ``backgrounds`` shift the distribution (used for the variant model); ``max_rotation``
    as in ``random_scene``.
    """
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        extra = {"background": backgrounds[rng.integers(len(backgrounds))]} if backgrounds else {}
        scenes.append(random_scene(rng, max_rotation, **extra, **fixed))
    captions = [caption(s, rng) for s in scenes]
    images = np.stack([render(s, palette) for s in scenes]) if n else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return images, captions, scenes


def scene_labels(scenes: list[Scene]) -> np.ndarray:
    """(N, 3) int64 array of (shape, colour, style) indices."""
    return np.array([s.labels() for s in scenes], dtype=np.int64).reshape(-1, 3)
