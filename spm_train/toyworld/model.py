"""The ToyWorld model components, built from config in the exact Stable Diffusion 1.x layout.

Sizes are chosen for 32x32 images on a 2-core CPU: an AutoencoderKL with 4x downsampling (8x8x4 latents),
a UNet2DConditionModel of about 4 M parameters with cross-attention in every block (SD-1.x Transformer2D
blocks with conv ``proj_in``/``proj_out``), a 2-layer CLIP text encoder of width 64 over 16 positions, and
SD's DDIM scheduler.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .render import WORLD, World

MAX_LENGTH = 16
TEXT_WIDTH = 64

# Words of the ToyWorld captions plus a few that prompts outside the captions may use.
EXTRA_WORDS = ("a", "on", "background", ",", "the", "of", "with", "and", "an", "in", "image", "picture", "photo",
               "shape", "style", "colour", "color", "no", "not")


def toyworld_words(world: World | None = None) -> list[str]:
    """The tokenizer's words: every value and synonym of ``world`` (default: the active one), the words of
    its caption forms, and ``EXTRA_WORDS``."""
    world = world or WORLD
    forms = {w for form, _ in world.templates for w in re.sub(r"\{\w+\}|,", " ", form).split()}
    return sorted(set(world.words()) | forms | set(EXTRA_WORDS))


def make_tokenizer(out_dir: str | Path):
    from .tokenizer import build_word_tokenizer

    return build_word_tokenizer(toyworld_words(), out_dir, model_max_length=MAX_LENGTH)


def make_text_encoder(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=TEXT_WIDTH,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config)


def make_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=32, scaling_factor=1.0,
    )


def make_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, use_linear_projection=False,
    )


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="epsilon",
    )


def make_pipeline(vae, text_encoder, tokenizer, unet, scheduler=None):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler or make_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe, out_dir: str | Path, half: bool = True) -> None:
    """Save in the diffusers folder layout (safetensors).

    ``half`` stores the UNet and the VAE in fp16 to keep the assets small; diffusers loads them back in fp32
    (``load_pipeline`` also asks for fp32 explicitly). The text encoder stays fp32: transformers would load an fp16 one as fp16, and a plain
    ``from_pretrained(dir)`` would then mix dtypes.
    """
    import copy

    if half:
        pipe = copy.deepcopy(pipe)
        pipe.unet.to(torch.float16)
        pipe.vae.to(torch.float16)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    _name_fast_tokenizer(Path(out_dir))


def _name_fast_tokenizer(out_dir: Path) -> None:
    """The word-level tokenizer (``tokenizer.save_word_level``) is a plain fast tokenizer, which
    transformers 5 saves under an internal alias; name the public class, which transformers 4 and 5 load."""
    import json

    from .tokenizer import name_fast_class

    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    if index.get("tokenizer", [None, None])[1] in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        name_fast_class(out_dir / "tokenizer" / "tokenizer_config.json")


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    """Text-encoder hidden states for ``prompts``, exactly as StableDiffusionPipeline computes them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


SHARED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")


def link_shared_components(pipe_dir: str | Path, base_dir: str | Path) -> None:
    """Replace the components a fine-tune shares with its base by relative symlinks into the base folder.

    The variant differs from the base only in its UNet; linking the rest keeps the shipped assets small while
    ``StableDiffusionPipeline.from_pretrained(pipe_dir)`` still works unchanged.
    """
    import os
    import shutil

    pipe_dir, base_dir = Path(pipe_dir), Path(base_dir)
    for name in SHARED_COMPONENTS:
        target = pipe_dir / name
        if target.is_symlink():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        target.symlink_to(Path(os.path.relpath(base_dir / name, pipe_dir)), target_is_directory=True)
