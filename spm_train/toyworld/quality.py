"""Generation quality of a ToyWorld pipeline, read by the ToyWorld classifier.

For every shape x colour x style combination the pipeline generates ``per_combo`` images from the prompt
"a {style} {colour} {shape}"; the score per attribute is the fraction the classifier reads back correctly.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import torch

from .render import COLOURS, SHAPES, STYLES

log = logging.getLogger(__name__)


def quality_prompts(per_combo: int) -> tuple[list[str], np.ndarray]:
    """Prompts over every shape x colour x style and their (N, 3) labels (shape, colour, style)."""
    prompts, labels = [], []
    for (si, shape), (ci, colour), (ti, style) in itertools.product(
            enumerate(SHAPES), enumerate(COLOURS), enumerate(STYLES)):
        for _ in range(per_combo):
            prompts.append(f"a {style} {colour} {shape}")
            labels.append((si, ci, ti))
    return prompts, np.array(labels, dtype=np.int64)


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, guidance: float, steps: int, device,
             batch: int = 100) -> np.ndarray:
    """uint8 (N, H, W, 3) generations, one seeded generator per batch so results do not depend on N."""
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(prompts), batch), desc="generate", mininterval=10):
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        images = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                      generator=gen, output_type="np", height=32, width=32).images
        out.append(np.clip(np.rint(images * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def measure_quality(pipe, classifier, per_combo: int = 4, seed: int = 0, guidance: float = 3.0,
                    steps: int = 25, device="cpu") -> dict:
    """Per-attribute accuracy of the classifier on the pipeline's generations."""
    from .classifier import accuracy

    pipe.set_progress_bar_config(disable=True)
    prompts, labels = quality_prompts(per_combo)
    images = generate(pipe, prompts, seed, guidance, steps, device)
    acc = accuracy(classifier, images, labels)
    result = {k: round(v, 4) for k, v in acc.items()}
    result.update(n=len(prompts), guidance_scale=guidance, num_inference_steps=steps, seed=seed)
    return result
