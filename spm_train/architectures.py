"""Model architectures built from config with random weights.

Used by tests (tiny models of each family, built in seconds, nothing downloaded) and by the
benchmark (full-size SD 1.5 / SD 2.1 / SDXL UNets: compute cost does not depend on weight values).
"""

from __future__ import annotations

import tempfile

import torch

# Published UNet shapes (diffusers UNet2DConditionModel arguments).
FULL_UNETS = {
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "sd21": dict(
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ),
}

TINY_WORDS = ["a", "an", "the", "photo", "of", "cat", "dog", "snoopy", "mickey", "painting", "by", "van", "gogh",
              "picasso", "red", "blue", "green", "car", "house", "tree", "in", "style", "portrait", "woman", "man",
              "wonder", "gal", "gadot", "circle", "square", "on", "white", "background", "and", "with"]


def cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a built model's weights to ``dtype``, in place; a no-op when they already are.

    diffusers' ``ModelMixin.to(dtype)`` warns about "modules that should be kept in float32" on every
    cast, even for a model that keeps none (0.42 compares an always-present list); such a model is cast
    as the plain ``nn.Module`` it is. A model that does keep modules in float32 goes through its own ``to``.
    """
    if all(p.dtype == dtype for p in model.parameters()):
        return model
    if getattr(model, "_keep_in_fp32_modules", None):
        return model.to(dtype)
    return torch.nn.Module.to(model, dtype)


def cast_pipeline(pipe, dtype: torch.dtype):
    """``cast`` on every model of a diffusers pipeline (``pipe.to(dtype)`` would warn per model)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            cast(component, dtype)
    return pipe


def full_unet(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A full-size UNet of a published architecture with random weights (``device="meta"`` for shapes only)."""
    from diffusers import UNet2DConditionModel

    if name not in FULL_UNETS:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(FULL_UNETS)}")
    with torch.device(device):
        unet = UNet2DConditionModel(**FULL_UNETS[name])
    return cast(unet, dtype) if str(device) != "meta" else unet


def _tokenizer(max_length: int):
    from spm_train.toyworld.tokenizer import build_word_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = build_word_tokenizer(TINY_WORDS, tmp)
    tok.model_max_length = max_length
    return tok


def _text_encoder(tok, width: int, seed: int, projection: int | None = None, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tok.model_max_length, hidden_act=hidden_act,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        projection_dim=projection or width,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 32), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=16)


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def tiny_pipeline(family: str = "sd1", seed: int = 0, max_length: int = 16):
    """A tiny random-weight pipeline of ``family`` (``sd1``, ``sd2`` with v-prediction, ``sdxl``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    tok = _tokenizer(max_length)
    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    if family == "sd1":
        text_encoder = _text_encoder(tok, 32, seed)
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=8, **common)
        return StableDiffusionPipeline(vae=_vae(seed + 2), text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                       scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    if family == "sd2":
        text_encoder = _text_encoder(tok, 32, seed, hidden_act="gelu")
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
                                    **common)
        return StableDiffusionPipeline(vae=_vae(seed + 2), text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                       scheduler=_scheduler("v_prediction"), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if family == "sdxl":
        text_encoder = _text_encoder(tok, 32, seed)
        text_encoder_2 = _text_encoder(tok, 32, seed + 3, projection=32, hidden_act="gelu")
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
                                    transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
                                    **common)
        return StableDiffusionXLPipeline(vae=_vae(seed + 2), text_encoder=text_encoder,
                                         text_encoder_2=text_encoder_2, tokenizer=tok, tokenizer_2=tok, unet=unet,
                                         scheduler=_scheduler(), force_zeros_for_empty_prompt=True)
    raise ValueError(f"unknown family {family!r}; supported: sd1, sd2, sdxl")


FULL_TEXT = {  # (hidden width, layers, heads, activation) of the published text encoders
    "sd15": [(768, 12, 12, "quick_gelu")],
    "sd21": [(1024, 23, 16, "gelu")],
    "sdxl": [(768, 12, 12, "quick_gelu"), (1280, 32, 20, "gelu")],
}


def full_pipeline(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A full-size pipeline of a published architecture with random weights, for benchmarks.

    UNet and text encoders have the published shapes (77 positions); the vocabulary is this project's
    small word list and the VAE a small stand-in with the same 8x down-sampling (training never decodes).
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = _tokenizer(77)
    encoders = []
    for i, (width, layers, heads, act) in enumerate(FULL_TEXT[name]):
        config = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width,
                                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                                hidden_act=act, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, projection_dim=width)
        with torch.device(device):
            cls = CLIPTextModelWithProjection if (name == "sdxl" and i == 1) else CLIPTextModel
            encoders.append(cls(config).to(dtype).eval())
    with torch.device(device):
        vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), latent_channels=4, norm_num_groups=8,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae = cast(vae, dtype)
    unet = full_unet(name, device=device, dtype=dtype)
    if name == "sdxl":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tok,
                                         tokenizer_2=tok, unet=unet, scheduler=_scheduler())
    prediction = "v_prediction" if name == "sd21" else "epsilon"
    return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tok, unet=unet,
                                   scheduler=_scheduler(prediction), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
