"""The shipped ToyWorld pipelines load offline and generate what they are asked for.

The full-size measurement (1,000 generations, DDIM 25 steps, guidance 3) is written by the build into
``assets/quality.json``; this test repeats it on 100 generations with 20 steps. The bar is the project's
quality bar loosened by two binomial standard deviations of a 100-sample estimate, nothing more.
"""

import json
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline

from spm_train.toyworld import ASSETS, base_model_path, load_classifier, load_pipeline, variant_model_path
from spm_train.toyworld.quality import measure_quality

QUALITY_BAR = {"shape": 0.90, "colour": 0.85, "style": 0.75}


def _loosened(bar: float, n: int) -> float:
    return bar - 2 * math.sqrt(bar * (1 - bar) / n)


def test_quality_json_records_the_full_measurement():
    report = json.loads((ASSETS / "quality.json").read_text())
    assert report["base"]["n"] >= 400 and report["sampler"]["guidance_scale"] == 3.0
    for head in QUALITY_BAR:
        assert 0.0 <= report["base"][head] <= 1.0


@pytest.fixture(scope="module")
def base_pipe():
    pipe = StableDiffusionPipeline.from_pretrained(str(base_model_path()), dtype=torch.float32,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_base_pipeline_is_sd1_layout(base_pipe):
    assert type(base_pipe.unet).__name__ == "UNet2DConditionModel"
    assert base_pipe.unet.config.use_linear_projection is False
    assert type(base_pipe.scheduler).__name__ == "DDIMScheduler"
    assert base_pipe.unet.dtype == torch.float32
    assert base_pipe.tokenizer.model_max_length == base_pipe.text_encoder.config.max_position_embeddings == 16


@pytest.fixture(scope="module")
def base_quality(base_pipe):
    # 100 prompts: every shape x colour x style once.
    return measure_quality(base_pipe, load_classifier("cpu"), per_combo=1, seed=1234, guidance=3.0, steps=20)


def test_base_generations_reproduce_the_build_measurement(base_quality):
    """The shipped weights, loaded offline, do what the build measured (catches loading/format regressions)."""
    full = json.loads((ASSETS / "quality.json").read_text())["base"]
    for head in QUALITY_BAR:
        assert base_quality[head] >= _loosened(full[head], base_quality["n"]) - 0.02, (head, base_quality, full)


def test_base_generations_meet_the_quality_bar(base_quality):
    full = json.loads((ASSETS / "quality.json").read_text())["base"]
    assert {h: full[h] for h, bar in QUALITY_BAR.items() if full[h] < bar} == {}, full
    for head, bar in QUALITY_BAR.items():
        assert base_quality[head] >= _loosened(bar, base_quality["n"]), (head, base_quality)


def test_variant_shares_the_architecture_but_not_the_weights(base_pipe):
    variant = load_pipeline("variant", device="cpu")
    def arch(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert arch(variant.unet.config) == arch(base_pipe.unet.config)
    base_sd, var_sd = base_pipe.unet.state_dict(), variant.unet.state_dict()
    assert base_sd.keys() == var_sd.keys()
    assert all(base_sd[k].shape == var_sd[k].shape for k in base_sd)
    changed = sum(not torch.equal(base_sd[k], var_sd[k]) for k in base_sd)
    assert changed > len(base_sd) // 2
    # Text encoder and VAE are the base ones, so a membrane trained on the base plugs straight in.
    assert all(torch.equal(a, b) for a, b in zip(base_pipe.text_encoder.state_dict().values(),
                                                 variant.text_encoder.state_dict().values()))
    assert str(variant_model_path()).endswith("variant")
