"""ToyWorld: a tiny text-to-image world (32x32 coloured shapes) on which concept erasure can be measured.

The shipped assets (built by ``python -m spm_train.toyworld.build``) live in ``assets/``:
``base/`` and ``variant/`` are StableDiffusionPipeline folders (SD-1.x layout, fp16 safetensors),
``classifier/`` is the attribute classifier, ``quality.json`` the measured generation quality.
"""

from __future__ import annotations

from pathlib import Path

from .render import BACKGROUNDS, COLOURS, SHAPES, STYLES, Scene, caption, make_batch, random_scene, render

ASSETS = Path(__file__).resolve().parent / "assets"

__all__ = [
    "ASSETS", "BACKGROUNDS", "COLOURS", "SHAPES", "STYLES", "Scene", "base_model_path", "caption",
    "classifier_path", "load_classifier", "load_pipeline", "make_batch", "random_scene", "render",
    "variant_model_path",
]


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; build it with `python -m spm_train.toyworld.build`")
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
    from .classifier import load_classifier_from

    return load_classifier_from(classifier_path(), device)
