"""Hygiene (issue 13, items 14-17): blobs checked where they are used, files a team can share, files
kept under SPM_HOME, and a failed pack's own log shown with its failure."""

import logging
import os
import pickle
import stat

import pytest
import torch

from spm_train import ConceptSpec, TrainerConfig
from spm_train.bulk import runner
from spm_train.bulk.plan import expand, pack
from spm_train.bulk.store import ConceptResult, ResultStore
from spm_train.errors import ConfigError
from spm_train.membrane import Membrane
from spm_train.registry import Registry, RegistryError, ValidationReport
from tests.registry.conftest import make_membrane, run_cli

PASSED = ValidationReport(structural="passed", behavioural="passed")


@pytest.fixture
def membrane_path(tmp_path, sd1_pipe):
    from spm_train.models import base_fingerprint

    path = tmp_path / "src" / "snoopy.safetensors"
    make_membrane(sd1_pipe, "snoopy", 0, base_fingerprint(sd1_pipe.unet)).save(str(path))
    return str(path)


# -- item 14: promote and show check the blob; a cached rerun repairs it -----------------------------


def test_promote_refuses_and_show_reports_a_missing_or_altered_blob(tmp_path, membrane_path):
    reg = Registry.open(tmp_path / "reg")
    v = reg.register(membrane_path, concept="snoopy", validation=PASSED)
    blob = reg.blobs.url_of(v.sha256)
    root = str(tmp_path / "reg")
    assert "blob:     intact" in run_cli("--root", root, "show", "snoopy").stdout
    with open(blob, "ab") as fh:
        fh.write(b"x")
    with pytest.raises(RegistryError, match="registry recorded"):
        reg.promote(v.ref, "production")
    shown = run_cli("--root", root, "show", "snoopy")
    assert shown.returncode == 1 and "blob:     PROBLEM: snoopy:v1: blob" in shown.stdout
    os.remove(blob)
    assert "is missing" in run_cli("--root", root, "promote", "snoopy:v1", "candidate").stderr
    assert reg.resolve("snoopy").aliases == ["latest"]


def test_a_cached_rerun_repairs_and_reports_a_missing_blob(tmp_path, membrane_path, caplog):
    from spm_train.registry import publish_results

    reg = Registry.open(tmp_path / "reg")
    v = reg.register(membrane_path, concept="snoopy", validation=PASSED)
    os.remove(reg.blobs.url_of(v.sha256))
    cached = ConceptResult(concept="snoopy", key="k", point={}, point_id="default", status="cached",
                           membrane=membrane_path)
    with caplog.at_level(logging.WARNING, logger="spm_train.registry.core"):
        publish_results([cached], concepts=[ConceptSpec("snoopy", "snoopy")], trainer=TrainerConfig(),
                        model={"source": "random:sd1"}, family="sd1", base_fingerprint="",
                        registry={"enabled": True, "uri": str(tmp_path / "reg")}, tracking={"backend": "disabled"},
                        root=str(tmp_path))
    assert "snoopy:v1: blob" in caplog.text and "is missing; restoring it" in caplog.text
    assert reg.verify() == [] and cached.status == "cached"


# -- item 15: files follow the umask, so a team's shared store is readable --------------------------


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_store_membranes_results_and_checkpoints_follow_the_umask(tmp_path, fresh_sd1, umask_022):
    from spm_train.training import train_membranes

    store = ResultStore(tmp_path / "store")
    weights = {"lora_unet_x": (torch.ones(1, 4), torch.ones(4, 1))}
    store.put(ConceptResult(concept="a", key="k", point={}, point_id="default", status="trained"),
              Membrane(weights=weights, rank=1, alpha=1.0))
    checkpoints = tmp_path / "ckpt"
    train_membranes(fresh_sd1, [ConceptSpec("a", "a photo of a cat")],
                    TrainerConfig.preset("smoke", iterations=2, checkpoint_every=1), checkpoint_dir=str(checkpoints),
                    progress=False)
    for path in (tmp_path / "store" / "results" / "k" / "membrane.safetensors",
                 tmp_path / "store" / "results" / "k" / "result.json", checkpoints / "checkpoint.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# -- item 16: W&B's own folders go under the run's folder -------------------------------------------


def test_wandb_staging_and_caches_are_kept_under_the_tracking_folder(tmp_path, monkeypatch):
    from spm_train.tracking import open_tracker

    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    seen = {}
    with open_tracker({"backend": "wandb", "mode": "offline", "dir": str(tmp_path)}, root=str(tmp_path)) as t:
        seen = {name: os.environ.get(name, "") for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR")}
        t.log_metrics({"x": 1.0})
    assert all(value.startswith(str(tmp_path / "wandb-home")) for value in seen.values()), seen
    assert "WANDB_DATA_DIR" not in os.environ  # the user's environment is as it was afterwards


def test_a_local_ray_session_goes_under_the_given_folder_when_sockets_allow(tmp_path, monkeypatch):
    import ray

    from spm_train.bulk.runner import ClusterOptions, connect

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    connect(ClusterOptions(num_cpus=1), temp_dir="/tmp/spm-home/ray")
    long = str(tmp_path / ("x" * 40) / "ray")  # Ray's socket paths would pass 107 characters
    connect(ClusterOptions(num_cpus=1), temp_dir=long)
    assert calls[0]["_temp_dir"] == "/tmp/spm-home/ray" and "_temp_dir" not in calls[1]


# -- item 17: a failed pack shows the worker's last log lines ---------------------------------------


def test_a_failed_pack_carries_and_shows_the_workers_last_log_lines(tmp_path, monkeypatch, caplog):
    job = pack(expand([ConceptSpec("a", "a cat")], TrainerConfig.preset("smoke"), {}, "fp"), 1)[0]
    work_log = logging.getLogger("spm_train.training")

    def failing(*args, **kwargs):
        work_log.info("loaded the base model in 3.2s")
        work_log.warning("step 2: the loss is 1e12")
        raise ConfigError("pack", ["the optimizer refused the learning rate"])

    monkeypatch.setattr(runner, "_load_base", lambda model: None)
    monkeypatch.setattr(runner, "_train_parts", failing)
    with pytest.raises(ConfigError) as info:
        runner.train_pack(job, {"source": "random:sd1"}, str(tmp_path / "store"))
    shipped = pickle.loads(pickle.dumps(info.value))  # as Ray hands it to the driver
    assert runner.worker_log(shipped)[-2:] == ["INFO spm_train.training: loaded the base model in 3.2s",
                                               "WARNING spm_train.training: step 2: the loss is 1e12"]
    with caplog.at_level(logging.ERROR, logger="spm_train.bulk.runner"):
        runner._failed(job, shipped)
    assert "the worker's last log lines" in caplog.text and "the loss is 1e12" in caplog.text
