"""The main job on a local Ray instance: results, caching, sweeps, failures, bad configs."""

import json
import os

import pytest
import ray
import torch

from pipelines.bulk_train import plan_run, train
from spm_train import load_membrane, parallel
from spm_train.errors import ClusterError, ConfigError

from .conftest import compose


def test_trains_every_concept_then_skips_what_it_already_has(tmp_path, ray_shutdown):
    cfg = compose(tmp_path, "cluster.num_cpus=2")
    first = train(cfg, run_dir=str(tmp_path / "run1"))
    assert [(r.concept, r.status) for r in first.results] == [("cat", "trained"), ("snoopy", "trained"),
                                                              ("vangogh", "trained")]
    for r in first.results:
        membrane = load_membrane(r.membrane)
        assert membrane.name == r.concept and membrane.num_layers == 48
        assert membrane.extra["iterations"] == "4"
        assert r.loss is not None and r.loss == pytest.approx(r.erase + 1000.0 * r.anchor, rel=1e-4)
    assert os.path.exists(first.manifest) and os.path.exists(tmp_path / "run1" / "summary.md")
    # nothing left behind: checkpoints of finished packs are removed
    assert not os.listdir(tmp_path / "store" / "checkpoints")
    ray.shutdown()
    again = train(cfg, run_dir=str(tmp_path / "run2"))
    assert [r.status for r in again.results] == ["cached"] * 3
    assert not ray.is_initialized()  # nothing to schedule, no cluster needed
    assert [r.membrane for r in again.results] == [r.membrane for r in first.results]


def test_a_sweep_runs_its_points_concurrently(tmp_path, ray_shutdown):
    cfg = compose(tmp_path, "cluster.num_cpus=4", "trainer.iterations=30", "trainer.checkpoint_every=0",
                  "+sweep.lr=[1e-3,2e-3]", "+sweep.guidance_scale=[1.0,2.0]",
                  "concepts.concepts=[{name: cat, target: a photo of a cat}]")
    summary = train(cfg, run_dir=str(tmp_path / "run"))
    assert len(summary.results) == 4 and {r.status for r in summary.results} == {"trained"}
    assert len({r.point_id for r in summary.results}) == 4
    assert len({r.job_id for r in summary.results}) == 4
    # a trainer field and a concept field: each membrane records the erase strength it was trained with
    for r in summary.results:
        membrane = load_membrane(r.membrane)
        assert json.loads(membrane.extra["concept"])["guidance_scale"] == r.point["guidance_scale"]
        assert float(membrane.trainer["lr"]) == r.point["lr"]
    intervals = [(r.started, r.finished) for r in summary.results]
    # at the moment the last job started, how many were still running?
    last_start = max(s for s, _ in intervals)
    overlapping = sum(s <= last_start < f for s, f in intervals)
    earliest_end = min(f for _, f in intervals)
    concurrent = sum(s < earliest_end for s, _ in intervals)
    assert max(overlapping, concurrent) >= 2, intervals


def test_a_failing_concept_is_reported_and_the_others_finish(tmp_path, ray_shutdown):
    concepts = ("concepts.concepts=[{name: cat, target: a photo of a cat}, "
                "{name: broken, target: snoopy, guidance_scale: 1e30}, {name: dog, target: a dog}]")
    cfg = compose(tmp_path, "cluster.num_cpus=2", concepts)
    summary = train(cfg, run_dir=str(tmp_path / "run"))
    status = {r.concept: r for r in summary.results}
    assert status["cat"].status == status["dog"].status == "trained"
    assert status["broken"].status == "failed"
    assert "TrainingDivergedError" in status["broken"].error and "broken" in status["broken"].error
    # the pack of three was split, so cat and dog trained in their own jobs
    assert status["cat"].job_id != status["dog"].job_id


@pytest.mark.parametrize("overrides, message", [
    (["trainer.lr=-0.1"], "lr must be > 0"),
    (["concepts.concepts=[{name: cat}]"], "has no target"),
    (["concepts.concepts=[{name: cat, target: '  '}]"], "target prompt is empty"),
    (["concepts.concepts=[]"], "the concept set is empty"),
    (["concepts.concepts=[{name: cat, target: cat, trainer: {speed: 2}}]"], "unknown key 'speed'"),
    (["cluster.address=127.0.0.1:9"], "cannot reach the Ray cluster at '127.0.0.1:9'"),
    (["model.source=/nonexistent/model"], "does not exist"),
])
def test_bad_configs_fail_before_any_job_starts(tmp_path, overrides, message):
    from spm_train.errors import ModelLoadError

    cfg = compose(tmp_path, *overrides)
    with pytest.raises((ConfigError, ClusterError, ModelLoadError), match=message) as err:
        train(cfg, run_dir=str(tmp_path / "run"))
    assert "\n" not in str(err.value)
    assert not ray.is_initialized()
    assert not (tmp_path / "store").exists() or not os.listdir(tmp_path / "store")


def test_hydra_rejects_unknown_keys_wrong_types_and_unknown_sets(tmp_path):
    from hydra.errors import ConfigCompositionException, MissingConfigException

    with pytest.raises(ConfigCompositionException, match="trainer.speed"):
        compose(tmp_path, "trainer.speed=2")
    with pytest.raises(ConfigCompositionException, match="trainer.iterations"):
        compose(tmp_path, "trainer.iterations=many")
    with pytest.raises(MissingConfigException, match="concepts/nope"):
        compose(tmp_path, "concepts=nope")


def test_every_shipped_config_composes(tmp_path):
    """Every group option loads against the schema, and every concept set validates."""
    from pathlib import Path

    from pipelines.bulk_train import _setup_concepts, _setup_trainer

    conf = Path(__file__).resolve().parents[2] / "conf"
    for group in ("model", "concepts", "trainer", "cluster", "tracking", "registry", "eval", "sweep"):
        for option in sorted((conf / group).glob("*.yaml")):
            cfg = compose(tmp_path, f"{group}={option.stem}")
            if group == "concepts":
                assert len(_setup_concepts(cfg)) >= 1
            if group == "trainer":
                _setup_trainer(cfg)
    paper = _setup_trainer(compose(tmp_path, "trainer=paper"))
    assert (paper.lr, paper.iterations, paper.lr_cycles) == (1e-4, 3000, 3)
    chars = {c.name for c in _setup_concepts(compose(tmp_path, "concepts=characters"))}
    assert chars == {"snoopy", "mickey", "spongebob", "pikachu", "donald-duck", "cat"}
    surrogate = _setup_concepts(compose(tmp_path, "concepts=surrogates"))[0]
    assert (surrogate.target, surrogate.neutral_prompt) == ("wonder woman", "gal gadot")


def test_plan_groups_concepts_into_packs(tmp_path):
    plan = plan_run(compose(tmp_path, "cluster.pack_size=2"))
    assert sorted(len(j.tasks) for j in plan.jobs) == [1, 2]
    assert plan.family == "sd1" and len(plan.base_fingerprint) == 16
    assert torch.is_tensor(torch.zeros(1))


@pytest.mark.skipif(not parallel.deepspeed_available(), reason="DeepSpeed is an optional extra (make deepspeed)")
def test_packs_train_under_a_deepspeed_config(tmp_path, ray_shutdown):
    cfg = compose(tmp_path, "cluster.num_cpus=2", "cluster.deepspeed=zero2", "cluster.pack_size=3")
    summary = train(cfg, run_dir=str(tmp_path / "run"))
    assert [r.status for r in summary.results] == ["trained"] * 3, [r.error for r in summary.results]
    with pytest.raises(ConfigError, match="deepspeed config 'zero9' not found"):
        plan_run(compose(tmp_path, "cluster.deepspeed=zero9"))


def test_a_deepspeed_config_without_deepspeed_installed_is_refused_before_any_job(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "deepspeed_available", lambda: False)
    with pytest.raises(ConfigError, match=r"cluster.deepspeed=zero2: DeepSpeed is not installed.*make deepspeed"):
        plan_run(compose(tmp_path, "cluster.deepspeed=zero2"))
    assert not os.path.exists(tmp_path / "store")


def test_pack_size_zero_sizes_packs_on_the_worker(tmp_path, ray_shutdown):
    plan = plan_run(compose(tmp_path, "cluster.pack_size=0", "cluster.max_pack_size=8"))
    assert plan.cluster.auto_pack and [len(j.tasks) for j in plan.jobs] == [3]
    summary = train(compose(tmp_path, "cluster.num_cpus=2", "cluster.pack_size=0"), run_dir=str(tmp_path / "r"))
    assert [r.status for r in summary.results] == ["trained"] * 3  # on CPU: the whole job as one pack
