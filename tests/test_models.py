"""Model families: detection, training and generation on tiny SD 1.x, SD 2.x (v-prediction) and SDXL."""

import pytest
import torch

from spm_train import (ConceptSpec, ModelLoadError, TrainerConfig, UnsupportedModelError, apply_membranes,
                       base_fingerprint, detect_family, load_pipeline, train_membranes)
from spm_train.architectures import tiny_pipeline

SMOKE = TrainerConfig.preset("smoke", iterations=2)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_each_family_trains_saves_and_generates(family, tmp_path):
    pipe = tiny_pipeline(family)
    assert detect_family(pipe) == family
    result = train_membranes(pipe, [ConceptSpec("cat", "a photo of a cat")], SMOKE, progress=False)
    membrane = result.membranes[0]
    assert membrane.family == family and membrane.base_fingerprint == base_fingerprint(pipe.unet)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    path = membrane.save(tmp_path / "cat.safetensors")
    kwargs = dict(num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    if family == "sdxl":
        kwargs.update(height=16, width=16)
    base = pipe("a photo of a cat", **kwargs).images
    from spm_train import load_membrane

    with apply_membranes(pipe, [load_membrane(path)]) as handle:
        kwargs["generator"] = torch.Generator().manual_seed(0)
        out = pipe("a photo of a cat", **kwargs).images
        assert handle.last_permeability[-1, 0] == pytest.approx(1.0)
    assert out.shape == base.shape and torch.isfinite(out).all()


def test_v_prediction_is_read_from_the_scheduler():
    from spm_train.models import ModelAdapter

    assert ModelAdapter(tiny_pipeline("sd2")).prediction_type == "v_prediction"
    assert ModelAdapter(tiny_pipeline("sd1")).prediction_type == "epsilon"


def test_a_membrane_transfers_to_a_fine_tune_of_the_same_family():
    base, tuned = tiny_pipeline("sd1", seed=0), tiny_pipeline("sd1", seed=0)
    with torch.no_grad():
        for p in tuned.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert base_fingerprint(base.unet) != base_fingerprint(tuned.unet)
    membrane = train_membranes(base, [ConceptSpec("cat", "cat")], SMOKE, progress=False).membranes[0]
    with apply_membranes(tuned, [membrane]):
        tuned("cat", num_inference_steps=2, output_type="pt")


def test_unsupported_models_are_named():
    class NotAPipeline:
        unet = torch.nn.Linear(2, 2)

    with pytest.raises(UnsupportedModelError, match="SD 1.x, SD 2.x, SDXL"):
        detect_family(NotAPipeline())


def test_missing_model_folder_fails_with_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        load_pipeline(str(tmp_path / "no-such-model"))
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="folder '/no-such-model' does not exist"):  # not read as a hub id
        load_pipeline("/no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(str(tmp_path / "empty"))


def test_unreachable_hub_id_fails_with_one_line():
    with pytest.raises(ModelLoadError, match="could not load base model 'some-org/some-model'") as err:
        load_pipeline("some-org/some-model")
    assert "\n" not in str(err.value)


def test_a_saved_pipeline_loads_from_its_folder(tmp_path):
    pipe = tiny_pipeline("sd2")
    pipe.save_pretrained(tmp_path / "m")
    loaded = load_pipeline(str(tmp_path / "m"))
    assert detect_family(loaded) == "sd2"
    assert base_fingerprint(loaded.unet) == base_fingerprint(pipe.unet)
