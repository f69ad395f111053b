"""ToyWorld renderer: 32x32 RGB images of coloured shapes in a few styles, with captions.

Every image is drawn with numpy masks on a 4x supersampled grid and averaged down, which gives
anti-aliased edges for free. Everything random comes from a ``numpy.random.Generator`` so that a seed
fixes the images and the captions.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

@dataclass(frozen=True)
class World:
    """A vocabulary: what ToyWorld draws and how its captions speak of it.

    ``templates``: caption forms with their weights (a form that leaves out an attribute leaves it random
    in the image); ``synonyms``: (value, other word) pairs that captions use for a value at
    ``synonym_rate``, so that a text encoder trained on them learns paraphrases.
    """

    name: str
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    styles: tuple[str, ...]
    backgrounds: tuple[str, ...]
    templates: tuple[tuple[str, float], ...]
    synonyms: tuple[tuple[str, str], ...] = ()
    synonym_rate: float = 0.0

    def synonym(self, value: str) -> str | None:
        return dict(self.synonyms).get(value)

    def words(self) -> tuple[str, ...]:
        """Every word a caption of this world can contain (without the function words of its forms)."""
        named = self.shapes + self.colours + self.styles + self.backgrounds
        return named + tuple(other for _, other in self.synonyms)

    def combinations(self) -> int:
        return len(self.shapes) * len(self.colours) * len(self.styles)


_CLASSIC_TEMPLATES = (
    ("a {style} {colour} {shape} on a {background} background", 4.0),
    ("a {style} {colour} {shape}", 4.0),
    ("a {colour} {shape}, {style}", 2.0),
    ("a {colour} {shape} on a {background} background", 1.0),
    ("a {colour} {shape}", 1.5),
    ("a {style} {shape}", 1.0),
    ("a {shape}", 0.5),
)

CLASSIC = World(
    name="classic",
    shapes=("circle", "square", "triangle", "star", "cross"),
    colours=("red", "green", "blue", "yellow", "purple"),
    styles=("solid", "outline", "striped", "dotted"),
    backgrounds=("white", "black", "gray", "cream"),
    templates=_CLASSIC_TEMPLATES,
)

# Ten shapes, eight colours, six styles: 480 combinations, so that ten concepts can be erased while at
# least two values of every attribute stay to measure what a membrane spares.
WIDE = World(
    name="wide",
    shapes=CLASSIC.shapes + ("diamond", "heart", "crescent", "arrow", "rectangle"),
    colours=CLASSIC.colours + ("orange", "cyan", "pink"),
    styles=CLASSIC.styles + ("checked", "gradient"),
    backgrounds=CLASSIC.backgrounds,
    templates=_CLASSIC_TEMPLATES + (
        ("a {shape} which is {colour} and {style}", 1.5),
        ("a {colour} and {style} {shape}", 1.5),
        ("this is a {style} {colour} {shape}", 1.0),
        ("a {style} {shape} of {colour} colour", 1.0),
    ),
    synonyms=(
        ("circle", "disc"), ("star", "pentagram"), ("cross", "plus"), ("diamond", "rhombus"),
        ("heart", "valentine"), ("crescent", "moon"), ("arrow", "pointer"), ("rectangle", "oblong"),
        ("red", "crimson"), ("green", "emerald"), ("blue", "azure"), ("yellow", "golden"),
        ("purple", "violet"), ("orange", "amber"), ("cyan", "turquoise"), ("pink", "rose"),
        ("solid", "filled"), ("outline", "hollow"), ("dotted", "spotted"), ("checked", "checkered"),
    ),
    synonym_rate=0.25,
)

WORLDS = {w.name: w for w in (CLASSIC, WIDE)}
WORLD_ENV = "SPM_TOYWORLD"


def _active_world() -> World:
    name = os.environ.get(WORLD_ENV, CLASSIC.name) or CLASSIC.name
    if name not in WORLDS:
        raise ValueError(f"{WORLD_ENV}={name!r} names no ToyWorld; known: {sorted(WORLDS)}")
    return WORLDS[name]


# The world this process draws, captions and loads assets for: the classic one unless SPM_TOYWORLD names
# another (read once, at import).
WORLD = _active_world()
SHAPES = WORLD.shapes
COLOURS = WORLD.colours
STYLES = WORLD.styles
BACKGROUNDS = WORLD.backgrounds
CAPTION_TEMPLATES = WORLD.templates

COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 30),
    "purple": (150, 50, 190),
    "orange": (245, 135, 20),
    "cyan": (30, 200, 215),
    "pink": (245, 120, 185),
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
_CHECK_CELL = 4.0
_GRADIENT_FLOOR = 0.15  # coverage left at the faded end of a gradient fill
_OUTLINE_WIDTH = 2.0
_PATTERN_TINT = 0.4  # how much shape colour the "off" pixels of stripes and dots carry

# Rotational symmetry of each shape, so that a rotation is drawn in [0, period).
_ROTATION_PERIOD = {"circle": 360.0, "square": 90.0, "triangle": 120.0, "star": 72.0, "cross": 90.0,
                    "diamond": 180.0, "rectangle": 180.0, "heart": 360.0, "crescent": 360.0, "arrow": 360.0}


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

    def labels(self, world: World | None = None) -> tuple[int, int, int]:
        """(shape, colour, style) indices in ``world`` (default: the active one), the classifier's targets."""
        world = world or WORLD
        return (world.shapes.index(self.shape), world.colours.index(self.colour),
                world.styles.index(self.style))

    def to_dict(self) -> dict:
        return asdict(self)


def random_scene(rng: np.random.Generator, max_rotation: float | None = None, world: World | None = None,
                 **fixed) -> Scene:
    """A random scene of ``world`` (default: the active one); keyword arguments (e.g. ``shape="star"``) fix
    attributes instead of sampling them.

    ``max_rotation`` (degrees): shapes turned by at most that much either way from upright; None draws
    any orientation (over the shape's symmetry period).
    """
    world = world or WORLD
    unknown = set(fixed) - set(Scene.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown scene fields {sorted(unknown)}; known: {list(Scene.__dataclass_fields__)}")
    shape = fixed.get("shape", world.shapes[rng.integers(len(world.shapes))])
    colour = fixed.get("colour", world.colours[rng.integers(len(world.colours))])
    style = fixed.get("style", world.styles[rng.integers(len(world.styles))])
    background = fixed.get("background", world.backgrounds[rng.integers(len(world.backgrounds))])
    for name, value, allowed in (("shape", shape, world.shapes), ("colour", colour, world.colours),
                                 ("style", style, world.styles),
                                 ("background", background, world.backgrounds)):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {allowed} (ToyWorld {world.name!r})")
    size = float(fixed.get("size", rng.uniform(*SIZE_RANGE)))
    margin = size / 2 + 1.0
    x = float(fixed.get("x", rng.uniform(margin, IMAGE_SIZE - margin)))
    y = float(fixed.get("y", rng.uniform(margin, IMAGE_SIZE - margin)))
    turn = (0.0, _ROTATION_PERIOD[shape]) if max_rotation is None else (-max_rotation, max_rotation)
    rotation = float(fixed.get("rotation", rng.uniform(*turn)))
    return Scene(shape, colour, style, background, x, y, size, rotation)


def caption(scene: Scene, rng: np.random.Generator, world: World | None = None) -> str:
    """A caption for ``scene`` from a randomly chosen form of ``world`` (some forms omit attributes); where
    the world has synonyms, each named value is spoken of by its synonym at the world's rate."""
    world = world or WORLD
    weights = np.array([w for _, w in world.templates])
    template = world.templates[rng.choice(len(world.templates), p=weights / weights.sum())][0]
    names = {"shape": scene.shape, "colour": scene.colour, "style": scene.style}
    if world.synonyms:
        for field, value in names.items():
            other = world.synonym(value)
            if other is not None and f"{{{field}}}" in template and rng.random() < world.synonym_rate:
                names[field] = other
    return template.format(background=scene.background, **names)


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


def _polygon_inside(px, py, vertices: np.ndarray) -> np.ndarray:
    """Even-odd inside test for any simple polygon: a ray cast to the right crosses an odd number of
    edges."""
    inside = np.zeros(px.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        (ax, ay), (bx, by) = vertices[i], vertices[(i + 1) % n]
        if ay == by:
            continue
        spans = (ay > py) != (by > py)
        x_cross = ax + (py - ay) * (bx - ax) / (by - ay)
        inside ^= spans & (px < x_cross)
    return inside


def _to_image(local: np.ndarray, cx: float, cy: float, theta: float) -> np.ndarray:
    """Points given around the origin (y pointing down), turned by ``theta`` and moved to (cx, cy)."""
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([cx + c * local[:, 0] - s * local[:, 1], cy + s * local[:, 0] + c * local[:, 1]], 1)


def _local(px, py, cx: float, cy: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid coordinates in the frame of a shape centred at (cx, cy) and turned by ``theta``."""
    c, s = np.cos(theta), np.sin(theta)
    dx, dy = px - cx, py - cy
    return c * dx + s * dy, -s * dx + c * dy


# Shapes drawn from their corners relative to a radius of 1, pointing up or right when upright (the arrow
# is not star-shaped around its centre, so it takes the even-odd test).
_OUTLINES = {
    # a plus sign: arms of half-width 0.36
    "cross": [(0.36, -1), (0.36, -0.36), (1, -0.36), (1, 0.36), (0.36, 0.36), (0.36, 1),
              (-0.36, 1), (-0.36, 0.36), (-1, 0.36), (-1, -0.36), (-0.36, -0.36), (-0.36, -1)],
    # a shaft and a head, pointing right
    "arrow": [(-1, -0.22), (0.15, -0.22), (0.15, -0.62), (1, 0), (0.15, 0.62), (0.15, 0.22), (-1, 0.22)],
}


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
    elif shape == "diamond":
        # tall and narrow, so that no turn of a square draws it
        angles = theta0 - np.pi / 2 + np.arange(4) * np.pi / 2
        radii = np.array([1.05, 0.6, 1.05, 0.6]) * radius
    elif shape == "rectangle":
        return _to_image(np.array([(-1.0, -0.5), (1.0, -0.5), (1.0, 0.5), (-1.0, 0.5)]) * radius * 0.98,
                         cx, cy, theta0)
    elif shape in _OUTLINES:
        return _to_image(np.asarray(_OUTLINES[shape], dtype=np.float64) * radius, cx, cy, theta0)
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)


def _shape_mask(scene: Scene, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    radius = scene.size / 2
    if scene.shape == "circle":
        return (px - scene.x) ** 2 + (py - scene.y) ** 2 <= (radius * 0.92) ** 2
    if scene.shape not in _ROTATION_PERIOD:
        raise ValueError(f"unknown shape {scene.shape!r}; known: {tuple(_ROTATION_PERIOD)}")
    theta = np.deg2rad(scene.rotation)
    if scene.shape in ("heart", "crescent"):
        u, v = _local(px, py, scene.x, scene.y, theta)
        u, v = u / radius, v / radius
        if scene.shape == "heart":
            # two lobes on top of a triangle pointing down
            lobes = (((u - 0.42) ** 2 + (v + 0.35) ** 2 <= 0.5 ** 2)
                     | ((u + 0.42) ** 2 + (v + 0.35) ** 2 <= 0.5 ** 2))
            tip = _polygon_inside(u, v, np.array([(-0.9, -0.2), (0.9, -0.2), (0.0, 1.0)]))
            return lobes | tip
        # a disc with a smaller disc bitten out of its right side
        return (u ** 2 + v ** 2 <= 0.95 ** 2) & ((u - 0.45) ** 2 + (v + 0.05) ** 2 > 0.8 ** 2)
    vertices = _vertices(scene.shape, scene.x, scene.y, radius, scene.rotation)
    if scene.shape == "arrow":
        return _polygon_inside(px, py, vertices)
    return _polygon_fan(px, py, scene.x, scene.y, vertices)


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary erosion with a (2k+1)^2 square, separable: min over x then over y."""
    padded = np.pad(mask, k, constant_values=False)
    win = np.lib.stride_tricks.sliding_window_view
    out = win(padded, 2 * k + 1, axis=1).min(axis=-1)
    out = win(out, 2 * k + 1, axis=0).min(axis=-1)
    return out


def _coverage(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(full, tinted) coverage of the supersampled grid: pixels in shape colour and in the pale pattern tint
    (boolean, or a fraction in [0, 1] where a style fades)."""
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
    elif scene.style == "checked":
        cell = np.floor((px - scene.x) / _CHECK_CELL) + np.floor((py - scene.y) / _CHECK_CELL)
        on = cell % 2 == 0
        full, tint = mask & on, mask & ~on
    elif scene.style == "gradient":
        # full colour along the shape's top edge, fading to _GRADIENT_FLOOR along its bottom (in the
        # shape's own frame, so that it turns with the shape)
        _, v = _local(px, py, scene.x, scene.y, np.deg2rad(scene.rotation))
        fade = np.clip((v + scene.size / 2) / scene.size, 0.0, 1.0)
        full = mask * (1.0 - (1.0 - _GRADIENT_FLOOR) * fade)
    else:
        raise ValueError(f"unknown style {scene.style!r}; known: {WIDE.styles}")
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
    "orange": (225, 105, 10),
    "cyan": (10, 160, 175),
    "pink": (215, 85, 150),
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
               max_rotation: float | None = None, world: World | None = None,
               **fixed) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` random scenes of ``world`` (default: the active one) rendered and captioned: (uint8 images
    N x 32 x 32 x 3, captions, scenes).

    ``palette`` and ``backgrounds`` shift the distribution (used for the variant model); ``max_rotation``
    as in ``random_scene``.
    """
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        extra = {"background": backgrounds[rng.integers(len(backgrounds))]} if backgrounds else {}
        scenes.append(random_scene(rng, max_rotation, world, **extra, **fixed))
    captions = [caption(s, rng, world) for s in scenes]
    images = np.stack([render(s, palette) for s in scenes]) if n else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return images, captions, scenes


def scene_labels(scenes: list[Scene], world: World | None = None) -> np.ndarray:
    """(N, 3) int64 array of (shape, colour, style) indices in ``world`` (default: the active one)."""
    return np.array([s.labels(world) for s in scenes], dtype=np.int64).reshape(-1, 3)
