"""`python -m pipelines.evaluate` on a finished bulk run: report with transport and anchoring ablations."""

import json
import os

import pytest


@pytest.fixture
def clip_dir(tmp_path):
    from tests.conftest import tiny_clip

    tiny_clip(tmp_path / "clip")
    return tmp_path / "clip"


def test_evaluate_pipeline_writes_the_report_with_ablations(tmp_path, clip_dir, ray_shutdown):
    from hydra import compose, initialize_config_dir

    from pipelines.bulk_train import train
    from pipelines.evaluate import run
    from tests.bulk.conftest import CONF, compose as compose_bulk

    bulk = train(compose_bulk(tmp_path, "cluster.num_cpus=2"), run_dir=str(tmp_path / "bulk" / "run1"))
    assert all(r.status == "trained" for r in bulk.results)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            "model=tiny_random", "concepts=smoke", "trainer=smoke", f"paths.root={tmp_path}", "eval.kind=clip",
            f"eval.clip_path={clip_dir}", "eval.samples_per_prompt=1", "eval.steps=2", "eval.ablation=true"])
    path = run(cfg, str(tmp_path / "report"))
    assert path == str(tmp_path / "report" / "report.html")
    text = open(os.path.join(os.path.dirname(path), "report.md")).read()
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    # cat and snoopy use anchoring: transport on, off, without anchoring, all together; vangogh is plain erase
    combos = {(m["concept"], m["equipped"], m["transport"], m["anchoring"]) for m in metrics}
    assert ("cat", "alone", True, False) in combos and ("cat", "alone", False, True) in combos
    assert ("snoopy", "all together", True, True) in combos
    assert len(metrics) == 3 * 4
    assert "grids/cat.png" in text and (tmp_path / "report" / "grids" / "vangogh.png").exists()


def test_the_bulk_job_writes_the_evaluation_report_when_asked(tmp_path, clip_dir, ray_shutdown):
    from pipelines.bulk_train import train
    from tests.bulk.conftest import compose as compose_bulk

    cfg = compose_bulk(tmp_path, "cluster.num_cpus=2", "eval.enabled=true", "eval.kind=clip",
                       f"eval.clip_path={clip_dir}", "eval.samples_per_prompt=1", "eval.steps=2")
    summary = train(cfg, run_dir=str(tmp_path / "run"))
    assert summary.report == str(tmp_path / "run" / "report" / "report.html")
    text = (tmp_path / "run" / "report" / "report.md").read_text()
    assert text.count("| cat |") == 3  # transport on, off, all together


def test_a_sweep_run_gets_one_report_per_sweep_point(tmp_path, clip_dir, ray_shutdown):
    from hydra import compose, initialize_config_dir

    from pipelines.bulk_train import train
    from pipelines.evaluate import run
    from tests.bulk.conftest import CONF, compose as compose_bulk

    train(compose_bulk(tmp_path, "cluster.num_cpus=2", "+sweep.lr=[0.001,0.002]"),
          run_dir=str(tmp_path / "bulk" / "run1"))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            "model=tiny_random", "concepts=smoke", "trainer=smoke", f"paths.root={tmp_path}", "eval.kind=clip",
            f"eval.clip_path={clip_dir}", "eval.samples_per_prompt=1", "eval.steps=2"])
    assert run(cfg, str(tmp_path / "report")) == str(tmp_path / "report")
    per_point = {}
    for point in ("lr=0.001", "lr=0.002"):
        metrics = json.loads((tmp_path / "report" / point / "metrics.json").read_text())
        assert sorted({m["concept"] for m in metrics}) == ["cat", "snoopy", "vangogh"]
        per_point[point] = [m["target_pixel_mse"] for m in metrics if m["equipped"] == "alone" and m["transport"]]
    assert per_point["lr=0.001"] != per_point["lr=0.002"]  # each point's own membranes
    from spm_train.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.similarity=fuzzy"):  # checked before any image is made
        run(_with(cfg, "eval.similarity", "fuzzy"), str(tmp_path / "report2"))
    assert not (tmp_path / "report2").exists()


def _with(cfg, key, value):
    from omegaconf import OmegaConf

    changed = OmegaConf.create(OmegaConf.to_container(cfg))
    OmegaConf.update(changed, key, value)
    return changed


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("{}", "is not a bulk run's manifest"),
                                              ("{nope", "is not readable JSON")])
def test_a_bad_manifest_is_one_message(tmp_path, content, message):
    from hydra import compose, initialize_config_dir

    from pipelines.evaluate import run
    from spm_train.errors import ConfigError
    from tests.bulk.conftest import CONF

    manifest = tmp_path / "manifest.json"
    if content is not None:
        manifest.write_text(content)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"paths.root={tmp_path}", f"manifest={manifest}"])
    with pytest.raises(ConfigError, match=message):
        run(cfg, str(tmp_path / "report"))
