"""Generate images with membranes from the registry: each prompt without and with them, same seed.

    python -m pipelines.generate model=toyworld membranes=[snoopy@production] prompt="a photo of snoopy"
    python -m pipelines.generate model=sd15 membranes=[snoopy,vangogh:v2] 'prompts=[a cat,starry night]'

Every membrane is read from the registry and its sha256 checked before use. Writes
``original_<i>.png``, ``membranes_<i>.png`` and ``grid.png`` to the run folder: one row per prompt,
labelled with it, original | with membranes, and above each membrane image the permeability gamma the
prompt gives each equipped membrane (small images enlarged, see ``spm_train.grids``). The grid is
recorded with each version used (shown in its model card).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from pipelines.console import quiet_console
from pipelines.schema import ModelConfig, PathsConfig, RegistryConfig, check_home, register
from spm_train.config import number_problem
from spm_train.errors import SPMError

logger = logging.getLogger("pipelines.generate")


@dataclass
class GenerateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # registry references: CONCEPT (latest), CONCEPT:vN, CONCEPT@ALIAS
    membranes: List[str] = field(default_factory=list)
    prompt: Optional[str] = None
    prompts: List[str] = field(default_factory=list)
    negative_prompt: Optional[str] = None
    seed: int = 0
    steps: int = 30
    guidance_scale: float = 7.5
    resolution: Optional[int] = None
    # facilitated transport: each membrane opens by the prompt's closeness to its concepts
    transport: bool = True
    facilitate: float = 1.0
    # "token" (per-token, calibrated per membrane), "content" (pooled content tokens) or "paper"
    similarity: str = "token"
    # zero point of membranes without a calibration in their header ("token"), or of "content"
    threshold: float = 0.85
    # "linear" (the paper's formula), "official" (gamma squared, as the official inference code) or
    # "shared" (linear; the membranes open on a prompt share one opening of `facilitate` at its summary
    # positions)
    scaling: str = "linear"
    device: Optional[str] = None


def _register_schema() -> None:
    register()
    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


_register_schema()


@dataclass
class GenerateResult:
    originals: list[str]
    with_membranes: list[str]
    grid: str
    refs: list[str]


def generate(cfg: DictConfig, *, run_dir: str | None = None) -> GenerateResult:
    import torch

    from spm_train.grids import save_png
    from spm_train.models import load_base_model
    from spm_train.registry import Registry
    from spm_train.transport import apply_membranes

    prompts = ([cfg.prompt] if cfg.prompt else []) + list(cfg.prompts)
    problems = []
    if not prompts:
        problems.append("no prompt: set prompt=... or prompts=[...]")
    if not cfg.membranes:
        problems.append("no membranes: set membranes=[CONCEPT@ALIAS,...]")
    if cfg.steps < 1:
        problems.append(f"steps={cfg.steps}: at least 1")
    from spm_train.transport import SCALINGS, SIMILARITIES

    if cfg.similarity not in SIMILARITIES:
        problems.append(f"similarity={cfg.similarity}: one of {', '.join(SIMILARITIES)}")
    if cfg.scaling not in SCALINGS:
        problems.append(f"scaling={cfg.scaling}: one of {', '.join(SCALINGS)}")
    for name in ("guidance_scale", "facilitate"):  # NaN passes `< 0`: guidance NaN silently turned CFG off
        if (problem := number_problem(name, cfg[name], minimum=0)) is not None:
            problems.append(problem)
    if cfg.resolution is not None and cfg.resolution < 8:
        problems.append(f"resolution={cfg.resolution}: must be a positive multiple of 8")
    if problems:
        from spm_train.errors import ConfigError

        raise ConfigError("generate", problems)
    run_dir = run_dir or cfg.paths.run_dir
    os.makedirs(run_dir, exist_ok=True)
    with Registry.open(cfg.registry.uri, cfg.registry.blobs, create=False) as reg:
        versions = [reg.resolve(ref) for ref in cfg.membranes]
        membranes = [reg.load(v) for v in versions]  # raises IntegrityError on an altered blob
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = load_base_model(cfg.model.source, dtype=cfg.model.dtype, device=device)
        # Stable Diffusion pipelines take sides divisible by 8 (and by the VAE's downscaling factor)
        step = math.lcm(8, int(getattr(pipe, "vae_scale_factor", 8)))
        if cfg.resolution and (cfg.resolution < step or cfg.resolution % step):
            from spm_train.errors import ConfigError

            raise ConfigError("generate", [f"resolution={cfg.resolution}: must be a positive multiple of {step}"])
        kwargs = dict(num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale,
                      negative_prompt=cfg.negative_prompt)
        if cfg.resolution:
            kwargs.update(height=cfg.resolution, width=cfg.resolution)
        # equipped once before anything is rendered: a membrane that does not fit fails here
        handle = apply_membranes(pipe, membranes, transport=cfg.transport, facilitate=cfg.facilitate,
                                 similarity=cfg.similarity, threshold=cfg.threshold, scaling=cfg.scaling)
        try:
            edited = [_sample(pipe, prompt, cfg.seed + i, kwargs) for i, prompt in enumerate(prompts)]
            gamma = handle.prompt_permeability(prompts)
        finally:
            handle.remove()
        originals = [_sample(pipe, prompt, cfg.seed + i, kwargs) for i, prompt in enumerate(prompts)]
        paths_o = [save_png(img, os.path.join(run_dir, f"original_{i}.png")) for i, img in enumerate(originals)]
        paths_m = [save_png(img, os.path.join(run_dir, f"membranes_{i}.png")) for i, img in enumerate(edited)]
        grid = os.path.join(run_dir, "grid.png")
        _grid(grid, prompts, originals, edited, [v.ref for v in versions], gamma, cfg)
        for v in versions:
            reg.record_image(v, grid, prompt="; ".join(prompts))
    logger.info("wrote %d prompt(s) x 2 images and %s", len(prompts), grid)
    return GenerateResult(paths_o, paths_m, grid, [v.ref for v in versions])


def _sample(pipe, prompt: str, seed: int, kwargs: dict):
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    return pipe(prompt, generator=generator, **kwargs).images[0]


def _grid(url: str, prompts, originals, edited, refs: list[str], gamma, cfg: DictConfig) -> None:
    """One row per prompt (its label on the left): original | with membranes, gamma above the latter."""
    from spm_train.grids import Group, Tile, gamma_caption, write_grid

    rows = [[Group([Tile(a)]), Group([Tile(b)], gamma_caption(refs, g.tolist(), transport=cfg.transport))]
            for a, b, g in zip(originals, edited, gamma)]
    header = [f"{', '.join(refs)}; seed {cfg.seed} + row, {cfg.steps} steps, guidance {cfg.guidance_scale}"]
    write_grid(url, prompts, ["original", "with membranes"], rows, header=header)


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    quiet_console(("transformers", "diffusers"))
    try:
        result = generate(cfg)
    except SPMError as exc:  # one line, exit code 2 (as the registry CLI)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"membranes: {', '.join(result.refs)}")
    print(f"grid:      {result.grid}")


if __name__ == "__main__":
    check_home()
    main()
