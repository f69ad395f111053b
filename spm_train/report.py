"""Pages and plots: the evaluation report (Markdown, and self-contained HTML with its grids inline),
the labelled before/after grids of each concept, and scatter plots of named points."""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass
from typing import Sequence, Union

from PIL import Image, ImageDraw, ImageFont

from . import io
from .grids import VERDICT_LEGEND, Group, Tile, gamma_caption, write_grid


@dataclass
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence]


@dataclass
class Figure:
    caption: str
    path: str  # a PNG: linked from report.md, embedded in report.html


# a section's body: paragraphs (str), tables and figures, in order
Block = Union[str, Table, Figure]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):  # three decimals, or three significant digits below 0.01 (pixel MSE)
        return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>\n" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def html_figure(caption: str, path: str) -> str:
    """The PNG at ``path`` inline (a data URI), at its own size: a grid's enlarged pixels stay sharp."""
    with open(path, "rb") as fh:
        data = fh.read()
    with Image.open(path) as image:
        width, height = image.size
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f"<figure><figcaption>{html.escape(caption)}</figcaption><div class='scroll'>"
            f"<img src='{uri}' width='{width}' height='{height}' alt='{html.escape(caption)}'></div></figure>")


_STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}"
          "td:first-child,th:first-child{text-align:left}figure{margin:1.5em 0}"
          "figcaption{font-weight:bold;margin-bottom:.4em}.scroll{overflow-x:auto}img{max-width:none}")


def write_report(directory: str, title: str, sections: Sequence[tuple[str, Block | Sequence[Block]]]
                 ) -> tuple[str, str]:
    """``report.md`` (figures linked) and a self-contained ``report.html`` (figures inline, tables as
    HTML tables built from the same rows), both written atomically; returns their paths."""
    md = [f"# {title}", ""]
    parts = ["<!DOCTYPE html>", f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for heading, blocks in sections:
        md += [f"## {heading}", ""]
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for block in [blocks] if isinstance(blocks, (str, Table, Figure)) else blocks:
            if isinstance(block, Table):
                md += [markdown_table(block.header, block.rows), ""]
                parts.append(html_table(block.header, block.rows))
            elif isinstance(block, Figure):
                md += [f"### {block.caption}", "", f"![{block.caption}]({os.path.relpath(block.path, directory)})", ""]
                parts.append(html_figure(block.caption, block.path))
            else:
                md += [block, ""]
                parts.append(f"<p>{html.escape(block)}</p>")
    parts.append("</body></html>")
    md_path, html_path = os.path.join(directory, "report.md"), os.path.join(directory, "report.html")
    for path, text in ((md_path, "\n".join(md)), (html_path, "\n".join(parts) + "\n")):
        with io.atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    return md_path, html_path


REPORT_COLUMNS = ("concept", "equipped", "transport", "anchoring", "erasure", "target before", "target after",
                  "non-target before", "non-target after", "preservation drop", "pixel MSE", "feature dist",
                  "gamma target", "gamma non-target")


def evaluation_rows(evaluations) -> list[list]:
    return [[e.concept, e.equipped, "on" if e.transport else "off", "on" if e.anchoring else "off",
             e.erasure_rate, e.target_before, e.target_after, e.nontarget_before, e.nontarget_after,
             e.preservation_drop, e.nontarget_pixel_mse, e.nontarget_feature_distance, e.gamma_target,
             e.gamma_nontarget] for e in evaluations]


def _column_title(e) -> str | None:
    """A grid column for each comparison the report makes, in the order they are read."""
    if e.equipped == "all together":
        return "all membranes together" if e.transport and e.anchoring else None
    if not e.anchoring:
        return "trained without anchoring" if e.transport else None
    return "membrane, transport on" if e.transport else "membrane, transport off"


def _tiles(images, verdicts) -> list[Tile]:
    return [Tile(image, text, present) for image, (text, present) in zip(images, verdicts)]


def concept_grid(evaluations, url: str, *, cell: int = 128, max_cell: int = 256) -> str:
    """One concept's grid: a row per prompt (probes, then non-target prompts), the original images and
    then one column per comparison (transport on and off, without anchoring, all membranes together), each
    image with the scorer's verdict and each group with the prompt's gamma. Written atomically."""
    columns = [(t, e.images) for e in evaluations if (t := _column_title(e)) and e.images is not None]
    if not columns:
        raise ValueError("concept_grid needs at least one evaluation with pictures")
    first = columns[0][1]
    rows = [[Group(_tiles(first.before[r], first.verdicts_before[r]))] for r in range(len(first.prompts))]
    for _, pics in columns:
        if pics.prompts != first.prompts:
            raise ValueError("the evaluations of one grid must share their prompts")
        for r, row in enumerate(rows):
            caption = gamma_caption(pics.membranes, pics.gamma[r].tolist(), transport=pics.transport)
            row.append(Group(_tiles(pics.after[r], pics.verdicts_after[r]), caption))
    labels = [("probe: " if r < first.probes else "non-target: ") + p for r, p in enumerate(first.prompts)]
    header = [f"{evaluations[0].concept}: {first.before.shape[1]} sample(s) per prompt, the same seeds in every "
              "column", VERDICT_LEGEND]
    write_grid(url, labels, ["original", *(t for t, _ in columns)], rows, header=header, cell=cell,
               max_cell=max_cell)
    return url


def evaluation_report(directory: str, title: str, evaluations,
                      notes: Sequence[tuple[str, Block | Sequence[Block]]] = ()) -> str:
    """Metrics table and one labelled grid per concept; returns the path of the self-contained report.html
    (report.md beside it links the same grids)."""
    by_concept: dict[str, list] = {}
    for e in evaluations:
        if e.images is not None and _column_title(e):
            by_concept.setdefault(e.concept, []).append(e)
    figures = []
    for concept, rows in by_concept.items():
        path = concept_grid(rows, os.path.join(directory, "grids", f"{concept}.png"))
        figures.append(Figure(f"{concept}: original | " + " | ".join(_column_title(e) for e in rows), path))
    explanation = ("erasure: share of probe images in which the scorer no longer sees the concept; target "
                   "before/after: share in which it does, without/with membranes; non-target: scorer accuracy "
                   "on the non-target prompts; pixel MSE and feature distance: mean change of the same-seed "
                   "non-target images; gamma: mean facilitated-transport permeability.")
    sections = [("Metrics", [Table(REPORT_COLUMNS, evaluation_rows(evaluations)), explanation]), *notes]
    if figures:
        sections.append(("Generations", ["Rows: the concept's probe prompts, then its non-target prompts. "
                                         "Columns: the base model, then each comparison. Above each group: "
                                         "the permeability gamma the prompt gives each equipped membrane. "
                                         + VERDICT_LEGEND[0].upper() + VERDICT_LEGEND[1:] + ".", *figures]))
    _, html_path = write_report(directory, title, sections)
    return html_path


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point beats on both axes (lower is better on both)."""
    front = []
    for name, (x, y) in points.items():
        dominated = any(ox <= x and oy <= y and (ox, oy) != (x, y) for other, (ox, oy) in points.items()
                        if other != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n])


def pareto_plot(points: dict[str, tuple[float, float]], url: str, *, x_label: str, y_label: str,
                size: tuple[int, int] = (720, 480)) -> str:
    """A PNG scatter of named (x, y) points, lower-is-better on both axes, the Pareto front joined by a
    line and its points labelled in red. Written atomically; returns ``url``."""
    return scatter_plot(points, url, x_label=x_label, y_label=y_label, highlight=pareto_front(points), join=True,
                        size=size)


def scatter_plot(points: dict[str, tuple[float, float]], url: str, *, x_label: str, y_label: str,
                 highlight: Sequence[str] = (), join: bool = False, size: tuple[int, int] = (720, 480)) -> str:
    """A PNG scatter of named (x, y) points, each labelled with its name; the ``highlight`` ones in red
    (joined by a line, in the given order, with ``join``). Written atomically; returns ``url``."""
    font = ImageFont.load_default()
    width, height = size
    left, right, top, bottom = 70, 170, 20, 50  # room on the right for the last labels
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    xs = [p[0] for p in points.values()] or [0.0]
    ys = [p[1] for p in points.values()] or [0.0]
    x0, x1 = min(0.0, min(xs)), max(0.0, max(xs)) * 1.1 + 1e-6
    y0, y1 = min(0.0, min(ys)), max(0.0, max(ys)) * 1.1 + 1e-6

    def at(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.line([at(x0, y0), at(x1, y0)], fill="black")
    draw.line([at(x0, y0), at(x0, y1)], fill="black")
    for i in range(5):
        fx, fy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        px, _ = at(fx, y0)
        _, py = at(x0, fy)
        draw.text((px - 10, height - bottom + 6), f"{fx:.2g}", fill="black", font=font)
        draw.text((8, py - 6), f"{fy:.2g}", fill="black", font=font)
    draw.text((left + 150, height - 18), x_label, fill="black", font=font)
    draw.text((left + 6, 4), y_label, fill="black", font=font)
    highlight = [n for n in highlight if n in points]
    if join and len(highlight) > 1:
        draw.line([at(*points[n]) for n in highlight], fill="red", width=2)
    for name, (x, y) in points.items():
        px, py = at(x, y)
        colour = "red" if name in highlight else "gray"
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        draw.text((px + 6, py - 6), name[:40], fill=colour if name in highlight else "dimgray", font=font)
    with io.atomic_output(url) as tmp:
        canvas.save(tmp, format="PNG")
    return url
