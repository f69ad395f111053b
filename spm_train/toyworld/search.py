"""Search the trainer settings under which one membrane erases its ToyWorld concept.

    python -m spm_train.toyworld.search --concept circle --out runs/toyworld-search

Every setting trains the concept's membrane on the shipped base model (same seed), then the evaluation
suite scores it with the ToyWorld classifier: P(target | probe prompts), non-target accuracy before and
after, and the mean pixel change of non-target images. Results are appended to ``results.jsonl`` as they
come (a cut-off search keeps what it measured) and summarised in ``search.md`` with a scatter plot of
erasure against preservation (``tradeoff.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict

from PIL import Image, ImageDraw, ImageFont

from ..config import ConceptSpec, TrainerConfig
from ..evaluate import EvalSettings, ToyWorldScorer, evaluate_concept
from ..report import markdown_table
from ..training import train_membranes
from .render import COLOURS, SHAPES, STYLES

logger = logging.getLogger(__name__)

# what is searched, one axis at a time around the base setting, then the promising combinations
BASE = dict(iterations=150, lr=3e-3, lr_scheduler="constant_with_warmup", lr_warmup_steps=10,
            max_denoising_steps=10, anchors_per_step=4, la_strength=1.0, scope="transformer",
            batch_size=1, log_every=10, checkpoint_every=0)
AXES = {
    "lr": [1e-3, 1e-2],
    "la_strength": [0.0, 10.0, 100.0, 1000.0],
    "scope": ["cross_attention"],
    "batch_size": [4],
    "iterations": [400],
    "rank": [4],
    "anchors_per_step": [16],
}


def concept_for(name: str, guidance_scale: float = 16.0) -> ConceptSpec:
    """A ToyWorld concept with probe prompts that show it and non-target prompts of the same kind.

    ``guidance_scale`` 16 (the erase loss's g): a tiny model's conditional and unconditional predictions
    differ little, so the paper's g = 1 moves generations too little; on the shipped base g = 5 left
    P(red) at 0.67, g = 8 at 0.50, g = 12 / 16 at 0.21 / 0.25 (docs/evaluation-and-toyworld.md,
    "Erasure on ToyWorld").
    """
    for kind, values in (("shape", SHAPES), ("colour", COLOURS), ("style", STYLES)):
        if name not in values:
            continue
        others = [v for v in values if v != name]
        if kind == "shape":
            probes = [f"a {name}", f"a red {name}", f"a striped blue {name}", f"a solid yellow {name}"]
            nontarget = [f"a {o}" for o in others] + [f"a red {o}" for o in others[:2]]
            return ConceptSpec(name, f"a {name}", probes=probes, nontarget=nontarget, guidance_scale=guidance_scale)
        if kind == "colour":
            probes = [f"a {name} {s}" for s in SHAPES[:4]]
            nontarget = [f"a {o} {SHAPES[i % 5]}" for i, o in enumerate(others)]
            return ConceptSpec(name, name, probes=probes, nontarget=nontarget, guidance_scale=guidance_scale)
        probes = [f"a {name} {c} {s}" for c, s in zip(COLOURS, SHAPES[:4])]
        nontarget = [f"a {o} {COLOURS[i]} {SHAPES[i]}" for i, o in enumerate(others)]
        return ConceptSpec(name, name, probes=probes, nontarget=nontarget, guidance_scale=guidance_scale)
    raise ValueError(f"unknown ToyWorld concept {name!r}; pick a shape, colour or style")


def settings_grid(base: dict, axes: dict) -> list[dict]:
    grid = [dict(base)]
    for key, values in axes.items():
        for value in values:
            grid.append({**base, key: value})
    return grid


def _plot(rows: list[dict], path: str) -> None:
    """Erasure (y) against preservation drop (x): the trade-off at a glance."""
    w, h, m = 480, 360, 50
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.rectangle([m, 10, w - 10, h - m], outline="black")
    draw.text((m, h - m + 20), "preservation drop (0 .. 0.5)", fill="black", font=font)
    draw.text((5, 12), "erasure", fill="black", font=font)
    for i, r in enumerate(rows):
        x = m + min(max(r["preservation_drop"], 0.0), 0.5) / 0.5 * (w - m - 10)
        y = h - m - r["erasure_rate"] * (h - m - 10)
        colour = "green" if r["target_after"] <= 0.10 and r["preservation_drop"] <= 0.05 else "red"
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        draw.text((x + 5, y - 5), str(i), fill="black", font=font)
    canvas.save(path)


def search(concept: ConceptSpec, grid: list[dict], out: str, eval_settings: EvalSettings, device="cpu",
           model: str = "toyworld") -> list[dict]:
    from ..models import load_base_model

    os.makedirs(out, exist_ok=True)
    pipe = load_base_model(model, device=device)
    scorer = ToyWorldScorer(device=device)
    cache: dict = {}
    rows = []
    with open(os.path.join(out, "results.jsonl"), "a") as log:
        for i, overrides in enumerate(grid):
            trainer = TrainerConfig(**overrides)
            spec = concept if trainer.la_strength > 0 else ConceptSpec(**{**concept.to_dict(), "action": "erase"})
            start = time.perf_counter()
            result = train_membranes(pipe, [spec], trainer, progress=False)
            seconds = time.perf_counter() - start
            ev = evaluate_concept(pipe, spec, result.membranes, scorer, eval_settings, baseline=cache)
            row = {"index": i, **overrides, "train_seconds": seconds, **ev.metrics(),
                   "final_loss": result.history[-1]["loss"] if result.history else None}
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            logger.info("[%d/%d] %s -> P(target) %.2f -> %.2f, non-target %.2f -> %.2f (%.0fs)", i + 1, len(grid),
                        {k: v for k, v in overrides.items() if BASE.get(k) != v}, ev.target_before,
                        ev.target_after, ev.nontarget_before or 0, ev.nontarget_after or 0, seconds)
    header = ["#", "changed from base", "P(target) before", "P(target) after", "non-target before",
              "non-target after", "preservation drop", "pixel MSE", "train s"]
    table = markdown_table(header, [[r["index"], ", ".join(f"{k}={r[k]}" for k in grid[r["index"]]
                                                           if BASE.get(k) != r[k]) or "base",
                                     r["target_before"], r["target_after"], r["nontarget_before"],
                                     r["nontarget_after"], r["preservation_drop"], r["nontarget_pixel_mse"],
                                     r["train_seconds"]] for r in rows])
    _plot(rows, os.path.join(out, "tradeoff.png"))
    with open(os.path.join(out, "search.md"), "w") as fh:
        fh.write(f"# ToyWorld erasure search: {concept.name}\n\nbase: {json.dumps(BASE)}\n\n"
                 f"evaluation: {json.dumps(asdict(eval_settings))}\n\n{table}\n\n![trade-off](tradeoff.png)\n")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--out", default="runs/toyworld-search")
    parser.add_argument("--samples", type=int, default=8, help="generations per prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", type=int, nargs="*", help="grid indices to run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="toyworld", help="model source (default: the shipped ToyWorld base)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override the base setting")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    base = dict(BASE)
    for item in args.set:
        key, _, value = item.partition("=")
        base[key] = type(BASE[key])(value) if key in BASE else json.loads(value)
    grid = settings_grid(base, AXES)
    if args.only:
        grid = [grid[i] for i in args.only]
    search(concept_for(args.concept), grid, args.out,
           EvalSettings(samples_per_prompt=args.samples, steps=args.steps), args.device, args.model)


if __name__ == "__main__":
    main()
