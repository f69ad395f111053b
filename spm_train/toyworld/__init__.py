"""ToyWorld: a tiny text-to-image world (32x32 coloured shapes) on which concept erasure can be measured.

The shipped assets (built by ``python -m spm_train.toyworld.build``) live in ``assets/``:
``base/`` and ``variant/`` are StableDiffusionPipeline folders (SD-1.x layout, fp16 safetensors),
``classifier/`` is the attribute classifier, ``quality.json`` the measured generation quality.
"""

from __future__ import annotations

from pathlib import Path

from .render import (BACKGROUNDS, COLOURS, SHAPES, STYLES, WORLD, WORLD_ENV, WORLDS, Scene, World, caption,
                     make_batch, random_scene, render)


def assets_dir(world: World) -> Path:
    """Where the assets of ``world`` live: ``assets/`` for the classic world, ``assets-<name>/`` for
    others."""
    root = Path(__file__).resolve().parent
    return root / ("assets" if world.name == "classic" else f"assets-{world.name}")


# The assets of the active world (``SPM_TOYWORLD``, classic by default).
ASSETS = assets_dir(WORLD)

__all__ = [
    "ASSETS", "BACKGROUNDS", "COLOURS", "SHAPES", "STYLES", "WORLD", "WORLDS", "Scene", "World", "assets_dir",
    "base_model_path", "caption", "classifier_path", "load_classifier", "load_pipeline", "make_batch",
    "random_scene", "render", "variant_model_path",
]


def _existing(path: Path) -> Path:
    if not path.exists():
        env = "" if WORLD.name == "classic" else f"{WORLD_ENV}={WORLD.name} "
        raise FileNotFoundError(f"{path} is missing; build it with `{env}python -m spm_train.toyworld.build`")
    return path


def base_model_path() -> Path:
    """Folder of the base ToyWorld StableDiffusionPipeline."""
    return _existing(ASSETS / "base")


def variant_model_path() -> Path:
    """Folder of the variant ("community fine-tune") pipeline: same architecture, different UNet weights."""
    return _existing(ASSETS / "variant")


def classifier_path() -> Path:
    return _existing(ASSETS / "classifier")


def load_pipeline(which: str = "base", device="cpu", dtype=None):
    """Load the shipped base or variant pipeline offline; weights stored in fp16 are upcast to fp32 by default."""
    import torch
    from diffusers import StableDiffusionPipeline

    paths = {"base": base_model_path, "variant": variant_model_path}
    if which not in paths:
        raise ValueError(f"which={which!r}; expected one of {sorted(paths)}")
    pipe = StableDiffusionPipeline.from_pretrained(str(paths[which]()), dtype=dtype or torch.float32,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_classifier(device="cpu"):
    """The ToyWorld attribute classifier (eval mode): ``.classify(images)``, ``.features(images)``."""
    from .classifier import HEADS, load_classifier_from

    model = load_classifier_from(classifier_path(), device)
    drawn = {head: tuple(values) for head, values in model.config.heads.items()}
    wanted = {head: tuple(values) for head, values in HEADS.items()}
    if drawn != wanted:
        raise ValueError(f"the classifier in {classifier_path()} reads {drawn}, not the values of ToyWorld "
                         f"{WORLD.name!r} ({wanted}); rebuild it or set {WORLD_ENV} to its world")
    return model
