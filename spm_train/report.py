"""Pictures and pages: before/after grids of generations and the evaluation report (Markdown + HTML)."""

from __future__ import annotations

import html
import os
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from . import io


def _to_pil(image: torch.Tensor, size: int) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array).resize((size, size), Image.NEAREST)


def comparison_grid(rows: Sequence[str], columns: Sequence[tuple[str, torch.Tensor]], url: str,
                    cell: int = 96, label_width: int = 200) -> str:
    """A PNG with one row per prompt and one column per image set (e.g. original | membrane).

    ``columns``: (title, images [len(rows), 3, H, W] in [0, 1]). Written atomically; returns ``url``.
    """
    font = ImageFont.load_default()
    header = 18
    width = label_width + cell * len(columns)
    height = header + cell * len(rows)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, (title, _) in enumerate(columns):
        draw.text((label_width + c * cell + 4, 3), title[:16], fill="black", font=font)
    for r, prompt in enumerate(rows):
        y = header + r * cell
        draw.text((4, y + cell // 2 - 6), prompt[:32], fill="black", font=font)
        for c, (_, images) in enumerate(columns):
            canvas.paste(_to_pil(images[r], cell), (label_width + c * cell, y))
    with io.atomic_output(url) as tmp:
        canvas.save(tmp, format="PNG")
    return url


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


def write_report(directory: str, title: str, sections: Sequence[tuple[str, str]],
                 images: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """Write ``report.md`` and ``report.html``: text sections (Markdown tables allowed) and titled pictures."""
    md = [f"# {title}", ""]
    for heading, body in sections:
        md += [f"## {heading}", "", body, ""]
    if images:
        md += ["## Generations (rows: prompts; columns: original | with membranes)", ""]
        for caption, path in images:
            md += [f"### {caption}", "", f"![{caption}]({os.path.relpath(path, directory)})", ""]
    md_path = os.path.join(directory, "report.md")
    with io.atomic_output(md_path) as tmp, open(tmp, "w") as fh:
        fh.write("\n".join(md))
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{_markdown_to_html(body)}")
    for caption, path in images:
        parts.append(f"<h3>{html.escape(caption)}</h3><img src='{html.escape(os.path.relpath(path, directory))}'>")
    parts.append("</body></html>")
    html_path = os.path.join(directory, "report.html")
    with io.atomic_output(html_path) as tmp, open(tmp, "w") as fh:
        fh.write("\n".join(parts))
    return md_path, html_path


def _markdown_to_html(body: str) -> str:
    """Tables and paragraphs, the only Markdown the report writes."""
    out, table = [], []
    for line in body.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            rows = [[html.escape(c.strip()) for c in r.strip("|").split("|")] for r in table if "---" not in r]
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in rows[0]) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows[1:])
                       + "</table>")
            table = []
        if line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    return "\n".join(out)


REPORT_COLUMNS = ("concept", "equipped", "transport", "anchoring", "erasure", "target before", "target after",
                  "non-target before", "non-target after", "preservation drop", "pixel MSE", "feature dist",
                  "gamma target", "gamma non-target")


def evaluation_rows(evaluations) -> list[list]:
    return [[e.concept, e.equipped, "on" if e.transport else "off", "on" if e.anchoring else "off",
             e.erasure_rate, e.target_before, e.target_after, e.nontarget_before, e.nontarget_after,
             e.preservation_drop, e.nontarget_pixel_mse, e.nontarget_feature_distance, e.gamma_target,
             e.gamma_nontarget] for e in evaluations]


def evaluation_report(directory: str, title: str, evaluations, notes: Sequence[tuple[str, str]] = ()) -> str:
    """Metrics table and one before/after grid per membrane (transport on, alone and all together)."""
    os.makedirs(os.path.join(directory, "grids"), exist_ok=True)
    images = []
    by_concept: dict[str, dict] = {}
    for e in evaluations:
        if e.images is not None and e.transport and e.anchoring:
            by_concept.setdefault(e.concept, {})[e.equipped] = e.images
    for concept, sets in by_concept.items():
        prompts, before, after = sets.get("alone") or next(iter(sets.values()))
        columns = [("original", before), ("membrane", after)]
        if "all together" in sets:
            columns.append(("all membranes", sets["all together"][2]))
        path = comparison_grid(prompts, columns, os.path.join(directory, "grids", f"{concept}.png"))
        images.append((concept, path))
    table = markdown_table(REPORT_COLUMNS, evaluation_rows(evaluations))
    explanation = ("erasure: share of probe images in which the scorer no longer sees the concept; target "
                   "before/after: share in which it does, without/with membranes; non-target: scorer accuracy "
                   "on the non-target prompts; pixel MSE and feature distance: mean change of the same-seed "
                   "non-target images; gamma: mean facilitated-transport permeability.")
    md, _ = write_report(directory, title, [("Metrics", table + "\n\n" + explanation), *notes], images)
    return md


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
    font = ImageFont.load_default()
    width, height = size
    left, right, top, bottom = 70, 170, 20, 50  # room on the right for the last labels
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    xs = [p[0] for p in points.values()] or [0.0]
    ys = [p[1] for p in points.values()] or [0.0]
    x0, x1 = min(0.0, min(xs)), max(xs) * 1.1 + 1e-6
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.1 + 1e-6

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
    front = pareto_front(points)
    if len(front) > 1:
        draw.line([at(*points[n]) for n in front], fill="red", width=2)
    for name, (x, y) in points.items():
        px, py = at(x, y)
        colour = "red" if name in front else "gray"
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        draw.text((px + 6, py - 6), name[:40], fill=colour if name in front else "dimgray", font=font)
    with io.atomic_output(url) as tmp:
        canvas.save(tmp, format="PNG")
    return url
