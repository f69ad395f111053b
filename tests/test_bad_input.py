"""Bad input (issue 13, items 8-12): each is one clear message, before any work, all problems at once."""

import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spm_train import ConceptSpec, TrainerConfig
from spm_train.errors import ConfigError, MembraneFormatError

ROOT = Path(__file__).resolve().parents[1]


# -- item 8: NaN and infinity are not numbers a setting can take ------------------------------------


@pytest.mark.parametrize("name", ["lr", "weight_decay", "la_strength", "alpha", "max_grad_norm",
                                  "trajectory_guidance", "anchor_scale_min", "anchor_scale_max"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_trainer_setting_that_is_not_finite_is_refused(name, value):
    with pytest.raises(ConfigError, match=f"{name} must be a finite number"):
        TrainerConfig.preset("smoke", **{name: value})


def test_a_concepts_guidance_scale_of_nan_is_refused():
    with pytest.raises(ConfigError, match="guidance_scale must be a finite number"):
        ConceptSpec("a", "a cat", guidance_scale=math.nan)


def test_generate_refuses_nan_guidance_and_negative_facilitation_before_opening_the_registry(tmp_path):
    from pipelines.generate import generate
    from tests.registry.test_generate import compose_generate

    cfg = compose_generate(tmp_path, "membranes=[snoopy]", "prompt=a cat", "guidance_scale=nan", "facilitate=-5")
    with pytest.raises(ConfigError) as info:  # not "no registry": the settings are checked first
        generate(cfg, run_dir=str(tmp_path / "run"))
    assert "guidance_scale must be a finite number" in str(info.value)
    assert "facilitate must be >= 0, got -5" in str(info.value)


def test_apply_membranes_refuses_a_negative_facilitation(sd1_pipe):
    from spm_train.transport import apply_membranes

    with pytest.raises(ConfigError, match="facilitate must be >= 0"):
        apply_membranes(sd1_pipe, [], facilitate=-1.0)


def test_eval_settings_that_are_not_finite_are_reported_before_training(tmp_path):
    from pipelines.evaluate import check_eval_config
    from tests.bulk.conftest import compose

    cfg = compose(tmp_path, "eval=toyworld", "model=toyworld", "concepts=toyworld", "eval.guidance_scale=nan",
                  "eval.threshold=1.5")
    problems = check_eval_config(cfg, [])
    assert any("eval.guidance_scale must be a finite number" in p for p in problems)
    assert any("eval.threshold must be < 1" in p for p in problems)


# -- item 9: a prompt longer than the text encoder's window is announced on the driver ---------------


def test_a_prompt_the_text_encoder_cuts_is_announced_before_training(tmp_path, caplog):
    from pipelines.bulk_train import plan_run
    from tests.bulk.conftest import compose

    long_target = " ".join(["a photo of a red car"] * 5)  # 30 words; the tiny tokenizer reads 16 tokens
    cfg = compose(tmp_path, f"concepts.concepts.0.target='{long_target}'", "registry.enabled=false")
    with caplog.at_level(logging.WARNING, logger="pipelines.bulk_train"):
        plan_run(cfg)
    assert "concept cat: the target prompt is 32 tokens; the text encoder reads 16" in caplog.text
    assert "snoopy" not in caplog.text  # short prompts say nothing


# -- item 10: unusable folders are named before Hydra and before training ----------------------------


def test_spm_home_on_a_file_is_one_line_and_exit_2_before_hydra(tmp_path):
    home = tmp_path / "home"
    home.write_text("not a folder")
    env = {**os.environ, "SPM_HOME": str(home), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "pipelines.bulk_train", "model=tiny_random", "concepts=smoke",
                             "trainer=smoke", "eval=none", "tracking=disabled"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"SPM_HOME={home}: cannot create or write this folder (it is a file)" in result.stderr


def test_check_home_names_an_unwritable_place_and_the_paths_root_override(tmp_path, monkeypatch, capsys):
    from pipelines.schema import check_home

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("SPM_HOME", str(blocker / "sub"))
    with pytest.raises(SystemExit) as info:
        check_home([])
    assert info.value.code == 2 and f"it lies under {blocker}, which is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check_home([f"paths.root={blocker}"])
    assert f"paths.root={blocker}: cannot create or write this folder (it is a file)" in capsys.readouterr().err
    check_home([f"paths.root={tmp_path / 'fine'}"])  # usable: nothing said


@pytest.mark.parametrize("store", ["nosuchprotocol://bucket/store", "{file}/store"])
def test_an_unusable_result_store_is_named_before_the_model_loads(tmp_path, monkeypatch, store):
    import pipelines.bulk_train as bulk
    from tests.bulk.conftest import compose

    (tmp_path / "file").write_text("x")
    store = store.format(file=tmp_path / "file")
    monkeypatch.setattr(bulk, "_setup_model", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(ConfigError, match=f"paths.store={store}"):
        bulk.plan_run(compose(tmp_path, f"paths.store={store}"))


# -- item 11: a per-concept override reports every problem ------------------------------------------


def test_a_per_concept_override_with_several_problems_reports_them_all(tmp_path, monkeypatch):
    from spm_train.bulk.plan import expand

    spec = ConceptSpec("a", "a cat", trainer={"lr": -1, "iterations": 0, "lrr": 1e-3})
    with pytest.raises(ConfigError) as info:
        expand([spec], TrainerConfig.preset("smoke"), {}, "fp")
    text = str(info.value)
    assert "unknown key 'lrr'" in text and "lr must be > 0" in text and "iterations must be > 0" in text


def test_a_bad_sweep_value_is_reported_before_the_model_loads(tmp_path, monkeypatch):
    import pipelines.bulk_train as bulk
    from tests.bulk.conftest import compose

    monkeypatch.setattr(bulk, "_setup_model", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(ConfigError, match="la_strength must be a finite number"):
        bulk.plan_run(compose(tmp_path, "+sweep.la_strength=[1.0,nan]"))


# -- item 12: errors name registry versions, not temporary files ------------------------------------


def test_a_version_that_does_not_load_is_named_by_its_reference(tmp_path, membrane_file_factory):
    from spm_train.registry import Registry, ValidationReport

    reg = Registry.open(tmp_path / "reg")
    reg.register(membrane_file_factory("snoopy", 0), concept="snoopy",
                 validation=ValidationReport(structural="passed", behavioural="passed"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    reg.register(str(junk), concept="snoopy")
    with pytest.raises(MembraneFormatError) as info:
        reg.load("snoopy:v2")
    assert "snoopy:v2" in str(info.value) and "/tmp" not in str(info.value) and "safetensors" not in str(
        info.value).split("snoopy:v2")[0]
    failed = reg.resolve("snoopy:v2")
    assert all("/tmp" not in r and str(tmp_path) not in r for r in failed.validation["reasons"])


@pytest.fixture
def membrane_file_factory(tmp_path, sd1_pipe):
    from spm_train.models import base_fingerprint
    from tests.registry.conftest import make_membrane

    def build(concept, seed):
        path = tmp_path / "src" / f"{concept}-{seed}.safetensors"
        make_membrane(sd1_pipe, concept, seed, base_fingerprint(sd1_pipe.unet)).save(str(path))
        return str(path)

    return build


def test_a_transfer_model_of_another_family_or_missing_is_named_before_training(tmp_path):
    """``registry.transfer_models`` load on the driver with the base: a model of another family, or one that
    does not exist, is one error naming it, before any job starts."""
    from pipelines.bulk_train import plan_run
    from tests.bulk.conftest import compose

    evaluator = "registry.evaluator=tests.registry.test_validation:fake_evaluator"
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError) as err:
        plan_run(compose(tmp_path, evaluator, f"registry.transfer_models=[random:sd2,{missing}]"))
    text = str(err.value)
    assert "registry.transfer_models: 'random:sd2' is a sd2 model, the base is sd1" in text
    assert f"registry.transfer_models: '{missing}' does not load" in text
    assert plan_run(compose(tmp_path, evaluator, "registry.transfer_models=[random:sd1]")).family == "sd1"


def test_a_local_transfer_model_is_checked_from_its_configs(tmp_path):
    """A local pipeline folder's family is read from its configs: the driver reads no weights of a transfer
    model (the registry stage loads it), so a folder without UNet weights still gets its family named."""
    from pipelines.bulk_train import plan_run
    from spm_train.architectures import tiny_pipeline
    from spm_train.models import detect_family, folder_family
    from tests.bulk.conftest import compose

    for family in ("sd1", "sd2", "sdxl"):
        folder = tmp_path / family
        tiny_pipeline(family).save_pretrained(folder)
        for weights in (folder / "unet").glob("diffusion_pytorch_model*"):
            weights.unlink()
        assert folder_family(str(folder)) == family == detect_family(tiny_pipeline(family))
    evaluator = "registry.evaluator=tests.registry.test_validation:fake_evaluator"
    with pytest.raises(ConfigError, match=f"'{tmp_path / 'sd2'}' is a sd2 model, the base is sd1"):
        plan_run(compose(tmp_path, evaluator, f"registry.transfer_models=[{tmp_path / 'sd2'}]"))
    shutil.rmtree(tmp_path / "sd1" / "text_encoder")
    with pytest.raises(ConfigError, match="names text_encoder, which has no folder"):
        plan_run(compose(tmp_path, evaluator, f"registry.transfer_models=[{tmp_path / 'sd1'}]"))
