"""Labelled picture grids: rows and columns of image groups, each image with the scorer's verdict.

A grid has one label strip on the left (a row's text, wrapped to fit), a title above each column, a
caption above each group (the membranes' permeability gamma for that prompt) and, under each image, the
scorer's verdict in red when it sees the erased concept and green when it does not. Small images (ToyWorld's
32 px) are enlarged by a whole factor with nearest-neighbour sampling, so every pixel stays a sharp block;
images at least ``cell`` pixels wide are kept as they are unless ``max_cell`` shrinks them.

Text uses Pillow's built-in bitmap font: no font file is needed, and the same text draws the same pixels
on every machine. That font covers Latin-1 only, so other characters are drawn as "?" (and gamma is
spelt out).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import io

PRESENT = (190, 20, 20)  # the scorer sees the erased concept
ABSENT = (20, 130, 40)  # it does not
NEUTRAL = (110, 110, 110)  # no verdict
TEXT = (0, 0, 0)

_MARGIN = 6
_FRAME = 2  # the verdict's coloured frame around an image
_SAMPLE_GAP = 2
_COLUMN_GAP = 14
_TITLE_LINES = 2  # a column title wraps onto at most this many lines


@lru_cache(maxsize=1)
def font() -> ImageFont.ImageFont:
    return ImageFont.load_default_imagefont()


def _line_height() -> int:
    return font().getbbox("Ag")[3] + 2


def _latin1(text: str) -> str:
    return str(text).encode("latin-1", "replace").decode("latin-1")


def _width(text: str) -> float:
    return font().getlength(text)


def fit(text: str, width: float) -> str:
    """``text`` on one line of at most ``width`` pixels, cut with "..." when longer."""
    text = _latin1(" ".join(str(text).split()))
    if _width(text) <= width:
        return text
    while text and _width(text + "...") > width:
        text = text[:-1]
    return text.rstrip() + "..." if text else ""


def wrap(text: str, width: float, max_lines: int) -> list[str]:
    """``text`` wrapped onto at most ``max_lines`` lines of ``width`` pixels; the last cut with "...".

    The bitmap font is monospaced, so a line's character budget is its width over one character's.
    """
    text = _latin1(" ".join(str(text).split()))
    chars = max(1, int(width // max(1.0, _width("m"))))
    lines = textwrap.wrap(text, chars, break_long_words=True) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [fit(" ".join(lines[max_lines - 1:]) + " ...", width)]
    return lines


def gamma_caption(names: Sequence[str], values: Sequence[float], *, transport: bool = True) -> str:
    """The permeability a prompt gives each equipped membrane, largest first; closed ones left out."""
    if not transport:
        return "transport off: gamma 1"
    if len(values) == 1:
        return f"gamma {values[0]:.2f}"
    opened = sorted(((v, n) for n, v in zip(names, values) if v >= 0.005), reverse=True)
    if not opened:
        return "gamma 0 (all closed)"
    return "gamma " + ", ".join(f"{n} {v:.2f}" for v, n in opened)


def to_uint8(image) -> np.ndarray:
    """[H, W, 3] uint8 from a [3, H, W] tensor or array in [0, 1], an [H, W, 3] uint8 array or a PIL image."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    array = np.asarray(image)
    if array.dtype == np.uint8:
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"a uint8 image must be [H, W, 3], got shape {array.shape}")
        return array
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"a float image must be [3, H, W] in [0, 1], got shape {array.shape}")
    return (np.clip(array, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)


@dataclass
class Tile:
    image: object  # see to_uint8
    verdict: str = ""
    present: bool | None = None  # True: the scorer sees the erased concept (red), False: not (green)


@dataclass
class Group:
    """The samples of one row in one column, with their caption (e.g. the prompt's gamma)."""
    tiles: Sequence[Tile] = field(default_factory=list)
    caption: str = ""


class GridLayout:
    """Where everything goes: depends only on the counts and the image size, so a caller (or a test) can
    find any image in a written grid."""

    def __init__(self, rows: int, columns: int, samples: int, image_size: tuple[int, int], *, cell: int = 128,
                 max_cell: int | None = None, label_width: int = 180, header_lines: int = 0):
        if rows < 1 or columns < 1 or samples < 1:
            raise ValueError(f"a grid needs at least one row, column and sample, got {rows}, {columns}, {samples}")
        h, w = image_size
        side = max(h, w)
        if side < cell:
            self.factor: float = cell // side  # a whole factor: every source pixel becomes an equal block
        elif max_cell is not None and side > max_cell:
            self.factor = max_cell / side
        else:
            self.factor = 1
        self.tile = (max(1, round(h * self.factor)), max(1, round(w * self.factor)))
        self.rows, self.columns, self.samples = rows, columns, samples
        line = _line_height()
        self.line = line
        self.label_width = label_width
        th, tw = self.tile
        self.slot = tw + 2 * _FRAME
        self.group_width = samples * self.slot + (samples - 1) * _SAMPLE_GAP
        self.header_top = _MARGIN
        self.titles_top = self.header_top + header_lines * line + (4 if header_lines else 0)
        self.body_top = self.titles_top + _TITLE_LINES * line + 4
        # caption line, framed image, verdict line, gap
        self.row_height = line + th + 2 * _FRAME + line + 8
        self.size = (_MARGIN + label_width + columns * (self.group_width + _COLUMN_GAP) - _COLUMN_GAP + _MARGIN,
                     self.body_top + rows * self.row_height + _MARGIN)

    def column_x(self, column: int) -> int:
        return _MARGIN + self.label_width + column * (self.group_width + _COLUMN_GAP)

    def row_y(self, row: int) -> int:
        return self.body_top + row * self.row_height

    def box(self, row: int, column: int, sample: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of one image, without its frame."""
        x = self.column_x(column) + sample * (self.slot + _SAMPLE_GAP) + _FRAME
        y = self.row_y(row) + self.line + _FRAME
        return x, y, x + self.tile[1], y + self.tile[0]

    def label_box(self, row: int) -> tuple[int, int, int, int]:
        y = self.row_y(row)
        return _MARGIN, y, _MARGIN + self.label_width - 8, y + self.row_height - 8


def _resize(array: np.ndarray, layout: GridLayout) -> Image.Image:
    image = Image.fromarray(array)
    th, tw = layout.tile
    if image.size == (tw, th):
        return image
    if layout.factor >= 1:
        return image.resize((tw, th), Image.NEAREST)
    return image.resize((tw, th), Image.BOX)


def draw_grid(row_labels: Sequence[str], column_titles: Sequence[str], groups: Sequence[Sequence[Group]], *,
              header: Sequence[str] = (), cell: int = 128, max_cell: int | None = None,
              label_width: int = 180) -> tuple[Image.Image, GridLayout]:
    """The grid as a PIL image and its layout. ``groups[r][c]`` holds row ``r``'s images in column ``c``
    (at most as many as the widest group; all images of one size). ``header``: lines above the titles."""
    if len(groups) != len(row_labels) or any(len(g) != len(column_titles) for g in groups):
        raise ValueError(f"groups must be {len(row_labels)} rows of {len(column_titles)} columns, got "
                         f"{[len(g) for g in groups]}")
    arrays = [[[to_uint8(t.image) for t in g.tiles] for g in row] for row in groups]
    sizes = {a.shape[:2] for row in arrays for g in row for a in g}
    if len(sizes) != 1:
        raise ValueError(f"every image of a grid must have one size, got {sorted(sizes) or 'no image'}")
    samples = max(len(g) for row in arrays for g in row)
    layout = GridLayout(len(row_labels), len(column_titles), samples, next(iter(sizes)), cell=cell,
                        max_cell=max_cell, label_width=label_width, header_lines=len(header))
    canvas = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(canvas)
    f = font()
    width = layout.size[0] - 2 * _MARGIN
    for i, text in enumerate(header):
        draw.text((_MARGIN, layout.header_top + i * layout.line), fit(text, width), fill=TEXT, font=f)
    for c, title in enumerate(column_titles):
        for i, text in enumerate(wrap(title, layout.group_width, _TITLE_LINES)):
            draw.text((layout.column_x(c), layout.titles_top + i * layout.line), text, fill=TEXT, font=f)
    for r, label in enumerate(row_labels):
        left, top, right, bottom = layout.label_box(r)
        lines = wrap(label, right - left, max(1, (bottom - top) // layout.line))
        for i, text in enumerate(lines):
            draw.text((left, top + layout.line + i * layout.line), text, fill=TEXT, font=f)
        for c, group in enumerate(groups[r]):
            x, y = layout.column_x(c), layout.row_y(r)
            if group.caption:
                draw.text((x, y), fit(group.caption, layout.group_width), fill=TEXT, font=f)
            for k, (tile, array) in enumerate(zip(group.tiles, arrays[r][c])):
                x0, y0, x1, y1 = layout.box(r, c, k)
                colour = NEUTRAL if tile.present is None else PRESENT if tile.present else ABSENT
                if tile.present is not None:
                    draw.rectangle([x0 - _FRAME, y0 - _FRAME, x1 + _FRAME - 1, y1 + _FRAME - 1], fill=colour)
                canvas.paste(_resize(array, layout), (x0, y0))
                if tile.verdict:
                    draw.text((x0 - _FRAME, y1 + _FRAME + 1), fit(tile.verdict, layout.slot), fill=colour, font=f)
    return canvas, layout


def save_png(image: Image.Image, url: str) -> str:
    """``image`` as a PNG at ``url``, written atomically; returns ``url``."""
    with io.atomic_output(url) as tmp:
        # level 1: grids are flat colour blocks, so a harder setting buys little size for much time
        image.save(tmp, format="PNG", compress_level=1)
    return url


def write_grid(url: str, row_labels: Sequence[str], column_titles: Sequence[str],
               groups: Sequence[Sequence[Group]], **options) -> GridLayout:
    """``draw_grid`` saved as a PNG at ``url`` (atomically); returns the layout."""
    image, layout = draw_grid(row_labels, column_titles, groups, **options)
    save_png(image, url)
    return layout


VERDICT_LEGEND = ("under each image: what the scorer reads; red frame: it sees the erased concept, "
                  "green: it does not")

